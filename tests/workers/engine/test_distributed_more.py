"""Multi-process runs on CPU, continued: a one-process checkpoint resumed by sharded (FSDP) ranks, on_policy
generation on a sharded student, and an online teacher sharded over the ranks (real torchrun launches, 2
ranks, gloo; the helpers and tolerances of ``test_distributed``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from safetensors.torch import load_file

from tests.workers.engine.test_distributed import (
    _SENTENCES,
    LAUNCH_TIMEOUT_S,
    LOSS_RTOL,
    ROOT,
    TINY_LLAMA,
    _config,
    _losses,
    _one_process,
    _resumes_from,
    _same_weights,
    _torchrun,
)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``test_distributed``'s corpus: sentences of different lengths."""
    path = tmp_path_factory.mktemp("dist-lm") / "corpus.txt"
    path.write_text("\n".join(f"{s} {i % 9}" for i in range(8) for s in _SENTENCES) + "\n")
    return path


TEACHER_LLAMA = TINY_LLAMA | {"hidden_size": 48, "intermediate_size": 96, "num_hidden_layers": 3}


@pytest.mark.parametrize("kind", ["lm", "mlp"])
def test_a_one_process_checkpoint_resumes_on_two_sharded_ranks_on_the_same_curve(tmp_path, corpus, kind):
    """Every rank reads the full weights and the index-keyed AdamW state of the one-process checkpoint and
    keeps its shards; the run continues on the uninterrupted one-process curve to the same final weights."""
    reference, reference_final = _one_process(_config(kind, tmp_path / "one", corpus, save_every=2))
    step_2 = tmp_path / "one" / "checkpoints" / "step-2"
    assert (step_2 / "optimizer.pt").is_file() and not (step_2 / "sharded").exists()

    _resumes_from(step_2, tmp_path / "two")
    data = _config(kind, tmp_path / "two", corpus, save_every=2, processes=2, strategy="fsdp")
    launched = _torchrun(tmp_path, data)
    assert launched.returncode == 0, launched.stderr[-4000:]
    assert _losses(tmp_path) == pytest.approx(reference[2:], rel=LOSS_RTOL)
    _same_weights(Path(data["output_dir"]) / "final", reference_final)


def _on_policy(tmp_path: Path, corpus: Path, name: str, **train: Any) -> dict[str, Any]:
    data = _config("lm", tmp_path / name, corpus, max_steps=4, **train)
    return data | {
        "teacher": {"source": "config", "params": TEACHER_LLAMA},
        "terms": [{"name": "jsd", "params": {"beta": 0.5}}],
        "scheme": "on_policy",
        "scheme_params": {"lmbda": 1.0, "max_new_tokens": 4, "temperature": 1.0},
    }


def test_on_policy_generation_on_a_sharded_student_follows_the_ddp_run(tmp_path, corpus):
    """Every step samples (λ = 1): the FSDP ranks generate in lockstep (a rank whose rows all ended keeps
    stepping with the others) from the same per-rank seeds as the DDP ranks, so both runs sample the same
    continuations and follow the same curve."""
    ddp = _torchrun(tmp_path, _on_policy(tmp_path, corpus, "ddp", processes=2, strategy="ddp"))
    assert ddp.returncode == 0, ddp.stderr[-4000:]
    reference = _losses(tmp_path)
    (tmp_path / "metrics.jsonl").unlink()
    fsdp = _torchrun(tmp_path, _on_policy(tmp_path, corpus, "fsdp", processes=2, strategy="fsdp"))
    assert fsdp.returncode == 0, fsdp.stderr[-4000:]
    assert len(reference) == 4
    assert _losses(tmp_path) == pytest.approx(reference, rel=LOSS_RTOL)


# Each rank generates greedily on its own rows with a sharded student; rank 0's only row ends at its first
# token (its EOS is the token it picks first), rank 1's rows never end: rank 0 must keep stepping with rank 1.
LOCKSTEP_PROBE = """
import copy, json, os, sys
import torch
from transformers import LlamaConfig, LlamaForCausalLM
from workers.engine.distributed import is_sharded, shard
from workers.engine.runtime import generate_continuations

torch.distributed.init_process_group("gloo")
rank = torch.distributed.get_rank()
torch.manual_seed(0)
full = LlamaForCausalLM(LlamaConfig(**json.loads(os.environ["DW_TEST_LLAMA"]))).eval()
sharded = copy.deepcopy(full)
shard(sharded, world=2, device=torch.device("cpu"), dtype=torch.float32)
prompts = [[5, 6, 7]] if rank == 0 else [[9, 10, 11, 12], [13]]
common = {"max_new_tokens": 6, "temperature": 0.0, "pad_id": 0, "device": torch.device("cpu"), "seed": 3}
free = generate_continuations(full, prompts, eos_id=None, **common)  # alone: no collective
eos = free[0][0] if rank == 0 else next(t for t in range(3, 128) if all(t not in row for row in free))
expected = generate_continuations(full, prompts, eos_id=eos, **common)
got = generate_continuations(sharded, prompts, eos_id=eos, synced=is_sharded(sharded), **common)
torch.distributed.barrier()
with open(os.environ["DW_TEST_OUT"] + f".{rank}", "w") as f:
    json.dump({"expected": expected, "got": got}, f)
torch.distributed.destroy_process_group()
"""


