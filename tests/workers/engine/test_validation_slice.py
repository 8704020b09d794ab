"""Early stopping selects on a validation slice held out of the train split; the eval split is only
reported."""

from __future__ import annotations

import csv

import numpy as np
import pytest

from workers.engine import run_evaluation, run_setup, trainer
from workers.engine.batching import Batcher
from workers.engine.config import ModelConfig, RunConfig, TrainConfig
from workers.engine.data import IGNORE_INDEX, load_dataset
from workers.engine.errors import ConfigError
from workers.engine.evaluate import evaluate
from workers.engine.models import load_model
from workers.engine.run_setup import validation_rows
from workers.engine.trainer import Callbacks, train

from .conftest import TINY_BERT

STOPPING = {
    "max_steps": 20,
    "eval_every": 5,
    "save_every": 1000,
    "early_stopping_metric": "accuracy",
    "early_stopping_patience": 10,
}


class Recorder:
    def __init__(self) -> None:
        self.metrics: list[tuple[int, dict[str, float]]] = []

    def callbacks(self) -> Callbacks:
        return Callbacks(on_metrics=lambda s, m: self.metrics.append((s, m)))

    def steps_with(self, prefix: str) -> list[int]:
        return [s for s, m in self.metrics if any(k.startswith(prefix) for k in m)]


@pytest.fixture
def evaluations(monkeypatch):
    """Every evaluate() call of the trainer, as the number of rows it scored."""
    calls: list[int] = []
    real = run_evaluation.evaluate

    def counting(model, batcher, **kwargs):
        calls.append(len(batcher))
        return real(model, batcher, **kwargs)

    monkeypatch.setattr(run_evaluation, "evaluate", counting)
    return calls


def _slice(cfg: RunConfig) -> np.ndarray:
    dataset = load_dataset(cfg.dataset)
    return run_setup._validation_slice(cfg, dataset, Batcher(dataset.train))


def test_with_early_stopping_the_eval_split_is_evaluated_once_at_the_end(tmp_path, digits_run, evaluations):
    rec = Recorder()
    cfg = digits_run(tmp_path, train=STOPPING)
    result = train(cfg, rec.callbacks())

    dataset = load_dataset(cfg.dataset)
    n_val, n_eval = len(_slice(cfg)), len(dataset.eval)
    assert n_val != n_eval
    # Decisions: the validation slice at every eval step and once more for the last weights.
    assert rec.steps_with("val/") == [5, 10, 15, 20]
    assert {"val/accuracy", "val/loss"} <= {k for _, m in rec.metrics for k in m}
    # The eval split: once, at the end, for the reported student.
    assert rec.steps_with("eval/") == [20]
    assert evaluations.count(n_eval) == 1 and evaluations[-1] == n_eval
    assert evaluations.count(n_val) == 4
    assert result.best_metric == max(m["val/accuracy"] for _, m in rec.metrics if "val/accuracy" in m)


def test_without_early_stopping_the_eval_split_curve_is_kept_and_nothing_is_held_out(
    tmp_path, digits_run, monkeypatch
):
    rec = Recorder()
    used: list[np.ndarray] = []
    real = trainer.rows_for_step
    monkeypatch.setattr(
        trainer, "rows_for_step", lambda step, rows, **kw: used.append(rows) or real(step, rows, **kw)
    )
    cfg = digits_run(tmp_path, train={"max_steps": 10, "eval_every": 5})
    train(cfg, rec.callbacks())
    assert rec.steps_with("eval/") == [5, 10] and rec.steps_with("val/") == []
    assert len(used[0]) == len(load_dataset(cfg.dataset).train)


def test_the_held_out_rows_are_never_trained_on(tmp_path, digits_run, monkeypatch):
    used: list[np.ndarray] = []
    real = trainer.rows_for_step

    def recording(step, rows, **kwargs):
        picked = real(step, rows, **kwargs)
        used.append(picked)
        return picked

    monkeypatch.setattr(trainer, "rows_for_step", recording)
    cfg = digits_run(tmp_path, train={**STOPPING, "batch_size": 256})
    train(cfg)
    held_out = _slice(cfg)
    trained = np.unique(np.concatenate(used))
    dataset = load_dataset(cfg.dataset)
    assert len(held_out) == pytest.approx(0.1 * len(dataset.train), abs=10)
    assert np.intersect1d(trained, held_out).size == 0
    # Every row not held out is still trained on (20 steps of 256 cover the ~1,300 remaining rows).
    assert len(trained) + len(held_out) == len(dataset.train)


