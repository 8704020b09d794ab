"""The teacher-output cache filled during the first epoch (workers/engine/cache_fill.py): the first step runs
after one teacher batch, not after the whole split; the entry written at the end of the epoch is the one an
up-front fill writes and trains the same curve; a stopped run leaves its rows to the run that resumes it; a
run that finds another filling keeps its outputs to itself."""

from __future__ import annotations

import fcntl
import json
import math
from pathlib import Path

import pytest
import torch

from tests.workers.engine import test_lm
from tests.workers.engine.test_lm import Log, _lm_run
from workers.engine import cache_fill, teachers
from workers.engine.cache import entry_tensors
from workers.engine.trainer import train

corpus, lm_teacher = test_lm.corpus, test_lm.lm_teacher  # the LM tests' fixtures

TERMS = [{"name": "ce", "weight": 0.5}, {"name": "topk", "weight": 0.5, "params": {"k": 8}}]


@pytest.fixture
def teacher_rows(monkeypatch) -> list[int]:
    """Rows the teacher reads, one entry per forward (its batch size)."""
    seen: list[int] = []
    real = teachers.load_model

    def counting(cfg, *, dataset, role):
        loaded = real(cfg, dataset=dataset, role=role)
        if role == "teacher":

            def hook(_module, args, kwargs):
                ids = kwargs["input_ids"] if "input_ids" in kwargs else args[0]
                seen.append(int(ids.shape[0]))

            loaded.model.register_forward_pre_hook(hook, with_kwargs=True)
        return loaded

    monkeypatch.setattr(teachers, "load_model", counting)
    return seen


def _offline(tmp: Path, corpus: Path, lm_teacher: Path, name: str, cache: str, **train_overrides):
    cfg = _lm_run(
        tmp / name,
        corpus,
        teacher={"source": "run", "path": str(lm_teacher)},
        terms=TERMS,
        scheme="offline",
        cache_dir=str(tmp / cache),
        evaluate_teacher=False,
        train={"max_steps": 20, "log_every": 1, **train_overrides},
    )
    return cfg


def _train_entry(cache: Path, result) -> dict[str, torch.Tensor]:
    (use,) = [u for u in result.teacher_cache if u["split"] == "train"]
    return entry_tensors(cache / use["key"])


def test_the_first_epoch_fills_the_entry_an_up_front_fill_writes_and_trains_the_same_curve(
    tmp_path, corpus, lm_teacher, teacher_rows, monkeypatch
):
    at_step: dict[int, int] = {}
    log = Log()
    cb = log.callbacks()
    cb.on_progress = lambda step, total: at_step.setdefault(step, sum(teacher_rows))
    during = train(_offline(tmp_path, corpus, lm_teacher, "during", "cache-a"), cb)
    n_rows = _train_entry(tmp_path / "cache-a", during)["offsets"].shape[0] - 1
    every_row = sum(teacher_rows)  # the train split's and the eval split's

    monkeypatch.setenv(cache_fill.FILL_ENV, "before")
    teacher_rows.clear()
    before_log = Log()
    before = train(_offline(tmp_path, corpus, lm_teacher, "before", "cache-b"), before_log.callbacks())
    assert sum(teacher_rows) == every_row  # the same rows, all of them, once

    # Step 1 waited for one batch of the teacher (8 rows), not for the whole split.
    assert at_step[1] == 8 and n_rows > 40
    epoch = n_rows // 8
    assert at_step[epoch] == epoch * 8 and at_step[epoch + 1] == at_step[20] == n_rows

    a, b = _train_entry(tmp_path / "cache-a", during), _train_entry(tmp_path / "cache-b", before)
    assert during.teacher_cache[0]["key"] == before.teacher_cache[0]["key"]
    assert a.keys() == b.keys() and torch.equal(a["offsets"], b["offsets"])
    assert torch.equal(a["prefix_end"], b["prefix_end"])
    # Float32 forwards of the same rows in other batches: equal up to the last bits, float16 when stored.
    assert (a["indices"] == b["indices"]).float().mean() > 0.999
    torch.testing.assert_close(a["logprobs"].float(), b["logprobs"].float(), atol=2e-3, rtol=0)
    torch.testing.assert_close(a["target_logprob"], b["target_logprob"], atol=1e-5, rtol=0)
    losses = [m["loss"] for m in log.train()]
    assert losses == pytest.approx([m["loss"] for m in before_log.train()], rel=1e-4)
    manifest = (tmp_path / "cache-a" / during.teacher_cache[0]["key"] / "manifest.json").read_text()
    assert '"filled_during_training": true' in manifest
    assert not list((tmp_path / "cache-a").glob(".partial-*"))  # the partial entry is gone


