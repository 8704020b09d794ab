"""The REST API: authentication, team scoping, input errors, launches, run control, metrics, leaderboards,
the OpenAPI schema, pagination and query counts."""

from __future__ import annotations

import json
import math
from unittest import mock

import pytest
import yaml
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.urls import URLPattern, reverse
from django.utils import timezone

from api import urls as api_urls
from api.models import ApiToken
from experiments.domain import preflight
from experiments.models import DatasetSpec, Experiment, MetricPoint, ModelSpec, Recipe, Run
from tests.api.conftest import DISPATCH, Api, make_token, succeeded_run
from tests.factories import (
    DatasetSpecFactory,
    ExperimentFactory,
    MembershipFactory,
    ModelSpecFactory,
    RecipeFactory,
    RunFactory,
)

pytestmark = pytest.mark.django_db


def _url(name: str, **kwargs) -> str:
    return reverse(f"api:{name}", kwargs=kwargs)


# --- authentication -------------------------------------------------------------------------------
def test_no_credentials_is_a_401_json_not_a_login_redirect(anonymous):
    response = anonymous.get(_url("model_list"))

    assert response.status_code == 401
    assert response["Content-Type"] == "application/json"
    assert response.json()["detail"]
    assert response["WWW-Authenticate"].startswith("Bearer")


@pytest.mark.parametrize(
    "header", ["Bearer nope", "Bearer dw_" + "x" * 40, "Token", "Bearer a b", "Bearer \u00e9"]
)
def test_a_bad_token_is_a_401(client, user, header):
    response = client.get(_url("model_list"), headers={"Authorization": header})

    assert response.status_code == 401
    assert response.json()["detail"]


def test_a_token_authenticates_as_its_user_and_records_its_use(api, user, digits_setup):
    response = api.get(_url("model_list"))

    assert response.status_code == 200
    assert {m["name"] for m in response.json()["results"]} == {"mlp-teacher", "mlp-16", "mlp-32"}
    assert ApiToken.objects.get(user=user).last_used_at is not None


def test_a_token_of_an_inactive_user_is_refused(api, user):
    user.is_active = False
    user.save()

    assert api.get(_url("team_list")).status_code == 401


def test_a_revoked_token_stops_working(client, user):
    token = make_token(user)
    client.force_login(user)
    record = ApiToken.objects.get(user=user)

    response = client.post(reverse("api:token_revoke", kwargs={"token_id": record.pk}))
    client.logout()

    assert response.status_code == 302
    assert Api(client, token).get(_url("team_list")).status_code == 401


def test_the_session_authenticates_the_browser(client_logged_in, digits_setup):
    assert client_logged_in.get(_url("model_list")).status_code == 200


def test_session_writes_need_the_csrf_token(user, digits_setup):
    from django.test import Client

    browser = Client(enforce_csrf_checks=True)
    browser.force_login(user)

    response = browser.post(_url("recipe_list"), "{}", content_type="application/json")

    assert response.status_code == 403
    assert "CSRF" in response.json()["detail"]


def test_token_writes_need_no_csrf_token(user, team):
    from django.test import Client

    api = Api(Client(enforce_csrf_checks=True), make_token(user))

    response = api.post(_url("recipe_list"), {"name": "kd", "terms": [{"name": "kd", "weight": 1.0}]})

    assert response.status_code == 201, response.json()


def test_unknown_api_paths_are_json_404s_with_a_hint_for_a_missing_slash(api):
    assert api.get("/api/nothing-here/").json() == {"detail": "Not found."}
    response = api.get("/api/models")

    assert response.status_code == 404
    assert "/api/models/" in response.json()["detail"]


# --- the token page ---------------------------------------------------------------------------------
def test_the_token_page_needs_a_login(client):
    response = client.get(reverse("api:token_list"))

    assert response.status_code == 302 and response.url.startswith(reverse("login"))


def test_a_user_creates_a_token_once_visible_and_usable(client_logged_in, client, user):
    response = client_logged_in.post(reverse("api:token_list"), {"name": "laptop"})

    token = response.context["token"]
    html = response.content.decode()
    assert response.status_code == 200 and token.startswith("dw_") and token in html
    assert "no-store" in response["Cache-Control"] or "no-cache" in response["Cache-Control"]
    record = ApiToken.objects.get(user=user)
    assert record.name == "laptop" and token not in (record.key_hash, record.prefix)
    assert token not in client_logged_in.get(reverse("api:token_list")).content.decode()
    client.logout()
    assert Api(client, token).get(_url("team_list")).status_code == 200


def test_a_duplicate_token_name_is_a_name_error(client_logged_in, user):
    client_logged_in.post(reverse("api:token_list"), {"name": "ci"})

    response = client_logged_in.post(reverse("api:token_list"), {"name": "ci"})

    assert "already have a token" in response.context["form"].errors["name"][0]
    assert ApiToken.objects.filter(user=user).count() == 1


def test_a_user_cannot_revoke_another_users_token(client_logged_in, other_user):
    make_token(other_user)
    record = ApiToken.objects.get(user=other_user)

    response = client_logged_in.post(reverse("api:token_revoke", kwargs={"token_id": record.pk}))

    assert response.status_code == 404
    assert ApiToken.objects.filter(pk=record.pk).exists()


def test_the_user_menu_links_to_the_token_page(client_logged_in):
    assert reverse("api:token_list") in client_logged_in.get(reverse("experiments:home")).content.decode()


# --- team scoping ---------------------------------------------------------------------------------
LISTS = {
    "model_list": "model",
    "dataset_list": "dataset",
    "recipe_list": "recipe",
    "experiment_list": "experiment",
    "run_list": "run",
    "leaderboard_list": "dataset",
}


