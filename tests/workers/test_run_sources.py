"""The task in-process (``apply``): a run config that names files the run may not read fails the run with a
clear message before anything is read, and no message of a failed run holds an absolute path of the
machine."""

from __future__ import annotations

import re
import shutil
from unittest import mock

import pytest

from experiments.models import MetricPoint, Run
from experiments.services import launch, records
from tests.factories import RunFactory
from workers.tasks import run_distillation

pytestmark = pytest.mark.django_db

DISPATCH = "workers.tasks.run_distillation.apply_async"


def _assert_no_machine_path(text: str, *paths) -> None:
    for path in paths:
        assert str(path) not in text
    assert not re.search(r"(?<![\w.:/~-])/[\w.-]+/", text), text  # an absolute path of two or more parts


def _experiment(team, user, digits_setup, *, teacher=None, students=None, name="kd"):
    with mock.patch(DISPATCH):
        return launch.experiment_create(
            team=team, created_by=user, name=name, dataset=digits_setup["dataset"],
            teacher=teacher or digits_setup["teacher"], students=students or digits_setup["students"][:1],
            recipes=[digits_setup["recipe"]], seeds=[0],
            train={"max_steps": 10, "eval_every": 10, "save_every": 10, "log_every": 5},
        )


def test_a_model_registered_from_a_run_whose_folder_was_deleted_fails_runs_clearly(team, user, digits_setup,
                                                                                    settings, tmp_path):
    trained = _experiment(team, user, digits_setup).runs.get(is_baseline=True)
    run_distillation.apply(args=(trained.id,))
    trained.refresh_from_db()
    assert trained.status == Run.Status.SUCCEEDED, trained.error
    registered = records.model_register_from_run(run=trained, name="trained mlp", created_by=user)
    shutil.rmtree(settings.ARTIFACT_ROOT / "runs" / str(trained.id))

    run = _experiment(team, user, digits_setup, teacher=registered, students=digits_setup["students"][1:],
                      name="from the deleted run").runs.get(is_baseline=False)
    run_distillation.apply(args=(run.id,))
    run.refresh_from_db()

    assert run.status == Run.Status.FAILED
    assert f"the model folder of run {trained.id} no longer exists" in run.error
    assert "needs text" not in run.error
    _assert_no_machine_path(run.error, settings.ARTIFACT_ROOT, tmp_path)


@pytest.fixture
def foreign_model(other_team, settings, digits_setup):
    """Another team's trained MLP and uploaded file, where they lie under the artifact root."""
    from workers.engine.config import DatasetConfig, ModelConfig
    from workers.engine.data import load_dataset
    from workers.engine.models import load_model, save_model

    foreign = RunFactory(experiment__team=other_team)
    digits = load_dataset(DatasetConfig(source="builtin", name="digits"))
    mlp = load_model(ModelConfig(source="builtin", name="mlp", params={"hidden_sizes": [16]}), dataset=digits,
                     role="student")
    folder = save_model(mlp, settings.ARTIFACT_ROOT / "runs" / str(foreign.pk) / "final")
    uploads = settings.ARTIFACT_ROOT / "datasets" / str(other_team.pk)
    uploads.mkdir(parents=True)
    rows = "".join(f"text {i},{i % 2}\n" for i in range(40))
    (uploads / "secret.csv").write_text("text,label\n" + rows)
    return {"run": foreign, "folder": folder, "upload": uploads / "secret.csv"}


@pytest.mark.parametrize(
    "case",
    [
        "run output of another team",
        "hub id that is a path",
        "hub id of a local folder",
        "another team's upload",
    ],
)
def test_a_crafted_config_that_reaches_the_worker_fails_the_run_and_reads_nothing(
        team, user, digits_setup, settings, tmp_path, foreign_model, monkeypatch, case):
    run = _experiment(team, user, digits_setup).runs.get(is_baseline=True)
    config = dict(run.config)
    if case == "run output of another team":
        config["student"] = {
            "source": "run",
            "num_labels": 10,
            "path": f"runs/{foreign_model['run'].pk}/final",
        }
        expected = "is outside the folders this worker may read models from"
    elif case == "hub id that is a path":
        config["student"] = {"source": "hf", "num_labels": 10, "name": str(foreign_model["folder"])}
        expected = "is not a hub id"
    elif case == "hub id of a local folder":
        monkeypatch.chdir(settings.ARTIFACT_ROOT)
        config["student"] = {"source": "hf", "num_labels": 10, "name": f"runs/{foreign_model['run'].pk}"}
        expected = "is not a hub id here"
    else:
        config["dataset"] = {
            **config["dataset"],
            "source": "hf",
            "name": "",
            "path": str(foreign_model["upload"]),
        }
        expected = "is outside the folders this worker may read datasets from"
    Run.objects.filter(pk=run.pk).update(config=config)

    with mock.patch("workers.engine.models.load_file", side_effect=AssertionError("weights were read")), \
            mock.patch("workers.engine.data._read_table", side_effect=AssertionError("a data file was read")):
        run_distillation.apply(args=(run.id,))
    run.refresh_from_db()

    assert run.status == Run.Status.FAILED
    assert expected in run.error, run.error
    assert not MetricPoint.objects.filter(run=run).exists()
    _assert_no_machine_path(run.error, settings.ARTIFACT_ROOT, tmp_path)


def test_a_teams_own_upload_trains_and_another_teams_upload_is_refused(team, user, settings, tmp_path,
                                                                         foreign_model):
    from django.core.files.uploadedfile import SimpleUploadedFile

    rows = "".join(f"{'great fun' if i % 2 else 'dull and slow'} review {i},{i % 2}\n" for i in range(40))
    upload = SimpleUploadedFile("reviews.csv", ("text,label\n" + rows).encode())
    dataset = records.dataset_spec_create(team=team, created_by=user, name="reviews", source="upload",
                                           upload=upload, text_column="text", label_column="label")
    student = records.model_spec_create(
        team=team, created_by=user, name="tiny-bert", source="config", num_labels=2,
        config={"model_type": "bert", "hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2,
                "intermediate_size": 32, "vocab_size": 200})
    with mock.patch(DISPATCH):
        experiment = launch.experiment_create(
            team=team,
            created_by=user,
            name="own upload",
            dataset=dataset,
            students=[student],
            recipes=[records.hard_labels_recipe(team=team)],
            seeds=[0, 1],
            train={"max_steps": 4, "eval_every": 4},
        )
    own, crafted = experiment.runs.order_by("seed")
    run_distillation.apply(args=(own.id,))
    own.refresh_from_db()
    assert own.status == Run.Status.SUCCEEDED, own.error

    Run.objects.filter(pk=crafted.pk).update(
        config={
            **crafted.config,
            "dataset": {**crafted.config["dataset"], "path": str(foreign_model["upload"])},
        }
    )
    run_distillation.apply(args=(crafted.id,))
    crafted.refresh_from_db()
    assert crafted.status == Run.Status.FAILED
    assert "is outside the folders this worker may read datasets from" in crafted.error
    _assert_no_machine_path(crafted.error, settings.ARTIFACT_ROOT, tmp_path)
