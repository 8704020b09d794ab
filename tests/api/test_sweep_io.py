"""Swept experiments through the API: JSON lists for training settings, term sweeps as a mapping or a list,
and the YAML export → import round trip (the same runs: same count, same concrete configs)."""

from __future__ import annotations

import json
from collections import Counter
from unittest import mock

import pytest
import yaml
from django.urls import reverse

from api import yaml_io
from experiments.models import Experiment
from experiments.services import records
from tests.api.conftest import DISPATCH

pytestmark = pytest.mark.django_db

YAML = "application/yaml"


def _url(name: str, **kwargs) -> str:
    return reverse(f"api:{name}", kwargs=kwargs)


def _body(digits_setup, **extra) -> dict:
    return {
        "name": "grid",
        "dataset": digits_setup["dataset"].pk,
        "teacher": digits_setup["teacher"].pk,
        "students": [digits_setup["students"][0].pk],
        "recipes": [digits_setup["recipe"].pk],
        "seeds": [0],
        "max_steps": 10,
        **extra,
    }


def _create(api, body: dict) -> Experiment:
    with mock.patch(DISPATCH):
        response = api.post(_url("experiment_list"), body)
    assert response.status_code == 201, response.json()
    return Experiment.objects.get(pk=response.json()["id"])


def _runs(experiment: Experiment) -> Counter:
    """The runs as a multiset of (student, recipe, seed, baseline, stage, frozen config)."""
    return Counter(
        (r.student_id, r.recipe_id, r.seed, r.is_baseline, r.stage, json.dumps(r.config, sort_keys=True))
        for r in experiment.runs.all()
    )


def _round_trip(api, experiment: Experiment) -> tuple[dict, Experiment]:
    exported = api.get(_url("experiment_export", pk=experiment.pk)).content
    with mock.patch(DISPATCH):
        response = api.post(_url("experiment_import"), exported, content_type=YAML)
    assert response.status_code == 201, response.json()
    return yaml.safe_load(exported), Experiment.objects.get(pk=response.json()["id"])


def _lrs(experiment: Experiment) -> list[float]:
    return sorted({r.config["train"]["lr"] for r in experiment.runs.all()})


# --- export → import ------------------------------------------------------------------------------
def test_a_long_sweep_round_trips_to_the_same_runs(api, digits_setup):
    # 30 log-spaced values: more text than the form's field takes when written out, which the import refused.
    original = _create(api, _body(digits_setup, lr="1e-5:1e-2:log30", term_sweeps={"kd.temperature": [2, 4]}))

    spec, copy = _round_trip(api, original)

    assert len(spec["train"]["lr"]) == 30 and spec["term_sweeps"] == {"kd.temperature": [2.0, 4.0]}
    assert copy.pk != original.pk and copy.train == original.train
    assert copy.runs.count() == original.runs.count() == 30 * (2 + 1)
    assert _runs(copy) == _runs(original)


def test_every_kind_of_swept_setting_round_trips(api, digits_setup):
    original = _create(
        api,
        _body(
            digits_setup,
            students=[s.pk for s in digits_setup["students"]],
            seeds=[0],
            max_steps=[20, 40],
            warmup_steps=[0, 5],
            labelled_fraction=[0.5, 1.0],
            batch_size="16:64:log3",
            term_sweeps={"kd.weight": [0.5, 0.9]},
        ),
    )

    spec, copy = _round_trip(api, original)

    assert spec["train"]["labelled_fraction"] == [0.5, 1.0] and spec["train"]["batch_size"] == [16, 32, 64]
    assert copy.runs.count() == original.runs.count() == 2 * (2 * 2 * 2 * 3) * (2 + 1)
    assert _runs(copy) == _runs(original)


def test_choice_and_boolean_term_sweeps_round_trip(api, team, user, digits_setup):
    recipe = records.recipe_create(
        team=team,
        created_by=user,
        name="topk",
        scheme="offline",
        terms=[{"name": "topk", "weight": 1.0, "params": {"k": 3, "temperature": 1.0}}],
    )
    original = _create(
        api,
        _body(
            digits_setup,
            recipes=[recipe.pk],
            term_sweeps={"topk.divergence": ["kd", "jsd"], "topk.tail": [True, False]},
        ),
    )

    spec, copy = _round_trip(api, original)

    assert spec["term_sweeps"] == {"topk.divergence": ["kd", "jsd"], "topk.tail": [True, False]}
    assert copy.runs.count() == original.runs.count() == 2 * 2 + 1
    assert _runs(copy) == _runs(original)