@pytest.mark.parametrize(("name", "record"), LISTS.items())
def test_lists_show_only_the_users_teams(api, foreign, experiment, run, ranked, name, record):
    response = api.get(_url(name))

    ids = {row["id"] for row in response.json()["results"]}
    assert response.status_code == 200 and ids
    assert foreign[record].pk not in ids
    assert "secret" not in response.content.decode()


def test_teams_lists_the_users_teams_with_the_role(api, team, other_team):
    response = api.get(_url("team_list"))

    assert [(t["name"], t["role"]) for t in response.json()["results"]] == [(team.name, "member")]


def test_staff_see_every_team_and_record(client, staff_user, team, other_team, foreign, experiment):
    staff = Api(client, make_token(staff_user))

    teams = {t["name"]: t["role"] for t in staff.get(_url("team_list")).json()["results"]}
    experiments = {e["name"] for e in staff.get(_url("experiment_list")).json()["results"]}

    assert teams == {team.name: None, other_team.name: None}
    assert experiments == {experiment.name, "secret experiment"}
    assert staff.get(_url("run_detail", pk=foreign["run"].pk)).status_code == 200


# Every API URL that names a record, with each method it answers, is checked against another team's record.
_RECORD_FOR_URL = {
    "model": "model",
    "dataset": "dataset",
    "recipe": "recipe",
    "experiment": "experiment",
    "run": "run",
    "leaderboard": "dataset",
}
_BODIES = {"model_derive": {"name": "x", "layers": [0]}, "run_register": {"name": "stolen"}}


def _record_urls() -> list[tuple[str, str, str]]:
    cases = []
    for pattern in api_urls.urlpatterns:
        if not isinstance(pattern, URLPattern) or "pk" not in pattern.pattern.converters:
            continue
        for method in getattr(pattern.callback, "actions", {}):
            cases.append((pattern.name, method, _RECORD_FOR_URL[pattern.name.split("_")[0]]))
    return cases


def test_every_record_url_is_covered():
    names = {name for name, _, _ in _record_urls()}

    assert {
        "model_detail",
        "dataset_detail",
        "recipe_detail",
        "recipe_export",
        "experiment_detail",
        "experiment_cancel",
        "experiment_export",
        "run_detail",
        "run_cancel",
        "run_requeue",
        "run_metrics",
        "run_register",
        "model_derive",
        "leaderboard_detail",
    } <= names


@pytest.mark.parametrize(("name", "method", "record"), _record_urls())
def test_another_teams_record_is_a_404_and_nothing_changes(api, foreign, name, method, record):
    before = (Run.objects.get(pk=foreign["run"].pk).status, ModelSpec.objects.count(), Recipe.objects.count())

    url = _url(name, pk=foreign[record].pk)
    response = api.get(url) if method == "get" else api.post(url, _BODIES.get(name, {}))

    assert response.status_code == 404, response.content
    assert set(response.json()) == {"detail"}
    assert "secret" not in response.content.decode()
    assert (
        Run.objects.get(pk=foreign["run"].pk).status,
        ModelSpec.objects.count(),
        Recipe.objects.count(),
    ) == before


@pytest.mark.parametrize("record", ["model", "dataset", "recipe", "experiment", "run"])
def test_delete_is_not_offered_and_answers_the_same_for_any_team(
    api, foreign, experiment, run, digits_setup, record
):
    own = {
        "model": digits_setup["teacher"],
        "dataset": digits_setup["dataset"],
        "recipe": digits_setup["recipe"],
        "experiment": experiment,
        "run": run,
    }[record]

    mine = api.delete(_url(f"{record}_detail", pk=own.pk))
    theirs = api.delete(_url(f"{record}_detail", pk=foreign[record].pk))

    assert mine.status_code == theirs.status_code == 405
    assert type(foreign[record]).objects.filter(pk=foreign[record].pk).exists()


def test_a_huge_or_odd_id_is_a_404_not_a_500(api):
    assert api.get("/api/models/99999999999999999999999/").status_code == 404
    assert api.get("/api/models/-1/").status_code == 404
    assert api.get("/api/models/abc/").status_code == 404


# --- records: create ------------------------------------------------------------------------------
def test_create_a_builtin_model_with_the_web_forms_fields(api, team, user):
    response = api.post(
        _url("model_list"),
        {
            "name": "mlp-64",
            "source": "builtin",
            "builtin_arch": "mlp",
            "hidden_sizes": [64, 64],
            "num_labels": 10,
        },
    )

    assert response.status_code == 201, response.json()
    spec = ModelSpec.objects.get(name="mlp-64")
    assert spec.team == team and spec.created_by == user and spec.config == {"hidden_sizes": [64, 64]}
    assert response.json()["id"] == spec.pk and response.json()["team"] == {"id": team.pk, "name": team.name}


def test_create_a_config_model_takes_the_config_as_an_object(api, team):
    config = {
        "model_type": "bert",
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "intermediate_size": 64,
    }

    response = api.post(
        _url("model_list"), {"name": "tiny-bert", "source": "config", "config": config, "num_labels": 10}
    )

    assert response.status_code == 201, response.json()
    assert ModelSpec.objects.get(name="tiny-bert").config == config


MODEL_OK = {"name": "m", "source": "builtin", "builtin_arch": "mlp", "hidden_sizes": "32", "num_labels": 10}


