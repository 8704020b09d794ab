"""Team isolation on every page of the site, found by walking ``experiments.urls``.

Two teams, Alpha and Bravo, each with a lead and one record of every kind (models, dataset, recipe, an
experiment with a finished run, its metric points, evaluations and artifacts). Alpha's user must reach Alpha's
records, get 404 on Bravo's (and change nothing by POSTing to them), and never see a Bravo name; anonymous
visitors are sent to the login page; the fleet pages are for staff only.

A URL added to ``experiments.urls`` is tested without touching this file. A new URL argument fails
``test_every_url_argument_names_a_known_record`` until it is added to ``RECORD_FOR_ARG``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest
from django.apps import apps
from django.urls import URLPattern, URLResolver, reverse
from django.utils import timezone

import experiments.urls
from experiments.models import Artifact, Evaluation, Membership, MetricPoint, Run, TeacherStore, Worker
from tests.factories import (
    DatasetSpecFactory,
    ExperimentFactory,
    MembershipFactory,
    ModelSpecFactory,
    RecipeFactory,
    RunFactory,
    TeamFactory,
    UserFactory,
)

pytestmark = pytest.mark.django_db

# URL argument → the record of a team it names.
RECORD_FOR_ARG = {
    "model_id": "student",
    "teacher_id": "teacher",
    "student_id": "student",
    "dataset_id": "dataset",
    "recipe_id": "recipe",
    "experiment_id": "experiment",
    "run_id": "run",
    "team_id": "team",
    "membership_id": "membership",
    "evaluation_id": "evaluation",
    "artifact_id": "artifact",
    "metric_id": "metric_point",
    "store_id": "store",
    "worker_id": "worker",  # not a team's record: the fleet pages are staff-only
}
# Parameters a page may read from the query string (compare, exports, filters): filled with Bravo's ids when
# Alpha asks, the page must neither fail nor show Bravo's records.
FOREIGN_QUERY = {
    "runs": "run", "run": "run", "ids": "run", "run_ids": "run", "experiment": "experiment",
    "experiments": "experiment", "dataset": "dataset", "model": "student", "models": "student",
    "recipe": "recipe", "team": "team",
}
# What a POST carries: enough for most forms to be valid, pointing at Bravo's records where a form takes ids.
POST_FIELDS = {
    "name": "hijacked",
    "role": "lead",
    "username": "alpha-lead",
    "queue": "hijacked",
    "layers": "0",
}


@dataclass(frozen=True)
class Endpoint:
    name: str  # "experiments:<url name>"
    args: tuple[str, ...]
    fleet: bool

    def url(self, records: dict[str, Any]) -> str:
        return reverse(self.name, kwargs={arg: records[RECORD_FOR_ARG[arg]].pk for arg in self.args})


def _walk(patterns: list, namespace: str) -> list[Endpoint]:
    found = []
    for pattern in patterns:
        if isinstance(pattern, URLResolver):
            inner = f"{namespace}:{pattern.namespace}" if pattern.namespace else namespace
            found.extend(_walk(pattern.url_patterns, inner))
        elif isinstance(pattern, URLPattern) and pattern.name:
            args = tuple(getattr(pattern.pattern, "converters", {}) or pattern.pattern.regex.groupindex)
            view = pattern.callback
            if getattr(view, "login_required", True) is False:  # open pages (an invite link) test themselves
                continue
            fleet = view.__module__ == "experiments.views.fleet" or pattern.name.startswith(
                ("worker", "fleet")
            )
            found.append(Endpoint(f"{namespace}:{pattern.name}", args, fleet))
    return found


ENDPOINTS = _walk(experiments.urls.urlpatterns, experiments.urls.app_name)
TEAM_PAGES = [e for e in ENDPOINTS if not e.fleet]
FLEET_PAGES = [e for e in ENDPOINTS if e.fleet]
RECORD_PAGES = [e for e in TEAM_PAGES if e.args]
PLAIN_PAGES = [e for e in TEAM_PAGES if not e.args]


def _ids(endpoints: list[Endpoint]) -> list[str]:
    return [e.name.split(":", 1)[1] for e in endpoints]


# --- the two teams --------------------------------------------------------------------------------
def _team_world(prefix: str) -> dict[str, Any]:
    team = TeamFactory(name=f"{prefix.title()} team", slug=f"{prefix}-team")
    lead = UserFactory(username=f"{prefix}-lead")
    membership = MembershipFactory(user=lead, team=team, role=Membership.Role.LEAD)
    dataset = DatasetSpecFactory(team=team, name=f"{prefix}-digits")
    teacher = ModelSpecFactory(
        team=team, name=f"{prefix}-teacher", config={"hidden_sizes": [64]}, param_count=5000
    )
    student = ModelSpecFactory(team=team, name=f"{prefix}-student", param_count=800)
    recipe = RecipeFactory(team=team, name=f"{prefix}-kd")
    experiment = ExperimentFactory(team=team, name=f"{prefix}-experiment", dataset=dataset, teacher=teacher)
    experiment.students.set([student])
    experiment.recipes.set([recipe])
    now = timezone.now()
    run = RunFactory(experiment=experiment, student=student, teacher=teacher, recipe=recipe,
                     status=Run.Status.SUCCEEDED, step=20, total_steps=20, started_at=now, finished_at=now)
    metric_point = MetricPoint.objects.create(run=run, name="train/loss", step=10, value=0.5, wall_time=now)
    MetricPoint.objects.create(run=run, name="eval/accuracy", step=20, value=0.9, wall_time=now)
    evaluation = Evaluation.objects.create(team=team, role=Evaluation.Role.STUDENT, run=run, model=student,
                                           dataset=dataset, split_key="k", accuracy=0.9, param_count=800,
                                           latency_ms=0.2)
    Evaluation.objects.create(team=team, role=Evaluation.Role.TEACHER, model=teacher, dataset=dataset,
                              split_key="k", accuracy=0.95, param_count=5000, latency_ms=0.5)
    artifact = Artifact.objects.create(run=run, kind=Artifact.Kind.MODEL, path=f"runs/{run.pk}/model")
    Artifact.objects.create(run=run, kind=Artifact.Kind.CHECKPOINT, path=f"runs/{run.pk}/ckpt-20", step=20)
    store = TeacherStore.objects.create(team=team, key=prefix[0] * 64, kind="logits", split="train",
                                        teacher=teacher, teacher_label=teacher.name, path="teacher-cache/x")
    return {
        "team": team,
        "user": lead,
        "membership": membership,
        "dataset": dataset,
        "teacher": teacher,
        "student": student,
        "recipe": recipe,
        "experiment": experiment,
        "run": run,
        "metric_point": metric_point,
        "evaluation": evaluation,
        "artifact": artifact,
        "store": store,
    }


@pytest.fixture
def alpha() -> dict[str, Any]:
    return _team_world("alpha")


@pytest.fixture
def bravo(alpha) -> dict[str, Any]:
    world = _team_world("bravo")
    worker = Worker.objects.create(name="gpu0@bravo-host", hostname="bravo-host", queues=["training"],
                                   state=Worker.State.ONLINE, last_heartbeat=timezone.now())
    alpha["worker"] = world["worker"] = worker
    return world


@pytest.fixture
def as_alpha(client, alpha, bravo):
    client.force_login(alpha["user"])
    return client


def _database_state() -> dict[str, list[dict[str, Any]]]:
    """Every row of the app's tables and of the users table, to check that a refused request changed
    nothing."""
    models = [*apps.get_app_config("experiments").get_models(), apps.get_model("auth", "User")]
    return {m._meta.label: list(m.objects.order_by("pk").values()) for m in models}


def _foreign_post(bravo: dict[str, Any]) -> dict[str, Any]:
    ids = {key: bravo[record].pk for key, record in FOREIGN_QUERY.items()}
    return {**POST_FIELDS, **ids, "students": bravo["student"].pk, "recipes": bravo["recipe"].pk,
            "teacher": bravo["teacher"].pk}


def _assert_no_bravo(response, endpoint: Endpoint) -> None:
    body = b"".join(response.streaming_content) if response.streaming else response.content
    assert b"bravo" not in body.lower(), f"{endpoint.name} shows another team's record"


def _is_login_redirect(response) -> bool:
    return response.status_code == 302 and response.url.startswith(reverse("login") + "?next=")


# --- the URL walk covers every page -------------------------------------------------------------
def test_the_walk_finds_the_site_pages():
    names = {e.name for e in ENDPOINTS}

    assert {"experiments:home", "experiments:model_list", "experiments:run_detail", "experiments:team_detail",
            "experiments:worker_list"} <= names
    assert FLEET_PAGES and RECORD_PAGES and PLAIN_PAGES


@pytest.mark.parametrize("endpoint", ENDPOINTS, ids=_ids(ENDPOINTS))
def test_every_url_argument_names_a_known_record(endpoint):
    unknown = [arg for arg in endpoint.args if arg not in RECORD_FOR_ARG]

    assert not unknown, f"{endpoint.name}: add {unknown} to RECORD_FOR_ARG so its permissions are tested"


# --- anonymous ------------------------------------------------------------------------------------
@pytest.mark.parametrize("endpoint", ENDPOINTS, ids=_ids(ENDPOINTS))
def test_anonymous_visitors_are_sent_to_the_login_page(client, alpha, bravo, endpoint):
    before = _database_state()
    url = endpoint.url(alpha)

    assert _is_login_redirect(client.get(url)), f"GET {url}"
    assert _is_login_redirect(client.post(url, POST_FIELDS)), f"POST {url}"
    assert _database_state() == before


# --- members --------------------------------------------------------------------------------------
@pytest.mark.parametrize("endpoint", TEAM_PAGES, ids=_ids(TEAM_PAGES))
def test_a_member_reaches_their_own_teams_pages_without_seeing_another_teams(as_alpha, alpha, endpoint):
    url = endpoint.url(alpha)
    response = as_alpha.get(url)
    if response.status_code == 405:  # a POST-only action: it works on the team's own record
        response = as_alpha.post(url, POST_FIELDS)
        assert response.status_code in (200, 302), f"POST {url}: {response.status_code}"
    else:
        assert response.status_code in (200, 302), f"GET {url}: {response.status_code}"
    assert not _is_login_redirect(response)
    if response.status_code == 200:
        _assert_no_bravo(response, endpoint)


@pytest.mark.parametrize("endpoint", RECORD_PAGES, ids=_ids(RECORD_PAGES))
def test_another_teams_records_give_404_and_posts_change_nothing(as_alpha, alpha, bravo, endpoint):
    url = endpoint.url(bravo)
    own_get = as_alpha.get(endpoint.url(alpha)).status_code
    before = _database_state()

    if own_get != 405:
        assert as_alpha.get(url).status_code == 404, f"GET {url}"
    post = as_alpha.post(url, _foreign_post(bravo))
    assert post.status_code == 404 or (post.status_code == 405 and own_get != 405), (
        f"POST {url}: {post.status_code}"
    )
    assert _database_state() == before


@pytest.mark.parametrize("endpoint", PLAIN_PAGES, ids=_ids(PLAIN_PAGES))
def test_pages_given_another_teams_ids_show_and_change_nothing_of_it(as_alpha, bravo, endpoint):
    url = endpoint.url({})
    query = {key: bravo[record].pk for key, record in FOREIGN_QUERY.items()}
    before = _database_state()

    response = as_alpha.get(url, query)
    assert response.status_code < 500, f"GET {url}"
    if response.status_code == 200:
        _assert_no_bravo(response, endpoint)
    post = as_alpha.post(url, _foreign_post(bravo))
    assert post.status_code < 500, f"POST {url}"
    assert _database_state() == before
    if post.status_code == 200:
        _assert_no_bravo(post, endpoint)


def test_a_member_cannot_reach_another_teams_membership_through_their_own_team(as_alpha, alpha, bravo):
    url = reverse("experiments:team_member_remove",
                  kwargs={"team_id": alpha["team"].pk, "membership_id": bravo["membership"].pk})

    assert as_alpha.post(url).status_code == 404
    assert Membership.objects.filter(pk=bravo["membership"].pk).exists()


# --- staff ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("endpoint", RECORD_PAGES, ids=_ids(RECORD_PAGES))
def test_staff_reach_every_teams_records(client, staff_user, alpha, bravo, endpoint):
    client.force_login(staff_user)
    url = endpoint.url(bravo)
    response = client.get(url)
    if response.status_code == 405:  # a POST action: staff may act on another team's record (not 403/404)
        response = client.post(url, POST_FIELDS)
        assert response.status_code in (200, 302, 400), f"POST {url}: {response.status_code}"
        return

    assert response.status_code in (200, 302), f"GET {url}: {response.status_code}"


# --- the fleet ------------------------------------------------------------------------------------
@pytest.mark.parametrize("endpoint", FLEET_PAGES, ids=_ids(FLEET_PAGES))
def test_fleet_pages_are_forbidden_to_non_staff(as_alpha, alpha, endpoint):
    url = endpoint.url(alpha)
    before = _database_state()

    assert as_alpha.get(url).status_code in (403, 405)
    assert as_alpha.post(url, POST_FIELDS).status_code == 403
    assert _database_state() == before


@pytest.mark.parametrize("endpoint", FLEET_PAGES, ids=_ids(FLEET_PAGES))
def test_fleet_pages_open_for_staff(client, staff_user, alpha, bravo, endpoint):
    client.force_login(staff_user)
    response = client.get(endpoint.url(alpha))
    if (
        response.status_code == 405
    ):  # an action on a worker that is not running: a clear message, not an error
        response = client.post(endpoint.url(alpha), POST_FIELDS, follow=True)
        assert response.status_code == 200
        assert [str(m) for m in response.context["messages"]], f"POST {endpoint.url(alpha)} said nothing"
        return

    assert response.status_code == 200
