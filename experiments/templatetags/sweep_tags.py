"""Template filters for sweeps: ``{% load sweep_tags %}{{ run|sweep_label }}`` → "lr=3e-4 τ=4"."""

from __future__ import annotations

from django import template

from experiments.domain import sweep_plan
from experiments.models import Run

register = template.Library()


@register.filter
def sweep_label(run: Run) -> str:
    """The run's point of its experiment's sweep (empty when the experiment sweeps nothing). Reads
    ``run.experiment``: select it with the run where many rows are shown."""
    return sweep_plan.run_label(train=run.experiment.train or {}, config=run.config or {})