@pytest.mark.parametrize(
    ("change", "field", "message"),
    [
        ({"name": None}, "name", "required"),
        ({"name": "<script>alert(1)</script>"}, "name", "<"),
        ({"name": "a\x00b"}, "name", ""),
        ({"name": "x" * 500}, "name", "at most 120"),
        ({"name": {"a": 1}}, "name", "single value"),
        ({"source": "ftp"}, "source", "valid choice"),
        ({"num_labels": "abc"}, "num_labels", "whole number"),
        ({"num_labels": 1}, "num_labels", "greater than or equal to 2"),
        ({"num_labels": True}, "num_labels", "not true/false"),
        ({"hidden_sizes": [0]}, "hidden_sizes", "between 1 and 65536"),
        ({"hidden_sizes": [{"x": 1}]}, "hidden_sizes", "list of numbers"),
        ({"source": "hf", "local_path": "../../../../etc", "hub_id": ""}, "local_path", "outside"),
        ({"source": "hf", "local_path": "/etc/passwd"}, "local_path", "outside"),
        ({"source": "hf", "hub_id": "org/model", "local_path": "/etc"}, "hub_id", "either"),
        ({"source": "config", "config": "[1, 2]"}, "config", "JSON object"),
        ({"source": "config", "config": "{not json"}, "config", "Not valid JSON"),
        ({"source": "config", "config": {"hidden_size": 3}}, "config", "model_type"),
        ({"colour": "blue"}, "colour", "Unknown field"),
        ({"task": "regression"}, "task", "valid choice"),
    ],
)
def test_create_model_bad_input_is_a_400_with_the_field_message(api, team, change, field, message):
    response = api.post(_url("model_list"), {**MODEL_OK, **change})

    assert response.status_code == 400, response.content
    errors = response.json()
    assert field in errors, errors
    assert message in " ".join(errors[field])
    assert not ModelSpec.objects.exists()


@pytest.mark.parametrize("body", [[1, 2], "text", 5, None])
def test_create_with_a_body_that_is_not_an_object_is_a_400(api, team, body):
    response = api.post(_url("model_list"), body if body is not None else {})

    assert response.status_code == 400
    assert response.json()


def test_malformed_json_is_a_400(api, team):
    response = api.client.post(
        _url("model_list"),
        "{bad",
        content_type="application/json",
        headers={"Authorization": f"Bearer {api.token}"},
    )

    assert response.status_code == 400 and "JSON" in response.json()["detail"]


def test_a_body_over_the_upload_cap_is_refused_before_parsing(api, team, settings):
    settings.DATA_UPLOAD_MAX_MEMORY_SIZE = 1000

    response = api.post(_url("model_list"), {**MODEL_OK, "notes": "x" * 5000})

    assert response.status_code == 413
    assert not ModelSpec.objects.exists()


def test_create_into_a_team_the_user_is_not_in_is_a_team_error(api, team, other_team):
    response = api.post(_url("model_list"), {**MODEL_OK, "team": other_team.pk})

    assert response.status_code == 400
    assert "team" in response.json()
    assert not ModelSpec.objects.exists()


def test_a_user_of_several_teams_must_name_the_team(api, user, team, other_team):
    MembershipFactory(user=user, team=other_team)

    missing = api.post(_url("model_list"), MODEL_OK)
    chosen = api.post(_url("model_list"), {**MODEL_OK, "team": other_team.pk})

    assert missing.status_code == 400 and "team" in missing.json()
    assert chosen.status_code == 201 and ModelSpec.objects.get().team == other_team


def test_a_taken_model_name_is_an_error_from_the_service(api, team, digits_setup):
    response = api.post(_url("model_list"), {**MODEL_OK, "name": "mlp-teacher"})

    assert response.status_code == 400
    assert "already exists" in json.dumps(response.json())


def test_create_a_dataset_and_its_bad_input(api, team):
    ok = api.post(_url("dataset_list"), {"name": "iris", "source": "builtin", "builtin_name": "iris"})
    bad = {
        "eval_fraction": api.post(
            _url("dataset_list"),
            {"name": "d", "source": "builtin", "builtin_name": "iris", "eval_fraction": 5},
        ),
        "builtin_name": api.post(
            _url("dataset_list"), {"name": "d", "source": "builtin", "builtin_name": "../x"}
        ),
        "local_path": api.post(
            _url("dataset_list"), {"name": "d", "source": "hf", "local_path": "/etc/passwd", "num_labels": 2}
        ),
        "label_names": api.post(
            _url("dataset_list"),
            {
                "name": "d",
                "source": "builtin",
                "builtin_name": "iris",
                "num_labels": 3,
                "label_names": ["a", "b"],
            },
        ),
    }

    assert ok.status_code == 201, ok.json()
    assert DatasetSpec.objects.get().splits == {"train": 120, "eval": 30}
    for field, response in bad.items():
        assert response.status_code == 400 and field in response.json(), (field, response.json())
    assert DatasetSpec.objects.count() == 1


def test_create_a_recipe_validates_terms_with_the_engine(api, team):
    response = api.post(
        _url("recipe_list"),
        {
            "name": "kd-t4",
            "scheme": "offline",
            "description": "classic",
            "terms": [
                {"name": "ce", "weight": 0.1},
                {"name": "kd", "weight": 0.9, "params": {"temperature": 4}},
            ],
        },
    )

    assert response.status_code == 201, response.json()
    recipe = Recipe.objects.get(name="kd-t4")
    assert recipe.terms[1]["params"]["temperature"] == 4 and recipe.version == 1
    assert response.json()["formula"].startswith("0.1·ce")
    again = api.post(_url("recipe_list"), {"name": "kd-t4", "terms": [{"name": "kd"}]})
    assert again.status_code == 201 and again.json()["version"] == 2


