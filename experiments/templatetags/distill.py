"""Display helpers for the templates. Every filter returns plain text: autoescaping still applies."""

from __future__ import annotations

import functools
import json
import math
from typing import Any

from django import template
from django.urls import get_script_prefix, reverse
from django.utils import timezone

from experiments import humanize
from experiments.domain import routing
from experiments.domain.compare import Latency, latency_of
from experiments.selectors import records

register = template.Library()


# Plain functions (experiments.humanize) that Python modules use too; templates use them as filters.
register.filter("ago", humanize.ago)
register.filter("duration", humanize.duration)


@functools.lru_cache(maxsize=64)
def _id_path(name: str, prefix: str) -> tuple[str, str]:
    marker = 987654321
    head, tail = reverse(name, args=[marker]).split(str(marker))
    return head, tail


@register.filter
def path_for(pk: Any, name: str) -> str:
    """The path of a route that takes one id, as ``{% url name pk %}`` gives it, from one reverse per route:
    ``{{ run_id|path_for:"experiments:run_detail" }}`` (a table of many rows reverses once, not per cell)."""
    head, tail = _id_path(name, get_script_prefix())
    return f"{head}{int(pk)}{tail}"


@register.filter
def pct(value: float | None, digits: int = 1) -> str:
    """A fraction as a percentage: 0.8734 → "87.3%"; "—" when missing."""
    if value is None or value == "" or (isinstance(value, float) and not math.isfinite(value)):
        return "—"
    return f"{100 * float(value):.{int(digits)}f}%"


@register.filter
def pp(value: float | None, digits: int = 1) -> str:
    """A difference of fractions in signed percentage points: 0.0123 → "+1.2 pp"."""
    if value is None or value == "":
        return "—"
    return f"{100 * float(value):+.{int(digits)}f} pp"


@register.filter
def compact(value: int | float | None) -> str:
    """A large count in short form: 1234567 → "1.23M", 52000 → "52.0k"."""
    if value is None or value == "":
        return "—"
    value = float(value)
    for limit, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= limit:
            return f"{value / limit:.3g}{suffix}" if value / limit < 100 else f"{value / limit:.0f}{suffix}"
    return f"{value:g}"


@register.filter
def pretty_json(value: Any) -> str:
    return json.dumps(value, indent=2, sort_keys=True, default=str)


@register.filter
def experiment_status(experiment) -> str:
    return records.experiment_status(experiment)


@register.filter
def slug_class(value: str) -> str:
    """A status such as "partly failed" as a CSS class suffix ("partly-failed")."""
    return str(value).replace(" ", "-").replace("_", "-")


@register.filter
def eta(run) -> str:
    """Time left for a running run's steps from its throughput; "" when unknown or when every step is done
    (evaluation and saving then show their own time left)."""
    batch = ((run.config or {}).get("train") or {}).get("batch_size")
    if run.status != "running" or not run.samples_per_s or not batch or not run.total_steps:
        return ""
    if run.step >= run.total_steps:
        return ""
    return humanize.duration((run.total_steps - run.step) * batch / run.samples_per_s)


@register.filter
def first_line(value: str) -> str:
    return (value or "").strip().splitlines()[0] if (value or "").strip() else ""


@register.filter
def get_item(mapping: dict, key: str) -> Any:
    return mapping.get(key) if isinstance(mapping, dict) else None


@register.filter
def startswith(value: str | None, prefix: str) -> bool:
    return str(value or "").startswith(prefix)


@register.filter
def get_form_field(form, name: str):
    """``form[name]`` for a name held in a variable."""
    return form[name]


@register.filter
def elapsed(run) -> str:
    """How long a run trained: from its start to its end (or to now while it runs)."""
    if not run.started_at:
        return ""
    return humanize.duration((run.finished_at or timezone.now()) - run.started_at)


@register.filter
def metric(value: Any) -> str:
    """A metric value for display: numbers with 4 significant digits, anything else as short text."""
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, int) or (isinstance(value, float) and value.is_integer() and abs(value) < 1e15):
        return f"{int(value):,}"
    if isinstance(value, float):
        return f"{value:.4g}"
    text = json.dumps(value, default=str) if isinstance(value, list | dict) else str(value)
    return text if len(text) <= 60 else text[:59] + "…"


@register.filter
def pp_unsigned(value: float | None, digits: int = 1) -> str:
    """Like ``pp`` without the sign, for a spread: 0.0123 → "1.2 pp"."""
    if value is None or value == "":
        return "—"
    return f"{100 * float(value):.{int(digits)}f} pp"


# The latency cell shows the median, its p25–p75 and the setting (``cells.latency_cell``).
SHOWN_METRICS = {"accuracy", "macro_f1", "params", "latency_ms_p50", "latency_ms_p25", "latency_ms_p75",
                 "efficiency_setting"}


@register.filter
def other_metrics(metrics: dict | None) -> list[tuple[str, Any]]:
    """An evaluation's metrics without those the table shows in their own columns."""
    return [(k, v) for k, v in sorted((metrics or {}).items()) if k not in SHOWN_METRICS]


@register.filter
def share(value: float | None) -> str:
    """A small fraction as a percentage with enough digits to read: 0.0089 → "0.89%", 0.25 → "25.0%",
    1.0 → "100%"; "—" when missing."""
    if value is None or value == "" or not math.isfinite(float(value)):
        return "—"
    percent = 100 * float(value)
    if percent >= 99.95:
        return "100%" if percent < 100.05 else f"{percent:.1f}%"
    return f"{percent:.2f}%" if percent < 1 else f"{percent:.1f}%"


@register.filter
def memory_size(value: int | float | None) -> str:
    """Bytes of memory as the estimates show them: 1288490188 → "1.2 GiB", 300 MiB → "300 MiB"."""
    if value is None or value == "":
        return "—"
    return routing.size_text(float(value))


@register.filter
def latency(evaluation: Any) -> Latency | None:
    """An evaluation's batch-1 latency with its spread and setting (for ``cells.latency_cell``)."""
    if evaluation is None:
        return None
    return latency_of(getattr(evaluation, "metrics", None), getattr(evaluation, "latency_ms", None))


@register.filter
def sig3(value: float | None) -> str:
    """A latency or a ratio with 3 significant digits: 0.02384 → "0.0238", 1.0309 → "1.03", 173.2 → "173",
    4210.7 → "4,211"; "—" when missing."""
    if value is None or value == "" or not math.isfinite(float(value)):
        return "—"
    value = float(value)
    return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.3g}"
