"""Input the database cannot store, or that is malformed deep inside a value, is a 400 with a field error on
every path in (JSON bodies, YAML documents, JSON typed into a form), never a 500, and creates nothing."""

from __future__ import annotations

from unittest import mock

import pytest
from django.urls import reverse

from experiments.models import DatasetSpec, Experiment, ModelSpec, Recipe
from tests.api.conftest import DISPATCH

pytestmark = pytest.mark.django_db

YAML = "application/yaml"
NUL, SURROGATE = "\u0000", "\ud800"


def _url(name: str, **kwargs) -> str:
    return reverse(f"api:{name}", kwargs=kwargs)


def _model(team, **fields):
    return {"team": team.pk, "name": "cfg", "source": "config", "task": "classification", "num_labels": 2,
            "config": {"model_type": "bert", "hidden_size": 32}, **fields}


def _launch(digits_setup, **fields):
    return {
        "name": "grid",
        "dataset": digits_setup["dataset"].pk,
        "teacher": digits_setup["teacher"].pk,
        "students": [digits_setup["students"][0].pk],
        "recipes": [digits_setup["recipe"].pk],
        "seeds": [0],
        "max_steps": 10,
        **fields,
    }


# --- the three inputs that answered 500 --------------------------------------------------------------
def test_a_nul_character_in_a_config_value_is_a_field_error(api, team):
    response = api.post(
        _url("model_list"), _model(team, config={"model_type": f"bert{NUL}", "hidden_size": 32})
    )

    assert response.status_code == 400
    assert "NUL" in response.json()["config"][0] and "config.model_type" in response.json()["config"][0]
    assert not ModelSpec.objects.exists()


def test_a_nul_character_in_a_config_key_is_a_field_error(api, team):
    response = api.post(_url("model_list"), _model(team, config={"model_type": "bert", f"a{NUL}": 1}))

    assert response.status_code == 400
    assert "NUL" in response.json()["config"][0]
    assert not ModelSpec.objects.exists()


def test_a_term_sweep_with_an_empty_param_and_an_object_of_values_is_a_field_error(api, team, digits_setup):
    response = api.post(
        _url("experiment_check"), _launch(digits_setup, term_sweeps=[{"param": "", "values": {}}])
    )

    assert response.status_code == 400
    assert "term parameter" in response.json()["term_sweeps"][0]


def test_a_term_sweep_under_an_empty_name_is_a_field_error_not_a_line(api, team, digits_setup):
    response = api.post(_url("experiment_check"), _launch(digits_setup, term_sweeps={"": [2, 4]}))

    assert response.status_code == 400
    assert "term parameter" in response.json()["term_sweeps"][0]


# --- anywhere in a JSON body ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("where", "value"),
    [
        ("config value in a list", {"model_type": "bert", "id2label": {"0": "a", "1": ["b", f"c{NUL}"]}}),
        ("config key deep down", {"model_type": "bert", "x": {"y": [{f"z{NUL}": 1}]}}),
        ("config lone surrogate", {"model_type": f"bert{SURROGATE}"}),
    ],
)
def test_unstorable_text_anywhere_in_a_config_is_a_field_error(api, team, where, value):
    response = api.post(_url("model_list"), _model(team, config=value))

    assert response.status_code == 400, where
    assert list(response.json()) == ["config"]
    assert not ModelSpec.objects.exists()


@pytest.mark.parametrize("field", ["notes", "tokenizer_id"])
def test_a_lone_surrogate_in_a_text_field_is_a_field_error(api, team, field):
    response = api.post(_url("model_list"), _model(team, **{field: f"a{SURROGATE}b"}))

    assert response.status_code == 400
    assert "Unicode" in response.json()[field][0]
    assert not ModelSpec.objects.exists()


def test_a_lone_surrogate_in_a_list_field_is_a_field_error(api, team):
    response = api.post(
        _url("dataset_list"),
        {
            "team": team.pk,
            "name": "d",
            "source": "hf",
            "hub_name": "x/y",
            "label_names": ["a", f"b{SURROGATE}"],
        },
    )

    assert response.status_code == 400
    assert "label_names" in response.json()
    assert not DatasetSpec.objects.exists()