def test_a_run_shorter_than_an_epoch_still_leaves_a_whole_entry(tmp_path, corpus, lm_teacher, teacher_rows):
    first = train(_offline(tmp_path, corpus, lm_teacher, "short", "cache", max_steps=2))
    assert [(u["split"], u["hit"]) for u in first.teacher_cache] == [("train", False), ("eval", False)]
    teacher_rows.clear()
    second = train(_offline(tmp_path, corpus, lm_teacher, "next", "cache", max_steps=2))
    assert [(u["split"], u["hit"]) for u in second.teacher_cache] == [("train", True), ("eval", True)]
    assert teacher_rows == [] and second.teacher_forwards == 0
    assert len(_train_entry(tmp_path / "cache", second)["offsets"]) - 1 > 2 * 8  # every row, not 2 batches


def test_a_stopped_run_leaves_its_rows_and_its_resume_continues_the_fill(
    tmp_path, corpus, lm_teacher, teacher_rows, monkeypatch
):
    monkeypatch.setattr(cache_fill, "FLUSH_ROWS", 8)  # a chunk per batch
    chunks_at: dict[int, int] = {}
    cache = tmp_path / "cache"
    cfg = _offline(tmp_path, corpus, lm_teacher, "run", "cache", save_every=3)
    cb = Log().callbacks()
    cb.on_progress = lambda step, _total: chunks_at.setdefault(step, len(list(cache.glob(".partial-*/c*"))))
    cb.should_stop = lambda: len(chunks_at) >= 3
    stopped = train(cfg, cb)
    assert stopped.stopped and stopped.steps == 3
    assert chunks_at[2] >= 1  # written while training, not only when the run ended
    (partial,) = cache.glob(".partial-*")
    assert not (cache / partial.name.removeprefix(".partial-")).exists()
    used = sum(teacher_rows)
    assert used == 24
    # The lock was freed: the resumed run (same output folder, from the step-3 checkpoint) takes it.
    teacher_rows.clear()
    at_end: list[int] = []
    cb = Log().callbacks()
    cb.on_progress = lambda step, total: at_end.append(sum(teacher_rows)) if step == total else None
    resumed = train(cfg, cb)
    assert resumed.steps == 20
    n_rows = _train_entry(cache, resumed)["offsets"].shape[0] - 1
    assert at_end == [n_rows - used]  # the train rows the stopped run had not filled, and only those
    assert not list(cache.glob(".partial-*"))

    monkeypatch.setenv(cache_fill.FILL_ENV, "before")
    whole = train(_offline(tmp_path, corpus, lm_teacher, "whole", "cache-b"))
    a, b = _train_entry(cache, resumed), _train_entry(tmp_path / "cache-b", whole)
    assert torch.equal(a["offsets"], b["offsets"]) and (a["indices"] == b["indices"]).float().mean() > 0.999


