"""YAML export and import of recipes and experiments: round trips, name resolution, and hostile documents."""

from __future__ import annotations

from unittest import mock

import pytest
import yaml
from django.urls import reverse
from rest_framework.exceptions import ValidationError

from api import yaml_io
from experiments.models import Experiment, Recipe
from experiments.services import records
from tests.api.conftest import DISPATCH
from tests.factories import MembershipFactory, ModelSpecFactory, RecipeFactory

pytestmark = pytest.mark.django_db

YAML = "application/yaml"


def _url(name: str, **kwargs) -> str:
    return reverse(f"api:{name}", kwargs=kwargs)


def _recipe_fields(recipe: Recipe) -> tuple:
    return recipe.name, recipe.scheme, recipe.terms, recipe.scheme_params, recipe.description


def _experiment_fields(experiment: Experiment) -> tuple:
    return (experiment.name, experiment.description, experiment.dataset_id, experiment.teacher_id,
            sorted(s.pk for s in experiment.students.all()), sorted(r.pk for r in experiment.recipes.all()),
            experiment.seeds, experiment.train, experiment.teacher_weights, experiment.assistant_id)


# --- recipes --------------------------------------------------------------------------------------
def test_recipe_export_is_a_self_contained_yaml_document(api, digits_setup):
    recipe = digits_setup["recipe"]

    response = api.get(_url("recipe_export", pk=recipe.pk))

    assert response.status_code == 200
    assert response["Content-Type"].startswith("application/yaml")
    assert f'filename="{recipe.name}-v1.yaml"' in response["Content-Disposition"]
    spec = yaml.safe_load(response.content)
    assert spec == {"format": "distillweb/v1", "kind": "recipe", "name": "kd-t4", "scheme": "offline",
                    "terms": recipe.terms}


def test_recipe_round_trip_into_another_team_gives_an_equal_recipe(api, user, team, other_team, digits_setup):
    MembershipFactory(user=user, team=other_team)
    original = RecipeFactory(team=team, name="scheduled", description="kd with a decaying weight",
                             terms=[{"name": "ce", "weight": 0.5, "params": {"label_smoothing": 0.1}},
                                    {"name": "kd", "weight": 0.9, "params": {"temperature": 2.0},
                                     "schedule": {"weight": {"kind": "linear", "start": 0.9, "end": 0.1}}}])
    exported = api.get(_url("recipe_export", pk=original.pk)).content

    response = api.post(f"{_url('recipe_import')}?team={other_team.pk}", exported, content_type=YAML)

    assert response.status_code == 201, response.json()
    copy = Recipe.objects.get(pk=response.json()["id"])
    assert copy.team == other_team and copy.version == 1
    assert _recipe_fields(copy) == _recipe_fields(original)


def test_recipe_import_of_an_existing_name_is_its_next_version(api, team, user):
    recipe = records.recipe_create(team=team, created_by=user, name="jsd", scheme="online",
                                    terms=[{"name": "jsd", "weight": 1.0, "params": {"beta": 0.3}}])
    exported = api.get(_url("recipe_export", pk=recipe.pk)).content

    response = api.post(_url("recipe_import"), exported, content_type=YAML)

    assert response.status_code == 201
    assert response.json()["version"] == 2
    assert _recipe_fields(Recipe.objects.get(pk=response.json()["id"])) == _recipe_fields(recipe)


def test_recipe_import_applies_the_same_rules_as_create(api, team):
    document = (
        "kind: recipe\nname: bad\nscheme: offline\nterms:\n  - name: kd\n    params: {temperature: -3}\n"
    )

    response = api.post(_url("recipe_import"), document, content_type=YAML)

    assert response.status_code == 400
    assert "temperature" in " ".join(response.json()["terms"])
    assert not Recipe.objects.exists()


# --- experiments ----------------------------------------------------------------------------------
def test_experiment_export_names_its_records(api, experiment, digits_setup):
    spec = yaml.safe_load(api.get(_url("experiment_export", pk=experiment.pk)).content)

    assert spec["kind"] == "experiment" and spec["dataset"] == "digits" and spec["teacher"] == "mlp-teacher"
    assert spec["students"] == ["mlp-16", "mlp-32"]
    assert spec["recipes"] == [{"name": "kd-t4", "version": 1}]
    assert spec["seeds"] == [0] and spec["train"]["max_steps"] == 20 and spec["train"]["batch_size"] == 64