@pytest.mark.parametrize(
    ("change", "field", "message"),
    [
        ({"terms": None}, "terms", "list of loss terms"),
        ({"terms": "kd"}, "terms", "list of loss terms"),
        ({"terms": []}, "terms", "list of loss terms"),
        ({"terms": [{"name": "kd"}] * 9}, "terms", "At most 8"),
        ({"terms": ["kd"]}, "terms", "must be an object"),
        ({"terms": [{"name": ["kd"]}]}, "terms", "needs a name"),
        ({"terms": [{"name": "kd", "params": ["x"]}]}, "terms", "params must be an object"),
        ({"terms": [{"name": "kd", "weight": "heavy"}]}, "terms", "weight must be a number"),
        ({"terms": [{"name": "kd", "colour": 1}]}, "terms", "unknown key colour"),
        ({"terms": [{"name": "telepathy"}]}, "terms", "Unknown loss term"),
        ({"terms": [{"name": "kd", "params": {"temperature": "hot"}}]}, "terms", "must be a number"),
        ({"terms": [{"name": "kd", "weight": -1}]}, "terms", "between 0"),
        ({"terms": [{"name": "kd"}, {"name": "kd"}]}, "terms", "once"),
        ({"scheme": "magic"}, "scheme", "valid choice"),
        ({"scheme": "hard_labels"}, "scheme", "ce term only"),
        ({"scheme_params": [1]}, "scheme_params", "object"),
        ({"scheme_params": {"generations": 2}}, "scheme_params", "no parameter"),
        ({"name": "<img src=x onerror=alert(1)>"}, "name", "<"),
    ],
)
def test_create_recipe_bad_input_is_a_400_with_the_field_message(api, team, change, field, message):
    body = {"name": "r", "scheme": "offline", "terms": [{"name": "kd", "weight": 1.0}], **change}

    response = api.post(_url("recipe_list"), {k: v for k, v in body.items() if v is not None})

    assert response.status_code == 400, response.content
    assert message in " ".join(response.json().get(field, [])), response.json()
    assert not Recipe.objects.exists()


def test_derive_a_student_from_a_transformers_model(api, team):
    parent = ModelSpecFactory(
        team=team,
        name="bert-4",
        source=ModelSpec.Source.CONFIG,
        builtin_arch="",
        config={
            "model_type": "bert",
            "hidden_size": 32,
            "num_hidden_layers": 4,
            "num_attention_heads": 2,
            "intermediate_size": 64,
        },
    )

    ok = api.post(_url("model_derive", pk=parent.pk), {"name": "bert-2", "layers": [0, 2]})
    bad = api.post(_url("model_derive", pk=parent.pk), {"name": "bert-x", "layers": [0, 9]})

    assert ok.status_code == 201, ok.json()
    assert ModelSpec.objects.get(name="bert-2").parent == parent
    assert bad.status_code == 400 and "layers" in bad.json()


def test_register_a_succeeded_runs_student(api, experiment, digits_setup, run):
    done = succeeded_run(experiment, digits_setup["students"][0], digits_setup["recipe"], 1, 0.9)

    ok = api.post(_url("run_register", pk=done.pk), {"name": "distilled"})
    early = api.post(_url("run_register", pk=run.pk), {"name": "too-early"})

    assert ok.status_code == 201 and ModelSpec.objects.get(name="distilled").source_run == done
    assert early.status_code == 400 and "has not succeeded" in json.dumps(early.json())


# --- records: read --------------------------------------------------------------------------------
def test_record_detail_and_filters(api, team, digits_setup):
    recipe = digits_setup["recipe"]

    detail = api.get(_url("recipe_detail", pk=recipe.pk)).json()
    by_q = api.get(_url("model_list"), {"q": "16"}).json()
    by_task = api.get(_url("dataset_list"), {"task": "causal_lm"}).json()
    RecipeFactory(team=team, name="other")
    by_name = api.get(_url("recipe_list"), {"name": recipe.name}).json()
    by_source = api.get(_url("model_list"), {"source": "config"}).json()

    assert detail["terms"] == recipe.terms and detail["team"]["id"] == team.pk and detail["needs_teacher"]
    assert [m["name"] for m in by_q["results"]] == ["mlp-16"]
    assert by_task["count"] == 0
    assert [r["id"] for r in by_name["results"]] == [recipe.pk] and by_source["count"] == 0


@pytest.mark.parametrize(
    ("name", "params", "field"),
    [
        ("model_list", {"team": "abc"}, "team"),
        ("model_list", {"team": str(10**30)}, "team"),
        ("model_list", {"task": "regression"}, "task"),
        ("run_list", {"status": "sleeping"}, "status"),
        ("run_list", {"experiment": "0"}, "experiment"),
        ("experiment_list", {"active": "maybe"}, "active"),
        ("experiment_list", {"ordering": "secret_field"}, "ordering"),
        ("model_list", {"limit": "abc"}, "limit"),
        ("model_list", {"limit": "0"}, "limit"),
        ("model_list", {"offset": "-1"}, "offset"),
        ("model_list", {"q": "x" * 201}, "q"),
    ],
)
def test_bad_query_parameters_are_400s(api, team, name, params, field):
    response = api.get(_url(name), params)

    assert response.status_code == 400, response.content
    assert field in response.json()


def test_pagination_pages_and_caps_the_page_size(api, team):
    for i in range(7):
        RecipeFactory(team=team, name=f"r{i}")

    first = api.get(_url("recipe_list"), {"limit": 3}).json()
    last = api.get(_url("recipe_list"), {"limit": 3, "offset": 6}).json()
    capped = api.get(_url("recipe_list"), {"limit": 100000})

    assert first["count"] == 7 and len(first["results"]) == 3 and first["next"] and first["previous"] is None
    assert len(last["results"]) == 1 and last["next"] is None
    assert capped.status_code == 200 and "limit=500" in (capped.json()["next"] or "limit=500")


