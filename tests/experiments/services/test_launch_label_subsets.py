"""Per-experiment options of how runs use the data: a labelled subset per seed, and early stopping on a
validation slice (form, API, YAML, frozen config, and the checks that refuse what cannot run)."""

from __future__ import annotations

from contextlib import nullcontext
from unittest import mock

import numpy as np
import pytest
import yaml
from django.core.exceptions import ValidationError
from django.urls import reverse

from experiments.forms import ExperimentForm
from experiments.models import Experiment
from experiments.services import launch
from tests.api.conftest import Api, make_token
from workers.engine.config import DatasetConfig
from workers.engine.data import load_dataset

pytestmark = pytest.mark.django_db

DISPATCH = "workers.tasks.run_distillation.apply_async"


def _create(setup, team, user, **train):
    with mock.patch(DISPATCH), nullcontext():
        return launch.experiment_create(
            team=team, created_by=user, name="subsets", dataset=setup["dataset"], teacher=setup["teacher"],
            students=setup["students"][:1], recipes=[setup["recipe"]], seeds=[0, 1],
            train={"max_steps": 20, "labelled_fraction": 0.2, **train})


def _labelled_rows(run) -> np.ndarray:
    return load_dataset(DatasetConfig(**run.config["dataset"])).train.labelled_rows


def test_with_the_option_on_each_seed_has_its_own_labelled_subset_shared_with_its_baseline(digits_setup, team,
                                                                                           user):
    experiment = _create(digits_setup, team, user, vary_labelled_subset=True)
    runs = {(r.seed, r.is_baseline): r for r in experiment.runs.all()}
    assert runs[(0, False)].config["dataset"]["labelled_seed"] == 0
    assert runs[(1, False)].config["dataset"]["labelled_seed"] == 1
    seed0, seed1 = _labelled_rows(runs[(0, False)]), _labelled_rows(runs[(1, False)])
    assert len(seed0) == len(seed1) and not np.array_equal(seed0, seed1)
    # "KD gain" stays honest: each seed's baseline trains on that seed's labelled rows.
    assert np.array_equal(_labelled_rows(runs[(0, True)]), seed0)
    assert np.array_equal(_labelled_rows(runs[(1, True)]), seed1)
    # The eval split does not move with the labelled subset (teacher evaluations are shared).
    from experiments.domain.engine_config import split_key

    assert split_key(runs[(0, False)].config["dataset"]) == split_key(runs[(1, False)].config["dataset"])


def test_with_the_option_off_every_seed_has_the_same_labelled_subset(digits_setup, team, user):
    experiment = _create(digits_setup, team, user)
    runs = list(experiment.runs.all())
    assert all("labelled_seed" not in r.config["dataset"] for r in runs)
    first = _labelled_rows(runs[0])
    assert all(np.array_equal(_labelled_rows(r), first) for r in runs[1:])


def test_early_stopping_settings_reach_the_frozen_config(digits_setup, team, user):
    experiment = _create(digits_setup, team, user, early_stopping_metric="loss", early_stopping_patience=3,
                         validation_fraction=0.2)
    train = experiment.runs.first().config["train"]
    assert (train["early_stopping_metric"], train["early_stopping_mode"]) == ("loss", "min")
    assert (train["early_stopping_patience"], train["validation_fraction"]) == (3, 0.2)
    plain = _create(digits_setup, team, user).runs.first().config["train"]
    # Recorded in every frozen config; unused while early stopping is off.
    assert plain["validation_fraction"] == 0.1 and plain["early_stopping_patience"] == 0
    assert "early_stopping_metric" not in plain