def test_term_sweeps_kept_under_train_as_the_api_shows_them_import_too(api, digits_setup):
    original = _create(api, _body(digits_setup, lr=[1e-4, 3e-4], term_sweeps={"kd.temperature": [2, 8]}))
    shown = api.get(_url("experiment_detail", pk=original.pk)).json()["train"]
    assert shown["term_sweeps"] == {"kd.temperature": [2.0, 8.0]}
    document = {
        "kind": "experiment",
        "name": "from the API",
        "dataset": "digits",
        "teacher": "mlp-teacher",
        "students": ["mlp-16"],
        "recipes": ["kd-t4"],
        "seeds": [0],
        "train": shown,
    }

    with mock.patch(DISPATCH):
        response = api.post(_url("experiment_import"), yaml.safe_dump(document), content_type=YAML)

    assert response.status_code == 201, response.json()
    assert _runs(Experiment.objects.get(pk=response.json()["id"])) == _runs(original)


def test_term_sweeps_given_twice_and_different_are_refused(api, digits_setup):
    document = (
        "kind: experiment\nname: twice\ndataset: digits\nteacher: mlp-teacher\nstudents: [mlp-16]\n"
        "recipes: [kd-t4]\nseeds: [0]\nterm_sweeps: {kd.temperature: [2, 4]}\n"
        "train: {max_steps: 10, term_sweeps: {kd.temperature: [2, 8]}}\n"
    )

    response = api.post(_url("experiment_import"), document, content_type=YAML)

    assert response.status_code == 400 and "once" in response.json()["term_sweeps"][0]
    assert not Experiment.objects.exists()


def test_a_hand_written_yaml_sweep_imports(api, digits_setup):
    # YAML 1.1 reads 3e-4 (no dot) as text: the items are read with the form's syntax, ranges included.
    document = (
        "kind: experiment\nname: by hand\ndataset: digits\nteacher: mlp-teacher\nstudents: [mlp-16]\n"
        "recipes: [kd-t4]\nseeds: [0]\ntrain: {max_steps: 10, lr: [1e-4, 3e-4, '5e-4:1e-3:lin2']}\n"
        "term_sweeps: [kd.temperature = 2:8:step2]\n"
    )

    with mock.patch(DISPATCH):
        response = api.post(_url("experiment_import"), document, content_type=YAML)

    assert response.status_code == 201, response.json()
    experiment = Experiment.objects.get(pk=response.json()["id"])
    assert experiment.train["lr"] == [1e-4, 3e-4, 5e-4, 1e-3]
    assert experiment.train["term_sweeps"] == {"kd.temperature": [2.0, 4.0, 6.0, 8.0]}
    assert experiment.runs.count() == 4 * (4 + 1)


def test_the_import_check_counts_a_long_sweep(api, digits_setup):
    original = _create(api, _body(digits_setup, lr="1e-5:1e-2:log30"))
    exported = api.get(_url("experiment_export", pk=original.pk)).content

    response = api.post(f"{_url('experiment_import')}?check=true", exported, content_type=YAML)

    assert response.status_code == 200, response.json()
    assert response.json()["runs"] == 60 and response.json()["errors"] == {}


# --- JSON lists on create -------------------------------------------------------------------------
def test_training_settings_take_json_lists(api, digits_setup):
    experiment = _create(api, _body(digits_setup, lr=[1e-4, "3e-4", "5e-4:1e-3:lin2"], max_steps=[10, 20]))

    assert experiment.train["lr"] == [1e-4, 3e-4, 5e-4, 1e-3] and experiment.train["max_steps"] == [10, 20]
    assert _lrs(experiment) == [1e-4, 3e-4, 5e-4, 1e-3]
    assert sorted(experiment.runs.values_list("total_steps", flat=True)) == [10] * 8 + [20] * 8


def test_an_empty_list_is_a_blank_field(api, digits_setup):
    experiment = _create(api, _body(digits_setup, lr=[]))

    assert experiment.train["lr"] == 1e-3 and experiment.runs.count() == 2


@pytest.mark.parametrize(
    "term_sweeps",
    [
        {"kd.temperature": [2, 8]},
        {"kd.temperature": "2:8:step6"},
        {"kd.temperature": "2, 8"},
        ["kd.temperature = 2, 8"],
        [{"param": "kd.temperature", "values": [2, 8]}],
        [{"kd.temperature": [2, 8]}],
    ],
)
def test_term_sweeps_take_a_mapping_or_a_list(api, digits_setup, term_sweeps):
    experiment = _create(api, _body(digits_setup, term_sweeps=term_sweeps))

    assert experiment.train["term_sweeps"] == {"kd.temperature": [2.0, 8.0]}
    temperatures = sorted(
        r.config["terms"][1]["params"]["temperature"] for r in experiment.runs.all() if not r.is_baseline
    )
    assert temperatures == [2.0, 8.0]


