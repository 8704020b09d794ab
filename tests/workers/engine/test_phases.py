"""The engine reports its long phases besides the training steps (loading, the teacher-output cache fill,
evaluation, saving) through ``Callbacks.on_phase``, at a bounded rate."""

from __future__ import annotations

import io

import pytest

from workers.engine import phases
from workers.engine.__main__ import ProgressBar
from workers.engine.config import RunConfig
from workers.engine.trainer import Callbacks, train

LLAMA = {
    "model_type": "llama",
    "hidden_size": 16,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "num_key_value_heads": 2,
    "intermediate_size": 32,
    "vocab_size": 160,
    "max_position_embeddings": 64,
}


class Recorder:
    def __init__(self) -> None:
        self.calls: list[tuple[str, int, int]] = []
        self.steps: list[int] = []

    def callbacks(self) -> Callbacks:
        return Callbacks(
            on_phase=lambda phase, done, total: self.calls.append((phase, done, total)),
            on_progress=lambda step, _total: self.steps.append(step),
        )

    def of(self, phase: str) -> list[tuple[int, int]]:
        return [(done, total) for p, done, total in self.calls if p == phase]

    def runs(self, phase: str) -> list[list[tuple[int, int]]]:
        """The reports of ``phase`` cut into its parts: a new part starts at every ``done`` 0."""
        parts: list[list[tuple[int, int]]] = []
        for done, total in self.of(phase):
            if done == 0 or not parts:
                parts.append([])
            parts[-1].append((done, total))
        return parts


@pytest.fixture
def every_report(monkeypatch):
    """No rate limit in between a part's first and last report: every batch's report is seen."""
    monkeypatch.setattr(phases, "MAX_PER_SECOND", 1e9)


def _lm_run(tmp_path, name: str = "run", **overrides) -> RunConfig:
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(
        "\n".join(f"the cat {i} sat on the mat and the dog {i % 7} ran far away" for i in range(40))
    )
    data = {
        "student": {"source": "config", "params": LLAMA},
        "teacher": {"source": "config", "params": LLAMA},
        "task": "causal_lm",
        "scheme": "offline",
        "terms": [{"name": "ce", "weight": 0.5}, {"name": "topk", "weight": 0.5, "params": {"k": 8}}],
        "dataset": {"source": "hf", "path": str(corpus), "max_length": 16},
        "train": {"max_steps": 3, "batch_size": 4, "eval_every": 1000, "save_every": 2, "device": "cpu"},
        "output_dir": str(tmp_path / name),
    }
    data["train"] |= overrides.pop("train", {})
    return RunConfig.from_dict(data | overrides)


def _complete(part: list[tuple[int, int]]) -> bool:
    """A part's rows go from 0 up to its total, never back."""
    done = [d for d, _ in part]
    total = part[0][1]
    return done[0] == 0 and done[-1] == total > 0 and done == sorted(done)


def test_an_offline_lm_run_reports_loading_the_cache_fill_evaluation_and_saving(tmp_path, every_report):
    rec = Recorder()
    result = train(_lm_run(tmp_path), rec.callbacks())
    assert result.steps == 3 and rec.steps == [1, 2, 3]
    phases_seen = [p for p, _, _ in rec.calls]
    assert set(phases_seen) == {"loading", "teacher_cache", "evaluation", "teacher_evaluation", "saving"}
    # Loading: the dataset, the student, the teacher, the tokenisations; each part starts and ends.
    loading = rec.runs("loading")
    assert len(loading) >= 4 and all(part == [(0, 1), (1, 1)] for part in loading)
    assert phases_seen[0] == "loading"  # before anything else
    # The train split's cache entry (and the eval split's) filled batch by batch up to every row.
    fills = rec.runs("teacher_cache")
    assert len(fills) == 2 and all(_complete(part) for part in fills)
    assert any(len(part) > 3 for part in fills)  # more than one batch in between
    # The student's final evaluation, then the teacher's, each over every eval row.
    evaluations, teacher = rec.runs("evaluation"), rec.runs("teacher_evaluation")
    assert len(evaluations) == len(teacher) == 1 and _complete(evaluations[0]) and _complete(teacher[0])
    assert evaluations[0][-1][1] == teacher[0][-1][1]  # the same eval rows
    assert phases_seen.index("teacher_evaluation") > phases_seen.index("evaluation")
    # A checkpoint at step 2, then the final model.
    assert rec.runs("saving") == [[(0, 1), (1, 1)], [(0, 1), (1, 1)]]
    # Training steps come through on_progress only.
    assert "training" not in phases_seen


def test_a_cache_hit_reports_no_fill(tmp_path):
    cache = tmp_path / "cache"
    train(_lm_run(tmp_path, "a", cache_dir=str(cache)), Callbacks())
    rec = Recorder()
    train(_lm_run(tmp_path, "b", cache_dir=str(cache)), rec.callbacks())
    assert rec.of("teacher_cache") == []
    assert {"loading", "evaluation", "teacher_evaluation", "saving"} <= {p for p, _, _ in rec.calls}


