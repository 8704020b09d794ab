"""Multi-process runs on CPU: real torchrun launches (2 ranks, gloo) of ``python -m workers.engine run``
compared with the one-process run at the same global batch, and the launches the engine refuses."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from workers.engine.config import RunConfig
from workers.engine.errors import ConfigError
from workers.engine.trainer import Callbacks, train

ROOT = Path(__file__).resolve().parents[3]
LAUNCH_TIMEOUT_S = float(os.environ.get("DISTILLWEB_TEST_TORCHRUN_TIMEOUT_S", "240"))
# fp32 on CPU: the ranks sum their halves of the batch and average the gradients, the one-process run sums
# the whole batch at once. Only the order of the float additions differs (~1e-7 relative per reduction; the
# curves measured here differ by at most 1.1e-7 relative, the final weights by at most 4e-6); 1e-5 relative
# leaves room for that and still catches any real difference (a wrong row split or loss scale moves the loss
# by 1e-2 or more).
LOSS_RTOL = 1e-5
WEIGHT_ATOL = 1e-4

# Rank 0's reporter for a torchrun launch: every metric and checkpoint, one JSON line per call; it asks the
# run to stop once DW_TEST_STOP_AT steps are done.
REPORTER = """
import json, os
from workers.engine.trainer import Callbacks

def factory(cfg):
    done = [0]

    def write(*record):
        with open(os.environ["DW_TEST_METRICS"], "a") as f:
            f.write(json.dumps(list(record)) + "\\n")

    def on_progress(step, total):
        done[0] = step

    def should_stop():
        return done[0] >= int(os.environ.get("DW_TEST_STOP_AT", "1000000"))

    return Callbacks(
        on_metrics=lambda step, metrics: write(step, metrics),
        on_progress=on_progress,
        on_checkpoint=lambda step, path: write("checkpoint", step, path),
        should_stop=should_stop,
    )
"""

# A torchrun entry point that runs the engine and records, per rank, the devices of the student's parameters
# as load_model built them.
BUILD_PROBE = """
import json, os, sys
import workers.engine.run_setup as run_setup
from workers.engine.__main__ import main

build = run_setup.load_model

def load_model(*args, **kwargs):
    loaded = build(*args, **kwargs)
    with open(os.environ["DW_TEST_DEVICES"], "a") as f:
        devices = sorted({p.device.type for p in loaded.model.parameters()})
        f.write(json.dumps([int(os.environ["RANK"]), devices]) + "\\n")
    return loaded

run_setup.load_model = load_model
sys.exit(main(sys.argv[1:]))
"""

TINY_LLAMA = {
    "model_type": "llama",
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 2,
    "intermediate_size": 64,
    "vocab_size": 128,
    "max_position_embeddings": 64,
}
_SENTENCES = [
    "the cat sat on the mat and looked at the bird",
    "a dog ran to the park to play with a red ball",
    "the sun was warm and the sky was blue today",
    "she read a short book about the sea and ships",
    "we ate bread and soup by the fire",
    "the old man told a story",
]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Sentences of different lengths, so the ranks' batches hold different numbers of tokens."""
    path = tmp_path_factory.mktemp("dist-lm") / "corpus.txt"
    path.write_text("\n".join(f"{s} {i % 9}" for i in range(8) for s in _SENTENCES) + "\n")
    return path


def _config(kind: str, output_dir: Path, corpus: Path | None = None, **train: Any) -> dict[str, Any]:
    common = {"lr": 1e-2, "log_every": 1, "eval_every": 1000, "save_every": 1000, "seed": 0, "device": "cpu"}
    if kind == "mlp":
        return {
            "student": {"source": "builtin", "name": "mlp", "params": {"hidden_sizes": [32]}},
            "dataset": {"source": "builtin", "name": "digits"},
            "terms": [{"name": "ce"}],
            "scheme": "hard_labels",
            "train": {"max_steps": 5, "batch_size": 16, **common, **train},
            "output_dir": str(output_dir),
        }
    return {
        "student": {"source": "config", "params": TINY_LLAMA},
        "task": "causal_lm",
        "dataset": {"source": "hf", "path": str(corpus), "max_length": 20},
        "terms": [{"name": "ce"}],
        "scheme": "hard_labels",
        "train": {"max_steps": 4, "batch_size": 8, **common, "lr": 3e-3, **train},
        "output_dir": str(output_dir),
        "cache_dir": str(output_dir.parent / "cache"),
    }


def _one_process(data: dict[str, Any]) -> tuple[list[float], Path]:
    metrics: list[tuple[int, dict[str, float]]] = []
    result = train(RunConfig.from_dict(data), Callbacks(on_metrics=lambda s, m: metrics.append((s, m))))
    return [m["loss"] for _, m in metrics if "loss" in m], Path(result.final_dir)


