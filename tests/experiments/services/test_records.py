from datetime import timedelta
from unittest import mock

import pytest
from django.core.exceptions import ValidationError
from django.utils import timezone

from experiments.models import Evaluation, Experiment, MetricPoint, ModelSpec, Run
from experiments.services import launch, lifecycle, records, telemetry
from tests.factories import ModelSpecFactory

pytestmark = pytest.mark.django_db

DISPATCH = "workers.tasks.run_distillation.apply_async"


def _create(setup, team, user, **overrides):
    kwargs = {
        "team": team,
        "created_by": user,
        "name": "kd sweep",
        "dataset": setup["dataset"],
        "teacher": setup["teacher"],
        "students": setup["students"],
        "recipes": [setup["recipe"]],
        "seeds": [0, 1],
        "train": {"max_steps": 30},
    }
    return launch.experiment_create(**{**kwargs, **overrides})


def test_experiment_create_adds_a_hard_label_baseline_per_student_and_seed(digits_setup, team, user):
    with mock.patch(DISPATCH):
        experiment = _create(digits_setup, team, user)
    runs = list(experiment.runs.all())
    assert len(runs) == 2 * 2 * 2  # students × seeds × (kd + baseline)
    baselines = [r for r in runs if r.is_baseline]
    assert len(baselines) == 4
    assert all(r.recipe.scheme == "hard_labels" and r.teacher is None for r in baselines)
    assert {(r.student_id, r.seed) for r in baselines} == {
        (s.id, seed) for s in digits_setup["students"] for seed in (0, 1)
    }
    distilled = [r for r in runs if not r.is_baseline]
    assert all(r.teacher == digits_setup["teacher"] for r in distilled)
    assert all(r.config["teacher"]["source"] == "builtin" for r in distilled)
    assert all(r.config["train"]["max_steps"] == 30 and r.total_steps == 30 for r in runs)
    assert {r.config["train"]["seed"] for r in runs} == {0, 1}


def test_a_text_model_on_numeric_features_is_refused_before_anything_runs(digits_setup, team, user):
    bert = ModelSpecFactory(team=team, name="tiny-bert", source="config", builtin_arch="",
                            config={"model_type": "bert"})
    with mock.patch(DISPATCH), pytest.raises(ValidationError) as exc:
        _create(digits_setup, team, user, students=[bert])
    assert "cannot read digits" in str(exc.value.message_dict["students"])
    assert Run.objects.count() == 0


def test_runs_are_enqueued_only_after_commit(digits_setup, team, user, django_capture_on_commit_callbacks):
    with mock.patch(DISPATCH) as dispatch:
        with django_capture_on_commit_callbacks(execute=False) as callbacks:
            experiment = _create(digits_setup, team, user)
        assert dispatch.call_count == 0  # nothing sent before the transaction commits
        for callback in callbacks:
            callback()
    run_ids = sorted(call.kwargs["args"][0] for call in dispatch.call_args_list)
    assert run_ids == sorted(experiment.runs.values_list("id", flat=True))


def test_invalid_experiment_creates_nothing(digits_setup, team, user):
    wrong = ModelSpecFactory(team=team, name="three-labels", num_labels=3)
    with mock.patch(DISPATCH) as dispatch, pytest.raises(ValidationError) as exc:
        _create(digits_setup, team, user, teacher=None, students=[wrong])
    assert "teacher" in exc.value.message_dict and "students" in exc.value.message_dict
    assert Experiment.objects.count() == 0 and Run.objects.count() == 0
    dispatch.assert_not_called()


@pytest.mark.parametrize(
    ("train", "field"),
    [({"lr": "fast"}, "lr"), ({"max_steps": 0}, "max_steps"), ({"batch_size": 10**9}, "batch_size"),
     ({"lr": float("nan")}, "lr"), ({"warmup_steps": 50, "max_steps": 10}, "warmup_steps")],
)
def test_out_of_range_hyperparameters_are_field_errors(digits_setup, team, user, train, field):
    with mock.patch(DISPATCH), pytest.raises(ValidationError) as exc:
        _create(digits_setup, team, user, train=train)
    assert field in exc.value.message_dict
    assert Experiment.objects.count() == 0


def test_claim_is_a_single_conditional_update(digits_setup, team, user):
    with mock.patch(DISPATCH):
        run = _create(digits_setup, team, user, seeds=[0]).runs.first()
    first = lifecycle.run_claim(run_id=run.id, task_id="a", worker_name="w1")
    assert first is not None and first.status == Run.Status.RUNNING and first.attempt == 1
    # A second delivery while the first is alive claims nothing.
    assert lifecycle.run_claim(run_id=run.id, task_id="b", worker_name="w2") is None
    run.refresh_from_db()
    assert run.task_id == "a" and run.worker_name == "w1"


