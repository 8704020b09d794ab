"""Pages run a constant number of queries whatever the number of rows (no query per row).

Each test renders a page with 3 rows, then with 30, and compares the two query counts. A failure lists the
statements that ran more often with more rows: the N+1 to fix.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.urls import reverse
from django.utils import timezone

from experiments.models import Artifact, Evaluation, Membership, MetricPoint, ModelSpec, Recipe, Run
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

FEW, MANY = 3, 30


def _queries(client, url: str) -> list[str]:
    with CaptureQueriesContext(connection) as ctx:
        response = client.get(url)
    assert response.status_code == 200, url
    return [q["sql"] for q in ctx.captured_queries]


def _shape(sql: str) -> str:
    """A statement without its literals, so that the same query with other ids counts as the same."""
    return re.sub(r"'[^']*'|\b\d+\b", "?", sql)


def _assert_constant(client, url: str, add_rows: Callable[[int], None]) -> None:
    """Render ``url`` with FEW rows and with MANY rows; both must run the same number of queries."""
    add_rows(FEW)
    client.get(url)  # warm per-process caches (content types, …) so they do not count for the first case
    few = _queries(client, url)
    add_rows(MANY - FEW)
    many = _queries(client, url)
    extra = Counter(map(_shape, many)) - Counter(map(_shape, few))
    repeated = "\n".join(f"{n}× {sql[:300]}" for sql, n in extra.most_common(5))
    assert len(many) == len(few), (
        f"{url}: {len(few)} queries with {FEW} rows, {len(many)} with {MANY}:\n{repeated}"
    )


@pytest.fixture
def setup(team, user, client):
    """A logged-in member of ``team`` with a dataset, a teacher, a student and a recipe to hang rows on."""
    client.force_login(user)
    return {
        "client": client,
        "team": team,
        "user": user,
        "dataset": DatasetSpecFactory(team=team, name="digits"),
        "teacher": ModelSpecFactory(team=team, name="teacher", param_count=10_000),
        "student": ModelSpecFactory(team=team, name="student", param_count=1_000),
        "recipe": RecipeFactory(team=team, name="kd"),
    }


def _experiment(s: dict, *, runs: int = 2):
    experiment = ExperimentFactory(
        team=s["team"], dataset=s["dataset"], teacher=s["teacher"], created_by=s["user"]
    )
    students = [s["student"], ModelSpecFactory(team=s["team"])]
    experiment.students.set(students)
    experiment.recipes.set([s["recipe"], RecipeFactory(team=s["team"])])
    for i in range(runs):
        _finished_run(s, experiment, students[i % 2], seed=i)
    return experiment


def _finished_run(s: dict, experiment, student: ModelSpec, *, seed: int, recipe: Recipe | None = None,
                  baseline: bool = False, accuracy: float = 0.8) -> Run:
    now = timezone.now()
    run = RunFactory(
        experiment=experiment,
        student=student,
        teacher=experiment.teacher,
        recipe=recipe or s["recipe"],
        seed=seed,
        is_baseline=baseline,
        status=Run.Status.SUCCEEDED,
        step=20,
        total_steps=20,
        started_at=now,
        finished_at=now,
    )
    Evaluation.objects.create(team=s["team"], role=Evaluation.Role.STUDENT, run=run, model=student,
                              dataset=experiment.dataset, split_key="k", accuracy=accuracy,
                              param_count=student.param_count, latency_ms=0.3)
    MetricPoint.objects.bulk_create([
        MetricPoint(run=run, name=name, step=step, value=0.5, wall_time=now)
        for name in ("train/loss", "eval/accuracy") for step in (10, 20)
    ])
    Artifact.objects.create(run=run, kind=Artifact.Kind.MODEL, path=f"runs/{run.pk}/model", size_bytes=10)
    return run


# --- list pages -----------------------------------------------------------------------------------
def test_model_list(setup):
    def add(n):
        for i in range(n):
            parent = ModelSpecFactory(team=setup["team"], param_count=1000 + i)
            ModelSpecFactory(team=setup["team"], source=ModelSpec.Source.DERIVED, parent=parent,
                             config={"layers": [0]})

    _assert_constant(setup["client"], reverse("experiments:model_list"), add)


def test_model_list_sorted_by_size_on_page_two(setup):
    _assert_constant(setup["client"], reverse("experiments:model_list") + "?sort=-params&page=2",
                     lambda n: ModelSpecFactory.create_batch(n, team=setup["team"]))


def test_dataset_list(setup):
    _assert_constant(setup["client"], reverse("experiments:dataset_list") + "?sort=-created_at",
                     lambda n: DatasetSpecFactory.create_batch(n, team=setup["team"]))


def test_recipe_list(setup):
    _assert_constant(setup["client"], reverse("experiments:recipe_list"),
                     lambda n: RecipeFactory.create_batch(n, team=setup["team"]))


def test_experiment_list(setup):
    _assert_constant(setup["client"], reverse("experiments:experiment_list"),
                     lambda n: [_experiment(setup) for _ in range(n)])


def test_experiment_list_for_the_team_chosen_in_the_header(setup):
    session = setup["client"].session
    session["team_id"] = setup["team"].pk
    session.save()

    _assert_constant(setup["client"], reverse("experiments:experiment_list") + "?sort=runs",
                     lambda n: [_experiment(setup) for _ in range(n)])


def test_list_pages_of_a_user_in_many_teams(setup, user):
    def add(n):
        for _ in range(n):
            team = TeamFactory()
            MembershipFactory(user=user, team=team)
            DatasetSpecFactory(team=team)

    _assert_constant(setup["client"], reverse("experiments:dataset_list") + "?sort=team", add)


# --- other pages ----------------------------------------------------------------------------------
def test_home(setup):
    _assert_constant(
        setup["client"], reverse("experiments:home"), lambda n: [_experiment(setup) for _ in range(n)]
    )


def test_experiment_page(setup):
    experiment = _experiment(setup, runs=0)

    def add(n):
        start = experiment.runs.count()
        for i in range(start, start + n):
            _finished_run(setup, experiment, setup["student"], seed=i)

    _assert_constant(setup["client"], reverse("experiments:experiment_detail", args=[experiment.pk]), add)


def test_leaderboard(setup):
    experiment = _experiment(setup, runs=0)
    baseline = RecipeFactory(team=setup["team"], name="hard_labels", scheme=Recipe.Scheme.HARD_LABELS,
                             terms=[{"name": "ce", "weight": 1.0, "params": {}}])
    Evaluation.objects.create(team=setup["team"], role=Evaluation.Role.TEACHER, model=setup["teacher"],
                              dataset=setup["dataset"], split_key="k", accuracy=0.95, param_count=10_000)

    def add(n):
        for i in range(n):
            student = ModelSpecFactory(team=setup["team"], param_count=500 + i)
            _finished_run(setup, experiment, student, seed=0, recipe=baseline, baseline=True, accuracy=0.7)
            _finished_run(setup, experiment, student, seed=0, recipe=setup["recipe"], accuracy=0.75)

    _assert_constant(setup["client"], reverse("experiments:leaderboard", args=[setup["dataset"].pk]), add)


def test_leaderboard_index(setup):
    def add(n):
        for _ in range(n):
            experiment = ExperimentFactory(team=setup["team"], dataset=DatasetSpecFactory(team=setup["team"]))
            _finished_run(setup, experiment, setup["student"], seed=0)

    _assert_constant(setup["client"], reverse("experiments:leaderboard_index"), add)


def test_team_page(setup):
    def add(n):
        for _ in range(n):
            MembershipFactory(team=setup["team"], user=UserFactory(), role=Membership.Role.MEMBER)

    _assert_constant(setup["client"], reverse("experiments:team_detail", args=[setup["team"].pk]), add)


def test_team_list(setup, user):
    def add(n):
        for _ in range(n):
            MembershipFactory(user=user, team=TeamFactory(), role=Membership.Role.LEAD)

    _assert_constant(setup["client"], reverse("experiments:team_list"), add)


def test_the_leaderboard_table_is_paginated_but_the_plot_and_csv_keep_every_row(setup):
    experiment = _experiment(setup, runs=0)
    for i in range(60):
        student = ModelSpecFactory(team=setup["team"], param_count=500 + i)
        _finished_run(setup, experiment, student, seed=0, accuracy=0.5 + i / 200)
    url = reverse("experiments:leaderboard", args=[setup["dataset"].pk])
    first = setup["client"].get(url)
    second = setup["client"].get(url, {"page": 2})
    assert len(first.context["page"].object_list) == 50 and len(second.context["page"].object_list) == 10
    assert first.context["page"].object_list[0].rank == 1 and second.context["page"].object_list[0].rank == 51
    assert "Page 1 of 2" in first.content.decode()
    assert len(first.context["figure"]["data"][0]["x"]) + sum(
        len(t["x"]) for t in first.context["figure"]["data"][1:]) >= 60
    csv_rows = setup["client"].get(url, {"format": "csv"}).content.decode().strip().splitlines()
    assert len(csv_rows) == 61                                   # header + every row