# --- experiments ----------------------------------------------------------------------------------
def _experiment_body(team, setup, **change):
    body = {
        "team": team.pk,
        "name": "kd sweep",
        "dataset": setup["dataset"].pk,
        "teacher": setup["teacher"].pk,
        "students": [s.pk for s in setup["students"]],
        "recipes": [setup["recipe"].pk],
        "seeds": [0, 1],
        "max_steps": 20,
        "batch_size": 32,
        "lr": 0.001,
        "lr_schedule": "cosine",
    }
    body.update(change)
    return {k: v for k, v in body.items() if v is not None}


def test_launch_creates_the_runs_and_enqueues_them_after_the_commit(
    api, team, digits_setup, django_capture_on_commit_callbacks
):
    with mock.patch(DISPATCH) as dispatch, django_capture_on_commit_callbacks(execute=True):
        response = api.post(_url("experiment_list"), _experiment_body(team, digits_setup))

    assert response.status_code == 201, response.json()
    experiment = Experiment.objects.get()
    runs = list(experiment.runs.all())
    assert len(runs) == 2 * 2 * 2  # students × seeds × (kd + the hard-label baseline)
    assert {c.kwargs["args"][0] for c in dispatch.call_args_list} == {r.pk for r in runs}
    body = response.json()
    assert body["id"] == experiment.pk and body["run_count"] == 8 and body["run_counts"]["queued"] == 8
    assert (
        body["status"] == "queued"
        and body["train"]["max_steps"] == 20
        and body["train"]["lr_schedule"] == "cosine"
    )
    assert response["Location"].endswith(
        reverse("experiments:experiment_detail", kwargs={"experiment_id": experiment.pk})
    )


def test_launch_accepts_the_forms_text_syntax_for_seeds(api, team, digits_setup):
    with mock.patch(DISPATCH):
        response = api.post(_url("experiment_list"), _experiment_body(team, digits_setup, seeds="0-2"))

    assert response.status_code == 201, response.json()
    assert Experiment.objects.get().seeds == [0, 1, 2]


def _web_form_errors(client, user, team, setup, change) -> dict[str, list[str]]:
    """The errors the web's experiment form shows for the same input (posted as a browser would)."""
    from django.test import Client

    body = _experiment_body(team, setup, **change)
    data = {
        k: (",".join(map(str, v)) if k in ("seeds", "teacher_weights") and isinstance(v, list) else v)
        for k, v in body.items()
    }
    browser = Client()
    browser.force_login(user)
    form = browser.post(reverse("experiments:experiment_create"), data).context["form"]
    return {("non_field_errors" if k == "__all__" else k): list(v) for k, v in form.errors.items()}


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"teacher": None}, "teacher"),
        ({"students": []}, "students"),
        ({"students": [999999]}, "students"),
        ({"lr": "fast"}, "lr"),
        ({"lr": 5}, "lr"),
        ({"max_steps": 0}, "max_steps"),
        ({"batch_size": 100000}, "batch_size"),
        ({"seeds": []}, "seeds"),
        ({"seeds": "0-99999999999"}, "seeds"),
        ({"seeds": [1, 1]}, "seeds"),
        ({"seeds": "a,b"}, "seeds"),
        ({"lr_schedule": "zigzag"}, "lr_schedule"),
        ({"dataset": "../../etc/passwd"}, "dataset"),
        ({"teacher_weights": ["x"]}, "teacher_weights"),
        ({"warmup_steps": 50}, "warmup_steps"),
        ({"lr": "1e-4:1e-3:log999999"}, "lr"),
    ],
)
def test_launch_bad_input_gives_the_web_forms_field_errors_and_creates_nothing(
    api, user, team, digits_setup, change, field
):
    with mock.patch(DISPATCH) as dispatch:
        response = api.post(_url("experiment_list"), _experiment_body(team, digits_setup, **change))
        web = _web_form_errors(api.client, user, team, digits_setup, change)

    assert response.status_code == 400, response.content
    assert response.json()[field] == web[field] and web[field]
    assert not Experiment.objects.exists() and not Run.objects.exists() and not dispatch.called


@pytest.mark.parametrize(
    ("change", "field", "message"),
    [
        ({"students": 5}, "students", "list of values"),
        ({"seeds": list(range(21))}, "seeds", "At most 20 seeds"),
        ({"name": "<b>bold</b>"}, "name", "<"),
        ({"lr": {"a": 1}}, "lr", "list of values"),
        ({"lr": [[0.1]]}, "lr", "list of values"),
        ({"term_sweeps": {"kd.temperature": [{"x": 1}]}}, "term_sweeps", "list of values"),
        ({"term_sweeps": {"telepathy.power": [1, 2]}}, "term_sweeps", "telepathy"),
    ],
)
def test_launch_bad_json_shapes_are_400s(api, team, digits_setup, change, field, message):
    with mock.patch(DISPATCH) as dispatch:
        response = api.post(_url("experiment_list"), _experiment_body(team, digits_setup, **change))

    assert response.status_code == 400, response.content
    assert message in " ".join(response.json().get(field, [])), response.json()
    assert not Experiment.objects.exists() and not dispatch.called


