"""The per-rank memory estimate (workers/engine/memory.py) against what real runs hold on the CPU: one
process, two ranks with DDP and with FSDP2, LoRA, and activation checkpointing, each run as the product runs
it (``python -m workers.engine run``, under torchrun for two ranks).

Measured: rank 0's peak resident set (``VmHWM``) at the end of the last training step (read by its progress
callback, before anything is saved or evaluated: the estimate covers training), less the same figure for the
same run with a tiny student (what every run holds whatever its model: torch, transformers, peft, the
process group, the data, the tokenizer). Estimated: the run's per-rank figure less the tiny run's (the CUDA
context left out).

Tolerance: within a factor of 1.5 either way (measured here: 0.73-1.07 of the estimate, checkpointing the
lowest: the estimate keeps one whole block's activations while the recomputation frees them as it goes). The
runs are fp32 on the CPU and glibc is told to return freed blocks (as multi-rank runs do), so the resident set
follows the live tensors; a wrong sharding, a teacher or LoRA counted wrongly, or bf16 activations assumed on
a CPU move the ratio by 2x or more.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests import waiting
from workers.engine.memory import estimate_run_memory

ROOT = Path(__file__).resolve().parents[3]
FACTOR = 1.5
STUDENT = {
    "model_type": "llama",
    "hidden_size": 384,
    "num_hidden_layers": 6,
    "num_attention_heads": 6,
    "num_key_value_heads": 6,
    "intermediate_size": 1024,
    "vocab_size": 8192,
    "max_position_embeddings": 128,
}
TINY = {**STUDENT, "hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
        "num_key_value_heads": 2, "intermediate_size": 64}
CASES = {
    "one process": ({}, 1),
    "two ranks, DDP": ({"processes": 2, "strategy": "ddp"}, 2),
    "two ranks, FSDP2": ({"processes": 2, "strategy": "fsdp"}, 2),
    "LoRA r=8": ({"lora_r": 8, "lora_alpha": 16}, 1),
    "activation checkpointing": ({"activation_checkpointing": True}, 1),
}


# Rank 0's callbacks: at the last step, write the process's peak resident set so far, then stop the run (a
# stopped run saves a checkpoint and evaluates nothing).
REPORTER = """
import os
from pathlib import Path
from workers.engine.trainer import Callbacks
def factory(cfg):
    done = [0]
    def on_progress(step, total):
        done[0] = step
        if step == int(os.environ["DW_TEST_PEAK_AT"]):
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    Path(os.environ["DW_TEST_PEAK"]).write_text(line.split()[1])
    stop_at = int(os.environ["DW_TEST_PEAK_AT"])
    return Callbacks(on_progress=on_progress, should_stop=lambda: done[0] >= stop_at)
"""
STEPS = 3


def _training_peak_kib(command: list[str], work: Path, name: str) -> int:
    peak = work / f"{name}.peak"
    env = os.environ | {
        "OMP_NUM_THREADS": "1",
        # glibc serves every block of 128 KiB or more from its own mapping, returned when freed (what the
        # engine sets on multi-rank runs), so the resident set follows the live tensors, not the heap's
        # high-water mark
        "MALLOC_MMAP_THRESHOLD_": "131072",
        "PYTHONPATH": os.pathsep.join([str(work), str(ROOT)]),
        "DW_TEST_PEAK": str(peak),
        "DW_TEST_PEAK_AT": str(STEPS),
    }
    done = subprocess.run(
        [*command, "--callbacks", "dw_test_peak:factory"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=False,
        timeout=waiting.scaled(600),
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return int(peak.read_text())


def _probe():
    path = ROOT / "benchmarks" / "distributed_memory.py"
    spec = importlib.util.spec_from_file_location("distributed_memory", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def measured(tmp_path_factory) -> dict[str, tuple[float, float]]:
    """(measured MiB, estimated MiB) per case."""
    probe = _probe()
    work = tmp_path_factory.mktemp("memory")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    (work / "dw_test_peak.py").write_text(REPORTER)
    out = {}
    for name, (train, ranks) in CASES.items():
        mib = []
        for size, student in (("tiny", TINY), ("full", STUDENT)):
            slug = f"{size}-" + name.replace(" ", "-").replace(",", "").replace("=", "")
            path = probe.config(work, slug, steps=STEPS + 1, batch_size=8, **train)
            data = json.loads(path.read_text())
            data["student"]["params"] = student
            data["dataset"]["max_length"] = 128
            data["train"]["log_every"] = 1
            path.write_text(json.dumps(data))
            launcher = torchrun if ranks > 1 else [sys.executable]
            peak = _training_peak_kib([*launcher, "-m", "workers.engine", "run", str(path)], work, slug)
            mib.append((peak / 1024, estimate_run_memory(data, on_cpu=True).model_bytes / 2**20))
        (tiny_got, tiny_estimate), (got, estimate) = mib
        out[name] = (got - tiny_got, estimate - tiny_estimate)
    print({name: f"{m:.0f} MiB measured / {e:.0f} MiB estimated" for name, (m, e) in out.items()})
    return out


@pytest.mark.parametrize("case", list(CASES))
def test_the_per_rank_estimate_is_within_the_stated_factor_of_the_measured_peak(measured, case):
    got, estimate = measured[case]
    assert estimate / FACTOR <= got <= estimate * FACTOR, f"{case}: {got:.0f} MiB vs {estimate:.0f} estimated"


def test_the_estimate_orders_the_cases_as_the_measurements_do(measured):
    """FSDP2 holds less per rank than DDP and one process; LoRA and checkpointing less than full training."""
    mib = {name: got for name, (got, _) in measured.items()}
    assert mib["two ranks, FSDP2"] < 0.8 * mib["two ranks, DDP"]
    assert mib["LoRA r=8"] < 0.8 * mib["one process"]
    assert mib["activation checkpointing"] < mib["one process"]
