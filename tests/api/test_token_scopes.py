"""API token limits, enforced on every endpoint: an expiry (then 401), a read-only scope (every unsafe method
is a 403) and one team (the token sees and creates only that team's records). The endpoints are enumerated
from the URL patterns, and the served schema is checked against them, so a new endpoint cannot escape these
tests."""

from __future__ import annotations

import re
from datetime import timedelta

import pytest
from django.urls import URLPattern, resolve, reverse
from django.utils import timezone

from api import urls as api_urls
from api.models import ApiToken
from api.services import api_token_create
from experiments.models import DatasetSpec, Experiment, ModelSpec, Recipe, Run, TeacherStore
from tests.api.conftest import Api
from tests.factories import MembershipFactory

pytestmark = pytest.mark.django_db

SAFE = {"get", "head", "options"}
_KIND = {
    "model": "model",
    "dataset": "dataset",
    "recipe": "recipe",
    "experiment": "experiment",
    "run": "run",
    "leaderboard": "dataset",
}


def _endpoints() -> list[tuple[str, str]]:
    """(URL name, method) of every API endpoint: each route of a viewset with each method it answers."""
    return [
        (p.name, method)
        for p in api_urls.urlpatterns
        if isinstance(p, URLPattern) and getattr(p.callback, "actions", None)
        for method in p.callback.actions
    ]


def _url(name: str, records: dict) -> str:
    pattern = next(p for p in api_urls.urlpatterns if isinstance(p, URLPattern) and p.name == name)
    if "pk" in pattern.pattern.converters:
        return reverse(f"api:{name}", kwargs={"pk": records[_KIND[name.split("_")[0]]].pk})
    return reverse(f"api:{name}")


def _call(api: Api, method: str, url: str):
    return api.get(url) if method == "get" else api.post(url, {})


def _state() -> tuple:
    return (
        ModelSpec.objects.count(),
        DatasetSpec.objects.count(),
        Recipe.objects.count(),
        Experiment.objects.count(),
        sorted(Run.objects.values_list("pk", "status", "cancel_requested")),
    )


def _token(user, **limits) -> str:
    return api_token_create(user=user, name=f"t{ApiToken.objects.count()}", **limits)[1]


@pytest.fixture
def own(digits_setup, experiment, run, ranked):
    """One record of every kind in the user's team, with a leaderboard."""
    TeacherStore.objects.create(team=digits_setup["dataset"].team, key="a" * 64, kind="logits", split="train",
                                teacher_label="our teacher", path="teacher-cache/" + "a" * 64)
    return {
        "model": digits_setup["teacher"],
        "dataset": digits_setup["dataset"],
        "recipe": digits_setup["recipe"],
        "experiment": experiment,
        "run": run,
    }


def test_every_operation_of_the_served_schema_is_enumerated(anonymous):
    schema = anonymous.get(reverse("api:schema"), {"format": "json"}).json()
    endpoints = set(_endpoints())
    operations = [
        (path, method)
        for path, item in schema["paths"].items()
        for method in item
        if method in {"get", "post", "put", "patch", "delete"}
    ]

    assert len(operations) >= 25
    for path, method in operations:
        name = resolve(re.sub(r"\{\w+\}", "1", path)).url_name
        assert (name, method) in endpoints, (path, method)


def test_the_enumeration_holds_reads_and_writes():
    methods = dict.fromkeys(_endpoints())
    assert ("run_cancel", "post") in methods and ("experiment_list", "post") in methods
    assert ("run_metrics", "get") in methods and ("leaderboard_export", "get") in methods


# --- read-only --------------------------------------------------------------------------------------
@pytest.mark.parametrize(("name", "method"), [e for e in _endpoints() if e[1] not in SAFE])
def test_a_read_only_token_is_refused_every_write_with_a_403_and_nothing_changes(
    client, user, own, name, method
):
    api = Api(client, _token(user, scope=ApiToken.Scope.READ))
    before = _state()

    response = _call(api, method, _url(name, own))

    assert response.status_code == 403, (name, response.content)
    assert "read-only" in response.json()["detail"]
    assert _state() == before