def test_unstorable_text_in_a_launch_is_a_field_error_and_queues_nothing(api, team, digits_setup):
    with mock.patch(DISPATCH) as dispatch:
        response = api.post(
            _url("experiment_list"), _launch(digits_setup, term_sweeps={f"kd.temperature{NUL}": [2, 4]})
        )

    assert response.status_code == 400
    assert "NUL" in response.json()["term_sweeps"][0]
    assert not Experiment.objects.exists() and not dispatch.called


def test_a_nul_character_in_a_field_name_is_an_error_not_a_500(api, team):
    response = api.post(_url("model_list"), {**_model(team), f"name{NUL}": "x"})

    assert response.status_code == 400
    assert "field name" in response.json()["non_field_errors"][0]


def test_a_body_nested_past_the_json_module_limit_is_a_400(api, team):
    depth = 100_000
    response = api.client.post(
        _url("model_list"),
        "[" * depth + "]" * depth,
        content_type="application/json",
        headers={"Authorization": f"Bearer {api.token}"},
    )

    assert response.status_code == 400
    assert "nested" in response.json()["detail"]


# --- YAML documents ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("document", "field"),
    [
        (
            'kind: recipe\nname: r\nscheme: offline\ndescription: "a\\ud800"\nterms:\n  - name: kd\n',
            "description",
        ),
        ('kind: recipe\nname: "r\\ud800"\nscheme: offline\nterms:\n  - name: kd\n', "name"),
    ],
)
def test_yaml_text_that_cannot_be_stored_is_a_field_error(api, team, document, field):
    response = api.post(_url("recipe_import"), document, content_type=YAML)

    assert response.status_code == 400
    assert "Unicode" in response.json()[field][0]
    assert not Recipe.objects.exists()


def test_a_yaml_nul_escape_in_a_term_sweep_is_a_field_error(api, team, digits_setup):
    document = (
        "kind: experiment\nname: e\ndataset: digits\nteacher: mlp-teacher\nstudents: [mlp-16]\n"
        'recipes: [kd-t4]\nseeds: [0]\nterm_sweeps: {"kd.temperature\\0": [2, 4]}\n'
    )

    with mock.patch(DISPATCH) as dispatch:
        response = api.post(_url("experiment_import"), document, content_type=YAML)

    assert response.status_code == 400
    assert "NUL" in response.json()["term_sweeps"][0]
    assert not Experiment.objects.exists() and not dispatch.called


# --- JSON typed into a web form ------------------------------------------------------------------------
@pytest.mark.parametrize(
    "config",
    [
        '{"model_type": "bert", "x": "a\\u0000b"}',
        '{"model_type": "bert", "x\\u0000": 1}',
        '{"model_type": "bert", "x": NaN}',
        '{"model_type": "bert", "x": [Infinity]}',
        '{"model_type": "bert", "x": "\\ud800"}',
        '{"model_type": "bert", "x": ' + "[" * 5000 + "]" * 5000 + "}",
    ],
)
def test_the_model_form_refuses_a_config_the_database_cannot_store(client_logged_in, team, config):
    response = client_logged_in.post(
        reverse("experiments:model_create"),
        {
            "team": team.pk,
            "name": "cfg",
            "source": "config",
            "num_labels": 5,
            "config": config,
        },
    )

    assert response.status_code == 200
    assert response.context["form"].errors["config"]
    assert not ModelSpec.objects.exists()


def test_the_api_refuses_a_config_given_as_json_text_the_database_cannot_store(api, team):
    response = api.post(_url("model_list"), _model(team, config='{"model_type": "bert", "x": "\\u0000"}'))

    assert response.status_code == 400
    assert "NUL" in response.json()["config"][0]
    assert not ModelSpec.objects.exists()


@pytest.mark.django_db
def test_an_api_path_with_an_encoded_line_break_is_a_json_404(client_logged_in):
    response = client_logged_in.get("/api/runs/%0AN/metrics/")
    assert response.status_code == 404
    assert response["Content-Type"].startswith("application/json")
