"""Recipes saved when attention_mse meant the post-softmax maps keep that computation, as
attention_prob_mse."""

from __future__ import annotations

import importlib

import pytest
from django.apps import apps

from experiments.models import Recipe, Run
from tests.factories import ExperimentFactory, RecipeFactory, RunFactory

pytestmark = pytest.mark.django_db

migration = importlib.import_module("experiments.migrations.0008_attention_mse_fits_scores")
OLD_TERMS = [{"name": "ce", "weight": 0.5, "params": {}},
             {"name": "attention_mse", "weight": 0.5, "params": {"layer_map": "uniform"}}]


def test_the_data_migration_moves_saved_recipes_sweeps_and_unstarted_runs_to_attention_prob_mse(team):
    recipe = RecipeFactory(team=team, scheme=Recipe.Scheme.ONLINE, terms=OLD_TERMS)
    other = RecipeFactory(team=team)
    experiment = ExperimentFactory(
        team=team, train={"max_steps": 20, "term_sweeps": {"attention_mse.layer_map": ["uniform", "last"]}}
    )
    queued = RunFactory(experiment=experiment, recipe=recipe, config={"terms": OLD_TERMS})
    # Requeued after an attempt: it may resume from a checkpoint trained with the old computation.
    started = RunFactory(experiment=experiment, recipe=recipe, config={"terms": OLD_TERMS},
                         status=Run.Status.QUEUED, attempt=1)

    migration.forwards(apps, None)

    recipe.refresh_from_db(), other.refresh_from_db(), experiment.refresh_from_db()
    assert [t["name"] for t in recipe.terms] == ["ce", "attention_prob_mse"]
    assert recipe.terms[1]["params"] == {"layer_map": "uniform"} and recipe.terms[1]["weight"] == 0.5
    assert other.terms == RecipeFactory._meta.declarations["terms"]
    assert experiment.train["term_sweeps"] == {"attention_prob_mse.layer_map": ["uniform", "last"]}
    queued.refresh_from_db(), started.refresh_from_db()
    assert [t["name"] for t in queued.config["terms"]] == ["ce", "attention_prob_mse"]
    assert started.config["terms"] == OLD_TERMS        # a launched run's frozen config is never edited

    migration.backwards(apps, None)
    recipe.refresh_from_db()
    assert recipe.terms == OLD_TERMS


def test_a_migrated_recipe_computes_what_the_old_term_computed():
    import torch

    from workers.engine import losses

    g = torch.Generator().manual_seed(0)
    maps = [tuple(torch.randn(2, 2, 4, 4, generator=g).softmax(-1) for _ in range(2)) for _ in range(2)]
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]]).bool()
    # The old attention_mse: the masked MSE of the probability maps, summed over mapped layers.
    pairs = (mask[:, None, :, None] & mask[:, None, None, :]).expand(2, 2, 4, 4)
    old = sum(((a.double() - b.double()) ** 2)[pairs].mean() for a, b in zip(*maps, strict=True))
    terms = migration.renamed_terms(OLD_TERMS)
    fn = losses.LOSS_TERMS[terms[1]["name"]].fn
    assert fn(maps[0], maps[1], mask, **terms[1]["params"]).item() == pytest.approx(old.item(), rel=1e-6)