def test_experiment_round_trip_launches_an_equal_experiment(
    api, team, digits_setup, django_capture_on_commit_callbacks
):
    with mock.patch(DISPATCH):
        created = api.post(
            _url("experiment_list"),
            {
                "name": "sweep",
                "description": "two seeds",
                "dataset": digits_setup["dataset"].pk,
                "teacher": digits_setup["teacher"].pk,
                "students": [s.pk for s in digits_setup["students"]],
                "recipes": [digits_setup["recipe"].pk],
                "seeds": [3, 4],
                "max_steps": 30,
                "lr": 0.002,
            },
        ).json()
    original = Experiment.objects.get(pk=created["id"])
    exported = api.get(_url("experiment_export", pk=original.pk)).content

    with mock.patch(DISPATCH) as dispatch, django_capture_on_commit_callbacks(execute=True):
        response = api.post(_url("experiment_import"), exported, content_type=YAML)

    assert response.status_code == 201, response.json()
    copy = Experiment.objects.get(pk=response.json()["id"])
    assert copy.pk != original.pk
    assert _experiment_fields(copy) == _experiment_fields(original)
    assert copy.runs.count() == original.runs.count() == 8
    assert dispatch.call_count == 8


def test_a_sweep_round_trips_with_its_term_sweeps(api, team, digits_setup):
    with mock.patch(DISPATCH):
        created = api.post(
            _url("experiment_list"),
            {
                "name": "grid",
                "dataset": digits_setup["dataset"].pk,
                "teacher": digits_setup["teacher"].pk,
                "students": [digits_setup["students"][0].pk],
                "recipes": [digits_setup["recipe"].pk],
                "seeds": [0],
                "max_steps": 10,
                "lr": "1e-4:1e-3:log3",
                "term_sweeps": {"kd.temperature": [2, 4]},
            },
        ).json()
    original = Experiment.objects.get(pk=created["id"])
    spec = yaml.safe_load(api.get(_url("experiment_export", pk=original.pk)).content)

    with mock.patch(DISPATCH):
        response = api.post(_url("experiment_import"), yaml.safe_dump(spec), content_type=YAML)

    assert spec["train"]["lr"] == original.train["lr"] and len(spec["train"]["lr"]) == 3
    assert spec["term_sweeps"] == {"kd.temperature": [2, 4]} and "term_sweeps" not in spec["train"]
    assert response.status_code == 201, response.json()
    copy = Experiment.objects.get(pk=response.json()["id"])
    assert _experiment_fields(copy) == _experiment_fields(original)
    assert copy.runs.count() == original.runs.count() == 3 * 2 + 3  # lr × τ kd runs, plus a baseline per lr


def test_import_with_check_creates_nothing(api, team, digits_setup):
    document = (
        "kind: experiment\nname: dry\ndataset: digits\nteacher: mlp-teacher\nstudents: [mlp-16, mlp-32]\n"
        "recipes: [kd-t4]\nseeds: [0, 1, 2]\ntrain: {max_steps: 10}\n"
    )

    with mock.patch(DISPATCH) as dispatch:
        response = api.post(f"{_url('experiment_import')}?check=true", document, content_type=YAML)

    assert response.status_code == 200 and response.json()["runs"] == 12 and response.json()["can_launch"]
    assert not Experiment.objects.exists() and not dispatch.called


def test_experiment_import_resolves_a_plain_recipe_name_to_its_latest_version(api, team, digits_setup):
    newer = RecipeFactory(team=team, name="kd-t4", version=2)
    document = (
        "kind: experiment\nname: latest\ndataset: digits\nteacher: mlp-teacher\nstudents: [mlp-16]\n"
        "recipes: [kd-t4]\nseeds: [0]\ntrain: {max_steps: 10}\n"
    )

    with mock.patch(DISPATCH):
        response = api.post(_url("experiment_import"), document, content_type=YAML)

    assert response.status_code == 201, response.json()
    assert [r.pk for r in Experiment.objects.get().recipes.all()] == [newer.pk]


def test_experiment_import_names_every_unknown_record(api, team, digits_setup):
    document = (
        "kind: experiment\nname: typo\ndataset: digitz\nteacher: mlp-teacher\n"
        "students: [mlp-16, mlp-99]\nrecipes: [{name: kd-t4, version: 7}]\nseeds: [0]\n"
        "train: {max_steps: 10, epochs: 3}\n"
    )

    response = api.post(_url("experiment_import"), document, content_type=YAML)

    errors = response.json()
    assert response.status_code == 400
    assert "digitz" in errors["dataset"][0] and "mlp-99" in errors["students"][0]
    assert "version 7" in errors["recipes"][0] and "epochs" in errors["train"][0]
    assert not Experiment.objects.exists()


def test_experiment_import_applies_the_forms_rules(api, team, digits_setup):
    document = (
        "kind: experiment\nname: x\ndataset: digits\nstudents: [mlp-16]\nrecipes: [kd-t4]\n"
        "seeds: '0-99999999'\ntrain: {lr: 7}\n"
    )

    response = api.post(_url("experiment_import"), document, content_type=YAML)

    assert response.status_code == 400
    assert "At most 20 seeds" in response.json()["seeds"][0]


