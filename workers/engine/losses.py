"""Distillation loss terms: pure, typed, masked functions plus a registry the UI can introspect.

Shapes: logits are ``(..., V)``: ``(B, V)`` for classification, ``(B, T, V)`` for causal LMs. An optional
boolean ``mask`` of shape ``(...)`` marks the positions that count (``None`` = all). Every term returns the
mean over valid positions as a float32 scalar; with no valid position it returns 0 (never NaN) and its
gradient is 0. Softmaxes run in float32 whatever the input dtype (see METHODS.md).

``KL(a‖b) = Σ a·(log a − log b)``; ``p^τ = softmax(z / τ)``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .config import LossTermConfig
from .errors import ConfigError

IGNORE_INDEX = -100


# --- helpers ---------------------------------------------------------------------------------------------------


def _masked_mean(values: Tensor, mask: Tensor | None) -> Tensor:
    """Mean of ``values`` (...,) over ``mask`` (...,); 0 with a zero gradient when nothing is valid."""
    if mask is None:
        mask = torch.ones_like(values, dtype=torch.bool)
    # torch.where (not values[mask]) keeps the graph connected when every position is masked, so
    # backward() still works and yields zeros instead of failing on an empty selection.
    total = torch.where(mask, values, torch.zeros_like(values)).sum()
    return total / mask.sum().clamp_min(1).to(values.dtype)


def _log_probs(logits: Tensor, temperature: float = 1.0) -> Tensor:
    """float32 log-softmax of ``logits / temperature`` over the last dimension."""
    return F.log_softmax(logits.float() / temperature, dim=-1)


def _kl(log_p: Tensor, log_q: Tensor) -> Tensor:
    """Per-position ``KL(p‖q)`` from log-probabilities: (..., V) → (...)."""
    # F.kl_div(input, target) computes target·(log target − input), i.e. KL(target‖input).
    return F.kl_div(log_q, log_p, reduction="none", log_target=True).sum(dim=-1)


def _mix_log(log_a: Tensor, log_b: Tensor, weight_a: float) -> Tensor:
    """``log(w·a + (1−w)·b)`` computed stably in log space; ``0 < w < 1``."""
    return torch.logsumexp(
        torch.stack([log_a + math.log(weight_a), log_b + math.log1p(-weight_a)]), dim=0
    )


# --- loss terms ------------------------------------------------------------------------------------------------


def ce(student_logits: Tensor, labels: Tensor, *, label_smoothing: float = 0.0) -> Tensor:
    """Cross-entropy with the hard labels; rows labelled ``IGNORE_INDEX`` (-100) do not count.

    Args:
        student_logits: (..., V).
        labels: (...), int64 class ids or -100.
        label_smoothing: in [0, 1).
    Returns:
        float32 scalar: mean over labelled positions, 0 when none is labelled.
    """
    logits = student_logits.float().reshape(-1, student_logits.shape[-1])  # (N, V)
    flat_labels = labels.reshape(-1)                                        # (N,)
    per_position = F.cross_entropy(
        logits, flat_labels, ignore_index=IGNORE_INDEX, label_smoothing=label_smoothing, reduction="none"
    )                                                                       # (N,), 0 where ignored
    return _masked_mean(per_position, flat_labels != IGNORE_INDEX)


def kd(student_logits: Tensor, teacher_logits: Tensor, mask: Tensor | None = None, *,
       temperature: float = 1.0) -> Tensor:
    """Hinton KD: ``τ² · KL(p_T^τ ‖ p_S^τ)``.

    The τ² factor keeps gradient magnitudes comparable across temperatures (Hinton et al., 2015).

    Args:
        student_logits, teacher_logits: (..., V).
        mask: (...) bool, True where the position counts; None = all.
        temperature: τ > 0.
    Returns:
        float32 scalar.
    """
    s = _log_probs(student_logits, temperature)   # (..., V)
    t = _log_probs(teacher_logits, temperature)   # (..., V)
    return _masked_mean(_kl(t, s), mask) * temperature**2


def reverse_kl(student_logits: Tensor, teacher_logits: Tensor, mask: Tensor | None = None, *,
               temperature: float = 1.0) -> Tensor:
    """Mode-seeking reverse KL: ``τ² · KL(p_S^τ ‖ p_T^τ)`` (MiniLLM, token level).

    Args/Returns: as :func:`kd`.
    """
    s = _log_probs(student_logits, temperature)
    t = _log_probs(teacher_logits, temperature)
    return _masked_mean(_kl(s, t), mask) * temperature**2


def jsd(student_logits: Tensor, teacher_logits: Tensor, mask: Tensor | None = None, *,
        beta: float = 0.5, temperature: float = 1.0) -> Tensor:
    """Generalized Jensen-Shannon divergence (GKD, Agarwal et al. 2024).

    ``M = β·p_T + (1−β)·p_S``; loss ``β·KL(p_T‖M) + (1−β)·KL(p_S‖M)``. β=0 is defined as forward
    ``KL(p_T‖p_S)`` and β=1 as reverse ``KL(p_S‖p_T)`` (special-cased, as TRL does: the formula itself
    tends to 0 at both ends). The logits are divided by τ but the result is NOT multiplied by τ², to agree
    numerically with TRL's ``generalized_jsd_loss``.

    Args:
        student_logits, teacher_logits: (..., V).
        mask: (...) bool; None = all positions.
        beta: in [0, 1], the teacher's weight in the mixture.
        temperature: τ > 0.
    Returns:
        float32 scalar.
    """
    s = _log_probs(student_logits, temperature)   # (..., V)
    t = _log_probs(teacher_logits, temperature)   # (..., V)
    if beta == 0:
        per_position = _kl(t, s)
    elif beta == 1:
        per_position = _kl(s, t)
    else:
        m = _mix_log(t, s, beta)                  # (..., V) log M
        per_position = beta * _kl(t, m) + (1 - beta) * _kl(s, m)
    return _masked_mean(per_position, mask)


def skew_kl(student_logits: Tensor, teacher_logits: Tensor, mask: Tensor | None = None, *,
            alpha: float = 0.1) -> Tensor:
    """Skew KL (DistiLLM): ``KL(p_T ‖ α·p_T + (1−α)·p_S)``; α=0 is forward KL.

    Args/Returns: as :func:`kd`; ``alpha`` in [0, 1).
    """
    s = _log_probs(student_logits)
    t = _log_probs(teacher_logits)
    m = s if alpha == 0 else _mix_log(t, s, alpha)
    return _masked_mean(_kl(t, m), mask)


def skew_reverse_kl(student_logits: Tensor, teacher_logits: Tensor, mask: Tensor | None = None, *,
                    alpha: float = 0.1) -> Tensor:
    """Skew reverse KL (DistiLLM): ``KL(p_S ‖ (1−α)·p_T + α·p_S)``; α=0 is reverse KL.

    Args/Returns: as :func:`kd`; ``alpha`` in [0, 1).
    """
    s = _log_probs(student_logits)
    t = _log_probs(teacher_logits)
    m = t if alpha == 0 else _mix_log(s, t, alpha)
    return _masked_mean(_kl(s, m), mask)


def tvd(student_logits: Tensor, teacher_logits: Tensor, mask: Tensor | None = None, *,
        temperature: float = 1.0) -> Tensor:
    """Total variation distance ``½ Σ |p_T^τ − p_S^τ|`` (bounded in [0, 1]; no τ² factor).

    Args/Returns: as :func:`kd`.
    """
    s = _log_probs(student_logits, temperature).exp()
    t = _log_probs(teacher_logits, temperature).exp()
    return _masked_mean(0.5 * (t - s).abs().sum(dim=-1), mask)


# --- registry --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ParamSpec:
    """One numeric parameter of a loss term, with its allowed range (bounds inclusive unless noted)."""

    name: str
    default: float
    description: str
    min: float | None = None
    max: float | None = None
    min_inclusive: bool = True
    max_inclusive: bool = True
    type: type = float

    def range_text(self) -> str:
        """Human-readable range, e.g. ``> 0``, ``in [0, 1]``, ``in [0, 1)``."""
        if self.min is not None and self.max is not None:
            left = "[" if self.min_inclusive else "("
            right = "]" if self.max_inclusive else ")"
            return f"in {left}{_fmt(self.min)}, {_fmt(self.max)}{right}"
        if self.min is not None:
            return f"{'>=' if self.min_inclusive else '>'} {_fmt(self.min)}"
        if self.max is not None:
            return f"{'<=' if self.max_inclusive else '<'} {_fmt(self.max)}"
        return "any number"

    def in_range(self, value: float) -> bool:
        if self.min is not None and (value < self.min or (value == self.min and not self.min_inclusive)):
            return False
        if self.max is not None and (value > self.max or (value == self.max and not self.max_inclusive)):
            return False
        return True


@dataclass(frozen=True)
class TermSpec:
    """A loss term the UI can offer: what it needs, its parameters, and the function computing it.

    ``fn`` is called as ``fn(student_logits, labels, **params)`` when ``needs_teacher`` is False, else as
    ``fn(student_logits, teacher_logits, mask, **params)``.
    """

    name: str
    title: str
    description: str
    needs_teacher: bool
    fn: Callable[..., Tensor]
    params: Mapping[str, ParamSpec] = field(default_factory=dict)

    def defaults(self) -> dict[str, float]:
        return {p.name: p.default for p in self.params.values()}


def _fmt(x: float) -> str:
    return f"{x:g}"


def _temperature(default: float = 1.0) -> ParamSpec:
    return ParamSpec("temperature", default, "Softmax temperature τ; higher values soften both distributions.",
                     min=0.0, min_inclusive=False)


def _params(*specs: ParamSpec) -> dict[str, ParamSpec]:
    return {p.name: p for p in specs}


LOSS_TERMS: dict[str, TermSpec] = {
    spec.name: spec
    for spec in (
        TermSpec(
            "ce", "Cross-entropy", "Cross-entropy with the hard labels (no teacher). Unlabelled rows are skipped.",
            needs_teacher=False, fn=ce,
            params=_params(ParamSpec("label_smoothing", 0.0, "Mass spread uniformly over all classes.",
                                     min=0.0, max=1.0, max_inclusive=False)),
        ),
        TermSpec(
            "kd", "Knowledge distillation (forward KL)",
            "τ²·KL(p_T^τ ‖ p_S^τ) between temperature-softened distributions (Hinton et al. 2015).",
            needs_teacher=True, fn=kd, params=_params(_temperature(4.0)),
        ),
        TermSpec(
            "reverse_kl", "Reverse KL", "τ²·KL(p_S^τ ‖ p_T^τ), mode-seeking (MiniLLM).",
            needs_teacher=True, fn=reverse_kl, params=_params(_temperature()),
        ),
        TermSpec(
            "jsd", "Generalized JSD",
            "β·KL(p_T‖M) + (1−β)·KL(p_S‖M) with M = β·p_T + (1−β)·p_S; β=0 is forward KL, β=1 reverse KL "
            "(GKD). Not scaled by τ², like TRL.",
            needs_teacher=True, fn=jsd,
            params=_params(
                ParamSpec("beta", 0.5, "Teacher weight β in the mixture M.", min=0.0, max=1.0),
                _temperature(),
            ),
        ),
        TermSpec(
            "skew_kl", "Skew KL", "KL(p_T ‖ α·p_T + (1−α)·p_S) (DistiLLM).",
            needs_teacher=True, fn=skew_kl,
            params=_params(ParamSpec("alpha", 0.1, "Skew α: how much teacher is mixed into the student side.",
                                     min=0.0, max=1.0, max_inclusive=False)),
        ),
        TermSpec(
            "skew_reverse_kl", "Skew reverse KL", "KL(p_S ‖ (1−α)·p_T + α·p_S) (DistiLLM).",
            needs_teacher=True, fn=skew_reverse_kl,
            params=_params(ParamSpec("alpha", 0.1, "Skew α: how much student is mixed into the teacher side.",
                                     min=0.0, max=1.0, max_inclusive=False)),
        ),
        TermSpec(
            "tvd", "Total variation distance", "½·Σ|p_T^τ − p_S^τ| (DistiLLM / DistillKit).",
            needs_teacher=True, fn=tvd, params=_params(_temperature()),
        ),
    )
}


def validate_term_params(name: str, params: Mapping[str, Any] | None) -> dict[str, float]:
    """Check a term's parameters against its schema and fill in defaults.

    Args:
        name: a key of ``LOSS_TERMS``.
        params: user-given values, e.g. ``{"temperature": 4}``.
    Returns:
        a complete dict of floats, e.g. ``{"temperature": 4.0}``.
    Raises:
        ConfigError: unknown term, unknown parameter, non-numeric or out-of-range value.
    """
    spec = LOSS_TERMS.get(name)
    if spec is None:
        raise ConfigError(f"Unknown loss term '{name}'. Available terms: {', '.join(LOSS_TERMS)}.")
    cleaned = spec.defaults()
    for key, value in (params or {}).items():
        param = spec.params.get(key)
        if param is None:
            known = ", ".join(spec.params) or "none"
            raise ConfigError(f"Loss term '{name}' has no parameter '{key}'. Its parameters: {known}.")
        # bool is an int subclass; True as a temperature is a mistake, not 1.0.
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise ConfigError(f"Parameter '{key}' of loss term '{name}' must be a number, got {value!r}.")
        if not param.in_range(value):
            raise ConfigError(
                f"Parameter '{key}' of loss term '{name}' must be {param.range_text()}, got {_fmt(value)}."
            )
        cleaned[key] = float(value)
    return cleaned


def validate_terms(terms: Sequence[LossTermConfig]) -> list[LossTermConfig]:
    """Validate a whole recipe: at least one term, each known, unique, with a finite weight >= 0.

    Returns:
        the terms with complete, validated parameters.
    """
    if not terms:
        raise ConfigError("The recipe has no loss terms. Add at least one (e.g. ce).")
    names = [t.name for t in terms]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ConfigError(f"Each loss term may appear once; repeated: {', '.join(duplicates)}.")
    cleaned = []
    for term in terms:
        weight = term.weight
        if isinstance(weight, bool) or not isinstance(weight, int | float) or not math.isfinite(weight) \
                or weight < 0:
            raise ConfigError(f"The weight of loss term '{term.name}' must be a number >= 0, got {weight!r}.")
        cleaned.append(LossTermConfig(term.name, float(weight), validate_term_params(term.name, term.params)))
    if not any(t.weight > 0 for t in cleaned):
        raise ConfigError("At least one loss term needs a positive weight.")
    return cleaned


class LossParts(NamedTuple):
    """``total`` carries the gradient; ``parts`` holds each term's detached, unweighted value by name."""

    total: Tensor
    parts: dict[str, Tensor]


