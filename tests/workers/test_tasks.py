"""The Celery task in-process (``apply``): claim, engine wiring, failures and duplicate delivery."""

import json
from types import SimpleNamespace
from unittest import mock

import pytest

from experiments.models import Evaluation, MetricPoint, Run
from experiments.services import launch, lifecycle, records
from workers.engine.errors import DataError
from workers.reporting import RunReporter
from workers.tasks import run_distillation

pytestmark = pytest.mark.django_db

DISPATCH = "workers.tasks.run_distillation.apply_async"


@pytest.fixture
def experiment(digits_setup, team, user):
    with mock.patch(DISPATCH):
        return launch.experiment_create(
            team=team,
            created_by=user,
            name="kd",
            dataset=digits_setup["dataset"],
            teacher=digits_setup["teacher"],
            students=digits_setup["students"][:1],
            recipes=[digits_setup["recipe"]],
            seeds=[0],
            train={"max_steps": 40, "eval_every": 20, "save_every": 20, "log_every": 10},
        )


def test_a_real_run_trains_distills_and_records_results(experiment, settings):
    run = experiment.runs.get(is_baseline=False)
    run_distillation.apply(args=(run.id,))
    run.refresh_from_db()
    assert run.status == Run.Status.SUCCEEDED, run.error
    assert run.step == 40 and run.finished_at and run.attempt == 1
    names = set(MetricPoint.objects.filter(run=run).values_list("name", flat=True))
    assert {"loss", "ce", "kd", "eval/accuracy"} <= names
    assert list(
        MetricPoint.objects.filter(run=run, name="loss").values_list("step", flat=True).order_by("step")
    ) == [10, 20, 30, 40]
    student = Evaluation.objects.get(run=run, role="student")
    assert student.accuracy is not None and student.param_count == run.result["student"]["params"]
    assert Evaluation.objects.filter(role="teacher", model=run.teacher).count() == 1
    # The final model is written by the attempt that owns the run, in a folder of its own, and recorded.
    model = run.artifacts.get(kind="model")
    assert model.path == f"runs/{run.id}/final-a1" and (settings.ARTIFACT_ROOT / model.path).is_dir()
    assert run.artifacts.filter(kind="checkpoint").exists()


def test_the_teacher_is_evaluated_once_per_benchmark(experiment, digits_setup, team, user):
    first = experiment.runs.get(is_baseline=False)
    run_distillation.apply(args=(first.id,))
    first.refresh_from_db()
    assert first.result["teacher_forwards"] > 0 and not any(e["hit"] for e in first.result["teacher_cache"])
    with mock.patch(DISPATCH):
        again = launch.experiment_create(
            team=team,
            created_by=user,
            name="kd again",
            dataset=digits_setup["dataset"],
            teacher=digits_setup["teacher"],
            students=digits_setup["students"][1:],
            recipes=[digits_setup["recipe"]],
            seeds=[0],
            train={"max_steps": 10, "eval_every": 10},
        )
    second = again.runs.get(is_baseline=False)
    run_distillation.apply(args=(second.id,))
    second.refresh_from_db()
    assert second.status == Run.Status.SUCCEEDED and second.result["teacher"] is None  # not measured again
    assert second.result["student"]["agreement"] > 0  # fidelity still measured against the teacher's logits
    assert Evaluation.objects.filter(role="teacher").count() == 1
    # The teacher-output cache computed by the first run serves the second: no teacher forward at all.
    assert second.result["teacher_forwards"] == 0
    assert second.result["teacher_cache"] and all(entry["hit"] for entry in second.result["teacher_cache"])
    first_cache = set(first.artifacts.filter(kind="teacher_cache").values_list("path", flat=True))
    second_cache = set(second.artifacts.filter(kind="teacher_cache").values_list("path", flat=True))
    assert first_cache and first_cache == second_cache
    assert all(p.startswith("teacher-cache/") for p in first_cache)


def test_duplicate_delivery_of_a_live_run_does_nothing(experiment):
    run = experiment.runs.first()
    lifecycle.run_claim(run_id=run.id, task_id="first-delivery", worker_name="w1")
    with mock.patch("workers.engine.trainer.train") as train:
        run_distillation.apply(args=(run.id,), task_id="second-delivery")
    train.assert_not_called()
    run.refresh_from_db()
    assert run.status == Run.Status.RUNNING and run.task_id == "first-delivery"


def test_finished_run_is_not_trained_again(experiment):
    run = experiment.runs.get(is_baseline=True)
    run_distillation.apply(args=(run.id,))
    with mock.patch("workers.engine.trainer.train") as train:
        run_distillation.apply(args=(run.id,))
    train.assert_not_called()
    run.refresh_from_db()
    assert run.status == Run.Status.SUCCEEDED and run.attempt == 1


def test_engine_errors_fail_the_run_with_the_engine_message_and_keep_metrics(experiment):
    run = experiment.runs.first()

    def failing_train(cfg, callbacks):
        callbacks.on_metrics(10, {"loss": 1.5})
        raise DataError("Dataset has no column 'text'. Available columns: body, label.")

    with mock.patch("workers.engine.trainer.train", side_effect=failing_train):
        run_distillation.apply(args=(run.id,))
    run.refresh_from_db()
    assert run.status == Run.Status.FAILED
    assert run.error == "Dataset has no column 'text'. Available columns: body, label."
    assert MetricPoint.objects.get(run=run).value == 1.5


