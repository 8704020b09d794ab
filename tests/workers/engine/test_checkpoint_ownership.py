"""Checkpoints of an owned run (an attempt holding the run's lease): registered before they count, resumed
only from the one registered last, and never written, pruned or kept by an attempt that lost the run."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from workers.engine.checkpoint import CHECKPOINTS, prune
from workers.engine.errors import TrainingError
from workers.engine.trainer import Callbacks, train


class Owner:
    """A caller that registers checkpoints (as the worker's conditional update does) until it loses the
    run."""

    def __init__(self, *, lose_at: int | None = None) -> None:
        self.registered: list[tuple[int, str]] = []
        self.steps: list[int] = []
        self.losses: dict[int, float] = {}
        self.lose_at = lose_at

    @property
    def owns(self) -> bool:
        return self.lose_at is None or (self.steps[-1] if self.steps else 0) < self.lose_at

    def register(self, step: int, path: str) -> bool:
        if not self.owns:
            return False
        self.registered.append((step, path))
        return True

    def callbacks(self) -> Callbacks:
        return Callbacks(
            on_progress=lambda s, _t: self.steps.append(s),
            on_metrics=lambda s, m: self.losses.__setitem__(s, m["loss"]) if "loss" in m else None,
            on_checkpoint=self.register,
            owns_run=lambda: self.owns,
        )


def folders(out: Path) -> list[str]:
    return sorted(p.name for p in (out / CHECKPOINTS).iterdir())


def test_an_attempt_resumes_from_the_registered_checkpoint_and_removes_every_other(tmp_path, digits_run):
    out = tmp_path / "run"
    first = Owner(lose_at=35)
    train(digits_run(out, attempt=1, train={"max_steps": 40, "save_every": 10}), first.callbacks())
    assert [s for s, _ in first.registered] == [10, 20, 30] and folders(out) == ["step-20-a1", "step-30-a1"]
    (out / "final-a1").mkdir()  # a lost attempt's final model, never recorded
    # Left behind by workers that lost the run or died: a newer folder nobody registered, a temporary one.
    shutil.copytree(out / CHECKPOINTS / "step-30-a1", out / CHECKPOINTS / "step-40-a1")
    shutil.copytree(out / CHECKPOINTS / "step-30-a1", out / CHECKPOINTS / ".step-50-a1.tmp-999")

    second = Owner()
    registered = str(out / CHECKPOINTS / "step-20-a1")
    train(
        digits_run(out, attempt=2, resume_from=registered, train={"max_steps": 40, "save_every": 10}),
        second.callbacks(),
    )
    assert second.steps[0] == 21  # from the registered checkpoint, not the newest folder on disk
    assert [s for s, _ in second.registered] == [30, 40]
    # Earlier attempts' folders are gone once the new owner registered its own; its own are kept (2).
    assert folders(out) == ["step-30-a2", "step-40-a2"]
    assert not (out / "final-a1").exists() and (out / "final-a2").is_dir() and not (out / "final").exists()


def test_the_same_steps_give_the_same_losses_after_a_resume(tmp_path, digits_run):
    whole = Owner()
    train(
        digits_run(tmp_path / "whole", attempt=1, train={"max_steps": 30, "save_every": 10}),
        whole.callbacks(),
    )
    out = tmp_path / "split"
    first, second = Owner(lose_at=15), Owner()
    train(digits_run(out, attempt=1, train={"max_steps": 30, "save_every": 10}), first.callbacks())
    train(
        digits_run(
            out, attempt=2, resume_from=first.registered[-1][1], train={"max_steps": 30, "save_every": 10}
        ),
        second.callbacks(),
    )
    assert second.losses == {s: v for s, v in whole.losses.items() if s > 10}


def test_an_attempt_that_lost_the_run_saves_nothing_and_stops(tmp_path, digits_run):
    out = tmp_path / "run"
    lost = Owner(lose_at=15)
    result = train(
        digits_run(out, attempt=1, train={"max_steps": 30, "save_every": 10, "log_every": 5}),
        lost.callbacks(),
    )
    assert result.stopped and result.final_dir is None and not result.student
    assert [s for s, _ in lost.registered] == [10]
    assert folders(out) == ["step-10-a1"]  # the refused step-20 was deleted; nothing else written
    assert not list(out.glob("final*"))


def test_a_registration_refused_at_the_last_moment_deletes_the_folder(tmp_path, digits_run):
    out = tmp_path / "run"
    refused = Owner()
    refused.register = lambda step, path: step < 20  # the lease was lost while the folder was written
    result = train(digits_run(out, attempt=1, train={"max_steps": 30, "save_every": 10}), refused.callbacks())
    assert result.stopped and folders(out) == ["step-10-a1"] and not list(out.glob("final*"))


def test_prune_never_touches_a_later_attempt(tmp_path):
    root = tmp_path / "checkpoints"
    for name in [
        "step-10",
        "step-10-a1",
        "step-20-a1",
        "step-30-a2",
        "step-40-a2",
        "step-50-a2",
        "step-60-a3",
        ".step-70-a2.tmp-1",
    ]:
        (root / name).mkdir(parents=True)
    prune(root, attempt=2, keep=2)
    assert sorted(p.name for p in root.iterdir()) == [
        ".step-70-a2.tmp-1",
        "step-40-a2",
        "step-50-a2",
        "step-60-a3",
    ]


def test_a_missing_registered_checkpoint_is_a_clear_error(tmp_path, digits_run):
    cfg = digits_run(tmp_path, attempt=2, resume_from=str(tmp_path / CHECKPOINTS / "step-10-a1"))
    with pytest.raises(TrainingError, match=r"checkpoint this run resumes from \(step-10-a1\) is missing"):
        train(cfg)


def test_without_an_attempt_the_newest_checkpoint_on_disk_is_resumed(tmp_path, digits_run):
    first = Owner()
    callbacks = first.callbacks()
    callbacks.should_stop = lambda: first.steps[-1] >= 20
    assert train(digits_run(tmp_path, train={"max_steps": 30, "save_every": 10}), callbacks).stopped
    assert folders(tmp_path) == ["step-10", "step-20"]
    again = Owner()
    train(digits_run(tmp_path, train={"max_steps": 30, "save_every": 10}), again.callbacks())
    assert again.steps[0] == 21 and (tmp_path / "final").is_dir()
