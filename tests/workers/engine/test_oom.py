"""Out of memory reads as out of memory, in every phase of a run, with the run's estimate and what to change.

The RAM cases fail for real: the engine's command line runs in a child process whose address space is limited
(``RLIMIT_AS``), so torch's CPU allocator itself refuses. CUDA's ``OutOfMemoryError`` cannot happen without a
GPU, so it is raised from inside a real forward pass (a forward hook on the model the engine loaded).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from workers.engine import run_setup, teachers
from workers.engine.errors import TrainingError
from workers.engine.memory import estimate_run_memory, size_text
from workers.engine.out_of_memory import host_memory_bytes
from workers.engine.trainer import train

REPO = Path(__file__).resolve().parents[3]
# Address space the child may add once torch and the engine are imported: a small digits run needs about
# 0.5 GiB of it (the lazily imported libraries, the data, threads).
HEADROOM_BYTES = int(1.6 * 1024**3)
# Limits the child's address space to what it uses after its imports plus the headroom, then runs the CLI.
LIMITED_CLI = f"""
import re, resource, sys
import torch, workers.engine.trainer
from workers.engine.__main__ import main
size = int(re.search(r"VmSize:\\s+(\\d+) kB", open("/proc/self/status").read())[1]) * 1024
resource.setrlimit(resource.RLIMIT_AS, (size + {HEADROOM_BYTES}, resource.RLIM_INFINITY))
sys.exit(main(sys.argv[1:]))
"""


def mlp_run(output_dir: Path, hidden_sizes: list[int]) -> dict:
    return {
        "student": {"source": "builtin", "name": "mlp", "params": {"hidden_sizes": hidden_sizes}},
        "dataset": {"source": "builtin", "name": "digits"},
        "terms": [{"name": "ce"}],
        "scheme": "hard_labels",
        "train": {
            "max_steps": 3,
            "batch_size": 32,
            "log_every": 1,
            "eval_every": 1000,
            "save_every": 1000,
            "device": "cpu",
        },
        "output_dir": str(output_dir),
    }


def run_limited_cli(tmp_path: Path, config: dict) -> subprocess.CompletedProcess:
    if not Path("/proc/self/status").exists():
        pytest.skip("reads the address space size from /proc")
    path = tmp_path / "run.json"
    path.write_text(json.dumps(config))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-c", LIMITED_CLI, "run", str(path)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def approx(n_bytes: int) -> str:
    return f"~{size_text(n_bytes)}" if n_bytes >= 1024**2 else size_text(n_bytes)


def ram_estimate_text(config: dict) -> str:
    return f"{approx(estimate_run_memory(config).model_bytes)} of RAM"


@pytest.mark.parametrize(
    ("hidden_sizes", "during"),
    [
        # 0.6 GiB of weights load; their gradients and AdamW states (1.7 GiB more) do not fit
        ([12000, 12000], "at step 1"),
        # 6 GiB of weights cannot even be built
        ([40000, 40000], "while loading the student"),
    ],
)
def test_the_cpu_allocator_failing_is_reported_as_out_of_memory_with_the_estimate(
    tmp_path, hidden_sizes, during
):
    config = mlp_run(tmp_path / "out", hidden_sizes)
    done = run_limited_cli(tmp_path, config)
    assert done.returncode == 2, done.stderr[-3000:]
    error = done.stderr[done.stderr.index("error: ") :]
    assert error.startswith(
        f"error: Out of memory (RAM) {during}. The run's estimate is "
        f"{ram_estimate_text(config)}: AdamW states"
    ), error
    assert f"this machine has {size_text(host_memory_bytes())}" in error
    assert "a smaller batch size (now 32; batch size 16 with 2 gradient accumulation steps" in error
    assert "a GPU queue" in error
    assert "Traceback" not in done.stderr and "DefaultCPUAllocator" not in error
    assert not (tmp_path / "out" / "final").exists()


# --- CUDA out of memory, raised from inside real forward passes ---------------------------------------------
def fail_forward(monkeypatch, *, role: str, when, exc: BaseException | None = None) -> None:
    """Models of ``role`` that the engine loads raise ``exc`` (CUDA OOM by default) from their forward pass
    whenever ``when(module)`` holds."""
    real_load_model = run_setup.load_model

    def load_model(*args, **kwargs):
        loaded = real_load_model(*args, **kwargs)
        if kwargs.get("role") == role:

            def hook(module, _inputs, _output):
                if when(module):
                    raise exc or torch.OutOfMemoryError(
                        "CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 23.64 GiB total capacity)"
                    )

            loaded.model.register_forward_hook(hook)
        return loaded

    monkeypatch.setattr(teachers if role == "teacher" else run_setup, "load_model", load_model)


def gpu_estimate_text(cfg) -> str:
    return f"{approx(estimate_run_memory(cfg.to_dict()).total_bytes)} of GPU memory"


def training(module) -> bool:
    return module.training


def evaluating(module) -> bool:
    return not module.training


def always(_module) -> bool:
    return True


def test_cuda_out_of_memory_in_a_training_step_names_the_step_the_estimate_and_the_changes(
    tmp_path, digits_run, monkeypatch
):
    cfg = digits_run(tmp_path, train={"max_steps": 4})
    fail_forward(monkeypatch, role="student", when=training)
    with pytest.raises(TrainingError) as exc:
        train(cfg)
    message = str(exc.value)
    assert message.startswith(
        f"Out of GPU memory at step 1. The run's estimate is {gpu_estimate_text(cfg)}: "
    )
    assert (
        "a smaller batch size (now 32; batch size 16 with 2 gradient accumulation steps trains on the "
        "same 32 rows per step)" in message
    )
    assert "a queue with a bigger GPU" in message
    assert isinstance(exc.value.__cause__, torch.OutOfMemoryError)


def test_cuda_out_of_memory_while_evaluating_says_so(tmp_path, digits_run, monkeypatch):
    cfg = digits_run(tmp_path, train={"max_steps": 3})
    fail_forward(monkeypatch, role="student", when=evaluating)
    with pytest.raises(TrainingError) as exc:
        train(cfg)
    assert str(exc.value).startswith(
        f"Out of GPU memory while evaluating the student. The run's estimate is {gpu_estimate_text(cfg)}"
    )


def test_cuda_out_of_memory_in_the_teacher_s_cache_fill_says_so(
    tmp_path, digits_run, digits_teacher, monkeypatch
):
    cfg = digits_run(
        tmp_path,
        scheme="offline",
        terms=[{"name": "kd"}, {"name": "ce"}],
        teacher={"source": "run", "path": str(digits_teacher)},
        cache_dir=str(tmp_path / "cache"),
    )
    fail_forward(monkeypatch, role="teacher", when=always)
    with pytest.raises(TrainingError) as exc:
        train(cfg)
    assert str(exc.value).startswith(
        "Out of GPU memory while the teacher computed its outputs on the train split. "
        f"The run's estimate is {gpu_estimate_text(cfg)}: "
    )


def test_cuda_out_of_memory_in_an_online_teacher_forward_names_the_step(
    tmp_path, digits_run, digits_teacher, monkeypatch
):
    cfg = digits_run(
        tmp_path,
        scheme="online",
        terms=[{"name": "kd"}, {"name": "ce"}],
        teacher={"source": "run", "path": str(digits_teacher)},
    )
    fail_forward(monkeypatch, role="teacher", when=always)
    with pytest.raises(TrainingError) as exc:
        train(cfg)
    assert str(exc.value).startswith("Out of GPU memory at step 1. The run's estimate is ")


def test_out_of_memory_while_loading_the_teacher_says_so(tmp_path, digits_run, digits_teacher, monkeypatch):
    cfg = digits_run(
        tmp_path,
        scheme="online",
        terms=[{"name": "kd"}, {"name": "ce"}],
        teacher={"source": "run", "path": str(digits_teacher)},
    )
    real_load_model = run_setup.load_model

    def load_model(*args, **kwargs):
        if kwargs.get("role") == "teacher":
            raise RuntimeError(
                "[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: not enough memory: "
                "you tried to allocate 1073741824 bytes."
            )
        return real_load_model(*args, **kwargs)

    monkeypatch.setattr(teachers, "load_model", load_model)
    with pytest.raises(TrainingError) as exc:
        train(cfg)
    assert str(exc.value).startswith(
        f"Out of memory (RAM) while loading the teacher. The run's estimate is "
        f"{ram_estimate_text(cfg.to_dict())}: "
    )
    assert "of RAM" in str(exc.value) and "a GPU queue" in str(exc.value)


def test_python_memory_error_in_a_step_is_out_of_memory_too(tmp_path, digits_run, monkeypatch):
    cfg = digits_run(tmp_path)
    fail_forward(monkeypatch, role="student", when=training, exc=MemoryError())
    with pytest.raises(TrainingError) as exc:
        train(cfg)
    assert str(exc.value).startswith(
        f"Out of memory (RAM) at step 1. The run's estimate is {ram_estimate_text(cfg.to_dict())}: "
    )