def test_launch_a_sweep_of_training_settings_and_term_parameters(api, team, digits_setup):
    body = _experiment_body(
        team,
        digits_setup,
        students=[digits_setup["students"][0].pk],
        seeds=[0],
        lr=[0.001, 0.003],
        term_sweeps={"kd.temperature": [2, 4]},
    )

    with mock.patch(DISPATCH):
        response = api.post(_url("experiment_list"), body)

    assert response.status_code == 201, response.json()
    experiment = Experiment.objects.get()
    assert experiment.train["lr"] == [0.001, 0.003]
    assert experiment.train["term_sweeps"] == {"kd.temperature": [2, 4]}
    kd_runs = experiment.runs.filter(is_baseline=False)
    assert kd_runs.count() == 4  # 2 learning rates × 2 temperatures
    assert {(r.config["train"]["lr"], r.config["terms"][1]["params"]["temperature"]) for r in kd_runs} == {
        (0.001, 2),
        (0.001, 4),
        (0.003, 2),
        (0.003, 4),
    }


def test_a_sweep_over_the_run_cap_is_refused_with_the_count(api, team, digits_setup, settings):
    settings.MAX_RUNS_PER_EXPERIMENT = 10

    response = api.post(_url("experiment_list"), _experiment_body(team, digits_setup, seeds=list(range(5))))

    assert response.status_code == 400
    assert "20 runs" in " ".join(response.json()["seeds"]) and "the limit is 10" in " ".join(
        response.json()["seeds"]
    )
    assert not Experiment.objects.exists()


def test_check_reports_the_runs_and_checks_and_creates_nothing(api, team, digits_setup):
    with mock.patch(DISPATCH) as dispatch:
        response = api.post(_url("experiment_check"), _experiment_body(team, digits_setup))

    body = response.json()
    assert response.status_code == 200, body
    assert body["runs"] == 8 and body["baselines"] == 4 and body["can_launch"] and body["errors"] == {}
    assert "runs" in {c["key"] for c in body["checks"]}
    assert all(c["level"] in preflight.LEVELS for c in body["checks"])
    assert not Experiment.objects.exists() and not dispatch.called


def test_check_of_an_oversized_sweep_says_it_cannot_launch(api, team, digits_setup, settings):
    settings.MAX_RUNS_PER_EXPERIMENT = 10

    body = api.post(
        _url("experiment_check"), _experiment_body(team, digits_setup, lr=[0.001, 0.002, 0.003])
    ).json()

    assert body["runs"] == 24 and not body["can_launch"]
    assert "the limit is 10" in " ".join(body["errors"]["lr"])
    assert not Experiment.objects.exists()


def test_check_with_bad_input_is_a_400_like_a_launch(api, team, digits_setup):
    response = api.post(_url("experiment_check"), _experiment_body(team, digits_setup, max_steps=0))

    assert response.status_code == 400 and "max_steps" in response.json()


def test_launch_with_another_teams_records_is_refused(api, team, digits_setup, foreign):
    response = api.post(
        _url("experiment_list"), _experiment_body(team, digits_setup, students=[foreign["model"].pk])
    )

    assert response.status_code == 400 and "students" in response.json()
    assert not Experiment.objects.filter(team=team).exists()


def test_experiment_list_filters_and_detail(api, team, experiment, run, digits_setup):
    finished = ExperimentFactory(team=team, name="done")  # its own dataset, no teacher
    RunFactory(experiment=finished, status=Run.Status.SUCCEEDED, finished_at=timezone.now())

    active = api.get(_url("experiment_list"), {"active": "true"}).json()
    inactive = api.get(_url("experiment_list"), {"active": "false"}).json()
    by_student = api.get(_url("experiment_list"), {"student": digits_setup["students"][0].pk}).json()
    by_dataset = api.get(_url("experiment_list"), {"dataset": finished.dataset_id}).json()
    by_teacher = api.get(_url("experiment_list"), {"teacher": digits_setup["teacher"].pk}).json()
    by_name = api.get(_url("experiment_list"), {"q": "DON", "ordering": "name"}).json()
    detail = api.get(_url("experiment_detail", pk=experiment.pk)).json()

    assert [e["name"] for e in active["results"]] == [experiment.name]
    assert [e["name"] for e in inactive["results"]] == ["done"]
    assert [e["id"] for e in by_student["results"]] == [experiment.pk]
    assert [e["id"] for e in by_dataset["results"]] == [finished.pk]
    assert [e["id"] for e in by_teacher["results"]] == [experiment.pk]
    assert [e["id"] for e in by_name["results"]] == [finished.pk]
    assert detail["students"] == [{"id": s.pk, "name": s.name} for s in digits_setup["students"]]
    assert detail["run_counts"] == {"queued": 1, "running": 0, "succeeded": 0, "failed": 0, "cancelled": 0}


def test_cancel_an_experiment_cancels_its_unfinished_runs(api, experiment, run):
    response = api.post(_url("experiment_cancel", pk=experiment.pk))

    assert response.status_code == 200 and response.json() == {"cancelled": 1}
    run.refresh_from_db()
    assert run.status == Run.Status.CANCELLED