def test_stale_running_run_is_taken_over_and_old_delivery_loses_ownership(digits_setup, team, user, settings):
    with mock.patch(DISPATCH):
        run = _create(digits_setup, team, user, seeds=[0]).runs.first()
    lifecycle.run_claim(run_id=run.id, task_id="a", worker_name="w1")
    Run.objects.filter(id=run.id).update(
        heartbeat_at=timezone.now() - timedelta(seconds=settings.RUN_HEARTBEAT_TIMEOUT_S + 5)
    )
    taken = lifecycle.run_claim(run_id=run.id, task_id="b", worker_name="w2")
    assert taken is not None and taken.attempt == 2
    now = timezone.now()
    assert telemetry.run_record_metrics(run_id=run.id, task_id="a", points=[("loss", 1, 1.0, now)]) is False
    assert not MetricPoint.objects.filter(run=run).exists()
    assert (
        telemetry.run_record_metrics(run_id=run.id, task_id="a", points=[], progress=(5, 30, None)) is False
    )


def test_metric_points_are_upserted_per_step(digits_setup, team, user):
    with mock.patch(DISPATCH):
        run = _create(digits_setup, team, user, seeds=[0]).runs.first()
    lifecycle.run_claim(run_id=run.id, task_id="a", worker_name="w")
    now = timezone.now()
    telemetry.run_record_metrics(
        run_id=run.id, task_id="a", points=[("loss", s, 1.0 / s, now) for s in (1, 2, 3)]
    )
    # A resumed run logs steps 2 and 3 again: still one point each, with the newest value.
    telemetry.run_record_metrics(
        run_id=run.id, task_id="a", points=[("loss", 2, 0.25, now), ("loss", 3, 0.2, now)]
    )
    points = list(MetricPoint.objects.filter(run=run).order_by("step").values_list("step", "value"))
    assert points == [(1, 1.0), (2, 0.25), (3, 0.2)]


def test_failure_keeps_metrics_and_stores_the_message(digits_setup, team, user):
    with mock.patch(DISPATCH):
        run = _create(digits_setup, team, user, seeds=[0]).runs.first()
    lifecycle.run_claim(run_id=run.id, task_id="a", worker_name="w")
    telemetry.run_record_metrics(run_id=run.id, task_id="a", points=[("loss", 10, 0.5, timezone.now())])
    assert lifecycle.run_fail(run_id=run.id, task_id="a", error="Dataset has no column 'txt'.")
    run.refresh_from_db()
    assert run.status == Run.Status.FAILED and run.error == "Dataset has no column 'txt'." and run.finished_at
    assert MetricPoint.objects.filter(run=run).count() == 1


def test_finish_stores_evaluations_and_reuses_the_teacher_evaluation(
    digits_setup, team, user, tmp_path, settings
):
    with mock.patch(DISPATCH):
        experiment = _create(digits_setup, team, user, seeds=[0])
    distilled = list(experiment.runs.filter(is_baseline=False))
    for i, run in enumerate(distilled):
        lifecycle.run_claim(run_id=run.id, task_id=f"t{i}", worker_name="w")
        final = settings.ARTIFACT_ROOT / f"runs/{run.id}/final"
        final.mkdir(parents=True)
        (final / "model.safetensors").write_bytes(b"weights")
        result = {
            "steps": 30,
            "final_dir": str(final),
            "student": {"accuracy": 0.9 + i / 100, "params": 1000},
            "teacher": {"accuracy": 0.97, "params": 20000},
        }
        assert lifecycle.run_finish(run_id=run.id, task_id=f"t{i}", result=result)
    assert Evaluation.objects.filter(role="student").count() == 2
    teacher_eval = Evaluation.objects.get(role="teacher")  # evaluated once per benchmark
    assert teacher_eval.accuracy == 0.97 and teacher_eval.model == digits_setup["teacher"]
    run = distilled[0]
    run.refresh_from_db()
    assert run.status == Run.Status.SUCCEEDED and run.step == 30
    artifact = run.artifacts.get(kind="model")
    assert artifact.path == f"runs/{run.id}/final" and artifact.size_bytes == 7 and len(artifact.sha256) == 64