def _torchrun(
    tmp_path: Path,
    data: dict[str, Any],
    *,
    ranks: int = 2,
    args: tuple[str, ...] = (),
    entry: tuple[str, ...] = ("-m", "workers.engine"),
    **env: str,
) -> subprocess.CompletedProcess:
    config = tmp_path / f"{Path(data['output_dir']).name}.json"
    config.write_text(json.dumps(data))
    (tmp_path / "dw_test_reporter.py").write_text(REPORTER)
    env = os.environ | {
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT)]),
        "DW_TEST_METRICS": str(tmp_path / "metrics.jsonl"),
        "DISTILLWEB_COLLECTIVE_TIMEOUT_S": "120",
        **env,
    }
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}"]
    command += [*entry, "run", str(config), "--callbacks", "dw_test_reporter:factory", *args]
    return subprocess.run(
        command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT_S, check=False
    )


def _records(tmp_path: Path) -> list[list[Any]]:
    path = tmp_path / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _losses(tmp_path: Path) -> list[float]:
    return [r[1]["loss"] for r in _records(tmp_path) if isinstance(r[1], dict) and "loss" in r[1]]


def _checkpoints(tmp_path: Path) -> list[tuple[int, str]]:
    return [(r[1], r[2]) for r in _records(tmp_path) if r[0] == "checkpoint"]


def _same_weights(a: Path, b: Path) -> None:
    left, right = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert left.keys() == right.keys()
    for name in left:
        assert torch.allclose(left[name], right[name], atol=WEIGHT_ATOL, rtol=0), name


@pytest.mark.parametrize(
    ("kind", "strategy", "accum"),
    [
        ("mlp", "ddp", 1),
        ("mlp", "fsdp", 1),
        ("mlp", "fsdp", 2),
        ("lm", "ddp", 1),
        ("lm", "fsdp", 1),
        ("lm", "ddp", 2),
    ],
)
def test_two_ranks_follow_the_one_process_curve_at_the_same_global_batch(
    tmp_path, corpus, kind, strategy, accum
):
    reference, reference_final = _one_process(_config(kind, tmp_path / "one", corpus, grad_accum_steps=accum))
    data = _config(kind, tmp_path / "two", corpus, grad_accum_steps=accum, processes=2, strategy=strategy)
    launched = _torchrun(tmp_path, data, args=("--result-json", str(tmp_path / "result.json")))

    assert launched.returncode == 0, launched.stderr[-4000:]
    assert launched.stdout.count("final model:") == 1  # rank 0 alone prints
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["steps"] == data["train"]["max_steps"] and result["student"]
    losses = _losses(tmp_path)
    assert len(losses) == len(reference) == data["train"]["max_steps"]
    assert losses == pytest.approx(reference, rel=LOSS_RTOL)
    # The full (unsharded) student, in the one-process format.
    two_final = Path(data["output_dir"]) / "final"
    assert (two_final / "distillweb_model.json").is_file()
    _same_weights(two_final, reference_final)


def test_a_world_size_other_than_the_runs_is_refused(tmp_path, digits_run, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match=r"train.processes = 1.*WORLD_SIZE=2.*--nproc_per_node 1"):
        train(digits_run(tmp_path))
    monkeypatch.delenv("WORLD_SIZE")
    with pytest.raises(ConfigError, match=r"asks for 2 rank.*started with 1 process"):
        train(digits_run(tmp_path, train={"processes": 2}))


