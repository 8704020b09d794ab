"""Template filters for a model's parameter count and task (experiments.domain.model_size)."""

from __future__ import annotations

from django import template

from experiments.domain import model_size
from experiments.forms import TASK_SHORT
from experiments.models import ModelSpec

register = template.Library()


@register.filter
def param_text(spec: ModelSpec) -> str:
    """"2.41k", "259–547" (a builtin net whose input width depends on the data), or "—"."""
    return model_size.size_text(model_size.model_size(spec))


@register.filter
def param_how(spec: ModelSpec) -> str:
    """Where the count comes from (a tooltip); "" when there is none."""
    size = model_size.model_size(spec)
    return size.how if size is not None else ""


@register.filter
def task_short(spec: ModelSpec) -> str:
    return TASK_SHORT.get(spec.task, spec.task)
