"""A recipe that cannot run is refused when it is saved (task-free rules) and in pre-flight (against the
dataset's task), with the engine's own message: the web calls the engine's ``recipe_rules``."""

from __future__ import annotations

from typing import Any

import pytest
from django.core.exceptions import ValidationError
from django.urls import reverse

from experiments.domain import preflight, validation
from experiments.models import Recipe
from experiments.services import records
from tests.factories import DatasetSpecFactory, ModelSpecFactory, RecipeFactory
from workers.engine.config import LossTermConfig
from workers.engine.recipe_rules import cross_tokenizer_problem, recipe_problems
from workers.engine.terms import validate_terms

pytestmark = pytest.mark.django_db

OFFLINE_HIDDEN = (
    "Loss term 'hidden_mse' needs the teacher's hidden_states on every batch, which the offline scheme does "
    "not keep (it caches outputs only). Use the online scheme."
)

# (scheme, terms): recipes no dataset can run, refused at save.
NEVER_RUN = [
    ("offline", [{"name": "hidden_mse"}]),
    ("offline", [{"name": "ce"}, {"name": "attention_mse"}]),
    ("multi_teacher", [{"name": "kd"}, {"name": "hidden_cosine"}]),
    ("teacher_assistant", [{"name": "attention_kl"}]),
    ("self_distillation", [{"name": "hidden_mse"}]),
    ("on_policy", [{"name": "ce"}, {"name": "jsd"}]),
]

# (scheme, terms, task): recipes that save but cannot run on that task's data: refused in pre-flight.
NOT_ON_TASK = [
    ("seq_kd", [{"name": "ce"}], "classification"),
    ("on_policy", [{"name": "kd"}], "classification"),
    ("offline", [{"name": "embedding_mse"}], "classification"),
    ("offline", [{"name": "ce"}, {"name": "kd"}], "causal_lm"),
    ("multi_teacher", [{"name": "taid"}], "causal_lm"),
    ("multi_teacher", [{"name": "topk", "params": {"k": 8, "tail": False, "temperature": 2.0}}], "causal_lm"),
    ("offline", [{"name": "kd"}], "embedding"),
    ("online", [{"name": "ce"}, {"name": "embedding_mse"}], "embedding"),
    ("multi_teacher", [{"name": "embedding_mse"}], "embedding"),
]


def _engine_messages(scheme: str, terms: list[dict[str, Any]], task: str | None = None) -> list[str]:
    """What the engine itself says (``plan_run`` raises the first)."""
    valid = validate_terms([LossTermConfig(t["name"], 1.0, t.get("params", {})) for t in terms])
    return [p.message for p in recipe_problems(scheme, valid, task)]


def _recipe_post(team, scheme: str, terms: list[dict[str, Any]]) -> dict[str, str]:
    data = {"team": str(team.pk), "name": "bad", "scheme": scheme, "description": "",
            "terms-TOTAL_FORMS": str(len(terms)), "terms-INITIAL_FORMS": "0"}
    for i, term in enumerate(terms):
        data |= {f"terms-{i}-name": term["name"], f"terms-{i}-weight": "1"}
    return data


@pytest.mark.parametrize(("scheme", "terms"), NEVER_RUN)
def test_saving_a_recipe_no_dataset_can_run_is_refused_with_the_engine_message(team, user, scheme, terms):
    expected = _engine_messages(scheme, terms)
    assert expected

    with pytest.raises(ValidationError) as refused:
        records.recipe_create(team=team, created_by=user, name="bad", scheme=scheme, terms=terms)

    assert [m for ms in refused.value.message_dict.values() for m in ms] == expected
    assert not Recipe.objects.exists()


def test_the_recipe_form_shows_the_engine_message_beside_the_scheme(client_logged_in, team):
    response = client_logged_in.post(
        reverse("experiments:recipe_create"), _recipe_post(team, "offline", [{"name": "hidden_mse"}])
    )

    assert response.status_code == 400
    assert response.context["form"].errors["scheme"] == [OFFLINE_HIDDEN]
    assert not Recipe.objects.exists()


