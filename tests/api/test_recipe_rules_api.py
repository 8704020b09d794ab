"""The API refuses a recipe that cannot run (400 with the engine's message, never a 500), and its pre-flight
check names a recipe the dataset's task cannot run."""

from __future__ import annotations

import pytest
from django.urls import reverse

from experiments.models import Recipe
from tests.factories import RecipeFactory
from workers.engine.config import LossTermConfig
from workers.engine.recipe_rules import recipe_problems
from workers.engine.terms import validate_terms

pytestmark = pytest.mark.django_db


def _url(name: str) -> str:
    return reverse(f"api:{name}")


def _engine_messages(scheme, terms, task=None) -> list[str]:
    valid = validate_terms([LossTermConfig(t["name"], 1.0, t.get("params", {})) for t in terms])
    return [p.message for p in recipe_problems(scheme, valid, task)]


@pytest.mark.parametrize(
    ("scheme", "terms", "field"),
    [
        ("offline", [{"name": "hidden_mse"}], "scheme"),
        ("multi_teacher", [{"name": "kd"}, {"name": "attention_mse"}], "scheme"),
        ("teacher_assistant", [{"name": "attention_kl"}], "scheme"),
        ("on_policy", [{"name": "ce"}, {"name": "kd"}], "terms"),
    ],
)
def test_creating_a_recipe_that_cannot_run_is_a_400_with_the_engine_message(api, team, scheme, terms, field):
    response = api.post(_url("recipe_list"), {"name": "bad", "scheme": scheme, "terms": terms})

    assert response.status_code == 400, response.content
    assert response.json()[field] == _engine_messages(scheme, terms)
    assert not Recipe.objects.exists()


def test_the_check_blocks_a_recipe_the_dataset_task_cannot_run(api, team, digits_setup):
    seq_kd = RecipeFactory(team=team, name="lm-only", scheme="seq_kd", terms=[{"name": "ce", "weight": 1.0}])
    body = {
        "team": team.pk,
        "name": "wrong task",
        "dataset": digits_setup["dataset"].pk,
        "teacher": digits_setup["teacher"].pk,
        "students": [digits_setup["students"][0].pk],
        "recipes": [seq_kd.pk],
        "seeds": [0],
        "max_steps": 5,
    }

    response = api.post(_url("experiment_check"), body)

    assert response.status_code == 200, response.content
    data = response.json()
    (message,) = _engine_messages("seq_kd", [{"name": "ce"}], "classification")
    check = next(c for c in data["checks"] if c["key"] == "recipes")
    assert check["level"] == "error" and check["summary"] == f"Recipe lm-only v1: {message}"
    assert not data["can_launch"] and f"Recipe lm-only v1: {message}" in data["errors"]["recipes"]