def test_experiment_import_validates_after_name_resolution(api, team, digits_setup):
    ModelSpecFactory(team=team, name="five-way", num_labels=5)
    document = (
        "kind: experiment\nname: x\ndataset: digits\nteacher: mlp-teacher\nstudents: [five-way]\n"
        "recipes: [kd-t4]\nseeds: [0]\ntrain: {lr: 7}\n"
    )

    response = api.post(_url("experiment_import"), document, content_type=YAML)

    assert set(response.json()) == {"lr"}  # the names resolved; the form then refused the learning rate
    assert not Experiment.objects.exists()


# --- teams ----------------------------------------------------------------------------------------
def test_import_team_choice(api, user, team, other_team, digits_setup):
    MembershipFactory(user=user, team=other_team)
    document = "kind: recipe\nname: r\nscheme: offline\nterms: [{name: kd}]\n"

    ambiguous = api.post(_url("recipe_import"), document, content_type=YAML)
    by_name = api.post(_url("recipe_import"), f"team: {other_team.name}\n" + document, content_type=YAML)
    by_query = api.post(f"{_url('recipe_import')}?team={team.pk}", document, content_type=YAML)

    assert ambiguous.status_code == 400 and "several teams" in ambiguous.json()["team"][0]
    assert by_name.status_code == 201 and by_name.json()["team"]["id"] == other_team.pk
    assert by_query.status_code == 201 and by_query.json()["team"]["id"] == team.pk


def test_import_into_a_team_the_user_is_not_in_is_refused(api, team, other_team):
    document = "kind: recipe\nname: r\nterms: [{name: kd}]\nscheme: offline\n"

    by_query = api.post(f"{_url('recipe_import')}?team={other_team.pk}", document, content_type=YAML)
    by_name = api.post(_url("recipe_import"), f"team: {other_team.name}\n" + document, content_type=YAML)

    assert by_query.status_code == by_name.status_code == 400
    assert not Recipe.objects.filter(team=other_team).exists()


# --- hostile and broken documents -----------------------------------------------------------------
def test_python_tags_are_refused_and_never_run(api, team, tmp_path):
    marker = tmp_path / "pwned"
    document = (
        f"kind: recipe\nname: !!python/object/apply:os.system ['touch {marker}']\nscheme: offline\n"
        "terms: [{name: kd}]\n"
    )

    response = api.post(_url("recipe_import"), document, content_type=YAML)

    assert response.status_code == 400
    assert "python/object/apply" in response.json()["yaml"][0]
    assert not marker.exists() and not Recipe.objects.exists()


def test_aliases_are_refused_before_expansion(api, team):
    laughs = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{chr(98 + i)}: &{chr(98 + i)} [*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}]\n"
        for i in range(8)
    )

    response = api.post(_url("recipe_import"), laughs, content_type=YAML)

    assert response.status_code == 400 and "aliases" in response.json()["yaml"][0]


@pytest.mark.parametrize(
    ("document", "key", "message"),
    [
        ("[1, 2]", "yaml", "mapping"),
        ("name: [unclosed", "yaml", "Not valid YAML"),
        ("kind: recipe\n---\nkind: recipe\n", "yaml", "single document"),
        ("kind: experiment\nname: r\n", "kind", "not a recipe"),
        ("format: other/v9\nname: r\n", "format", "distillweb/v1"),
        ("name: r\nterms: [{name: kd}]\nowner: root\n", "owner", "Unknown key"),
        ("name: r\nscheme: offline\nterms: {name: kd}\n", "terms", "list of loss terms"),
        ("x: " + "[" * 30 + "]" * 30 + "\n", "yaml", "nests deeper"),
        ("name: <script>alert(1)</script>\nscheme: offline\nterms: [{name: kd}]\n", "name", "<"),
    ],
)
def test_broken_recipe_documents_are_400s(api, team, document, key, message):
    response = api.post(_url("recipe_import"), document, content_type=YAML)

    assert response.status_code == 400, response.content
    assert message in " ".join(response.json()[key]), response.json()


def test_import_needs_a_yaml_body(api, team):
    empty = api.post(_url("recipe_import"), "", content_type=YAML)
    as_json = api.post(_url("recipe_import"), {"name": "r"})

    assert empty.status_code == 400 and "YAML document" in empty.json()["yaml"][0]
    assert as_json.status_code == 415


def test_an_oversized_document_is_refused(api, team):
    response = api.post(_url("recipe_import"), "name: " + "x" * 300_000 + "\n", content_type=YAML)

    assert response.status_code == 413


def test_load_refuses_what_safe_load_cannot_build_without_touching_the_database():
    with pytest.raises(ValidationError) as exc:
        yaml_io.load("!!python/name:os.system\n", kind="recipe", keys=yaml_io.RECIPE_KEYS)

    assert "yaml" in exc.value.detail