def test_the_slice_is_the_same_for_the_same_split_seed_whatever_the_run_seed(tmp_path, digits_run):
    a = _slice(digits_run(tmp_path, train={**STOPPING, "seed": 0}))
    b = _slice(digits_run(tmp_path, train={**STOPPING, "seed": 7}))
    other_split = digits_run(
        tmp_path, train=STOPPING, dataset={"source": "builtin", "name": "digits", "split_seed": 3}
    )
    assert np.array_equal(a, b)
    assert not np.array_equal(a, _slice(other_split))
    labels = load_dataset(digits_run(tmp_path).dataset).train.labels
    assert set(labels[a].tolist()) == set(range(10))  # stratified: every class is represented


def test_the_slice_comes_from_labelled_rows_and_leaves_each_class_rows_to_train_on():
    labels = np.array([0, 0, 0, 1, 1, IGNORE_INDEX, IGNORE_INDEX, 2], dtype=np.int64)
    rows = validation_rows(labels, 0.5, seed=[0, 2], stratify=True)
    assert set(labels[rows].tolist()) <= {0, 1} and IGNORE_INDEX not in labels[rows]
    for label in (0, 1):  # a class keeps at least one row to train on; a one-row class gives none
        assert 0 < np.sum(labels[rows] == label) < np.sum(labels == label)
    assert np.array_equal(rows, validation_rows(labels, 0.5, seed=[0, 2], stratify=True))
    assert validation_rows(np.array([IGNORE_INDEX, 4]), 0.5, seed=0, stratify=True).size == 0


def test_with_a_labelled_fraction_the_baseline_selects_on_labelled_rows_it_does_not_train_on(
    tmp_path, digits_run, monkeypatch
):
    used: list[np.ndarray] = []
    real = trainer.rows_for_step
    monkeypatch.setattr(
        trainer, "rows_for_step", lambda step, rows, **kw: used.append(rows) or real(step, rows, **kw)
    )
    dataset_cfg = {"source": "builtin", "name": "digits", "labelled_fraction": 0.2}
    cfg = digits_run(tmp_path, dataset=dataset_cfg, train=STOPPING)
    train(cfg)
    split = load_dataset(cfg.dataset).train
    held_out = _slice(cfg)
    assert np.all(split.labels[held_out] != IGNORE_INDEX)
    assert set(used[0].tolist()) == set(split.labelled_rows.tolist()) - set(held_out.tolist())


def test_the_reported_result_is_computed_on_the_eval_split(tmp_path, digits_run):
    cfg = digits_run(tmp_path, train=STOPPING)
    result = train(cfg)
    dataset = load_dataset(cfg.dataset)
    saved = load_model(ModelConfig(source="run", path=result.final_dir), dataset=dataset, role="student")
    on_eval = evaluate(saved.model, Batcher(dataset.eval), efficiency=False)
    _, val = run_setup._validation_view(dataset, Batcher(dataset.train), _slice(cfg), saved, max_length=128)
    on_val = evaluate(saved.model, val, efficiency=False)
    assert result.student["accuracy"] == pytest.approx(on_eval["accuracy"])
    assert result.student["nll"] == pytest.approx(on_eval["nll"], rel=1e-6)
    assert result.student["nll"] != pytest.approx(on_val["nll"], rel=1e-6)