def test_the_validation_slice_evaluations_are_reported(tmp_path, every_report):
    rec = Recorder()
    cfg = _lm_run(
        tmp_path,
        scheme="online",
        terms=[{"name": "ce", "weight": 0.5}, {"name": "kd"}],
        evaluate_teacher=False,
        train={
            "max_steps": 4,
            "eval_every": 2,
            "save_every": 100,
            "early_stopping_metric": "loss",
            "early_stopping_mode": "min",
            "early_stopping_patience": 5,
        },
    )
    train(cfg, rec.callbacks())
    evaluations = rec.runs("evaluation")
    assert all(_complete(part) for part in evaluations)
    totals = [part[-1][1] for part in evaluations]
    # the validation slice at steps 2 and 4, then the eval split at the end
    assert len(totals) == 3 and totals[0] == totals[1]


def test_seq_kd_reports_its_generation_row_by_row(tmp_path, every_report):
    rec = Recorder()
    cfg = _lm_run(tmp_path, scheme="seq_kd", terms=[{"name": "ce"}], scheme_params={"max_new_tokens": 2})
    train(cfg, rec.callbacks())
    generations = rec.runs("seq_kd")
    assert len(generations) == 1 and _complete(generations[0]) and len(generations[0]) > 2


def test_a_builtin_mlp_classification_run_reports_loading_and_evaluation(tmp_path, digits_run):
    rec = Recorder()
    train(digits_run(tmp_path / "run"), rec.callbacks())
    assert rec.runs("loading") and all(part == [(0, 1), (1, 1)] for part in rec.runs("loading"))
    evaluations = rec.runs("evaluation")
    assert len(evaluations) == 1 and _complete(evaluations[0])
    assert rec.of("saving") == [(0, 1), (1, 1)]  # the final model
    assert rec.of("teacher_cache") == []


def test_a_distilled_classification_run_reports_the_teacher_evaluation(tmp_path, digits_run, digits_teacher):
    rec = Recorder()
    cfg = digits_run(
        tmp_path / "run",
        teacher={"source": "run", "path": str(digits_teacher)},
        scheme="offline",
        terms=[{"name": "ce", "weight": 0.5}, {"name": "kd", "weight": 0.5}],
    )
    train(cfg, rec.callbacks())
    evaluations, teacher = rec.runs("evaluation"), rec.runs("teacher_evaluation")
    assert len(evaluations) == len(teacher) == 1 and _complete(evaluations[0]) and _complete(teacher[0])
    assert rec.of("teacher_cache")


# --- the rate limit -----------------------------------------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_the_limiter_passes_a_few_reports_a_second_per_phase_on_a_long_loop():
    calls: list[tuple[str, int, int]] = []
    clock = FakeClock()
    limiter = phases.PhaseLimiter(lambda *c: calls.append(c), per_second=4, clock=clock)
    total = 10_000
    for done in range(total + 1):  # 10 s of reports, one per millisecond
        limiter.report("evaluation", done, total)
        clock.now += 0.001
    times = [c[1] / 1000 for c in calls]
    assert calls[0] == ("evaluation", 0, total) and calls[-1] == ("evaluation", total, total)
    for second in range(10):
        in_second = [t for t in times if second <= t < second + 1]
        assert len(in_second) <= 4 + 1  # 4 a second, plus the part's first or last report
    assert 35 <= len(calls) <= 45
    assert [c[1] for c in calls] == sorted(c[1] for c in calls)


def test_the_limiter_counts_each_phase_on_its_own_and_skips_repeats():
    calls: list[tuple[str, int, int]] = []
    clock = FakeClock()
    limiter = phases.PhaseLimiter(lambda *c: calls.append(c), per_second=4, clock=clock)
    assert limiter.report("teacher_cache", 0, 100)
    assert not limiter.report("teacher_cache", 10, 100)  # too soon
    assert limiter.report("evaluation", 5, 50)  # another phase: passes
    assert limiter.report("teacher_cache", 20, 100)  # back to the first: its first since the switch
    assert not limiter.report("teacher_cache", 30, 100)
    clock.now += 0.25
    assert limiter.report("teacher_cache", 40, 100)
    assert limiter.report("teacher_cache", 100, 100)  # the last always passes
    assert not limiter.report("teacher_cache", 100, 100)  # a repeat does not
    assert [c[1] for c in calls] == [0, 5, 20, 40, 100]


def test_reports_go_nowhere_without_a_reporter_and_track_yields_every_batch():
    assert list(phases.track(iter([[1, 2], [3]]), 3)) == [[1, 2], [3]]
    phases.report("loading", 0, 1)  # no reporter: nothing happens
    calls: list[tuple[str, int, int]] = []
    with phases.reporting(lambda *c: calls.append(c), per_second=1e9):
        with phases.part("saving"):
            pass
        with phases.within("evaluation"):
            assert list(phases.track(iter([[1, 2], [3], [4, 5]]), 5)) == [[1, 2], [3], [4, 5]]
    phases.report("loading", 0, 1)
    assert calls == [
        ("saving", 0, 1),
        ("saving", 1, 1),
        ("evaluation", 0, 5),
        ("evaluation", 2, 5),
        ("evaluation", 3, 5),
        ("evaluation", 5, 5),
    ]


def test_the_cli_progress_line_shows_the_phase():
    stream = io.StringIO()
    bar = ProgressBar(stream)
    bar.on_phase("loading", 0, 1)
    bar.last_draw = 0.0
    bar.on_phase("teacher_cache", 40, 400)
    bar.on_progress(1, 1)
    bar.on_phase("evaluation", 64, 64)
    bar.close()
    text = stream.getvalue()
    assert "\rloading" in text and "teacher_cache 40/400 rows" in text
    assert "training step 1/1" in text and "evaluation 64/64 rows" in text and text.endswith("\n")
