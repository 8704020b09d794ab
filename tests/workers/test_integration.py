"""End to end: a real `celery worker` over Redis trains and distills, results land in Postgres."""

import pytest

from experiments.models import Artifact, DatasetSpec, Evaluation, MetricPoint, ModelSpec, Run, Worker
from experiments.services import launch, records
from tests import waiting
from tests.factories import MembershipFactory, TeamFactory, UserFactory

pytestmark = [pytest.mark.integration, pytest.mark.django_db(transaction=True)]


def wait_for_runs(runs, timeout: float, worker) -> list[Run]:
    """Follow the runs in the database until all have finished (``timeout``: an idle machine's bound,
    scaled)."""
    return waiting.wait_for_runs(runs, timeout=timeout, check=worker.check_alive, describe=worker.tail)


def test_worker_trains_a_teacher_then_distills_and_reports_everything(celery_worker_process, tmp_path):
    worker = celery_worker_process
    user = UserFactory()
    team = TeamFactory()
    MembershipFactory(user=user, team=team)
    digits = records.dataset_spec_create(team=team, created_by=user, name="digits", source="builtin",
                                          builtin_name="digits")

    def mlp(name, hidden, **extra):
        return records.model_spec_create(
            team=team,
            created_by=user,
            name=name,
            source="builtin",
            builtin_arch="mlp",
            config={"hidden_sizes": hidden},
            num_labels=10,
            **extra,
        )

    train = {
        "max_steps": 60,
        "eval_every": 20,
        "save_every": 20,
        "log_every": 10,
        "batch_size": 64,
        "lr": 0.01,
    }
    training = launch.experiment_create(
        team=team, created_by=user, name="teacher", dataset=digits, students=[mlp("teacher-arch", [128])],
        recipes=[records.hard_labels_recipe(team=team)], seeds=[0], train={**train, "max_steps": 150},
    )
    teacher = records.model_register_from_run(run=training.runs.get(), name="teacher", created_by=user,
                                               allow_pending=True)
    kd = records.recipe_create(team=team, created_by=user, name="kd", scheme="offline",
                                terms=[{"name": "ce", "weight": 0.1}, {"name": "kd", "weight": 0.9,
                                                                         "params": {"temperature": 4}}])
    experiment = launch.experiment_create(
        team=team, created_by=user, name="kd", dataset=digits, teacher=teacher, students=[mlp("s16", [16])],
        recipes=[kd], seeds=[0], train=train,
    )
    runs = list(experiment.runs.all())
    assert all(r.waiting_for_id == training.runs.get().id for r in runs if not r.is_baseline)

    finished = wait_for_runs([training.runs.get(), *runs], timeout=300, worker=worker)
    by_student = {}
    for run in finished:
        by_student.setdefault(run.student.name, []).append(run)
    assert [r.status for r in by_student["teacher-arch"]] == [Run.Status.SUCCEEDED]
    assert {r.status for r in by_student["s16"]} == {Run.Status.SUCCEEDED}

    for run in by_student["s16"] + by_student["teacher-arch"]:
        assert run.step == run.total_steps and run.worker_name == worker.name and run.attempt == 1
        steps = list(
            MetricPoint.objects.filter(run=run, name="loss").order_by("step").values_list("step", flat=True)
        )
        assert steps == list(range(10, run.total_steps + 1, 10))  # every logged step exactly once
        assert MetricPoint.objects.filter(run=run, name="eval/accuracy").count() >= 3
        evaluation = Evaluation.objects.get(run=run, role="student")
        assert 0.5 < evaluation.accuracy <= 1.0 and evaluation.param_count > 0
        assert evaluation.metrics["latency_ms_p50"] > 0
        final = Artifact.objects.get(run=run, kind="model")
        assert final.size_bytes > 0 and len(final.sha256) == 64
        assert run.checkpoint_path

    distilled = next(r for r in by_student["s16"] if not r.is_baseline)
    assert MetricPoint.objects.filter(run=distilled, name="kd").exists()
    assert distilled.result["student"]["agreement"] > 0.5
    teacher_eval = Evaluation.objects.get(role="teacher", model=teacher)
    assert teacher_eval.accuracy > 0.8
    assert ModelSpec.objects.get(pk=teacher.pk).source_run.status == Run.Status.SUCCEEDED
    worker_row = Worker.objects.get(name=worker.name)
    assert worker_row.last_heartbeat is not None and worker_row.queues == [worker.queue]
    assert DatasetSpec.objects.count() == 1


def test_bad_columns_and_unknown_model_ids_fail_only_their_runs(celery_worker_process, tmp_path, settings):
    worker = celery_worker_process
    user = UserFactory()
    team = TeamFactory()
    MembershipFactory(user=user, team=team)
    data = tmp_path / "data"
    data.mkdir()
    rows = "".join(f"{'great fun' if i % 2 else 'dull and slow'} review {i},{i % 2}\n" for i in range(60))
    (data / "good.csv").write_text("text,label\n" + rows)
    (data / "bad.csv").write_text("body,label\n" + rows)
    settings.DATASET_ROOTS = [data]

    def csv_dataset(name):
        return records.dataset_spec_create(
            team=team,
            created_by=user,
            name=name,
            source="hf",
            local_path=str(data / f"{name}.csv"),
            text_column="text",
            num_labels=2,
        )

    tiny_bert = records.model_spec_create(
        team=team, created_by=user, name="tiny-bert", source="config", num_labels=2,
        config={"model_type": "bert", "hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2,
                "intermediate_size": 32, "vocab_size": 200},
    )
    missing = records.model_spec_create(team=team, created_by=user, name="missing", source="hf",
                                         hub_id="distillweb-tests/no-such-model", num_labels=2)
    hard_labels = [records.hard_labels_recipe(team=team)]
    good = launch.experiment_create(team=team, created_by=user, name="good", dataset=csv_dataset("good"),
                                      students=[tiny_bert, missing], recipes=hard_labels, seeds=[0],
                                      train={"max_steps": 6, "eval_every": 3, "log_every": 3})
    bad = launch.experiment_create(
        team=team,
        created_by=user,
        name="bad",
        dataset=csv_dataset("bad"),
        students=[tiny_bert],
        recipes=hard_labels,
        seeds=[0],
        train={"max_steps": 6},
    )
    finished = {
        r.id: r for r in wait_for_runs([*good.runs.all(), *bad.runs.all()], timeout=180, worker=worker)
    }
    ok = finished[good.runs.get(student=tiny_bert).id]
    assert ok.status == Run.Status.SUCCEEDED, ok.error
    unknown = finished[good.runs.get(student=missing).id]
    assert unknown.status == Run.Status.FAILED
    assert "could not be loaded" in unknown.error and "distillweb-tests/no-such-model" in unknown.error
    (column,) = [finished[r.id] for r in bad.runs.all()]
    assert column.status == Run.Status.FAILED
    assert "no column 'text'" in column.error and "body" in column.error