def test_a_local_dataset_with_an_eval_file_holds_the_slice_out_of_the_train_file(tmp_path, evaluations):
    rows = [(f"sport story {i} goal match", "sport") for i in range(20)] + [
        (f"tech story {i} chip software", "tech") for i in range(20)
    ]
    train_file, eval_file = tmp_path / "train.csv", tmp_path / "eval.csv"
    for path, part in ((train_file, rows[::2] + rows[1::4]), (eval_file, rows[3::4])):
        with path.open("w", newline="") as f:
            csv.writer(f).writerows([("text", "label"), *part])
    rec = Recorder()
    cfg = RunConfig.from_dict(
        {
            "student": {"source": "config", "params": {**TINY_BERT, "num_hidden_layers": 1}},
            "dataset": {
                "source": "hf",
                "path": str(train_file),
                "eval_path": str(eval_file),
                "max_length": 16,
            },
            "terms": [{"name": "ce"}],
            "scheme": "hard_labels",
            "train": {
                **STOPPING,
                "max_steps": 4,
                "eval_every": 2,
                "batch_size": 8,
                "device": "cpu",
                "validation_fraction": 0.25,
            },
            "output_dir": str(tmp_path / "run"),
        }
    )
    train(cfg, rec.callbacks())
    dataset = load_dataset(cfg.dataset)
    # Classification: by the split's labels.
    held_out = run_setup._validation_slice(cfg, dataset, dataset.train)
    assert len(held_out) == round(0.25 * len(dataset.train))
    assert rec.steps_with("val/") == [2, 4] and rec.steps_with("eval/") == [4]
    assert evaluations == [len(held_out), len(held_out), len(dataset.eval)]


@pytest.mark.parametrize("fraction", [0, -0.1, 0.6, float("nan"), True])
def test_a_validation_fraction_out_of_range_is_refused_before_anything_loads(
    tmp_path, digits_run, fraction, monkeypatch
):
    monkeypatch.setattr(run_setup, "load_dataset", lambda *a, **k: pytest.fail("loaded data"))
    with pytest.raises(ConfigError, match="train.validation_fraction"):
        train(digits_run(tmp_path, train={**STOPPING, "validation_fraction": fraction}))


def test_the_validation_fraction_is_part_of_the_frozen_config(tmp_path, digits_run):
    cfg = digits_run(tmp_path, train={**STOPPING, "validation_fraction": 0.2})
    assert cfg.to_dict()["train"]["validation_fraction"] == 0.2
    assert RunConfig.from_json(cfg.to_json()) == cfg
    assert TrainConfig().validation_fraction == 0.1


def test_a_distilled_run_selects_on_its_fidelity_to_the_teacher_on_the_slice(
    tmp_path, digits_run, digits_teacher
):
    rec = Recorder()
    cfg = digits_run(
        tmp_path,
        teacher={"source": "run", "path": str(digits_teacher)},
        scheme="offline",
        terms=[{"name": "ce", "weight": 0.1}, {"name": "kd", "weight": 0.9}],
        train={**STOPPING, "early_stopping_metric": "val/agreement"},
    )
    result = train(cfg, rec.callbacks())
    assert rec.steps_with("eval/") == [20]
    assert result.best_metric == max(m["val/agreement"] for _, m in rec.metrics if "val/agreement" in m)
    # The teachers' outputs on the slice are an entry of their own; the eval split's serves the result.
    assert {u["split"] for u in result.teacher_cache} == {"train", "validation", "eval"}
    assert "agreement" in result.student and result.teacher is not None


@pytest.mark.parametrize("pack", [False, True])
def test_a_causal_lm_run_holds_rows_out_and_reports_the_eval_split_at_the_end(tmp_path, pack):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(
        "\n".join(f"the cat {i} sat on the mat and the dog {i % 7} ran far away" for i in range(40))
    )
    llama = {
        "model_type": "llama",
        "hidden_size": 16,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "num_key_value_heads": 2,
        "intermediate_size": 32,
        "vocab_size": 160,
        "max_position_embeddings": 64,
    }
    rec = Recorder()
    cfg = RunConfig.from_dict(
        {
            "student": {"source": "config", "params": llama},
            "teacher": {"source": "config", "params": llama},
            "task": "causal_lm",
            "scheme": "online",
            "terms": [{"name": "ce", "weight": 0.5}, {"name": "kd"}],
            "dataset": {"source": "hf", "path": str(corpus), "max_length": 16, "pack": pack},
            "train": {
                "max_steps": 4,
                "batch_size": 4,
                "eval_every": 2,
                "save_every": 100,
                "device": "cpu",
                "early_stopping_metric": "loss",
                "early_stopping_mode": "min",
                "early_stopping_patience": 5,
            },
            "output_dir": str(tmp_path / "run"),
            "evaluate_teacher": False,
        }
    )
    result = train(cfg, rec.callbacks())
    assert rec.steps_with("val/") == [2, 4] and rec.steps_with("eval/") == [4]
    assert {"val/loss", "val/agreement"} <= {k for _, m in rec.metrics for k in m}
    assert result.best_step in (2, 4) and "perplexity" in result.student
