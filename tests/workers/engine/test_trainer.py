"""The training loop on CPU: schemes, callbacks, checkpoints and resume, failures, the command line."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from workers.engine import trainer
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
        return Callbacks(on_metrics=lambda s, m: self.metrics.append((s, m)),
                         on_progress=lambda s, t: self.progress.append((s, t)),
                         on_checkpoint=lambda s, p: self.checkpoints.append((s, p)),
                         should_stop=lambda: self.stop_at is not None and self.progress[-1][0] >= self.stop_at)

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
    assert result.student["accuracy"] > 0.5      # 10 classes: chance is 0.1
    assert {"params", "size_bytes", "latency_ms_p50", "latency_ms_p95", "throughput_per_s"} <= set(result.student)
    assert set(result.to_dict()) == {"steps", "stopped", "final_dir", "student", "teacher", "train_seconds",
                                     "last_checkpoint"}
    json.dumps(result.to_dict())


def test_offline_kd_runs_the_teacher_only_to_precompute_logits(tmp_path, digits_run, digits_teacher, monkeypatch):
    calls = {"teacher": 0}
    real_load_model = trainer.load_model

    def counting_load_model(cfg, *, dataset, role):
        loaded = real_load_model(cfg, dataset=dataset, role=role)
        if role == "teacher":
            loaded.model.register_forward_hook(lambda *_: calls.__setitem__("teacher", calls["teacher"] + 1))
        return loaded

    monkeypatch.setattr(trainer, "load_model", counting_load_model)
    calls_at_step: dict[int, int] = {}
    rec = Recorder()
    callbacks = rec.callbacks()
    callbacks.on_progress = lambda step, total: calls_at_step.setdefault(step, calls["teacher"])
    cfg = digits_run(tmp_path, teacher=_teacher(digits_teacher), terms=KD_TERMS, scheme="offline",
                     train={"max_steps": 40, "batch_size": 64})
    result = train(cfg, callbacks)

    precompute_batches = math.ceil(1437 / 64)   # the train split, once
    assert calls_at_step[1] == precompute_batches
    assert calls_at_step[40] == precompute_batches
    assert {"loss", "ce", "kd", "lr", "samples_per_s"} == set(rec.metrics[0][1])
    assert rec.train_losses()[-1] < rec.train_losses()[0]
    assert {"agreement", "kl_to_teacher"} <= set(result.student)
    assert result.teacher["accuracy"] > 0.8


def test_online_kd_runs_the_teacher_on_every_step(tmp_path, digits_run, digits_teacher, monkeypatch):
    calls = {"teacher": 0}
    real_load_model = trainer.load_model

    def counting_load_model(cfg, *, dataset, role):
        loaded = real_load_model(cfg, dataset=dataset, role=role)
        if role == "teacher":
            loaded.model.register_forward_hook(lambda *_: calls.__setitem__("teacher", calls["teacher"] + 1))
        return loaded

    monkeypatch.setattr(trainer, "load_model", counting_load_model)
    calls_at_step: dict[int, int] = {}
    cfg = digits_run(tmp_path, teacher=_teacher(digits_teacher), terms=KD_TERMS, scheme="online",
                     evaluate_teacher=False, train={"max_steps": 10})
    result = train(cfg, Callbacks(on_progress=lambda step, _: calls_at_step.setdefault(step, calls["teacher"])))
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


def test_nan_loss_raises_with_the_step_and_term_and_saves_no_bad_checkpoint(tmp_path, digits_run, digits_teacher,
                                                                             monkeypatch):
    kd = LOSS_TERMS["kd"]
    seen = {"calls": 0}

    def kd_nan_from_third_call(*args, **kwargs):
        seen["calls"] += 1
        value = kd.fn(*args, **kwargs)
        return value * float("nan") if seen["calls"] >= 3 else value

    monkeypatch.setitem(LOSS_TERMS, "kd", dataclasses.replace(kd, fn=kd_nan_from_third_call))
    cfg = digits_run(tmp_path, teacher=_teacher(digits_teacher), terms=KD_TERMS, scheme="offline",
                     train={"max_steps": 20, "save_every": 1, "log_every": 5})
    with pytest.raises(TrainingError) as exc:
        train(cfg)
    assert str(exc.value) == ("Loss became NaN at step 3 (term: kd). Try a lower learning rate or temperature.")
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
    cfg = digits_run(tmp_path, teacher=_teacher(digits_teacher), terms=KD_TERMS, scheme="hard_labels",
                     train={"max_steps": 5})
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
    assert lr_at(10, cfg) == 1.0 and lr_at(60, cfg) == pytest.approx(0.5) and lr_at(109, cfg) == pytest.approx(0.01)
    cosine = dataclasses.replace(cfg, lr_schedule="cosine")
    assert lr_at(60, cosine) == pytest.approx(0.5) and lr_at(109, cosine) < 0.01
    assert lr_at(100, dataclasses.replace(cfg, lr_schedule="constant")) == 1.0


def test_tiny_bert_distils_end_to_end_and_its_final_folder_loads_as_a_run(tmp_path, topics_csv, topics):
    from workers.engine.config import RunConfig
    from workers.engine.data import Batcher
    from workers.engine.models import forward_logits, load_model

    cfg = RunConfig.from_dict({
        "student": {"source": "config", "params": {**TINY_BERT, "num_hidden_layers": 1}},
        "teacher": {"source": "config", "params": TINY_BERT},
        "dataset": {"source": "hf", "path": str(topics_csv), "text_column": "body", "label_column": "topic",
                    "max_length": 32},
        "terms": [{"name": "ce", "weight": 0.5}, {"name": "jsd", "weight": 0.5, "params": {"beta": 0.5}}],
        "scheme": "online",
        "train": {"max_steps": 6, "batch_size": 8, "lr": 1e-3, "log_every": 2, "eval_every": 3, "save_every": 3,
                  "device": "cpu"},
        "output_dir": str(tmp_path),
    })
    rec = Recorder()
    result = train(cfg, rec.callbacks())

    assert result.steps == 6 and {"ce", "jsd"} <= set(rec.metrics[0][1])
    assert all(math.isfinite(v) for _, m in rec.metrics for v in m.values())
    assert result.student["params_non_embedding"] < result.student["params"]
    assert result.teacher["params"] > result.student["params"]
    assert result.student["size_bytes"] == sum(p.stat().st_size for p in (tmp_path / "final").glob("*.safetensors"))

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
    assert "kd  (needs a teacher)" in out and "temperature = 4" in out and "beta = 0.5" in out


def test_out_of_memory_becomes_a_training_error_with_step_and_batch_size(tmp_path, digits_run, monkeypatch):
    def oom(*_args, **_kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(trainer, "forward_logits", oom)
    with pytest.raises(TrainingError) as exc:
        train(digits_run(tmp_path))
    assert str(exc.value) == ("Out of GPU memory at step 1 with batch size 32. "
                              "Lower the batch size or max length.")


@pytest.mark.parametrize(("scheme", "terms", "expect_unlabelled"), [("hard_labels", [{"name": "ce"}], False),
                                                                     ("offline", KD_TERMS, True)])
def test_unlabelled_rows_are_used_only_by_teacher_terms(tmp_path, digits_run, digits_teacher, monkeypatch,
                                                        scheme, terms, expect_unlabelled):
    sampled = []
    real_rows_for_step = trainer.rows_for_step

    def recording_rows_for_step(*args, **kwargs):
        sampled.append(real_rows_for_step(*args, **kwargs))
        return sampled[-1]

    monkeypatch.setattr(trainer, "rows_for_step", recording_rows_for_step)
    cfg = digits_run(tmp_path, teacher=_teacher(digits_teacher), terms=terms, scheme=scheme,
                     dataset={"source": "builtin", "name": "digits", "labelled_fraction": 0.1},
                     train={"max_steps": 10})
    train(cfg)

    labels = load_dataset(cfg.dataset).train.labels
    seen = labels[np.concatenate(sampled)]
    assert (seen == -100).any() == expect_unlabelled
    assert (seen != -100).any()