@pytest.mark.parametrize(("train", "field"), [
    ({"early_stopping_metric": "accuracy"}, "early_stopping_patience"),
    ({"early_stopping_patience": 2}, "early_stopping_metric"),
    ({"early_stopping_metric": "perplexity", "early_stopping_patience": 2}, "early_stopping_metric"),
    ({"early_stopping_metric": "accuracy", "early_stopping_patience": 2, "validation_fraction": 0.9},
     "validation_fraction"),
    ({"early_stopping_metric": "agreement", "early_stopping_patience": 2}, "early_stopping_metric"),
    ({"vary_labelled_subset": "yes"}, "vary_labelled_subset"),
])
def test_settings_that_cannot_run_are_field_errors(digits_setup, team, user, train, field):
    with pytest.raises(ValidationError) as caught:
        _create(digits_setup, team, user, **train)
    assert field in caught.value.message_dict


def test_a_validation_slice_needs_labelled_rows_to_hold_out(digits_setup, team, user):
    dataset = digits_setup["dataset"]
    dataset.splits = {"train": 10, "eval": 3}
    dataset.save()
    with pytest.raises(ValidationError) as caught:
        _create(digits_setup, team, user, labelled_fraction=0.1, early_stopping_metric="accuracy",
                early_stopping_patience=2)
    assert "validation_fraction" in caught.value.message_dict


def test_the_form_gives_the_settings_to_the_service(digits_setup, team, user):
    form = ExperimentForm({
        "team": team.pk, "name": "es", "dataset": digits_setup["dataset"].pk,
        "teacher": digits_setup["teacher"].pk, "students": [digits_setup["students"][0].pk],
        "recipes": [digits_setup["recipe"].pk], "seeds": "0", "early_stopping_metric": "macro_f1",
        "early_stopping_patience": "4", "validation_fraction": "0.15", "vary_labelled_subset": "on",
        "labelled_fraction": "0.5",
    }, user=user)
    assert form.is_valid(), form.errors
    train = form.train_settings()
    assert train["early_stopping_metric"] == "macro_f1" and train["vary_labelled_subset"] is True
    assert train["early_stopping_patience"] == 4 and train["validation_fraction"] == 0.15


def test_the_api_and_yaml_accept_the_settings_and_round_trip_them(client, user, team, digits_setup,
                                                                  django_capture_on_commit_callbacks):
    api = Api(client, make_token(user))
    body = {
        "name": "es",
        "dataset": digits_setup["dataset"].pk,
        "teacher": digits_setup["teacher"].pk,
        "students": [digits_setup["students"][0].pk],
        "recipes": [digits_setup["recipe"].pk],
        "seeds": [0, 1],
        "max_steps": 20,
        "labelled_fraction": 0.3,
        "vary_labelled_subset": True,
        "early_stopping_metric": "accuracy",
        "early_stopping_patience": 2,
        "validation_fraction": 0.25,
    }
    with mock.patch(DISPATCH):
        response = api.post(reverse("api:experiment_list"), body)
    assert response.status_code == 201, response.json()
    original = Experiment.objects.get(pk=response.json()["id"])
    run = original.runs.get(seed=1, is_baseline=False)
    assert run.config["dataset"]["labelled_seed"] == 1
    assert (
        run.config["train"]["validation_fraction"] == 0.25
        and run.config["train"]["early_stopping_mode"] == "max"
    )

    exported = api.get(reverse("api:experiment_export", kwargs={"pk": original.pk})).content
    assert yaml.safe_load(exported)["train"]["vary_labelled_subset"] is True
    with mock.patch(DISPATCH), django_capture_on_commit_callbacks(execute=True):
        imported = api.post(reverse("api:experiment_import"), exported, content_type="application/yaml")
    assert imported.status_code == 201, imported.json()
    assert Experiment.objects.get(pk=imported.json()["id"]).train == original.train

    bad = api.post(reverse("api:experiment_list"), {**body, "early_stopping_metric": "perplexity"})
    assert bad.status_code == 400 and "early_stopping_metric" in bad.json()
    bad = api.post(reverse("api:experiment_list"), {**body, "vary_labelled_subset": "yes"})
    assert bad.status_code == 400 and "vary_labelled_subset" in bad.json()
