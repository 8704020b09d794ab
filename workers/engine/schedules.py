"""Schedules for a loss term's weight and numeric parameters over training progress.

A schedule is a small JSON dict, ``{"kind": "linear", "start": 4.0, "end": 1.0}``; ``progress`` is
``step / total_steps`` clamped to [0, 1]:

- ``constant``: ``start`` throughout (``end``, if given, must equal ``start``);
- ``linear``: ``start + (end − start) · progress``;
- ``cosine``: ``end + (start − end) · (1 + cos(π · progress)) / 2`` (starts flat, ends flat).

Every value lies between ``start`` and ``end``, so checking both endpoints against a parameter's range
checks the whole schedule.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Protocol

from .errors import ConfigError

SCHEDULE_KINDS = ("constant", "linear", "cosine")
WEIGHT = "weight"
MAX_WEIGHT = 1e6


class _RangeSpec(Protocol):
    """What schedules need from ``terms.ParamSpec`` (kept structural to avoid an import cycle)."""

    type: type

    def in_range(self, value: float) -> bool: ...

    def range_text(self) -> str: ...


def progress(step: int, total_steps: int) -> float:
    """Fraction of training done, in [0, 1]; 0 when ``total_steps`` < 1."""
    if total_steps < 1:
        return 0.0
    return min(1.0, max(0.0, step / total_steps))


def value_at(schedule: Mapping[str, Any], step: int, total_steps: int) -> float:
    """The scheduled value after ``step`` of ``total_steps`` optimizer steps (schedule already validated)."""
    start = float(schedule["start"])
    end = float(schedule.get("end", start))
    p = progress(step, total_steps)
    kind = schedule["kind"]
    if kind == "constant":
        return start
    if kind == "linear":
        return start + (end - start) * p
    if kind == "cosine":
        return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * p))
    raise ConfigError(f"Unknown schedule kind '{kind}'. Use one of: {', '.join(SCHEDULE_KINDS)}.")


def _number(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ConfigError(f"{what} must be a number, got {value!r}.")
    return float(value)


def validate_schedule(
    term: str, schedule: Mapping[str, Any] | None, params: Mapping[str, _RangeSpec]
) -> dict[str, dict[str, Any]]:
    """Check a term's schedules; returns them with floats and an explicit ``end``.

    Args:
        term: the term's name (for messages).
        schedule: ``{"weight" | numeric parameter name: {"kind", "start", "end"}}``; None = no schedule.
        params: the term's parameter schema; only float parameters can be scheduled.
    Raises:
        ConfigError: unknown target or kind, extra keys, non-numeric or out-of-range endpoints.
    """
    if schedule is None:
        return {}
    if not isinstance(schedule, Mapping):
        raise ConfigError(f"The schedule of loss term '{term}' must be a mapping, got {schedule!r}.")
    cleaned: dict[str, dict[str, Any]] = {}
    for target, spec in schedule.items():
        param = params.get(target)
        if target != WEIGHT and (param is None or param.type is not float):
            numeric = [name for name, p in params.items() if p.type is float]
            raise ConfigError(
                f"Loss term '{term}' cannot schedule '{target}'. Schedulable: "
                f"{', '.join([WEIGHT, *numeric])}."
            )
        where = f"The {target} schedule of loss term '{term}'"
        if not isinstance(spec, Mapping):
            raise ConfigError(f"{where} must be a mapping with kind, start and end, got {spec!r}.")
        extra = set(spec) - {"kind", "start", "end"}
        if extra:
            raise ConfigError(
                f"{where} has unknown keys: {', '.join(sorted(map(str, extra)))}. Use kind, start and end."
            )
        kind = spec.get("kind")
        if kind not in SCHEDULE_KINDS:
            raise ConfigError(f"{where} has kind {kind!r}; use one of: {', '.join(SCHEDULE_KINDS)}.")
        if "start" not in spec:
            raise ConfigError(f"{where} needs a start value.")
        start = _number(spec["start"], f"{where}: start")
        end = _number(spec.get("end", start), f"{where}: end")
        if kind == "constant" and end != start:
            raise ConfigError(f"{where} is constant, so end must equal start (or be left out).")
        for label, value in (("start", start), ("end", end)):
            if target == WEIGHT:
                if not 0 <= value <= MAX_WEIGHT:
                    raise ConfigError(f"{where}: {label} must be in [0, {MAX_WEIGHT:g}], got {value:g}.")
            elif not param.in_range(value):
                raise ConfigError(f"{where}: {label} must be {param.range_text()}, got {value:g}.")
        cleaned[target] = {"kind": kind, "start": start, "end": end}
    return cleaned


def max_weight(weight: float, schedule: Mapping[str, Any]) -> float:
    """The largest weight a term reaches during training (its fixed weight if it has no weight schedule)."""
    spec = schedule.get(WEIGHT)
    if spec is None:
        return weight
    return max(float(spec["start"]), float(spec.get("end", spec["start"])))