def test_the_same_recipe_online_saves(client_logged_in, team):
    response = client_logged_in.post(
        reverse("experiments:recipe_create"), _recipe_post(team, "online", [{"name": "hidden_mse"}])
    )

    assert response.status_code == 302
    assert Recipe.objects.get(name="bad").scheme == "online"


def test_web_and_engine_share_one_rule_and_one_message():
    assert _engine_messages("offline", [{"name": "hidden_mse"}]) == [OFFLINE_HIDDEN]
    assert validation.recipe_rule_errors(scheme="offline", terms=[{"name": "hidden_mse"}]) == {
        "scheme": [OFFLINE_HIDDEN]
    }


def _dataset(team, task: str):
    if task == "classification":
        return DatasetSpecFactory(team=team)
    return DatasetSpecFactory(team=team, task=task, builtin_name="fortunes", num_labels=0, label_names=[])


@pytest.mark.parametrize(("scheme", "terms", "task"), NOT_ON_TASK)
def test_preflight_blocks_a_recipe_the_dataset_task_cannot_run_with_the_engine_message(
    team, scheme, terms, task
):
    recipe = RecipeFactory(
        team=team, name="r", scheme=scheme, terms=validation.clean_terms(terms, scheme=scheme)
    )
    dataset = _dataset(team, task)
    expected = _engine_messages(scheme, terms, task)
    assert expected

    report = preflight.experiment_preflight(
        dataset=dataset, teacher=None, students=[ModelSpecFactory(team=team)], recipes=[recipe], seeds=[0],
        train={},
    )

    check = next(c for c in report.checks if c.key == "recipes")
    assert check.blocks and not report.can_launch and check.field == "recipes"
    assert [check.summary, *check.details] == [f"Recipe r v1: {m}" for m in expected]
    assert validation.recipe_task_problems(recipe, task=task) == expected


def test_preflight_says_every_recipe_can_run_when_they_can(team):
    online = RecipeFactory(team=team, scheme="online", terms=[{"name": "hidden_mse"}])
    recipes = [RecipeFactory(team=team), online]

    report = preflight.experiment_preflight(
        dataset=DatasetSpecFactory(team=team), teacher=None, students=[ModelSpecFactory(team=team)],
        recipes=recipes, seeds=[0], train={},
    )

    check = next(c for c in report.checks if c.key == "recipes")
    assert check.level == "ok" and "Every recipe can run" in check.summary


def test_launch_validation_refuses_the_recipe_by_name(team):
    recipe = RecipeFactory(team=team, name="lm-kd", scheme="offline", terms=[{"name": "kd"}])
    dataset = _dataset(team, "causal_lm")
    student = ModelSpecFactory(team=team, task="causal_lm", num_labels=0)

    with pytest.raises(ValidationError) as refused:
        validation.check_experiment(team=team, dataset=dataset, teacher=ModelSpecFactory(team=team),
                                    students=[student], recipes=[recipe])

    expected = _engine_messages("offline", [{"name": "kd"}], "causal_lm")
    assert refused.value.message_dict["recipes"] == [f"Recipe lm-kd v1: {m}" for m in expected]


def test_preflight_shows_the_engine_refusal_of_a_teacher_with_another_tokenizer(team):
    dataset = _dataset(team, "causal_lm")
    lm = {"source": "config", "builtin_arch": "", "task": "causal_lm", "num_labels": 0,
          "config": {"model_type": "gpt2"}}
    teacher = ModelSpecFactory(team=team, name="gpt2", tokenizer_id="gpt2", **lm)
    student = ModelSpecFactory(team=team, name="smol", tokenizer_id="HuggingFaceTB/SmolLM2-135M", **lm)
    seq_kd = RecipeFactory(team=team, name="seq", scheme="seq_kd", terms=[{"name": "ce"}, {"name": "kd"}])

    check = preflight.check_tokenizers(dataset=dataset, teacher=teacher, students=[student], recipes=[seq_kd])

    engine = cross_tokenizer_problem("seq_kd", validate_terms([LossTermConfig("ce"), LossTermConfig("kd")]))
    assert check.level == "error" and check.summary.endswith(engine)