def test_several_term_sweeps_in_a_list(api, digits_setup):
    experiment = _create(
        api,
        _body(
            digits_setup,
            term_sweeps=[{"param": "kd.temperature", "values": [2, 8]}, "kd.weight = 0.5:0.9:lin3"],
        ),
    )

    assert experiment.train["term_sweeps"] == {"kd.temperature": [2.0, 8.0], "kd.weight": [0.5, 0.7, 0.9]}
    assert experiment.runs.count() == 2 * 3 + 1


def test_check_takes_the_same_lists(api, digits_setup):
    response = api.post(
        _url("experiment_check"),
        _body(digits_setup, lr=[1e-4, 3e-4], term_sweeps=[{"param": "kd.temperature", "values": [2, 8]}]),
    )

    assert response.status_code == 200, response.json()
    assert response.json()["runs"] == 2 * (2 + 1)


@pytest.mark.parametrize(
    ("extra", "field", "message"),
    [
        # the shape of the JSON
        ({"lr": [True, 1e-3]}, "lr", "not true/false"),
        ({"lr": ["1e-4, 3e-4"]}, "lr", "one value or range per list item"),
        ({"lr": [[1e-4]]}, "lr", "list of values"),
        ({"term_sweeps": {"kd.temperature": [{"x": 1}]}}, "term_sweeps", "list of values"),
        ({"lr": {"a": 1}}, "lr", "Give a list of values"),
        ({"lr": [1e-4] * 201}, "lr", "at most 200 fit"),
        ({"term_sweeps": [3]}, "term_sweeps", "Give term sweeps as"),
        (
            {"term_sweeps": {"kd.temperature = 2\nkd.weight": [1]}},
            "term_sweeps",
            "does not name a term parameter",
        ),
        (
            {"term_sweeps": ["kd.temperature = 2\nkd.weight = 1"]},
            "term_sweeps",
            "one TERM.PARAM = values line",
        ),
        ({"term_sweeps": {"kd.temperature": []}}, "term_sweeps", "at least one value"),
        ({"lr": ["1" * 201]}, "lr", "at most 200 characters"),
        ({"term_sweeps": ["kd.temperature = " + "2" * 2000]}, "term_sweeps", "at most 2000 characters"),
        # the form's own rules (experiments.domain.sweeps), the same as on the page
        ({"lr": [1e-4, 1e-4]}, "lr", "appears more than once"),
        ({"lr": [2.0]}, "lr", "less than or equal to 1"),
        ({"max_steps": [10, 2.5]}, "max_steps", "not a whole number"),
        ({"lr": ["1e-4:1e-3:log1"]}, "lr", "whole number of 2 or more"),
        ({"term_sweeps": {"kd.nope": [1, 2]}}, "term_sweeps", "kd has no parameter nope"),
        ({"term_sweeps": {"kd.temperature": [2, 2]}}, "term_sweeps", "appears more than once"),
        (
            {"term_sweeps": [{"param": "jsd.beta", "values": [0.1]}]},
            "term_sweeps",
            "no chosen recipe has a jsd term",
        ),
        ({"term_sweeps": ["kd.temperature = 2", "kd.temperature = 4"]}, "term_sweeps", "swept twice"),
    ],
)
def test_bad_sweeps_are_field_errors_and_create_nothing(api, digits_setup, extra, field, message):
    with mock.patch(DISPATCH):
        response = api.post(_url("experiment_list"), _body(digits_setup, **extra))

    assert response.status_code == 400
    assert message in " ".join(response.json()[field]), response.json()
    assert not Experiment.objects.exists()


def test_the_list_form_reads_values_as_the_page_does(user, team, digits_setup):
    """A JSON list and the same values typed in the form give the same experiment inputs."""
    from api import inputs
    from experiments import forms
    from experiments.domain import input_rules

    listed = inputs.experiment_input(
        user=user,
        payload=_body(digits_setup, lr=[1e-4, "3e-4"], term_sweeps={"kd.temperature": [2, 8]}, team=team.pk),
    )
    typed = forms.ExperimentForm(
        {
            **_body(
                digits_setup, team=team.pk, seeds="0", lr="1e-4, 3e-4", term_sweeps="kd.temperature = 2, 8"
            ),
            "students": [digits_setup["students"][0].pk],
            "recipes": [digits_setup["recipe"].pk],
        },
        user=user,
    )

    assert not listed.errors, listed.errors
    assert typed.is_valid(), typed.errors
    listed_kwargs = input_rules.experiment_preflight_kwargs(listed.data)
    typed_kwargs = typed.preflight_kwargs()
    assert listed_kwargs["train"]["lr"] == typed_kwargs["train"]["lr"] == [1e-4, 3e-4]
    assert listed_kwargs["term_sweeps"] == typed_kwargs["term_sweeps"] == {"kd.temperature": [2.0, 8.0]}


def test_yaml_keys_are_unchanged():
    assert "term_sweeps" in yaml_io.EXPERIMENT_KEYS and "term_sweeps" not in yaml_io.TRAIN_KEYS