def test_ranks_of_a_sharded_student_generate_in_lockstep_when_one_rank_ends_first(tmp_path):
    probe = tmp_path / "dw_lockstep_probe.py"
    probe.write_text(LOCKSTEP_PROBE)
    env = os.environ | {
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": str(ROOT),
        "DW_TEST_LLAMA": json.dumps(TINY_LLAMA),
        "DW_TEST_OUT": str(tmp_path / "out"),
    }
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        str(probe),
    ]
    done = subprocess.run(
        command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT_S
    )
    assert done.returncode == 0, done.stderr[-4000:]
    rank_0, rank_1 = (json.loads((tmp_path / f"out.{r}").read_text()) for r in (0, 1))
    assert rank_0["got"] == rank_0["expected"] and len(rank_0["got"][0]) == 1  # ended at its first token
    assert rank_1["got"] == rank_1["expected"] and all(len(row) == 6 for row in rank_1["got"])


# A torchrun entry point that records, per rank, whether each loaded teacher is sharded (beside an FSDP
# student, unless DISTILLWEB_REPLICATE_TEACHER is set).
TEACHER_PROBE = """
import json, os, sys
import workers.engine.teachers as teachers
from workers.engine import distributed
from workers.engine.__main__ import main

models = teachers.Teachers.models

def recorded(self):
    loaded = models(self)
    with open(os.environ["DW_TEST_TEACHER"], "a") as f:
        f.write(json.dumps([self.ranks.rank, [distributed.is_sharded(t.model) for t in loaded]]) + "\\n")
    return loaded

teachers.Teachers.models = recorded
sys.exit(main(sys.argv[1:]))
"""


def test_an_online_teacher_sharded_over_fsdp_ranks_gives_the_replicated_teachers_curve(tmp_path, corpus):
    """A teacher with files (a run's final model), as teachers usually are: its cache key is its files'
    digest (a teacher built from a config alone is keyed by its weights' digest, taken before sharding)."""
    trained = _config("lm", tmp_path / "teacher", corpus, max_steps=2)
    trained["student"]["params"] = TEACHER_LLAMA
    _, teacher = _one_process(trained)

    def config(name: str) -> dict[str, Any]:
        data = _config("lm", tmp_path / name, corpus, processes=2, strategy="fsdp", eval_every=2)
        return data | {
            "teacher": {"source": "run", "path": str(teacher)},
            "terms": [
                {"name": "ce", "weight": 0.5},
                {"name": "kd", "weight": 0.5, "params": {"temperature": 2}},
            ],
            "scheme": "online",
            "evaluate_teacher": True,
        }

    (tmp_path / "dw_teacher_probe.py").write_text(TEACHER_PROBE)
    entry = (str(tmp_path / "dw_teacher_probe.py"),)
    placements = tmp_path / "teacher.jsonl"
    runs = {}
    for name, replicate in (("replicated", "1"), ("sharded", "")):
        launched = _torchrun(
            tmp_path,
            config(name),
            entry=entry,
            args=("--result-json", str(tmp_path / f"{name}.json")),
            DW_TEST_TEACHER=str(placements),
            DISTILLWEB_REPLICATE_TEACHER=replicate,
        )
        assert launched.returncode == 0, launched.stderr[-4000:]
        runs[name] = (_losses(tmp_path), json.loads((tmp_path / f"{name}.json").read_text()))
        (tmp_path / "metrics.jsonl").unlink()
    # (rank, sharded) at each call of Teachers.models: False in the replicated run, True in the sharded one.
    records = [json.loads(line) for line in placements.read_text().splitlines()]
    placed = {(rank, *sharded) for rank, sharded in records}
    assert placed == {(0, False), (0, True), (1, False), (1, True)}
    (replicated, replicated_result), (sharded, sharded_result) = runs["replicated"], runs["sharded"]
    assert len(sharded) == 4 and sharded == pytest.approx(replicated, rel=LOSS_RTOL)
    # Rank 0 evaluated the student (beside the teacher's outputs) and the teacher alone, gathered.
    quality = ("nll", "perplexity", "tokens", "agreement", "kl_to_teacher")
    for who in ("student", "teacher"):
        got, expected = (
            {k: v for k, v in result[who].items() if k in quality}
            for result in (sharded_result, replicated_result)
        )
        assert "nll" in got and got == pytest.approx(expected, rel=1e-5), who


def test_a_tied_sharded_students_final_model_has_the_one_process_keys(tmp_path, corpus):
    """The gathered state of a student whose head is tied to its embedding names the head too; the final
    model holds what the one-process save holds (the embedding alone), with the same weights."""

    def config(name: str, **train: Any) -> dict[str, Any]:
        data = _config("lm", tmp_path / name, corpus, max_steps=2, **train)
        data["student"]["params"] = TINY_LLAMA | {"tie_word_embeddings": True}
        return data

    _, reference_final = _one_process(config("one"))
    data = config("two", processes=2, strategy="fsdp")
    launched = _torchrun(tmp_path, data)
    assert launched.returncode == 0, launched.stderr[-4000:]
    assert "lm_head.weight" not in load_file(reference_final / "model.safetensors")
    _same_weights(Path(data["output_dir"]) / "final", reference_final)  # the same keys, the same weights
