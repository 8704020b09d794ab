"""Training schemes (METHODS.md §3) and their parameter schemas. Torch-free: the web forms import it.

Some schemes change the training loop (``offline``, ``online``, ``hard_labels``, ``seq_kd``, ``on_policy``,
``multi_teacher``); two are chains of ordinary runs that the caller orchestrates (``self_distillation``: each
generation distils from the previous one; ``teacher_assistant``: teacher → assistant → student). Each chained
run itself trains with ``offline``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .errors import ConfigError


@dataclass(frozen=True)
class SchemeParam:
    name: str
    default: float
    description: str
    min: float
    max: float
    integer: bool = False

    def range_text(self) -> str:
        return f"in [{self.min:g}, {self.max:g}]"


@dataclass(frozen=True)
class SchemeSpec:
    name: str
    title: str
    description: str
    needs_teacher: bool
    tasks: tuple[str, ...] = ("classification", "causal_lm", "embedding")
    chained: bool = False  # orchestrated as several runs by the caller
    params: Mapping[str, SchemeParam] = field(default_factory=dict)

    def defaults(self) -> dict[str, float]:
        return {p.name: p.default for p in self.params.values()}


def _params(*specs: SchemeParam) -> dict[str, SchemeParam]:
    return {p.name: p for p in specs}


SCHEMES: dict[str, SchemeSpec] = {
    s.name: s
    for s in (
        SchemeSpec("offline", "Offline", "Teacher outputs are computed once, cached and reused.", True),
        SchemeSpec("online", "Online", "The teacher runs on every batch (needed for feature terms).", True),
        SchemeSpec("hard_labels", "Hard labels", "Baseline: ce on the labels only, no teacher.", False),
        SchemeSpec(
            "seq_kd",
            "Sequence-level KD",
            "The student is trained with ce on teacher-generated continuations.",
            True,
            tasks=("causal_lm",),
            params=_params(
                SchemeParam(
                    "max_new_tokens", 64, "Tokens the teacher generates per prompt.", 1, 2048, integer=True
                ),
                SchemeParam(
                    "temperature", 0.0, "Sampling temperature of the teacher (0 = greedy).", 0.0, 10.0
                ),
            ),
        ),
        SchemeSpec(
            "on_policy",
            "On-policy (GKD)",
            "With probability λ a batch's continuations are sampled from the student, "
            "then scored by the teacher.",
            True,
            tasks=("causal_lm",),
            params=_params(
                SchemeParam("lmbda", 0.5, "Probability λ that a batch is student-generated.", 0.0, 1.0),
                SchemeParam("temperature", 1.0, "Sampling temperature of the student.", 0.01, 10.0),
                SchemeParam("max_new_tokens", 32, "Tokens sampled per prompt.", 1, 2048, integer=True),
            ),
        ),
        SchemeSpec(
            "self_distillation",
            "Self-distillation (born-again)",
            "Each generation of the same architecture distils from the previous one; "
            "the first from the teacher.",
            True,
            chained=True,
            params=_params(SchemeParam("generations", 2, "Generations to chain.", 1, 10, integer=True)),
        ),
        SchemeSpec(
            "teacher_assistant",
            "Teacher assistant",
            "The assistant is distilled from the teacher first, then the student from the assistant.",
            True,
            chained=True,
        ),
        SchemeSpec(
            "multi_teacher",
            "Multi-teacher",
            "Targets are the weighted average of several teachers' distributions, "
            "each softened at the term's temperature before averaging (Hinton et al. 2015).",
            True,
        ),
    )
}


def validate_scheme_params(name: str, params: Mapping[str, Any] | None) -> dict[str, float]:
    """Check a scheme's parameters and fill in defaults; ConfigError with a clear message otherwise."""
    spec = SCHEMES.get(name)
    if spec is None:
        raise ConfigError(f"Unknown training scheme '{name}'. Available schemes: {', '.join(SCHEMES)}.")
    cleaned: dict[str, float] = spec.defaults()
    for key, value in (params or {}).items():
        param = spec.params.get(key)
        if param is None:
            known = ", ".join(spec.params) or "none"
            raise ConfigError(f"Scheme '{name}' has no parameter '{key}'. Its parameters: {known}.")
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise ConfigError(f"Parameter '{key}' of scheme '{name}' must be a number, got {value!r}.")
        if param.integer and float(value) != int(value):
            raise ConfigError(f"Parameter '{key}' of scheme '{name}' must be a whole number, got {value!r}.")
        if not param.min <= value <= param.max:
            raise ConfigError(
                f"Parameter '{key}' of scheme '{name}' must be {param.range_text()}, got {value:g}."
            )
        cleaned[key] = int(value) if param.integer else float(value)
    return cleaned