@pytest.mark.parametrize(("name", "method"), [e for e in _endpoints() if e[1] in SAFE])
def test_a_read_only_token_reads_every_endpoint(client, user, own, name, method):
    api = Api(client, _token(user, scope=ApiToken.Scope.READ))

    response = _call(api, method, _url(name, own))

    assert response.status_code == 200, (name, response.content)


def test_a_token_created_without_limits_has_full_scope(client, user, team):
    api = Api(client, _token(user))
    response = api.post(
        reverse("api:model_list"),
        {"name": "m", "source": "builtin", "builtin_arch": "mlp", "hidden_sizes": "32", "num_labels": 10},
    )
    assert response.status_code == 201, response.content
    assert ApiToken.objects.get().scope == ApiToken.Scope.WRITE


# --- expiry ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("name", "method"), _endpoints())
def test_an_expired_token_is_a_401_on_every_endpoint(client, user, own, name, method):
    token = _token(user, expires_at=timezone.now() + timedelta(hours=1))
    ApiToken.objects.update(expires_at=timezone.now() - timedelta(seconds=1))
    before = _state()

    response = _call(Api(client, token), method, _url(name, own))

    assert response.status_code == 401, (name, response.content)
    assert "expired" in response.json()["detail"] and response["WWW-Authenticate"].startswith("Bearer")
    assert _state() == before
    assert ApiToken.objects.get().last_used_at is None


def test_a_token_works_until_it_expires(client, user, team):
    token = _token(user, expires_at=timezone.now() + timedelta(minutes=5))
    api = Api(client, token)
    assert api.get(reverse("api:team_list")).status_code == 200

    ApiToken.objects.update(expires_at=timezone.now())
    assert api.get(reverse("api:team_list")).status_code == 401


def test_an_expiry_in_the_past_is_refused_at_creation(user):
    from django.core.exceptions import ValidationError

    with pytest.raises(ValidationError) as info:
        api_token_create(user=user, name="old", expires_at=timezone.now() - timedelta(days=1))
    assert "expires_at" in info.value.message_dict


# --- one team -------------------------------------------------------------------------------------------
@pytest.fixture
def two_teams(user, team, other_team, foreign):
    """The user is in both teams; ``foreign`` holds a record of every kind in the second one."""
    MembershipFactory(user=user, team=other_team)
    return foreign


def _record_endpoints() -> list[tuple[str, str]]:
    return [
        (name, method)
        for name, method in _endpoints()
        if "pk"
        in next(p for p in api_urls.urlpatterns if getattr(p, "name", None) == name).pattern.converters
    ]


@pytest.mark.parametrize(("name", "method"), _record_endpoints())
def test_a_team_token_cannot_reach_the_users_other_team(client, user, team, own, two_teams, name, method):
    scoped = Api(client, _token(user, team=team))
    before = _state()

    response = _call(scoped, method, _url(name, two_teams))

    assert response.status_code == 404, (name, response.content)
    assert "secret" not in response.content.decode()
    assert _state() == before


@pytest.mark.parametrize("name", [n for n, m in _endpoints() if m == "get" and n.endswith("_list")])
def test_a_team_token_lists_only_its_team(client, user, team, own, two_teams, name):
    scoped = Api(client, _token(user, team=team)).get(reverse(f"api:{name}")).json()["results"]
    unscoped = Api(client, _token(user)).get(reverse(f"api:{name}")).json()["results"]

    if name == "team_list":
        assert {r["id"] for r in scoped} == {team.pk}
        assert {r["id"] for r in unscoped} == {team.pk, two_teams["model"].team_id}
    else:
        assert scoped and len(unscoped) > len(scoped), name
        assert "secret" not in str(scoped)