# --- runs -----------------------------------------------------------------------------------------
def test_run_list_filters_by_experiment_and_status(api, team, experiment, run, digits_setup):
    done = succeeded_run(experiment, digits_setup["students"][1], digits_setup["recipe"], 0, 0.75)
    elsewhere = RunFactory(experiment=ExperimentFactory(team=team, dataset=digits_setup["dataset"]))
    baseline = RunFactory(experiment=experiment, is_baseline=True, student=digits_setup["students"][0])

    queued = api.get(_url("run_list"), {"experiment": experiment.pk, "status": "queued"}).json()
    both = api.get(
        _url("run_list"), {"experiment": experiment.pk, "status": "queued,succeeded", "ordering": "id"}
    ).json()
    baselines = api.get(_url("run_list"), {"is_baseline": "true"}).json()
    other = api.get(_url("run_list"), {"experiment": elsewhere.experiment_id}).json()
    finished = api.get(_url("run_list"), {"status": "succeeded"}).json()["results"][0]

    assert [r["id"] for r in queued["results"]] == [baseline.pk, run.pk]
    assert [r["id"] for r in both["results"]] == [run.pk, done.pk, baseline.pk]
    assert [r["id"] for r in baselines["results"]] == [baseline.pk]
    assert [r["id"] for r in other["results"]] == [elsewhere.pk]
    assert finished["metric"] == {"name": "accuracy", "value": 0.75}
    assert finished["student"]["name"] == "mlp-32" and finished["recipe"]["name"] == "kd-t4"


def test_run_detail_has_the_frozen_config_and_evaluations(api, experiment, digits_setup):
    done = succeeded_run(experiment, digits_setup["students"][0], digits_setup["recipe"], 0, 0.8)

    body = api.get(_url("run_detail", pk=done.pk)).json()

    assert body["config"] == done.config
    assert [(e["role"], e["accuracy"]) for e in body["evaluations"]] == [("student", 0.8)]
    assert body["url"].endswith(reverse("experiments:run_detail", kwargs={"run_id": done.pk}))


def test_cancel_a_queued_run_and_requeue_it(api, run, django_capture_on_commit_callbacks):
    cancelled = api.post(_url("run_cancel", pk=run.pk))
    again = api.post(_url("run_cancel", pk=run.pk))
    with mock.patch(DISPATCH) as dispatch, django_capture_on_commit_callbacks(execute=True):
        requeued = api.post(_url("run_requeue", pk=run.pk))

    assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"
    assert again.status_code == 409 and "already finished" in again.json()["detail"]
    assert requeued.status_code == 200 and requeued.json()["status"] == "queued"
    assert dispatch.call_args.kwargs["args"] == (run.pk,)


def test_requeue_a_succeeded_run_is_a_409(api, experiment, digits_setup):
    done = succeeded_run(experiment, digits_setup["students"][0], digits_setup["recipe"], 0, 0.8)

    response = api.post(_url("run_requeue", pk=done.pk))

    assert response.status_code == 409 and "succeeded" in response.json()["detail"]


# --- metrics --------------------------------------------------------------------------------------
def _points(run, name, values):
    now = timezone.now()
    MetricPoint.objects.bulk_create(
        [MetricPoint(run=run, name=name, step=i, value=v, wall_time=now) for i, v in enumerate(values)]
    )


def test_metrics_are_downsampled_to_max_points_per_series(api, run):
    _points(run, "loss", [math.sin(i / 50) + (5.0 if i == 2500 else 0.0) for i in range(5000)])
    _points(run, "eval/accuracy", [i / 100 for i in range(100)])

    body = api.get(_url("run_metrics", pk=run.pk), {"max_points": 200}).json()

    series = {s["name"]: s for s in body["series"]}
    assert body["names"] == ["eval/accuracy", "loss"] and body["max_points"] == 200
    loss = series["loss"]
    assert len(loss["steps"]) <= 200 and len(loss["steps"]) == len(loss["values"])
    assert loss["points"] == 5000 and loss["downsampled"]
    assert loss["steps"][0] == 0 and loss["steps"][-1] == 4999
    assert 2500 in loss["steps"]  # the spike survives min/max buckets
    assert series["eval/accuracy"]["points"] == 100 and not series["eval/accuracy"]["downsampled"]


def test_metrics_by_name_with_nan_as_null(api, run):
    _points(run, "loss", [1.0, float("nan"), 0.5])
    _points(run, "kd", [2.0])

    body = api.get(f"{_url('run_metrics', pk=run.pk)}?name=loss&max_points=2000").json()

    assert [s["name"] for s in body["series"]] == ["loss"]
    assert body["series"][0]["values"] == [1.0, None, 0.5]


@pytest.mark.parametrize(
    "params", [{"max_points": "3"}, {"max_points": "abc"}, {"max_points": "100000"}, {"name": "x" * 65}]
)
def test_metrics_bad_parameters_are_400s(api, run, params):
    assert api.get(_url("run_metrics", pk=run.pk), params).status_code == 400


# --- leaderboards ---------------------------------------------------------------------------------
def test_leaderboard_mirrors_the_web_rows(api, experiment, ranked):
    body = api.get(_url("leaderboard_detail", pk=experiment.dataset_id)).json()

    rows = body["results"]
    assert body["count"] == body["total"] == 4 and body["dataset"]["id"] == experiment.dataset_id
    assert body["metric"]["name"] == "accuracy" and body["split"] == "k" and body["scope"] == "team"
    assert [(r["student"]["id"], r["recipe"]["id"], r["rank"]) for r in rows] == [
        (ranked["s1"].pk, ranked["kd"].pk, 1),
        (ranked["s1"].pk, ranked["base"].pk, 2),
        (ranked["s2"].pk, ranked["base"].pk, 3),
        (ranked["s2"].pk, ranked["kd"].pk, 4),
    ]
    top = rows[0]
    assert top["mean"] == pytest.approx(0.86) and top["seeds"] == 2
    assert top["retention"] == pytest.approx(0.86 / 0.9) and top["kd_gain"] == pytest.approx(0.05)
    assert top["compression"] == pytest.approx(4.0) and top["speedup"] == pytest.approx(4.0)
    assert rows[1]["kd_gain"] is None and rows[1]["is_baseline"]
    assert [r["pareto"] for r in rows] == [True, False, True, False] and top["family"] == "mlp"