def combine_terms(terms: Sequence[LossTermConfig], student_logits: Tensor, teacher_logits: Tensor | None,
                  labels: Tensor) -> LossParts:
    """Weighted sum of a recipe's terms.

    Teacher terms see every classification row, labelled or not: there ``-100`` means "unlabelled" and
    the teacher's distribution is still a target (transfer set). For sequences (``student_logits.dim() > 2``)
    ``-100`` marks padding/prompt positions, which no term may use.

    Args:
        terms: validated terms (see :func:`validate_terms`).
        student_logits: (B, V) or (B, T, V).
        teacher_logits: same shape as ``student_logits``, or None when no term needs a teacher.
        labels: (B,) or (B, T); -100 = no label.
    Returns:
        LossParts(total: float32 scalar, parts: {term name: detached float32 scalar}).
    """
    mask = labels != IGNORE_INDEX if student_logits.dim() > 2 else None
    total = student_logits.new_zeros((), dtype=torch.float32)
    parts: dict[str, Tensor] = {}
    for term in terms:
        spec = LOSS_TERMS.get(term.name)
        if spec is None:
            raise ConfigError(f"Unknown loss term '{term.name}'. Available terms: {', '.join(LOSS_TERMS)}.")
        if spec.needs_teacher:
            if teacher_logits is None:
                raise ConfigError(f"Loss term '{term.name}' needs a teacher, but there are no teacher logits.")
            value = spec.fn(student_logits, teacher_logits, mask, **term.params)
        else:
            value = spec.fn(student_logits, labels, **term.params)
        total = total + term.weight * value
        parts[term.name] = value.detach()
    return LossParts(total=total, parts=parts)
