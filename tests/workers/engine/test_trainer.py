"""The training loop on CPU: schemes, callbacks, checkpoints and resume, failures, the command line."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from workers.engine import run_setup, step_inputs, teachers, trainer
from workers.engine.__main__ import main as cli_main
from workers.engine.checkpoint import list_checkpoints
from workers.engine.config import ModelConfig, TrainConfig
from workers.engine.data import load_dataset
from workers.engine.errors import ConfigError, TrainingError
from workers.engine.losses import LOSS_TERMS
from workers.engine.trainer import Callbacks, lr_at, train

from .conftest import TINY_BERT

KD_TERMS = [{"name": "ce", "weight": 0.1}, {"name": "kd", "weight": 0.9, "params": {"temperature": 4.0}}]


class Recorder:
    """Collects everything the trainer reports."""

    def __init__(self, stop_at: int | None = None) -> None:
        self.metrics: list[tuple[int, dict[str, float]]] = []
        self.progress: list[tuple[int, int]] = []
        self.checkpoints: list[tuple[int, str]] = []
        self.stop_at = stop_at

    def callbacks(self) -> Callbacks:
        return Callbacks(
            on_metrics=lambda s, m: self.metrics.append((s, m)),
            on_progress=lambda s, t: self.progress.append((s, t)),
            on_checkpoint=lambda s, p: self.checkpoints.append((s, p)),
            should_stop=lambda: self.stop_at is not None and self.progress[-1][0] >= self.stop_at,
        )

    def train_losses(self) -> list[float]:
        return [m["loss"] for _, m in self.metrics if "loss" in m]

    def eval_points(self) -> list[tuple[int, dict[str, float]]]:
        return [(s, m) for s, m in self.metrics if "eval/accuracy" in m]


def _teacher(path) -> dict:
    return {"source": "run", "path": str(path)}


def test_hard_labels_training_lowers_the_loss_and_reports_everything(tmp_path, digits_run):
    rec = Recorder()
    result = train(digits_run(tmp_path, train={"max_steps": 60, "eval_every": 30}), rec.callbacks())

    losses = rec.train_losses()
    assert len(losses) == 12 and losses[-1] < 0.5 * losses[0]
    assert set(rec.metrics[0][1]) == {"loss", "ce", "lr", "samples_per_s"}
    assert rec.progress == [(s, 60) for s in range(1, 61)]
    assert [s for s, _ in rec.eval_points()] == [30, 60]
    assert {"eval/loss", "eval/accuracy", "eval/macro_f1", "eval/ece"} <= set(rec.eval_points()[0][1])
    assert result.stopped is False and result.steps == 60 and result.teacher is None
    assert result.student["accuracy"] > 0.5  # 10 classes: chance is 0.1
    assert {"params", "size_bytes", "latency_ms_p50", "latency_ms_p95", "throughput_per_s"} <= set(
        result.student
    )
    assert set(result.to_dict()) == {
        "steps",
        "stopped",
        "final_dir",
        "student",
        "teacher",
        "train_seconds",
        "last_checkpoint",
        "task",
        "scheme",
        "stopped_early",
        "best_step",
        "best_metric",
        "restored_best",
        "teacher_cache",
        "teacher_forwards",
    }
    json.dumps(result.to_dict())


def test_offline_kd_runs_the_teacher_only_to_fill_the_cache_during_the_first_epoch(
    tmp_path, digits_run, digits_teacher, monkeypatch
):
    calls = {"teacher": 0}
    real_load_model = teachers.load_model

    def counting_load_model(cfg, *, dataset, role):
        loaded = real_load_model(cfg, dataset=dataset, role=role)
        if role == "teacher":
            loaded.model.register_forward_hook(lambda *_: calls.__setitem__("teacher", calls["teacher"] + 1))
        return loaded

    monkeypatch.setattr(teachers, "load_model", counting_load_model)
    calls_at_step: dict[int, int] = {}
    rec = Recorder()
    callbacks = rec.callbacks()
    callbacks.on_progress = lambda step, total: calls_at_step.setdefault(step, calls["teacher"])
    cfg = digits_run(
        tmp_path,
        teacher=_teacher(digits_teacher),
        terms=KD_TERMS,
        scheme="offline",
        train={"max_steps": 40, "batch_size": 64},
    )
    result = train(cfg, callbacks)

    # The cache is filled during the first epoch: one teacher batch per step (22 steps of 64 rows), then the
    # rows the epoch left out (1437 - 22 * 64 = 29), once; later steps read the cache.
    epoch = 1437 // 64
    assert [calls_at_step[s] for s in (1, 2, epoch)] == [1, 2, epoch]
    assert calls_at_step[epoch + 1] == calls_at_step[40] == epoch + math.ceil((1437 - epoch * 64) / 64)
    assert {"loss", "ce", "kd", "lr", "samples_per_s"} == set(rec.metrics[0][1])
    assert rec.train_losses()[-1] < rec.train_losses()[0]
    assert {"agreement", "kl_to_teacher"} <= set(result.student)
    assert result.teacher["accuracy"] > 0.8


def test_online_kd_runs_the_teacher_on_every_step(tmp_path, digits_run, digits_teacher, monkeypatch):
    calls = {"teacher": 0}
    real_load_model = teachers.load_model

    def counting_load_model(cfg, *, dataset, role):
        loaded = real_load_model(cfg, dataset=dataset, role=role)
        if role == "teacher":
            loaded.model.register_forward_hook(lambda *_: calls.__setitem__("teacher", calls["teacher"] + 1))
        return loaded

    monkeypatch.setattr(teachers, "load_model", counting_load_model)
    calls_at_step: dict[int, int] = {}
    cfg = digits_run(
        tmp_path,
        teacher=_teacher(digits_teacher),
        terms=KD_TERMS,
        scheme="online",
        evaluate_teacher=False,
        train={"max_steps": 10},
    )
    result = train(
        cfg, Callbacks(on_progress=lambda step, _: calls_at_step.setdefault(step, calls["teacher"]))
    )
    assert calls_at_step[10] - calls_at_step[1] == 9
    assert result.teacher is None


def test_resumed_run_reaches_the_same_weights_as_an_uninterrupted_one(tmp_path, digits_run):
    settings = {"max_steps": 24, "save_every": 8, "log_every": 4, "warmup_steps": 3, "lr_schedule": "cosine"}
    student = {"source": "builtin", "name": "mlp", "params": {"hidden_sizes": [32], "dropout": 0.3}}
    straight = train(digits_run(tmp_path / "a", student=student, train=settings))

    interrupted_cfg = digits_run(tmp_path / "b", student=student, train=settings)
    first = train(interrupted_cfg, Recorder(stop_at=12).callbacks())
    assert first.stopped and first.steps == 12
    rec = Recorder()
    resumed = train(interrupted_cfg, rec.callbacks())

    assert rec.progress[0] == (13, 24)
    assert resumed.steps == 24 and not resumed.stopped
    a = load_file(f"{straight.final_dir}/model.safetensors")
    b = load_file(f"{resumed.final_dir}/model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_should_stop_ends_early_and_leaves_a_checkpoint(tmp_path, digits_run):
    rec = Recorder(stop_at=10)
    result = train(digits_run(tmp_path, train={"max_steps": 100, "save_every": 1000}), rec.callbacks())

    assert result.stopped and result.steps == 10
    assert result.final_dir is None and result.student == {} and result.teacher is None
    assert result.last_checkpoint.endswith("checkpoints/step-10")
    assert rec.checkpoints == [(10, result.last_checkpoint)]
    state = json.loads((tmp_path / "checkpoints" / "step-10" / "trainer_state.json").read_text())
    assert state["step"] == 10
    assert not (tmp_path / "final").exists()


def test_only_the_last_two_checkpoints_are_kept(tmp_path, digits_run):
    train(digits_run(tmp_path, train={"max_steps": 20, "save_every": 5}))
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-15", "step-20"]


def test_checkpoint_of_a_different_config_is_not_resumed(tmp_path, digits_run):
    train(digits_run(tmp_path, train={"max_steps": 10, "save_every": 5}))
    with pytest.raises(ConfigError, match=r"different run \(changed: train.lr\)"):
        train(digits_run(tmp_path, train={"max_steps": 10, "save_every": 5, "lr": 0.5}))


def test_nan_loss_raises_with_the_step_and_term_and_saves_no_bad_checkpoint(
    tmp_path, digits_run, digits_teacher, monkeypatch
):
    kd = LOSS_TERMS["kd"]
    seen = {"calls": 0}

    def kd_nan_from_third_call(*args, **kwargs):
        seen["calls"] += 1
        value = kd.fn(*args, **kwargs)
        return value * float("nan") if seen["calls"] >= 3 else value

    monkeypatch.setitem(LOSS_TERMS, "kd", dataclasses.replace(kd, fn=kd_nan_from_third_call))
    cfg = digits_run(
        tmp_path,
        teacher=_teacher(digits_teacher),
        terms=KD_TERMS,
        scheme="offline",
        train={"max_steps": 20, "save_every": 1, "log_every": 5},
    )
    with pytest.raises(TrainingError) as exc:
        train(cfg)
    assert str(exc.value) == (
        "Loss became NaN at step 3 (term: kd). Try a lower learning rate or temperature."
    )
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-1", "step-2"]
    weights = load_file(tmp_path / "checkpoints" / "step-2" / "model.safetensors")
    assert all(torch.isfinite(w).all() for w in weights.values())


def test_exploding_learning_rate_is_reported_as_nan(tmp_path, digits_run):
    with pytest.raises(TrainingError, match=r"Loss became NaN at step \d+ \(term: ce\)"):
        train(digits_run(tmp_path, train={"lr": 1e30, "grad_clip": 0.0, "lr_schedule": "constant"}))


def test_teacher_terms_without_a_teacher_are_a_config_error(tmp_path, digits_run):
    with pytest.raises(ConfigError, match="Loss term 'kd' needs a teacher, but the run has none"):
        train(digits_run(tmp_path, terms=KD_TERMS, scheme="offline"))


def test_hard_labels_scheme_trains_ce_alone_at_full_weight(tmp_path, digits_run, digits_teacher):
    rec = Recorder()
    cfg = digits_run(
        tmp_path,
        teacher=_teacher(digits_teacher),
        terms=KD_TERMS,
        scheme="hard_labels",
        train={"max_steps": 5},
    )
    result = train(cfg, rec.callbacks())
    assert set(rec.metrics[0][1]) == {"loss", "ce", "lr", "samples_per_s"}
    assert rec.metrics[0][1]["loss"] == pytest.approx(rec.metrics[0][1]["ce"])
    assert result.teacher is None


def test_bad_train_settings_are_config_errors(tmp_path, digits_run):
    with pytest.raises(ConfigError, match="train.batch_size must be a whole number >= 1"):
        train(digits_run(tmp_path, train={"batch_size": 0}))
    with pytest.raises(ConfigError, match="lr_schedule"):
        train(digits_run(tmp_path, train={"lr_schedule": "step"}))
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="CUDA is not available"):
            train(digits_run(tmp_path, train={"device": "cuda"}))


def test_lr_schedule_warms_up_then_decays():
    cfg = TrainConfig(max_steps=110, lr=1.0, warmup_steps=10, lr_schedule="linear")
    assert [lr_at(s, cfg) for s in (0, 4, 9)] == [0.1, 0.5, 1.0]
    assert (
        lr_at(10, cfg) == 1.0
        and lr_at(60, cfg) == pytest.approx(0.5)
        and lr_at(109, cfg) == pytest.approx(0.01)
    )
    cosine = dataclasses.replace(cfg, lr_schedule="cosine")
    assert lr_at(60, cosine) == pytest.approx(0.5) and lr_at(109, cosine) < 0.01
    assert lr_at(100, dataclasses.replace(cfg, lr_schedule="constant")) == 1.0


def test_tiny_bert_distils_end_to_end_and_its_final_folder_loads_as_a_run(tmp_path, topics_csv, topics):
    from workers.engine.batching import Batcher
    from workers.engine.config import RunConfig
    from workers.engine.models import forward_logits, load_model

    cfg = RunConfig.from_dict(
        {
            "student": {"source": "config", "params": {**TINY_BERT, "num_hidden_layers": 1}},
            "teacher": {"source": "config", "params": TINY_BERT},
            "dataset": {
                "source": "hf",
                "path": str(topics_csv),
                "text_column": "body",
                "label_column": "topic",
                "max_length": 32,
            },
            "terms": [{"name": "ce", "weight": 0.5}, {"name": "jsd", "weight": 0.5, "params": {"beta": 0.5}}],
            "scheme": "online",
            "train": {
                "max_steps": 6,
                "batch_size": 8,
                "lr": 1e-3,
                "log_every": 2,
                "eval_every": 3,
                "save_every": 3,
                "device": "cpu",
            },
            "output_dir": str(tmp_path),
        }
    )
    rec = Recorder()
    result = train(cfg, rec.callbacks())

    assert result.steps == 6 and {"ce", "jsd"} <= set(rec.metrics[0][1])
    assert all(math.isfinite(v) for _, m in rec.metrics for v in m.values())
    assert result.student["params_non_embedding"] < result.student["params"]
    assert result.teacher["params"] > result.student["params"]
    assert result.student["size_bytes"] == sum(
        p.stat().st_size for p in (tmp_path / "final").glob("*.safetensors")
    )

    reloaded = load_model(ModelConfig(source="run", path=result.final_dir), dataset=topics, role="teacher")
    batch = Batcher(topics.eval, tokenizer=reloaded.tokenizer, max_length=32).batch(range(len(topics.eval)))
    reloaded.model.eval()
    accuracy = (forward_logits(reloaded.model, batch.inputs).argmax(-1) == batch.labels).float().mean().item()
    assert accuracy == pytest.approx(result.student["accuracy"])


def test_cli_runs_a_config_file_and_prints_a_results_table(tmp_path, digits_run, capsys):
    config = digits_run(tmp_path / "out", train={"max_steps": 5}).to_dict()
    (tmp_path / "run.json").write_text(json.dumps(config))
    assert cli_main(["run", str(tmp_path / "run.json")]) == 0
    out, err = capsys.readouterr()
    assert "step 5/5 [####################] 100%" in err
    assert "accuracy" in out and "latency_ms_p50" in out
    assert (tmp_path / "out" / "final" / "model.safetensors").is_file()


def test_cli_lists_the_loss_terms(capsys):
    assert cli_main(["methods"]) == 0
    out = capsys.readouterr().out
    assert (
        "kd  (needs a teacher: teacher_logits)" in out
        and "on_policy" in out
        and "temperature = 4" in out
        and "beta = 0.5" in out
    )


def test_out_of_memory_becomes_a_training_error_with_step_and_batch_size(tmp_path, digits_run, monkeypatch):
    def oom(*_args, **_kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(step_inputs, "forward_outputs", oom)
    with pytest.raises(TrainingError) as exc:
        train(digits_run(tmp_path))
    assert str(exc.value).startswith("Out of GPU memory at step 1. The run's estimate is ")
    assert "a smaller batch size (now 32;" in str(exc.value)


@pytest.mark.parametrize(
    ("scheme", "terms", "expect_unlabelled"),
    [("hard_labels", [{"name": "ce"}], False), ("offline", KD_TERMS, True)],
)
def test_unlabelled_rows_are_used_only_by_teacher_terms(
    tmp_path, digits_run, digits_teacher, monkeypatch, scheme, terms, expect_unlabelled
):
    sampled = []
    real_rows_for_step = trainer.rows_for_step

    def recording_rows_for_step(*args, **kwargs):
        sampled.append(real_rows_for_step(*args, **kwargs))
        return sampled[-1]

    monkeypatch.setattr(trainer, "rows_for_step", recording_rows_for_step)
    cfg = digits_run(
        tmp_path,
        teacher=_teacher(digits_teacher),
        terms=terms,
        scheme=scheme,
        dataset={"source": "builtin", "name": "digits", "labelled_fraction": 0.1},
        train={"max_steps": 10},
    )
    train(cfg)

    labels = load_dataset(cfg.dataset).train.labels
    seen = labels[np.concatenate(sampled)]
    assert (seen == -100).any() == expect_unlabelled
    assert (seen != -100).any()


# --- gradient accumulation, early stopping, term state ------------------------------------------------------


def _weights(result) -> dict[str, torch.Tensor]:
    return load_file(f"{result.final_dir}/model.safetensors")


def test_gradient_accumulation_matches_one_big_batch(tmp_path, digits_run):
    settings = {"max_steps": 8, "lr_schedule": "constant", "grad_clip": 0.0}
    big = train(digits_run(tmp_path / "big", train={**settings, "batch_size": 64}))
    rec = Recorder()
    small = train(
        digits_run(tmp_path / "small", train={**settings, "batch_size": 32, "grad_accum_steps": 2}),
        rec.callbacks(),
    )
    a, b = _weights(big), _weights(small)
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)  # equal up to float summation order
    assert rec.metrics[0][1]["samples_per_s"] > 0
    one_step = train(digits_run(tmp_path / "one", train={**settings, "batch_size": 32}))
    c = _weights(one_step)
    assert not all(torch.allclose(a[k], c[k], atol=1e-5) for k in a)  # a different (smaller) batch differs


def _stopping(**train_overrides) -> dict:
    # "loss" watched with mode max: the first evaluation is the best, every later one is worse.
    return {
        "max_steps": 40,
        "eval_every": 5,
        "save_every": 5,
        "early_stopping_metric": "loss",
        "early_stopping_mode": "max",
        "early_stopping_patience": 2,
        **train_overrides,
    }


def _validation_metrics(cfg, result) -> dict[str, float]:
    """A finished run's saved student evaluated on the run's validation slice."""
    from workers.engine.batching import Batcher
    from workers.engine.evaluate import evaluate
    from workers.engine.models import load_model

    dataset = load_dataset(cfg.dataset)
    student = load_model(ModelConfig(source="run", path=result.final_dir), dataset=dataset, role="student")
    rows = run_setup._validation_slice(cfg, dataset, Batcher(dataset.train))
    _, batches = run_setup._validation_view(dataset, Batcher(dataset.train), rows, student, max_length=128)
    return evaluate(student.model, batches, efficiency=False)


def test_early_stopping_stops_and_records_why(tmp_path, digits_run):
    rec = Recorder()
    result = train(digits_run(tmp_path, train=_stopping()), rec.callbacks())
    assert result.stopped_early and not result.stopped
    assert result.steps == 15 and result.best_step == 5
    # Selection happens on the validation slice held out of the train split, never on the eval split.
    assert result.best_metric == pytest.approx(
        next(m["val/loss"] for s, m in rec.metrics if s == 5 and "val/loss" in m)
    )
    assert result.final_dir is not None and "accuracy" in result.student
    plain = train(digits_run(tmp_path / "plain", train={"max_steps": 10}))
    assert plain.stopped_early is False and plain.best_step is None and plain.best_metric is None


def test_early_stopping_keeps_the_best_evaluated_weights(tmp_path, digits_run):
    rec = Recorder()
    best = train(digits_run(tmp_path / "best", train=_stopping()), rec.callbacks())
    at_best = next(m for s, m in rec.metrics if s == 5 and "val/loss" in m)
    assert best.restored_best and best.best_step == 5
    # The saved student is the step-5 one: its evaluation on the validation slice repeats step 5's numbers.
    on_val = _validation_metrics(digits_run(tmp_path / "best", train=_stopping()), best)
    assert on_val["nll"] == pytest.approx(at_best["val/loss"], rel=1e-6)
    assert on_val["accuracy"] == pytest.approx(at_best["val/accuracy"])
    last = train(digits_run(tmp_path / "last", train=_stopping(early_stopping_restore_best=False)))
    last_on_val = _validation_metrics(digits_run(tmp_path / "last", train=_stopping()), last)
    assert not last.restored_best and last_on_val["nll"] != pytest.approx(at_best["val/loss"], rel=1e-6)
    reloaded = _weights(best)
    assert not all(torch.equal(reloaded[k], v) for k, v in _weights(last).items())
    # A run that ends at max_steps while its last weights are the best restores nothing.
    improving = train(digits_run(tmp_path / "up", train=_stopping(early_stopping_mode="min", max_steps=20)))
    assert not improving.stopped_early and improving.best_step == 20 and not improving.restored_best


def test_early_stopping_state_survives_a_resume(tmp_path, digits_run):
    straight = train(digits_run(tmp_path / "a", train=_stopping()))
    cfg = digits_run(tmp_path / "b", train=_stopping())
    first = train(cfg, Recorder(stop_at=10).callbacks())
    assert first.stopped and first.steps == 10
    resumed = train(cfg)
    assert (resumed.steps, resumed.best_step, resumed.best_metric) == (15, 5, straight.best_metric)
    a, b = _weights(straight), _weights(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_is_bit_for_bit_with_term_state_modules_and_accumulation(tmp_path, digits_run, digits_teacher):
    terms = [
        {"name": "ce", "weight": 0.3},
        {"name": "taid", "weight": 0.5},
        {"name": "hidden_mse", "weight": 0.2, "params": {"layer_map": "last"}},
    ]
    student = {"source": "builtin", "name": "mlp", "params": {"hidden_sizes": [32], "dropout": 0.3}}
    settings = {"max_steps": 16, "save_every": 4, "log_every": 4, "batch_size": 16, "grad_accum_steps": 2}

    def cfg(name):
        return digits_run(
            tmp_path / name,
            student=student,
            teacher=_teacher(digits_teacher),
            terms=terms,
            scheme="online",
            evaluate_teacher=False,
            train=settings,
        )

    rec_a = Recorder()
    straight = train(cfg("a"), rec_a.callbacks())
    first = train(cfg("b"), Recorder(stop_at=8).callbacks())
    assert first.stopped and first.steps == 8
    state = json.loads((tmp_path / "b" / "checkpoints" / "step-8" / "trainer_state.json").read_text())
    assert 0.4 < state["extra"]["term_state"]["taid"]["t"] < 1.0
    assert (tmp_path / "b" / "checkpoints" / "step-8" / "term_modules.safetensors").is_file()
    rec_b = Recorder()
    resumed = train(cfg("b"), rec_b.callbacks())

    a, b = _weights(straight), _weights(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)
    ma = load_file(f"{straight.final_dir}/term_modules.safetensors")
    mb = load_file(f"{resumed.final_dir}/term_modules.safetensors")
    assert set(ma) == {"hidden_mse.0.weight", "hidden_mse.0.bias"}  # the learned 32 → 64 projection
    assert all(torch.equal(ma[k], mb[k]) for k in ma)

    def last_log(rec):
        return {
            k: v
            for s, m in rec.metrics
            if s == 16 and "loss" in m
            for k, v in m.items()
            if k != "samples_per_s"
        }

    assert last_log(rec_a) == last_log(rec_b)
    assert "t/taid" in rec_b.metrics[0][1]


def test_scheduled_term_weights_are_logged(tmp_path, digits_run, digits_teacher):
    terms = [
        {"name": "ce", "weight": 0.5},
        {
            "name": "kd",
            "weight": 1.0,
            "schedule": {
                "weight": {"kind": "linear", "start": 0.0, "end": 1.0},
                "temperature": {"kind": "linear", "start": 4, "end": 2},
            },
        },
    ]
    rec = Recorder()
    train(
        digits_run(
            tmp_path,
            teacher=_teacher(digits_teacher),
            terms=terms,
            scheme="offline",
            evaluate_teacher=False,
            train={"max_steps": 10, "log_every": 5},
        ),
        rec.callbacks(),
    )
    first, last = rec.metrics[0][1], [m for _, m in rec.metrics if "loss" in m][-1]
    assert first["weight/kd"] == pytest.approx(0.4) and last["weight/kd"] == pytest.approx(0.9)
    assert first["temperature/kd"] == pytest.approx(3.2)
    assert "weight/ce" not in first


# --- feature terms and schemes ------------------------------------------------------------------------------


def test_feature_terms_train_online_and_are_refused_offline(
    tmp_path, digits_run, digits_teacher, monkeypatch
):
    terms = [{"name": "ce", "weight": 0.5}, {"name": "hidden_mse", "weight": 0.5}]
    rec = Recorder()
    result = train(
        digits_run(
            tmp_path / "on",
            teacher=_teacher(digits_teacher),
            terms=terms,
            scheme="online",
            evaluate_teacher=False,
            train={"max_steps": 10},
        ),
        rec.callbacks(),
    )
    losses = [m["hidden_mse"] for _, m in rec.metrics if "hidden_mse" in m]
    assert result.steps == 10 and losses[-1] < losses[0]

    calls = {"loads": 0}
    monkeypatch.setattr(run_setup, "load_dataset", lambda *a, **k: calls.__setitem__("loads", 1))
    with pytest.raises(
        ConfigError,
        match="Loss term 'hidden_mse' needs the teacher's hidden_states on every "
        "batch, which the offline scheme does not keep.*Use the online scheme",
    ):
        train(digits_run(tmp_path / "off", teacher=_teacher(digits_teacher), terms=terms, scheme="offline"))
    assert calls["loads"] == 0  # refused before any data or model is read


def test_transformer_feature_terms_read_hidden_states_attentions_and_values(tmp_path, topics_csv):
    from workers.engine.config import RunConfig

    cfg = RunConfig.from_dict(
        {
            "student": {
                "source": "config",
                "params": {**TINY_BERT, "num_hidden_layers": 1, "hidden_size": 16},
            },
            "teacher": {"source": "config", "params": TINY_BERT},
            "dataset": {
                "source": "hf",
                "path": str(topics_csv),
                "text_column": "body",
                "label_column": "topic",
                "max_length": 16,
            },
            "terms": [
                {"name": "ce", "weight": 0.5},
                {"name": "hidden_mse", "weight": 0.2},
                {"name": "attention_kl", "weight": 0.2},
                {"name": "attention_mse", "weight": 0.1},
            ],
            "scheme": "online",
            "evaluate_teacher": False,
            "train": {"max_steps": 3, "batch_size": 4, "log_every": 1, "eval_every": 100, "device": "cpu"},
            "output_dir": str(tmp_path),
        }
    )
    rec = Recorder()
    train(cfg, rec.callbacks())
    assert {"hidden_mse", "attention_kl", "attention_mse"} <= set(rec.metrics[0][1])
    assert all(math.isfinite(v) for _, m in rec.metrics for v in m.values())


def test_multi_teacher_target_is_the_weighted_average_of_the_distributions():
    z1, z2 = torch.tensor([[2.0, 0.0, -1.0]]), torch.tensor([[0.0, 1.0, 0.0]])
    p1, p2 = torch.softmax(z1, -1), torch.softmax(z2, -1)
    mixed = teachers.mix_teacher_logits([z1, z2], [1.0, 3.0])
    assert torch.allclose(mixed.exp(), 0.25 * p1 + 0.75 * p2)
    assert torch.allclose(mixed, torch.log(0.25 * p1 + 0.75 * p2))
    assert torch.allclose(teachers.mix_teacher_logits([z1, z2], [1.0, 0.0]).exp(), p1)


def test_multi_teacher_run_caches_the_mixture_of_its_teachers(tmp_path, digits_run, digits_teacher, digits):
    from workers.engine.batching import Batcher
    from workers.engine.models import load_model

    extra = {"source": "builtin", "name": "mlp", "params": {"hidden_sizes": [16]}}
    cfg = digits_run(
        tmp_path,
        teacher=_teacher(digits_teacher),
        extra_teachers=[extra],
        teacher_weights=[3, 1],
        terms=KD_TERMS,
        scheme="multi_teacher",
        train={"max_steps": 5},
    )
    result = train(cfg)
    entry = load_file(f"{result.teacher_cache[0]['path']}/outputs.safetensors")["logits"]

    torch.manual_seed(cfg.train.seed)  # the trainer builds each teacher from the run's seed
    random_teacher = load_model(cfg.extra_teachers[0], dataset=digits, role="teacher").model.eval()
    trained = load_model(cfg.teacher, dataset=digits, role="teacher").model.eval()
    features = Batcher(digits.train).batch(range(len(digits.train))).inputs
    with torch.no_grad():
        expected = torch.log(
            0.75 * torch.softmax(trained(**features), -1)
            + 0.25 * torch.softmax(random_teacher(**features), -1)
        )
    assert torch.allclose(entry, expected, atol=1e-5)
    assert result.teacher["params"] == sum(
        p.numel() for m in (trained, random_teacher) for p in m.parameters()
    )


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"scheme": "self_distillation"}, "is a chain of runs that the experiment builds"),
        ({"scheme": "seq_kd"}, "Scheme 'seq_kd' works for causal_lm runs, not classification"),
        (
            {"scheme": "offline", "extra_teachers": [{"source": "builtin", "name": "mlp"}]},
            "Extra teachers are only used by the multi_teacher scheme",
        ),
        (
            {"scheme": "multi_teacher", "teacher_weights": [1.0, 2.0]},
            "teacher_weights has 2 entries for 1 teachers",
        ),
        (
            {
                "scheme": "offline",
                "train": {"early_stopping_metric": "perplexity", "early_stopping_patience": 2},
            },
            "Early stopping cannot watch 'perplexity'",
        ),
        (
            {"scheme": "offline", "train": {"grad_accum_steps": 0}},
            "train.grad_accum_steps must be a whole number",
        ),
    ],
)
def test_bad_schemes_and_settings_are_refused_before_anything_loads(
    tmp_path, digits_run, digits_teacher, overrides, message, monkeypatch
):
    monkeypatch.setattr(run_setup, "load_dataset", lambda *a, **k: pytest.fail("loaded data"))
    with pytest.raises(ConfigError, match=message):
        train(digits_run(tmp_path, teacher=_teacher(digits_teacher), terms=KD_TERMS, **overrides))