def test_a_batch_the_ranks_cannot_share_equally_is_refused(tmp_path, digits_run, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    refused = r"batch size \(15\) must be divisible by the number of ranks \(2\)"
    with pytest.raises(ConfigError, match=refused):
        train(digits_run(tmp_path, train={"processes": 2, "batch_size": 15}))


def test_a_refused_launch_fails_on_every_rank_with_the_message(tmp_path):
    data = _config("mlp", tmp_path / "run", processes=3)
    launched = _torchrun(tmp_path, data, args=("--result-json", str(tmp_path / "result.json")))
    assert launched.returncode != 0
    assert "asks for 3 rank(s)" in launched.stderr and "--nproc_per_node 3" in launched.stderr
    # What a caller that launched the run reads back (rank 0 writes it).
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["error_type"] == "ConfigError" and "asks for 3 rank(s)" in result["error"]


def _resumes_from(source: Path, output_dir: Path) -> None:
    """A new output folder whose only checkpoint is ``source``: the run resumes from it."""
    (output_dir / "checkpoints").mkdir(parents=True)
    shutil.copytree(source, output_dir / "checkpoints" / source.name)


def test_a_two_rank_checkpoint_is_registered_by_rank_0_and_resumes_with_one_process(tmp_path, corpus):
    reference, reference_final = _one_process(_config("lm", tmp_path / "one", corpus))
    data = _config("lm", tmp_path / "two", corpus, processes=2, strategy="fsdp", save_every=2)
    data["keep_checkpoints"] = 5
    launched = _torchrun(tmp_path, data)
    assert launched.returncode == 0, launched.stderr[-4000:]

    registered = _checkpoints(tmp_path)  # once each, by rank 0
    assert [step for step, _ in registered] == [2, 4]
    step_2 = Path(registered[0][1])
    assert (step_2 / "sharded" / ".metadata").is_file() and (step_2 / "trainer_state.json").is_file()
    _resumes_from(step_2, tmp_path / "resumed")
    losses, final = _one_process(_config("lm", tmp_path / "resumed", corpus))
    assert losses == pytest.approx(reference[2:], rel=LOSS_RTOL)  # steps 3 and 4, where the run stopped
    _same_weights(final, reference_final)


def test_a_stop_on_rank_0_stops_every_rank_at_that_step_and_two_ranks_resume(tmp_path):
    reference, _ = _one_process(_config("mlp", tmp_path / "one"))
    data = _config("mlp", tmp_path / "two", processes=2, strategy="fsdp")
    launched = _torchrun(tmp_path, data, DW_TEST_STOP_AT="2")
    assert launched.returncode == 0, launched.stderr[-4000:]
    stopped_at = _checkpoints(tmp_path)
    assert [step for step, _ in stopped_at] == [2]  # should_stop's checkpoint; nothing after it
    assert "final model: None" in launched.stdout

    (tmp_path / "metrics.jsonl").unlink()
    resumed = _config("mlp", tmp_path / "resumed", processes=2, strategy="fsdp")
    _resumes_from(Path(stopped_at[0][1]), tmp_path / "resumed")
    launched = _torchrun(tmp_path, resumed)
    assert launched.returncode == 0, launched.stderr[-4000:]
    assert _losses(tmp_path) == pytest.approx(reference[2:], rel=LOSS_RTOL)


@pytest.mark.parametrize("scheme", ["offline", "online"])
def test_distillation_with_two_ranks_follows_the_one_process_curve(tmp_path, digits_teacher, scheme):
    """Offline: each rank reads its own rows of the teacher-output cache; online: the teacher is replicated
    on every rank, frozen."""

    def config(name: str, **train: Any) -> dict[str, Any]:
        return _config("mlp", tmp_path / name, **train) | {
            "teacher": {"source": "run", "path": str(digits_teacher)},
            "terms": [
                {"name": "ce", "weight": 0.1},
                {"name": "kd", "weight": 0.9, "params": {"temperature": 4.0}},
            ],
            "scheme": scheme,
            "cache_dir": str(tmp_path / f"cache-{name}"),
        }

    reference, _ = _one_process(config("one"))
    launched = _torchrun(tmp_path, config("two", processes=2, strategy="ddp"))
    assert launched.returncode == 0, launched.stderr[-4000:]
    assert _losses(tmp_path) == pytest.approx(reference, rel=LOSS_RTOL)


def test_bf16_parameters_and_activation_checkpointing_on_sharded_ranks_stay_near_the_fp32_curve(
    tmp_path, corpus
):
    reference, _ = _one_process(_config("lm", tmp_path / "one", corpus))
    data = _config(
        "lm", tmp_path / "two", corpus, processes=2, precision="bf16", activation_checkpointing=True
    )  # strategy auto: fsdp with several ranks
    launched = _torchrun(tmp_path, data)
    assert launched.returncode == 0, launched.stderr[-4000:]
    # bf16 keeps 8 bits of mantissa: each loss within 1% of the fp32 run's (they differ by ~1e-4 here).
    assert _losses(tmp_path) == pytest.approx(reference, rel=1e-2)


@pytest.mark.parametrize("tied", [False, True])
def test_only_rank_0_builds_the_full_sharded_student_and_the_others_follow_it(tmp_path, corpus, tied):
    """FSDP: rank 0 builds the randomly initialised student, the other ranks build it on the meta device and
    receive their shards of rank 0's weights (and its buffers: the rotary frequencies), so the run still
    follows the one-process curve to the same final weights."""
    llama = TINY_LLAMA | {"tie_word_embeddings": tied}

    def config(name: str, **train: Any) -> dict[str, Any]:
        data = _config("lm", tmp_path / name, corpus, **train)
        data["student"]["params"] = llama
        return data

    reference, reference_final = _one_process(config("one"))
    data = config("two", processes=2, strategy="fsdp")
    (tmp_path / "dw_build_probe.py").write_text(BUILD_PROBE)
    devices = tmp_path / "devices.jsonl"
    launched = _torchrun(
        tmp_path, data, entry=(str(tmp_path / "dw_build_probe.py"),), DW_TEST_DEVICES=str(devices)
    )
    assert launched.returncode == 0, launched.stderr[-4000:]
    built = [json.loads(line) for line in devices.read_text().splitlines()]
    assert sorted((rank, tuple(found)) for rank, found in built) == [(0, ("cpu",)), (1, ("meta",))]
    assert _losses(tmp_path) == pytest.approx(reference, rel=LOSS_RTOL)
    two = load_file(Path(data["output_dir"]) / "final" / "model.safetensors")
    one = load_file(reference_final / "model.safetensors")
    for name in one:  # (the gathered state dict also names a tied head: lm_head.weight)
        assert torch.allclose(two[name], one[name], atol=WEIGHT_ATOL, rtol=0), name
    if tied:
        assert torch.equal(
            two.get("lm_head.weight", two["model.embed_tokens.weight"]), two["model.embed_tokens.weight"]
        )
