"""The loss term ``attention_mse`` now fits TinyBERT's pre-softmax attention scores; what it computed before (the
MSE of the post-softmax probabilities) is the term ``attention_prob_mse``. Recipes saved with the old term, the
term sweeps of experiments over it and the frozen configs of runs that have not started move to the new name, so
each keeps the computation it was written with. Runs that started (or finished) keep their frozen config."""

from __future__ import annotations

from typing import Any

from django.db import migrations

OLD, NEW = "attention_mse", "attention_prob_mse"


def renamed_terms(terms: Any, old: str = OLD, new: str = NEW) -> Any:
    """``terms`` with every term named ``old`` named ``new`` (anything that is not a list of terms unchanged)."""
    if not isinstance(terms, list):
        return terms
    return [{**t, "name": new} if isinstance(t, dict) and t.get("name") == old else t for t in terms]


def renamed_sweeps(train: Any, old: str = OLD, new: str = NEW) -> Any:
    """``Experiment.train`` with term sweeps over ``old.PARAM`` keyed ``new.PARAM``."""
    if not isinstance(train, dict) or not isinstance(train.get("term_sweeps"), dict):
        return train
    sweeps = {(f"{new}.{key.split('.', 1)[1]}" if isinstance(key, str) and key.startswith(f"{old}.") else key): v
              for key, v in train["term_sweeps"].items()}
    return {**train, "term_sweeps": sweeps}


def _rename(apps, old: str, new: str) -> None:
    Recipe = apps.get_model("experiments", "Recipe")
    Experiment = apps.get_model("experiments", "Experiment")
    Run = apps.get_model("experiments", "Run")
    for recipe in Recipe.objects.only("pk", "terms").iterator():
        terms = renamed_terms(recipe.terms, old, new)
        if terms != recipe.terms:
            recipe.terms = terms
            recipe.save(update_fields=["terms"])
    for experiment in Experiment.objects.only("pk", "train").iterator():
        train = renamed_sweeps(experiment.train, old, new)
        if train != experiment.train:
            experiment.train = train
            experiment.save(update_fields=["train"])
    for run in Run.objects.filter(status="queued", attempt=0).only("pk", "config").iterator():
        config = run.config if isinstance(run.config, dict) else {}
        terms = renamed_terms(config.get("terms"), old, new)
        if terms != config.get("terms"):
            run.config = {**config, "terms": terms}
            run.save(update_fields=["config"])


def forwards(apps: Any, schema_editor: Any) -> None:
    _rename(apps, OLD, NEW)


def backwards(apps: Any, schema_editor: Any) -> None:
    _rename(apps, NEW, OLD)


class Migration(migrations.Migration):
    dependencies = [("experiments", "0007_worker_memory_total")]

    operations = [migrations.RunPython(forwards, backwards)]