def test_runs_wait_for_the_run_that_trains_their_teacher(digits_setup, team, user, settings):
    with mock.patch(DISPATCH):
        training = _create(digits_setup, team, user, teacher=None, students=[digits_setup["teacher"]],
                           recipes=[records.hard_labels_recipe(team=team)], seeds=[0])
    teacher_run = training.runs.get()
    teacher = records.model_register_from_run(run=teacher_run, name="trained teacher", created_by=user,
                                               allow_pending=True)
    assert teacher.source == ModelSpec.Source.RUN
    with mock.patch(DISPATCH) as dispatch:
        with pytest.MonkeyPatch.context():
            experiment = launch.experiment_create(
                team=team, created_by=user, name="kd", dataset=digits_setup["dataset"], teacher=teacher,
                students=digits_setup["students"][:1], recipes=[digits_setup["recipe"]], seeds=[0],
            )
    distilled = experiment.runs.get(is_baseline=False)
    baseline = experiment.runs.get(is_baseline=True)
    assert distilled.waiting_for == teacher_run and baseline.waiting_for is None
    assert distilled.config["teacher"] == {
        "source": "run",
        "num_labels": 10,
        "path": f"runs/{teacher_run.id}/final",
    }

    lifecycle.run_claim(run_id=teacher_run.id, task_id="t", worker_name="w")
    with mock.patch(DISPATCH) as dispatch:
        from django.db import transaction

        with transaction.atomic():
            lifecycle.run_fail(run_id=teacher_run.id, task_id="t", error="NaN loss")
    dispatch.assert_not_called()
    distilled.refresh_from_db()
    assert distilled.status == Run.Status.FAILED and f"Run #{teacher_run.id}" in distilled.error


def test_cancel_stops_a_queued_run_at_once_and_flags_a_running_one(digits_setup, team, user):
    with mock.patch(DISPATCH):
        queued, running = _create(digits_setup, team, user, seeds=[0]).runs.all()[:2]
    lifecycle.run_claim(run_id=running.id, task_id="a", worker_name="w")
    assert lifecycle.run_cancel(run=queued).status == Run.Status.CANCELLED
    running = lifecycle.run_cancel(run=running)
    assert running.status == Run.Status.RUNNING and running.cancel_requested
    assert lifecycle.run_claim(run_id=queued.id, task_id="b", worker_name="w") is None  # never starts


def test_register_from_run_requires_a_finished_run(digits_setup, team, user):
    with mock.patch(DISPATCH):
        run = _create(digits_setup, team, user, seeds=[0]).runs.first()
    with pytest.raises(ValidationError):
        records.model_register_from_run(run=run, name="not yet", created_by=user)


def test_recipe_validation_rejects_bad_terms(team, user):
    with pytest.raises(ValidationError) as exc:
        records.recipe_create(team=team, created_by=user, name="bad", scheme="offline",
                               terms=[{"name": "kd", "weight": 1, "params": {"temperature": 0}}])
    assert "terms" in exc.value.message_dict
    with pytest.raises(ValidationError):
        records.recipe_create(team=team, created_by=user, name="bad", scheme="offline",
                               terms=[{"name": "no_such_loss", "weight": 1}])
    recipe = records.recipe_create(team=team, created_by=user, name="jsd", scheme="offline",
                                    terms=[{"name": "jsd", "weight": 1, "params": {"beta": 0.5}}])
    again = records.recipe_create(team=team, created_by=user, name="jsd", scheme="offline",
                                   terms=[{"name": "jsd", "weight": 1, "params": {"beta": 0.9}}])
    assert (recipe.version, again.version) == (1, 2)


def test_local_model_paths_must_be_under_a_configured_root(team, user, settings, tmp_path):
    root = tmp_path / "models"
    (root / "bert").mkdir(parents=True)
    settings.MODEL_ROOTS = [root]
    with pytest.raises(ValidationError) as exc:
        records.model_spec_create(
            team=team, created_by=user, name="x", source="hf", local_path="/etc", num_labels=2
        )
    assert "local_path" in exc.value.message_dict
    with pytest.raises(ValidationError):
        records.model_spec_create(team=team, created_by=user, name="x", source="hf",
                                   local_path=str(root / "bert" / ".." / ".." / ".."), num_labels=2)
    (root / "escape").symlink_to("/etc")
    with pytest.raises(ValidationError):
        records.model_spec_create(
            team=team, created_by=user, name="x", source="hf", local_path=str(root / "escape"), num_labels=2
        )
    spec = records.model_spec_create(team=team, created_by=user, name="x", source="hf",
                                      local_path=str(root / "bert"), num_labels=2)
    assert spec.local_path == str((root / "bert").resolve())


def test_status_constraint_is_enforced_by_the_database(digits_setup, team, user):
    from django.db import IntegrityError, transaction

    with mock.patch(DISPATCH):
        run = _create(digits_setup, team, user, seeds=[0]).runs.first()
    with pytest.raises(IntegrityError), transaction.atomic():
        Run.objects.filter(id=run.id).update(status="exploded")
