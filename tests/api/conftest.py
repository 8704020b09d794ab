"""Fixtures of the API tests: tokens, a JSON client that sends one, and records of the user's and another
team."""

from __future__ import annotations

import json
from typing import Any

import pytest
from django.utils import timezone

DISPATCH = "workers.tasks.run_distillation.apply_async"


class Api:
    """Django's test client speaking JSON with ``Authorization: Bearer <token>`` (or no header)."""

    def __init__(self, client, token: str | None) -> None:
        self.client = client
        self.token = token

    def _headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}

    def get(self, url: str, params: dict[str, Any] | None = None):
        return self.client.get(url, params or {}, headers=self._headers())

    def post(self, url: str, data: Any = None, *, content_type: str = "application/json"):
        body = json.dumps(data) if content_type == "application/json" and data is not None else (data or "")
        return self.client.post(url, body, content_type=content_type, headers=self._headers())

    def delete(self, url: str):
        return self.client.delete(url, headers=self._headers())


def make_token(user) -> str:
    from api.services import api_token_create

    return api_token_create(user=user, name=f"test-{user.pk}")[1]


@pytest.fixture
def token(user) -> str:
    return make_token(user)


@pytest.fixture
def api(client, token) -> Api:
    return Api(client, token)


@pytest.fixture
def anonymous(client) -> Api:
    return Api(client, None)


@pytest.fixture
def experiment(team, digits_setup):
    from tests.factories import ExperimentFactory

    experiment = ExperimentFactory(
        team=team,
        dataset=digits_setup["dataset"],
        teacher=digits_setup["teacher"],
        seeds=[0],
        train={"max_steps": 20},
    )
    experiment.students.set(digits_setup["students"])
    experiment.recipes.set([digits_setup["recipe"]])
    return experiment


@pytest.fixture
def run(experiment, digits_setup):
    from tests.factories import RunFactory

    return RunFactory(
        experiment=experiment,
        student=digits_setup["students"][0],
        recipe=digits_setup["recipe"],
        teacher=digits_setup["teacher"],
    )


@pytest.fixture
def foreign(other_team):
    """One record of every kind in a team the user is not in: the run has succeeded, with an evaluation."""
    from experiments.models import Evaluation, Run, TeacherStore
    from tests.factories import DatasetSpecFactory, ExperimentFactory, RunFactory

    dataset = DatasetSpecFactory(team=other_team, name="secret-data")
    experiment = ExperimentFactory(team=other_team, dataset=dataset, name="secret experiment")
    run = RunFactory(experiment=experiment, status=Run.Status.SUCCEEDED, step=20, finished_at=timezone.now())
    experiment.students.set([run.student])
    experiment.recipes.set([run.recipe])
    Evaluation.objects.create(
        team=other_team,
        role=Evaluation.Role.STUDENT,
        run=run,
        model=run.student,
        dataset=dataset,
        split_key="k",
        accuracy=0.5,
        param_count=100,
    )
    store = TeacherStore.objects.create(team=other_team, key="f" * 64, kind="logits", split="train",
                                        teacher_label="secret teacher", path="teacher-cache/" + "f" * 64)
    return {
        "experiment": experiment,
        "run": run,
        "model": run.student,
        "dataset": dataset,
        "recipe": run.recipe,
        "store": store,
    }


def succeeded_run(
    experiment,
    student,
    recipe,
    seed: int,
    accuracy: float,
    *,
    baseline: bool = False,
    params: int = 1000,
    latency: float = 0.5,
):
    """A finished run with its student evaluation."""
    from experiments.models import Evaluation, Run
    from tests.factories import RunFactory

    run = RunFactory(
        experiment=experiment,
        student=student,
        recipe=recipe,
        seed=seed,
        is_baseline=baseline,
        status=Run.Status.SUCCEEDED,
        step=20,
        total_steps=20,
        finished_at=timezone.now(),
    )
    Evaluation.objects.create(
        team=experiment.team,
        role=Evaluation.Role.STUDENT,
        run=run,
        model=student,
        dataset=experiment.dataset,
        split_key="k",
        accuracy=accuracy,
        param_count=params,
        latency_ms=latency,
    )
    return run


@pytest.fixture
def ranked(team, experiment, digits_setup):
    """A leaderboard: two students, a kd recipe and the baseline; teacher accuracy 0.9."""
    from experiments.models import Evaluation, Recipe
    from tests.factories import RecipeFactory

    s1, s2 = digits_setup["students"]
    kd = digits_setup["recipe"]
    base = RecipeFactory(
        team=team,
        name="hard_labels",
        scheme=Recipe.Scheme.HARD_LABELS,
        terms=[{"name": "ce", "weight": 1.0, "params": {}}],
    )
    Evaluation.objects.create(
        team=team,
        role=Evaluation.Role.TEACHER,
        model=digits_setup["teacher"],
        dataset=experiment.dataset,
        split_key="k",
        accuracy=0.9,
        param_count=8000,
        latency_ms=2.0,
    )
    for seed, acc in ((0, 0.85), (1, 0.87)):
        succeeded_run(experiment, s1, kd, seed, acc, params=2000)
    for seed, acc in ((0, 0.80), (1, 0.82)):
        succeeded_run(experiment, s1, base, seed, acc, baseline=True, params=2000)
    succeeded_run(experiment, s2, kd, 0, 0.70, params=500)
    succeeded_run(experiment, s2, base, 0, 0.72, baseline=True, params=500)
    return {"s1": s1, "s2": s2, "kd": kd, "base": base}