def test_a_run_that_finds_the_entry_being_filled_keeps_its_outputs_to_itself(
    tmp_path, corpus, lm_teacher, teacher_rows
):
    cfg = _offline(tmp_path, corpus, lm_teacher, "alone", "cache")
    alone = train(_offline(tmp_path, corpus, lm_teacher, "ref", "cache-ref"))
    key = alone.teacher_cache[0]["key"]
    (tmp_path / "cache").mkdir()
    with open(tmp_path / "cache" / f"{key}.lock", "a+") as held:  # another run is filling this entry
        fcntl.flock(held, fcntl.LOCK_EX)
        teacher_rows.clear()
        result = train(cfg)
        fcntl.flock(held, fcntl.LOCK_UN)
    assert result.steps == 20 and math.isfinite(result.student["nll"])
    assert not (tmp_path / "cache" / key).exists() and not list((tmp_path / "cache").glob(".partial-*"))
    assert "train" not in [u["split"] for u in result.teacher_cache]  # nothing of its own was written
    assert result.student["nll"] == pytest.approx(alone.student["nll"], rel=1e-4)
    # The lock is free again: the next run fills and writes the entry.
    after = train(_offline(tmp_path, corpus, lm_teacher, "after", "cache"))
    assert after.teacher_cache[0]["split"] == "train" and (tmp_path / "cache" / key).is_dir()


def test_a_classification_entry_filled_during_training_matches_the_up_front_one(
    tmp_path, digits_run, digits_teacher, monkeypatch
):
    def run(name: str):
        return train(
            digits_run(
                tmp_path / name,
                teacher={"source": "run", "path": str(digits_teacher)},
                terms=[{"name": "kd"}, {"name": "ce"}],
                scheme="offline",
                cache_dir=str(tmp_path / f"cache-{name}"),
                train={"max_steps": 30, "batch_size": 64},
            )
        )

    during = run("during")
    monkeypatch.setenv(cache_fill.FILL_ENV, "before")
    before = run("before")
    a, b = _train_entry(tmp_path / "cache-during", during), _train_entry(tmp_path / "cache-before", before)
    torch.testing.assert_close(a["logits"], b["logits"], atol=1e-5, rtol=1e-5)
    assert during.student["accuracy"] == pytest.approx(before.student["accuracy"], abs=1e-3)


def test_the_fill_mode_setting_is_checked(monkeypatch):
    monkeypatch.setenv(cache_fill.FILL_ENV, "sometimes")
    with pytest.raises(Exception, match="must be 'during' or 'before'"):
        cache_fill.fill_mode()
    monkeypatch.setenv(cache_fill.FILL_ENV, "")
    assert cache_fill.fill_mode() == "during"


def test_two_ranks_fill_their_rows_and_rank_0_writes_the_whole_entry(tmp_path, monkeypatch):
    """Each rank computes its block of each batch and writes its own chunks; at the end of the epoch rank 0
    completes the entry, which equals a one-process up-front fill, and both ranks train on it."""
    from tests.workers.engine import test_distributed as dist

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(f"{s} {i % 9}" for i in range(8) for s in dist._SENTENCES) + "\n")
    teacher = dist._one_process(dist._config("lm", tmp_path / "teacher", corpus, max_steps=10))[1]

    def config(name: str, **train_overrides) -> dict:
        return dist._config("lm", tmp_path / name, corpus, max_steps=12, **train_overrides) | {
            "teacher": {"source": "run", "path": str(teacher)},
            "terms": TERMS,
            "scheme": "offline",
            "cache_dir": str(tmp_path / f"cache-{name}"),
        }

    launched = dist._torchrun(tmp_path, config("two", processes=2, strategy="fsdp"))
    assert launched.returncode == 0, launched.stderr[-4000:]
    two = dist._losses(tmp_path)
    monkeypatch.setenv(cache_fill.FILL_ENV, "before")
    one, _ = dist._one_process(config("one"))
    assert two == pytest.approx(one, rel=1e-4)  # the same stored targets (float16) on both sides

    manifests = [json.loads(p.read_text()) for p in (tmp_path / "cache-two").glob("*/manifest.json")]
    (key,) = [m["key"] for m in manifests if m["split"] == "train"]
    assert [m["filled_during_training"] for m in manifests if m["split"] == "train"] == [True]
    entry = tmp_path / "cache-two" / key
    reference = tmp_path / "cache-one" / entry.name
    a, b = entry_tensors(entry), entry_tensors(reference)
    assert torch.equal(a["offsets"], b["offsets"]) and (a["indices"] == b["indices"]).float().mean() > 0.999
    assert not list((tmp_path / "cache-two").glob(".partial-*"))
