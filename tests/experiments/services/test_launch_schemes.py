"""Recipes whose scheme changes what an experiment creates: chains of runs and several teachers."""

from contextlib import nullcontext
from unittest import mock

import pytest
from django.core.exceptions import ValidationError

from experiments.models import Experiment, Recipe, Run
from experiments.services import launch, records
from tests.factories import ModelSpecFactory
from workers.tasks import run_distillation

pytestmark = pytest.mark.django_db

DISPATCH = "workers.tasks.run_distillation.apply_async"
KD = [{"name": "ce", "weight": 0.1}, {"name": "kd", "weight": 0.9, "params": {"temperature": 4}}]


def _recipe(team, user, scheme, terms=KD, **params):
    return records.recipe_create(team=team, created_by=user, name=f"{scheme}-recipe", scheme=scheme,
                                  terms=terms, scheme_params=params)


def _create(setup, team, user, recipe, capture=None, **kwargs):
    with mock.patch(DISPATCH) as dispatch, capture(execute=True) if capture else nullcontext():
        experiment = launch.experiment_create(
            team=team,
            created_by=user,
            name="chain",
            dataset=setup["dataset"],
            teacher=setup["teacher"],
            students=setup["students"][:1],
            recipes=[recipe],
            seeds=[0],
            train={"max_steps": 30, "eval_every": 10, "save_every": 10, "log_every": 10, "lr": 0.01},
            **kwargs,
        )
    return experiment, dispatch


def test_teacher_assistant_distils_the_assistant_first(digits_setup, team, user,
                                                       django_capture_on_commit_callbacks):
    assistant = ModelSpecFactory(team=team, name="assistant", config={"hidden_sizes": [48]})
    recipe = _recipe(team, user, Recipe.Scheme.TEACHER_ASSISTANT)
    experiment, dispatch = _create(digits_setup, team, user, recipe, assistant=assistant,
                                   capture=django_capture_on_commit_callbacks)
    first, second, baseline = experiment.runs.order_by("id")
    assert (first.student, first.stage, first.teacher) == (assistant, "assistant", digits_setup["teacher"])
    assert first.config["scheme"] == "offline" and first.config["teacher"]["source"] == "builtin"
    assert (
        second.student == digits_setup["students"][0] and second.stage == "" and second.waiting_for == first
    )
    assert second.config["teacher"] == {"source": "run", "num_labels": 10, "path": f"runs/{first.id}/final"}
    assert baseline.is_baseline
    # Only runs that wait for nothing are sent now; the student follows when the assistant succeeds.
    sent = {c.kwargs["args"][0] for c in dispatch.call_args_list}
    assert sent == {first.id, baseline.id}


def test_self_distillation_chains_its_generations(digits_setup, team, user):
    recipe = _recipe(team, user, Recipe.Scheme.SELF_DISTILLATION, generations=3)
    experiment, _ = _create(digits_setup, team, user, recipe)
    chain = list(experiment.runs.filter(is_baseline=False).order_by("id"))
    assert [r.stage for r in chain] == ["generation 1", "generation 2", ""]
    assert chain[0].waiting_for is None and chain[0].config["teacher"]["source"] == "builtin"
    for previous, run in zip(chain, chain[1:], strict=False):
        assert run.waiting_for == previous
        assert run.config["teacher"]["path"] == f"runs/{previous.id}/final"


def test_multi_teacher_normalises_the_weights_into_the_config(digits_setup, team, user):
    second = ModelSpecFactory(team=team, name="second-teacher", config={"hidden_sizes": [32]})
    recipe = _recipe(team, user, Recipe.Scheme.MULTI_TEACHER)
    experiment, _ = _create(digits_setup, team, user, recipe, extra_teachers=[second], teacher_weights=[3, 1])
    run = experiment.runs.get(is_baseline=False)
    assert run.config["scheme"] == "multi_teacher"
    assert [t["params"]["hidden_sizes"] for t in run.config["extra_teachers"]] == [[32]]
    assert run.config["teacher_weights"] == [0.75, 0.25]
    assert list(experiment.extra_teachers.all()) == [second]


@pytest.mark.parametrize(
    ("scheme", "kwargs", "field"),
    [
        (Recipe.Scheme.TEACHER_ASSISTANT, {}, "assistant"),
        (Recipe.Scheme.MULTI_TEACHER, {}, "extra_teachers"),
        (Recipe.Scheme.SEQ_KD, {}, "recipes"),
    ],
)
def test_schemes_refuse_incomplete_experiments(digits_setup, team, user, scheme, kwargs, field):
    recipe = _recipe(team, user, scheme)
    with pytest.raises(ValidationError) as exc:
        _create(digits_setup, team, user, recipe, **kwargs)
    assert field in exc.value.message_dict
    assert not Experiment.objects.exists() and not Run.objects.exists()


def test_multi_teacher_weights_must_match_the_teachers(digits_setup, team, user):
    second = ModelSpecFactory(team=team, name="second-teacher")
    recipe = _recipe(team, user, Recipe.Scheme.MULTI_TEACHER)
    with pytest.raises(ValidationError) as exc:
        _create(digits_setup, team, user, recipe, extra_teachers=[second], teacher_weights=[1])
    assert "teacher_weights" in exc.value.message_dict


def test_scheme_parameters_are_validated(team, user):
    with pytest.raises(ValidationError) as exc:
        _recipe(team, user, Recipe.Scheme.SELF_DISTILLATION, generations=0)
    assert "scheme_params" in exc.value.message_dict
    with pytest.raises(ValidationError):
        _recipe(team, user, Recipe.Scheme.ON_POLICY, lmbda=1.5)
    # on_policy scores student samples: no ce (the engine's rule, refused at save).
    on_policy = _recipe(team, user, Recipe.Scheme.ON_POLICY, terms=[{"name": "kd", "weight": 1.0}])
    assert on_policy.scheme_params == {
        "lmbda": 0.5, "temperature": 1.0, "max_new_tokens": 32}


def test_a_teacher_assistant_chain_really_trains_in_order(digits_setup, team, user,
                                                         django_capture_on_commit_callbacks):
    assistant = ModelSpecFactory(team=team, name="assistant", config={"hidden_sizes": [48]})
    recipe = _recipe(team, user, Recipe.Scheme.TEACHER_ASSISTANT)
    experiment, _ = _create(digits_setup, team, user, recipe, assistant=assistant)
    first, second, _baseline = experiment.runs.order_by("id")
    with mock.patch(DISPATCH) as dispatch, django_capture_on_commit_callbacks(execute=True):
        run_distillation.apply(args=(first.id,))
    first.refresh_from_db()
    assert first.status == Run.Status.SUCCEEDED, first.error
    assert [c.kwargs["args"][0] for c in dispatch.call_args_list] == [second.id]  # the student follows
    run_distillation.apply(args=(second.id,))
    second.refresh_from_db()
    assert second.status == Run.Status.SUCCEEDED, second.error
    assert second.result["student"]["agreement"] > 0.3  # it really was distilled from the assistant