def test_a_team_token_sees_the_other_teams_records_through_no_endpoint(client, user, team, own, two_teams):
    """The control: the same user without the team limit does see them (so the 404s above come from the
    limit)."""
    unscoped = Api(client, _token(user))
    for name, method in _record_endpoints():
        if method == "get":
            assert unscoped.get(_url(name, two_teams)).status_code != 404, name


def test_a_team_token_creates_only_in_its_team(client, user, team, other_team, two_teams):
    scoped = Api(client, _token(user, team=team))
    model = {"name": "m", "source": "builtin", "builtin_arch": "mlp", "hidden_sizes": "32", "num_labels": 10}

    refused = scoped.post(reverse("api:model_list"), {**model, "team": other_team.pk})
    assert refused.status_code == 400 and "team" in refused.json()
    # The user is in two teams, yet the token needs no team: it has only one.
    created = scoped.post(reverse("api:model_list"), model)
    assert created.status_code == 201 and ModelSpec.objects.get(name="m").team == team

    yaml_doc = (
        "format: distillweb/v1\nkind: recipe\nname: r\nscheme: logits\nterms:\n- {name: kd, weight: 1.0}\n"
    )
    imported = scoped.post(
        reverse("api:recipe_import") + f"?team={other_team.pk}", yaml_doc, content_type="application/yaml"
    )
    assert imported.status_code == 400 and "team" in imported.json()
    assert not Recipe.objects.filter(team=other_team, name="r").exists()


def test_a_team_token_limits_staff_too(client, staff_user, team, other_team, foreign):
    scoped = Api(client, _token(staff_user, team=team))
    assert (
        scoped.get(reverse("api:experiment_detail", kwargs={"pk": foreign["experiment"].pk})).status_code
        == 404
    )
    assert [t["id"] for t in scoped.get(reverse("api:team_list")).json()["results"]] == [team.pk]


def test_a_token_for_a_team_the_user_is_not_in_is_refused(user, other_team):
    from django.core.exceptions import ValidationError

    with pytest.raises(ValidationError) as info:
        api_token_create(user=user, name="x", team=other_team)
    assert "team" in info.value.message_dict


def test_a_team_token_of_a_user_who_left_the_team_sees_nothing(client, user, team, own):
    scoped = Api(client, _token(user, team=team))
    user.memberships.all().delete()
    assert scoped.get(reverse("api:model_list")).json()["results"] == []


# --- the token page -------------------------------------------------------------------------------------
def test_the_token_page_creates_a_limited_token_and_shows_its_limits(
    client_logged_in, client, user, team, other_team
):
    MembershipFactory(user=user, team=other_team)
    response = client_logged_in.post(
        reverse("api:token_list"),
        {"name": "ci", "expires_in_days": "30", "scope": "read", "team": str(team.pk)},
    )
    assert response.status_code == 200, response.context["form"].errors
    record = ApiToken.objects.get(name="ci")
    assert record.scope == ApiToken.Scope.READ and record.team == team
    assert timedelta(days=29, hours=23) < record.expires_at - timezone.now() <= timedelta(days=30)

    html = client_logged_in.get(reverse("api:token_list")).content.decode()
    row = html[html.index("<strong>ci</strong>") :]
    row = row[: row.index("</tr>")]
    assert "read only" in row and f"{team.name} only" in row and f"{record.expires_at:%Y-%m-%d}" in row

    token = response.context["token"]
    assert Api(client, token).post(reverse("api:experiment_check"), {}).status_code == 403


def test_the_token_page_offers_only_the_users_teams(client_logged_in, other_team):
    response = client_logged_in.post(reverse("api:token_list"), {"name": "x", "team": str(other_team.pk)})
    assert "team" in response.context["form"].errors and not ApiToken.objects.exists()


def test_the_token_page_marks_an_expired_token(client_logged_in, user):
    _token(user, expires_at=timezone.now() + timedelta(days=1))
    ApiToken.objects.update(expires_at=timezone.now() - timedelta(days=1))
    assert "expired" in client_logged_in.get(reverse("api:token_list")).content.decode()