def test_unexpected_errors_fail_the_run_with_the_exception_named(experiment):
    run = experiment.runs.first()
    with mock.patch("workers.engine.trainer.train", side_effect=ZeroDivisionError("boom")):
        run_distillation.apply(args=(run.id,))
    run.refresh_from_db()
    assert run.status == Run.Status.FAILED and "ZeroDivisionError" in run.error and "boom" in run.error


def test_a_cancelled_run_stops_and_keeps_its_metrics(experiment):
    run = experiment.runs.first()

    def train_until_cancelled(cfg, callbacks):
        callbacks.on_metrics(10, {"loss": 1.0})
        lifecycle.run_cancel(run=Run.objects.get(id=run.id))
        assert callbacks.should_stop()
        return SimpleNamespace(stopped=True, to_dict=dict)

    with mock.patch("workers.engine.trainer.train", side_effect=train_until_cancelled):
        run_distillation.apply(args=(run.id,))
    run.refresh_from_db()
    assert run.status == Run.Status.CANCELLED and run.finished_at
    assert MetricPoint.objects.filter(run=run).count() == 1


def test_reporter_batches_metric_writes(experiment):
    run = experiment.runs.first()
    lifecycle.run_claim(run_id=run.id, task_id="t", worker_name="w")
    now = [0.0]
    reporter = RunReporter(
        run_id=run.id, task_id="t", flush_every_s=5.0, max_buffer=1000, clock=lambda: now[0]
    )
    for step in range(1, 101):
        reporter.on_metrics(step, {"loss": 1.0 / step, "kd": 0.5})
    assert MetricPoint.objects.filter(run=run).count() == 0  # buffered, not one write per step
    now[0] = 6.0
    reporter.on_metrics(101, {"loss": 0.01})
    assert MetricPoint.objects.filter(run=run).count() == 201


def test_reporter_stops_the_engine_when_the_run_was_taken_over(experiment):
    run = experiment.runs.first()
    lifecycle.run_claim(run_id=run.id, task_id="old", worker_name="w")
    Run.objects.filter(id=run.id).update(task_id="new")  # another delivery took it over
    reporter = RunReporter(run_id=run.id, task_id="old", clock=lambda: 100.0)
    reporter.on_progress(5, 40)
    assert reporter.should_stop()


def test_a_causal_lm_experiment_distils_through_the_sparse_teacher_cache(team, user, settings, tmp_path):
    data = tmp_path / "corpus"
    data.mkdir()
    lines = [f"the {w} sat on the mat and the {w} ran to the door number {i}" for i, w in
             enumerate(["cat", "dog", "fox", "owl"] * 30)]
    (data / "lines.jsonl").write_text("".join(json.dumps({"text": line}) + "\n" for line in lines))
    settings.DATASET_ROOTS = [data]
    dataset = records.dataset_spec_create(
        team=team,
        created_by=user,
        name="lines",
        source="hf",
        task="causal_lm",
        local_path=str(data / "lines.jsonl"),
        max_length=32,
    )

    def llama(name, hidden, layers):
        return records.model_spec_create(
            team=team,
            created_by=user,
            name=name,
            source="config",
            task="causal_lm",
            config={
                "model_type": "llama",
                "hidden_size": hidden,
                "intermediate_size": 2 * hidden,
                "num_hidden_layers": layers,
                "num_attention_heads": 2,
                "num_key_value_heads": 2,
                "vocab_size": 300,
                "max_position_embeddings": 64,
            },
        )

    teacher, student = llama("lm-teacher", 64, 2), llama("lm-student", 32, 1)
    topk = records.recipe_create(team=team, created_by=user, name="topk", scheme="offline",
                                  terms=[{"name": "topk", "weight": 1.0, "params": {"k": 16}}])
    with mock.patch(DISPATCH):
        experiment = launch.experiment_create(
            team=team,
            created_by=user,
            name="lm",
            dataset=dataset,
            teacher=teacher,
            students=[student],
            recipes=[topk],
            seeds=[0],
            train={
                "max_steps": 12,
                "batch_size": 8,
                "eval_every": 6,
                "log_every": 3,
                "save_every": 6,
                "lr": 0.003,
            },
        )
    distilled, baseline = experiment.runs.get(is_baseline=False), experiment.runs.get(is_baseline=True)
    assert distilled.config["task"] == "causal_lm"
    for run in (distilled, baseline):
        run_distillation.apply(args=(run.id,))
        run.refresh_from_db()
        assert run.status == Run.Status.SUCCEEDED, run.error
    metrics = distilled.result["student"]
    assert metrics["perplexity"] > 1 and metrics["bits_per_token"] > 0 and 0 <= metrics["agreement"] <= 1
    assert {"loss", "topk", "eval/loss"} <= set(
        MetricPoint.objects.filter(run=distilled).values_list("name", flat=True)
    )
    assert distilled.artifacts.filter(kind="teacher_cache").exists()
    assert baseline.result["student"]["perplexity"] > 1