def test_leaderboard_budget_filters_and_pages(api, experiment, ranked):
    url = _url("leaderboard_detail", pk=experiment.dataset_id)

    budget = api.get(url, {"max_params": 1000}).json()
    by_recipe = api.get(url, {"recipe": "kd-t4"}).json()
    page = api.get(url, {"limit": 1, "offset": 1}).json()

    assert [(r["student"]["id"], r["rank"]) for r in budget["results"]] == [
        (ranked["s2"].pk, 1),
        (ranked["s2"].pk, 2),
    ]
    assert budget["count"] == 2 and budget["total"] == 4
    assert {r["recipe"]["name"] for r in by_recipe["results"]} == {"kd-t4"} and by_recipe["count"] == 2
    assert page["count"] == 4 and [r["rank"] for r in page["results"]] == [2]


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"max_params": "lots"}, "max_params"),
        ({"max_latency_ms": "-1"}, "max_latency_ms"),
        ({"scope": "universe"}, "scope"),
        ({"metric": "vibes"}, "metric"),
        ({"split": "nope"}, "split"),
    ],
)
def test_leaderboard_bad_parameters_are_400s(api, experiment, ranked, params, field):
    response = api.get(_url("leaderboard_detail", pk=experiment.dataset_id), params)

    assert response.status_code == 400 and field in response.json()


def test_leaderboard_csv_is_the_pages_export(api, experiment, ranked):
    response = api.get(_url("leaderboard_export", pk=experiment.dataset_id), {"max_params": 1000})

    lines = response.content.decode().splitlines()
    assert response.status_code == 200 and response["Content-Type"].startswith("text/csv")
    assert lines[0].startswith("rank,student,family,recipe") and len(lines) == 3
    assert "/runs/" in lines[1] and "config.json" in lines[1]


def test_leaderboard_list_counts_results(api, experiment, ranked):
    [dataset] = api.get(_url("leaderboard_list")).json()["results"]

    assert dataset["id"] == experiment.dataset_id and dataset["result_count"] == 6


# --- schema ---------------------------------------------------------------------------------------
def test_the_schema_is_valid_openapi_3_listing_every_endpoint(anonymous):
    from drf_spectacular.validation import validate_schema

    response = anonymous.get(_url("schema"), {"format": "json"})

    schema = response.json()
    validate_schema(schema)
    assert schema["openapi"].startswith("3.")
    for path in [
        "/api/teams/",
        "/api/models/",
        "/api/models/{id}/",
        "/api/datasets/",
        "/api/recipes/",
        "/api/recipes/{id}/export.yaml",
        "/api/recipes/import",
        "/api/experiments/",
        "/api/experiments/{id}/cancel/",
        "/api/experiments/{id}/export.yaml",
        "/api/experiments/import",
        "/api/experiments/check",
        "/api/leaderboards/{id}/export.csv",
        "/api/runs/",
        "/api/runs/{id}/",
        "/api/runs/{id}/cancel/",
        "/api/runs/{id}/requeue/",
        "/api/runs/{id}/metrics/",
        "/api/leaderboards/{id}/",
    ]:
        assert path in schema["paths"], path
    assert schema["components"]["securitySchemes"]["bearerToken"]["scheme"] == "bearer"
    launch = schema["paths"]["/api/experiments/"]["post"]["requestBody"]["content"]["application/json"][
        "schema"
    ]
    assert launch["$ref"] == "#/components/schemas/ExperimentCreateRequest"


def test_the_schema_is_also_yaml(anonymous):
    response = anonymous.get(_url("schema"))

    assert yaml.safe_load(response.content)["info"]["title"] == "distillweb API"


def test_swagger_ui_is_served_without_a_cdn(anonymous):
    response = anonymous.get(_url("docs"))

    html = response.content.decode()
    assert response.status_code == 200
    assert "/static/drf_spectacular_sidecar/swagger-ui-dist/swagger-ui-bundle.js" in html
    assert "cdn" not in html.lower() and "jsdelivr" not in html


# --- query counts ---------------------------------------------------------------------------------
def _queries(api, url) -> int:
    with CaptureQueriesContext(connection) as ctx:
        assert api.get(url).status_code == 200
    return len(ctx.captured_queries)


def _grow(team, digits_setup, n):
    for i in range(n):
        ModelSpecFactory(team=team)
        DatasetSpecFactory(team=team)
        RecipeFactory(team=team)
        experiment = ExperimentFactory(
            team=team, dataset=digits_setup["dataset"], teacher=digits_setup["teacher"]
        )
        experiment.students.set(digits_setup["students"])
        experiment.recipes.set([digits_setup["recipe"]])
        RunFactory(experiment=experiment, student=digits_setup["students"][0], recipe=digits_setup["recipe"])
        succeeded_run(experiment, digits_setup["students"][1], digits_setup["recipe"], i, 0.5 + i / 100)


@pytest.mark.parametrize(
    "name",
    [
        "team_list",
        "model_list",
        "dataset_list",
        "recipe_list",
        "experiment_list",
        "run_list",
        "leaderboard_list",
        "leaderboard_detail",
    ],
)
def test_lists_use_a_constant_number_of_queries(api, team, digits_setup, name, django_assert_max_num_queries):
    url = _url(name, pk=digits_setup["dataset"].pk) if name == "leaderboard_detail" else _url(name)
    _grow(team, digits_setup, 2)
    few = _queries(api, url)
    _grow(team, digits_setup, 15)

    with django_assert_max_num_queries(few):
        response = api.get(url)

    assert response.status_code == 200
    if name not in ("team_list", "leaderboard_list"):
        assert response.json()["count"] >= 17
