"""Distillation loss terms: pure, typed, masked functions, bound to the term catalogue of :mod:`.terms`.

Shapes: logits are ``(..., V)``: ``(B, V)`` for classification, ``(B, T, V)`` for causal LMs. An optional
boolean ``mask`` of shape ``(...)`` marks the positions that count (``None`` = all). Every term returns the
mean over valid positions as a float32 scalar; with no valid position it returns 0 (never NaN) and its
gradient is 0. Softmaxes run in float32 whatever the input dtype (see METHODS.md).

``KL(a‖b) = Σ a·(log a − log b)``; ``p^τ = softmax(z / τ)``.

Token-level terms are written as a per-position function (``_kd_tokens`` etc.) plus a public wrapper that
averages it over the mask. With ``chunk_size`` the wrapper goes through :func:`chunked_token_loss`, which
never holds more than ``chunk_size`` positions' float32 softmaxes at once, in the forward or the backward.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from types import MappingProxyType
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import LossTermConfig
from .errors import ConfigError
from .terms import DIVERGENCES, POOLINGS, TermSpec
from .terms import LOSS_TERMS as CATALOGUE

IGNORE_INDEX = -100
# A finite stand-in for log(0): exp() of it is exactly 0, yet differences and gradients stay finite (a true
# -inf gives 0·inf = NaN in KL terms and in logsumexp's backward).
LOG_ZERO = -1e30


@dataclass
class TopK:
    """A sparse teacher distribution over the vocabulary (what the LM teacher-output cache stores).

    Attributes:
        logprobs: (..., k) float teacher log-probabilities (temperature 1) of its top-k tokens.
        indices: (..., k) int64 token ids.
        tail_logmass: (...) log of the probability mass outside the top k; None when not stored.
    """

    logprobs: Tensor
    indices: Tensor
    tail_logmass: Tensor | None = None


# --- helpers ------------------------------------------------------------------------------------------------


def _masked_mean(values: Tensor, mask: Tensor | None) -> Tensor:
    """Mean of ``values`` (...,) over ``mask`` (...,); 0 with a zero gradient when nothing is valid."""
    if mask is None:
        mask = torch.ones_like(values, dtype=torch.bool)
    # torch.where (not values[mask]) keeps the graph connected when every position is masked, so
    # backward() still works and yields zeros instead of failing on an empty selection.
    total = torch.where(mask, values, torch.zeros_like(values)).sum()
    return total / mask.sum().clamp_min(1).to(values.dtype)


def _log_probs(logits: Tensor, temperature: float | Tensor = 1.0) -> Tensor:
    """float32 log-softmax of ``logits / temperature`` over the last dimension."""
    return F.log_softmax(logits.float() / temperature, dim=-1)


def _kl(log_p: Tensor, log_q: Tensor) -> Tensor:
    """Per-position ``KL(p‖q)`` from log-probabilities: (..., V) → (...)."""
    # F.kl_div(input, target) computes target·(log target − input), i.e. KL(target‖input).
    return F.kl_div(log_q, log_p, reduction="none", log_target=True).sum(dim=-1)


def _mix_log(log_a: Tensor, log_b: Tensor, weight_a: float) -> Tensor:
    """``log(w·a + (1−w)·b)`` computed stably in log space; ``0 < w < 1``."""
    return torch.logsumexp(torch.stack([log_a + math.log(weight_a), log_b + math.log1p(-weight_a)]), dim=0)


def _divergence(divergence: str, log_s: Tensor, log_t: Tensor, *, beta: float = 0.5) -> Tensor:
    """Per-position divergence between two distributions given as log-probabilities (..., n) → (...).

    ``kd`` = KL(t‖s), ``reverse_kl`` = KL(s‖t), ``jsd`` the generalized JSD with teacher weight β (β=0 forward
    KL, β=1 reverse KL), ``tvd`` = ½Σ|t − s|. No temperature factor here.
    """
    if divergence == "kd":
        return _kl(log_t, log_s)
    if divergence == "reverse_kl":
        return _kl(log_s, log_t)
    if divergence == "jsd":
        if beta == 0:
            return _kl(log_t, log_s)
        if beta == 1:
            return _kl(log_s, log_t)
        m = _mix_log(log_t, log_s, beta)  # (..., n) log M
        return beta * _kl(log_t, m) + (1 - beta) * _kl(log_s, m)
    if divergence == "tvd":
        return 0.5 * (log_t.exp() - log_s.exp()).abs().sum(dim=-1)
    raise ConfigError(f"Unknown divergence '{divergence}'. Use one of: {', '.join(DIVERGENCES)}.")


def _tau_squared(divergence: str, temperature: float | Tensor) -> float | Tensor:
    """The Hinton τ² factor for the KL divergences (jsd and tvd are not scaled, as in TRL and DistiLLM)."""
    return temperature**2 if divergence in ("kd", "reverse_kl") else 1.0


def mix_teachers(
    logits: Tensor | Sequence[Tensor], weights: Sequence[float], *, temperature: float | Tensor = 1.0
) -> Tensor:
    """Teacher logits whose distribution at ``temperature`` is the weighted average of the teachers' softened
    distributions (Hinton et al. 2015): ``softmax(mixed / τ) = Σ_i w_i softmax(z_i / τ)``.

    The result is ``τ · log Σ_i w_i softmax(z_i / τ)``: any term that divides its teacher logits by τ (kd,
    reverse_kl, jsd, tvd, topk) then compares the student with the average of the softened teachers, not with
    the τ = 1 average softened afterwards. Weights are normalised to sum to 1; a weight of 0 drops its
    teacher.

    Args:
        logits: (K, ..., V), or K tensors (..., V), one per teacher.
        weights: K numbers >= 0 with a positive sum.
        temperature: τ > 0 of the term that reads the result.
    Returns:
        (..., V) float32.
    """
    stacked = torch.stack(list(logits)) if not isinstance(logits, Tensor) else logits  # (K, ..., V)
    if len(weights) != stacked.shape[0]:
        raise ConfigError(f"{stacked.shape[0]} teachers but {len(weights)} teacher weights.")
    total = float(sum(weights))
    log_w = torch.tensor(
        [math.log(w / total) if w > 0 else -math.inf for w in weights],
        dtype=torch.float32,
        device=stacked.device,
    ).view(-1, *([1] * (stacked.dim() - 1)))  # (K, 1, ..., 1)
    log_mix = torch.logsumexp(_log_probs(stacked, temperature) + log_w, dim=0)  # (..., V)
    return log_mix * temperature


# --- memory-aware token loss --------------------------------------------------------------------------------


def _take(target: Any, index: tuple) -> Any:
    """``target[index]`` for a tensor, or for each tensor of a :class:`TopK`."""
    if isinstance(target, TopK):
        tail = None if target.tail_logmass is None else target.tail_logmass[index]
        return TopK(target.logprobs[index], target.indices[index], tail)
    return target[index]


def _chunk_indices(leading: torch.Size, chunk_size: int) -> list[tuple]:
    """Index tuples covering the leading dims in blocks of at most ``chunk_size`` positions (views, no
    copies)."""
    if len(leading) == 1:
        return [(slice(i, i + chunk_size),) for i in range(0, leading[0], chunk_size)]
    if len(leading) == 2:
        # One batch row at a time, so shifted (non-contiguous) logits are sliced, never copied.
        return [
            (b, slice(i, i + chunk_size)) for b in range(leading[0]) for i in range(0, leading[1], chunk_size)
        ]
    raise ValueError(f"chunked losses take (N, V) or (B, T, V) logits, got {len(leading) + 1} dims")


class _ChunkedTokenMean(torch.autograd.Function):
    """Masked mean of a per-position loss, computed block by block.

    The forward computes each block's value and its gradient at once (inside ``enable_grad``) and keeps only
    the gradient, in the logits' dtype: one logits-sized buffer instead of several float32 (positions × V)
    softmaxes. The backward scales that buffer in place, so the graph supports a single backward pass.
    """

    @staticmethod
    def forward(
        ctx, logits: Tensor, per_token: Callable[..., Tensor], target: Any, mask: Tensor, chunk_size: int
    ) -> Tensor:
        want_grad = ctx.needs_input_grad[0]
        grad = torch.zeros_like(logits, memory_format=torch.contiguous_format) if want_grad else None
        count = mask.sum().clamp_min(1).to(torch.float32)
        total = torch.zeros((), dtype=torch.float32, device=logits.device)
        for index in _chunk_indices(logits.shape[:-1], chunk_size):
            rows, rows_target, rows_mask = logits[index], _take(target, index), mask[index]
            if want_grad:
                with torch.enable_grad():
                    x = rows.detach().requires_grad_()
                    value = torch.where(rows_mask, per_token(x, rows_target), 0.0).sum() / count
                    (g,) = torch.autograd.grad(value, x)
                grad[index] = g
            else:
                value = torch.where(rows_mask, per_token(rows, rows_target), 0.0).sum() / count
            total += value.detach()
        ctx.grad = grad
        return total

    @staticmethod
    def backward(ctx, grad_output: Tensor):
        grad = ctx.grad
        if grad is None:
            raise RuntimeError("chunked_token_loss supports a single backward pass.")
        ctx.grad = None
        return grad.mul_(grad_output.to(grad.dtype)), None, None, None, None


def chunked_token_loss(
    per_token: Callable[..., Tensor],
    student_logits: Tensor,
    target: Any,
    mask: Tensor | None = None,
    *,
    chunk_size: int,
    **params: Any,
) -> Tensor:
    """Masked mean of ``per_token(student_rows, target_rows, **params)`` over positions, ``chunk_size`` at a
    time.

    Equal to ``_masked_mean(per_token(student_logits, target, **params), mask)``, but the float32 softmaxes of
    all positions never exist at once, in the forward or the backward. Peak extra memory is one gradient
    buffer in the logits' dtype plus one block's intermediates. Only ``student_logits`` gets a gradient.

    Args:
        per_token: (n, V) student rows and the matching target rows → (n,) float32 values.
        student_logits: (N, V) or (B, T, V), any float dtype (slices of shifted logits are fine).
        target: teacher logits (..., V_t), labels (...), or a :class:`TopK`, aligned with the positions.
        mask: (...) bool; None = all positions.
        chunk_size: positions per block (>= 1).
    Returns:
        float32 scalar; 0 (with a zero gradient) when no position is valid.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if mask is None:
        mask = torch.ones(student_logits.shape[:-1], dtype=torch.bool, device=student_logits.device)
    fn = functools.partial(per_token, **params)
    return _ChunkedTokenMean.apply(student_logits, fn, target, mask, chunk_size)


def token_mean(
    per_token: Callable[..., Tensor],
    student_logits: Tensor,
    target: Any,
    mask: Tensor | None,
    *,
    chunk_size: int | None = None,
    **params: Any,
) -> Tensor:
    """Masked mean of a per-position loss; chunked (:func:`chunked_token_loss`) when ``chunk_size`` is given
    and smaller than the number of positions."""
    positions = math.prod(student_logits.shape[:-1])
    if chunk_size is None or chunk_size >= positions:
        return _masked_mean(per_token(student_logits, target, **params), mask)
    return chunked_token_loss(per_token, student_logits, target, mask, chunk_size=chunk_size, **params)


# --- output (logit) terms -----------------------------------------------------------------------------------


def _ce_tokens(logits: Tensor, labels: Tensor, *, label_smoothing: float = 0.0) -> Tensor:
    flat = logits.float().reshape(-1, logits.shape[-1])  # (N, V)
    per_position = F.cross_entropy(
        flat, labels.reshape(-1), ignore_index=IGNORE_INDEX, label_smoothing=label_smoothing, reduction="none"
    )  # (N,), 0 where ignored
    return per_position.reshape(labels.shape)


def ce(
    student_logits: Tensor, labels: Tensor, *, label_smoothing: float = 0.0, chunk_size: int | None = None
) -> Tensor:
    """Cross-entropy with the hard labels; rows labelled ``IGNORE_INDEX`` (-100) do not count.

    Args:
        student_logits: (..., V).
        labels: (...), int64 class ids or -100.
        label_smoothing: in [0, 1).
        chunk_size: positions per block for long sequences (see :func:`chunked_token_loss`); None = all at
        once.
    Returns:
        float32 scalar: mean over labelled positions, 0 when none is labelled.
    """
    return token_mean(
        _ce_tokens,
        student_logits,
        labels,
        labels != IGNORE_INDEX,
        chunk_size=chunk_size,
        label_smoothing=label_smoothing,
    )


def _kd_tokens(s: Tensor, t: Tensor, *, temperature: float = 1.0) -> Tensor:
    return _kl(_log_probs(t, temperature), _log_probs(s, temperature)) * temperature**2


def kd(
    student_logits: Tensor,
    teacher_logits: Tensor,
    mask: Tensor | None = None,
    *,
    temperature: float = 1.0,
    chunk_size: int | None = None,
) -> Tensor:
    """Hinton KD: ``τ² · KL(p_T^τ ‖ p_S^τ)``.

    The τ² factor keeps gradient magnitudes comparable across temperatures (Hinton et al., 2015).

    Args:
        student_logits, teacher_logits: (..., V).
        mask: (...) bool, True where the position counts; None = all.
        temperature: τ > 0.
        chunk_size: positions per block (:func:`chunked_token_loss`); None = all at once.
    Returns:
        float32 scalar.
    """
    return token_mean(
        _kd_tokens, student_logits, teacher_logits, mask, chunk_size=chunk_size, temperature=temperature
    )


def _reverse_kl_tokens(s: Tensor, t: Tensor, *, temperature: float = 1.0) -> Tensor:
    return _kl(_log_probs(s, temperature), _log_probs(t, temperature)) * temperature**2


def reverse_kl(
    student_logits: Tensor,
    teacher_logits: Tensor,
    mask: Tensor | None = None,
    *,
    temperature: float = 1.0,
    chunk_size: int | None = None,
) -> Tensor:
    """Mode-seeking reverse KL: ``τ² · KL(p_S^τ ‖ p_T^τ)`` (MiniLLM, token level).

    Args/Returns: as :func:`kd`.
    """
    return token_mean(
        _reverse_kl_tokens,
        student_logits,
        teacher_logits,
        mask,
        chunk_size=chunk_size,
        temperature=temperature,
    )


def _jsd_tokens(s: Tensor, t: Tensor, *, beta: float = 0.5, temperature: float = 1.0) -> Tensor:
    return _divergence("jsd", _log_probs(s, temperature), _log_probs(t, temperature), beta=beta)


def jsd(
    student_logits: Tensor,
    teacher_logits: Tensor,
    mask: Tensor | None = None,
    *,
    beta: float = 0.5,
    temperature: float = 1.0,
    chunk_size: int | None = None,
) -> Tensor:
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
        chunk_size: positions per block; None = all at once.
    Returns:
        float32 scalar.
    """
    return token_mean(
        _jsd_tokens,
        student_logits,
        teacher_logits,
        mask,
        chunk_size=chunk_size,
        beta=beta,
        temperature=temperature,
    )


def _skew_kl_tokens(s: Tensor, t: Tensor, *, alpha: float = 0.1) -> Tensor:
    log_s, log_t = _log_probs(s), _log_probs(t)
    return _kl(log_t, log_s if alpha == 0 else _mix_log(log_t, log_s, alpha))


def skew_kl(
    student_logits: Tensor,
    teacher_logits: Tensor,
    mask: Tensor | None = None,
    *,
    alpha: float = 0.1,
    chunk_size: int | None = None,
) -> Tensor:
    """Skew KL (DistiLLM): ``KL(p_T ‖ α·p_T + (1−α)·p_S)``; α=0 is forward KL.

    Args/Returns: as :func:`kd`; ``alpha`` in [0, 1).
    """
    return token_mean(
        _skew_kl_tokens, student_logits, teacher_logits, mask, chunk_size=chunk_size, alpha=alpha
    )


def _skew_reverse_kl_tokens(s: Tensor, t: Tensor, *, alpha: float = 0.1) -> Tensor:
    log_s, log_t = _log_probs(s), _log_probs(t)
    return _kl(log_s, log_t if alpha == 0 else _mix_log(log_s, log_t, alpha))


def skew_reverse_kl(
    student_logits: Tensor,
    teacher_logits: Tensor,
    mask: Tensor | None = None,
    *,
    alpha: float = 0.1,
    chunk_size: int | None = None,
) -> Tensor:
    """Skew reverse KL (DistiLLM): ``KL(p_S ‖ (1−α)·p_T + α·p_S)``; α=0 is reverse KL.

    Args/Returns: as :func:`kd`; ``alpha`` in [0, 1).
    """
    return token_mean(
        _skew_reverse_kl_tokens, student_logits, teacher_logits, mask, chunk_size=chunk_size, alpha=alpha
    )


def _tvd_tokens(s: Tensor, t: Tensor, *, temperature: float = 1.0) -> Tensor:
    return _divergence("tvd", _log_probs(s, temperature), _log_probs(t, temperature))


def tvd(
    student_logits: Tensor,
    teacher_logits: Tensor,
    mask: Tensor | None = None,
    *,
    temperature: float = 1.0,
    chunk_size: int | None = None,
) -> Tensor:
    """Total variation distance ``½ Σ |p_T^τ − p_S^τ|`` (bounded in [0, 1]; no τ² factor).

    Args/Returns: as :func:`kd`.
    """
    return token_mean(
        _tvd_tokens, student_logits, teacher_logits, mask, chunk_size=chunk_size, temperature=temperature
    )


def _taid_tokens(s: Tensor, t: Tensor, *, interpolation: float | Tensor) -> Tensor:
    # The student side of the target is detached: p_t is a moving target, only log p_S is trained.
    target = _log_probs((1 - interpolation) * s.detach().float() + interpolation * t.float())  # (..., V)
    return _kl(target, _log_probs(s))


def taid(
    student_logits: Tensor,
    teacher_logits: Tensor,
    mask: Tensor | None = None,
    *,
    interpolation: float | Tensor,
    chunk_size: int | None = None,
) -> Tensor:
    """TAID (Shing et al., ICLR 2025): ``KL(p_t ‖ p_S)`` with ``p_t = softmax((1−t)·stopgrad(z_S) + t·z_T)``.

    ``t`` (``interpolation``) is chosen by the caller: linear in training progress, or adaptive
    (:func:`taid_update`). At t = 1 this is forward KL at temperature 1.

    Args:
        student_logits, teacher_logits: (..., V).
        mask: (...) bool; None = all positions.
        interpolation: t in [0, 1], a float or a 0-d tensor.
        chunk_size: positions per block; None = all at once.
    Returns:
        float32 scalar.
    """
    return token_mean(
        _taid_tokens, student_logits, teacher_logits, mask, chunk_size=chunk_size, interpolation=interpolation
    )


def taid_update(
    t: Tensor,
    momentum: Tensor,
    prev_loss: Tensor,
    loss: Tensor,
    *,
    t_target: float,
    t_end: float,
    alpha: float,
    beta: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """One adaptive TAID step on 0-d float32 tensors (no CPU-GPU sync): returns the new (t, momentum,
    prev_loss).

    ``δ = (J_prev − J)/J_prev`` is the loss's relative improvement, ``m ← β·m + (1−β)·δ``, and
    ``t ← min(t_end, max(t_target, t + α·sigmoid(m)·(1 − t)))`` where ``t_target`` is the linear schedule's
    value: t moves fast while the student learns quickly and never lags the linear schedule. The first call
    (``prev_loss`` = inf) only records the loss, as in the authors' implementation.
    """
    first = torch.isinf(prev_loss)
    relative = (prev_loss - loss) / (prev_loss + 1e-15)
    new_momentum = beta * momentum + (1 - beta) * relative
    step = alpha * torch.sigmoid(new_momentum) * (1 - t)
    new_t = torch.clamp(torch.clamp(t + step, min=t_target), max=t_end)
    return (torch.where(first, t, new_t), torch.where(first, momentum, new_momentum), loss.detach().float())


def _tail_logmass(log_probs: Tensor, indices: Tensor) -> Tensor:
    """log of the probability outside ``indices``: (..., V), (..., k) → (...)."""
    return torch.logsumexp(log_probs.scatter(-1, indices, LOG_ZERO), dim=-1)


def topk_log_probs(
    student_logits: Tensor, teacher: Tensor | TopK, *, k: int, tail: bool, temperature: float = 1.0
) -> tuple[Tensor, Tensor]:
    """Student and teacher distributions restricted to the teacher's top-k tokens, as log-probabilities.

    Without ``tail`` both are renormalised over the k tokens; with ``tail`` one more entry holds the rest of
    the mass (the student's is the exact log-mass of its other tokens; the teacher's the cache's stored tail,
    or ``1 − Σ top-k`` when none is stored). Both rows sum to 1.

    Args:
        student_logits: (..., V).
        teacher: dense teacher logits (..., V) or a :class:`TopK` (at least k entries per position).
        k: tokens kept.
        tail: add the remaining-mass bucket (needs temperature 1).
        temperature: τ applied to both sides.
    Returns:
        (log_s, log_t), each (..., k) or (..., k + 1) float32.
    """
    t_tail: Tensor | None = None
    if isinstance(teacher, TopK):
        log_t, indices = teacher.logprobs.float(), teacher.indices  # (..., K)
        available = log_t.shape[-1]
        if available < k:
            raise ConfigError(
                f"Loss term 'topk' uses k={k}, but the teacher cache holds only the top "
                f"{available} tokens. Lower k or rebuild the cache."
            )
        dropped = None
        if available > k:
            keep = log_t.topk(k, dim=-1).indices  # (..., k)
            dropped = _tail_logmass(log_t, keep)  # mass of the K − k others
            log_t, indices = log_t.gather(-1, keep), indices.gather(-1, keep)
        log_t = log_t / temperature
        if tail:
            if teacher.tail_logmass is not None:
                t_tail = teacher.tail_logmass.float()
                if dropped is not None:
                    t_tail = torch.logaddexp(t_tail, dropped)
            else:
                covered = torch.logsumexp(log_t, dim=-1).clamp(max=0.0)
                t_tail = torch.log((-torch.expm1(covered)).clamp_min(1e-30))
    else:
        if teacher.shape[-1] < k:
            raise ConfigError(
                f"Loss term 'topk' uses k={k}, but the teacher has only {teacher.shape[-1]} classes. Lower k."
            )
        full_t = _log_probs(teacher, temperature)  # (..., V)
        indices = teacher.topk(k, dim=-1).indices  # (..., k)
        log_t = full_t.gather(-1, indices)
        if tail:
            t_tail = _tail_logmass(full_t, indices)
    full_s = _log_probs(student_logits, temperature)  # (..., V)
    log_s = full_s.gather(-1, indices)  # (..., k)
    if tail:
        log_s = torch.cat([log_s, _tail_logmass(full_s, indices).unsqueeze(-1)], dim=-1)
        log_t = torch.cat([log_t, t_tail.unsqueeze(-1)], dim=-1)
    # Renormalise: a no-op with the tail (up to rounding in a half-precision cache), the restriction without.
    return log_s - torch.logsumexp(log_s, -1, keepdim=True), log_t - torch.logsumexp(log_t, -1, keepdim=True)


def _dense_from_topk(teacher: TopK, temperature: float) -> Tensor:
    """A TopK that holds the whole vocabulary (k = V) as dense log-probabilities (..., V) at
    ``temperature``."""
    log_t = torch.empty_like(teacher.logprobs, dtype=torch.float32)
    log_t.scatter_(-1, teacher.indices, teacher.logprobs.float() / temperature)
    return log_t - torch.logsumexp(log_t, -1, keepdim=True)  # undo the cache's half-precision rounding


def _topk_tokens(
    s: Tensor, teacher: Tensor | TopK, *, k: int, divergence: str, tail: bool, temperature: float, beta: float
) -> Tensor:
    if isinstance(teacher, TopK) and k == s.shape[-1] == teacher.logprobs.shape[-1]:
        # The cache holds the full distribution: the dense divergence, no gathers and no tail bucket (it is
        # empty).
        log_t = _dense_from_topk(teacher, temperature)
        return _divergence(divergence, _log_probs(s, temperature), log_t, beta=beta) * _tau_squared(
            divergence, temperature
        )
    log_s, log_t = topk_log_probs(s, teacher, k=k, tail=tail, temperature=temperature)
    return _divergence(divergence, log_s, log_t, beta=beta) * _tau_squared(divergence, temperature)


def topk(
    student_logits: Tensor,
    teacher: Tensor | TopK,
    mask: Tensor | None = None,
    *,
    k: int = 64,
    divergence: str = "kd",
    tail: bool = True,
    temperature: float = 1.0,
    beta: float = 0.5,
    chunk_size: int | None = None,
) -> Tensor:
    """A divergence restricted to the teacher's top-k tokens (Sparse Logit Sampling / DistillKit / TRL).

    See :func:`topk_log_probs` for the restricted distributions. ``kd`` and ``reverse_kl`` keep their τ²
    factor, ``jsd`` and ``tvd`` are unscaled, so with k = V and no tail this equals the dense term.

    Args:
        student_logits: (..., V).
        teacher: dense teacher logits (..., V) or a sparse :class:`TopK` from the cache.
        mask: (...) bool; None = all positions.
        k: >= 1 tokens; divergence: kd | reverse_kl | jsd | tvd; tail: add the remaining-mass bucket;
        temperature: τ > 0 (1 with the tail); beta: jsd's teacher weight.
        chunk_size: positions per block; None = all at once.
    Returns:
        float32 scalar.
    """
    return token_mean(
        _topk_tokens,
        student_logits,
        teacher,
        mask,
        chunk_size=chunk_size,
        k=k,
        divergence=divergence,
        tail=tail,
        temperature=temperature,
        beta=beta,
    )


def _uld_tokens(s: Tensor, t: Tensor | TopK) -> Tensor:
    if isinstance(t, TopK):
        return _uld_sparse_tokens(s, t)
    p_s = _log_probs(s).exp().sort(dim=-1, descending=True).values  # (..., V_s)
    p_t = _log_probs(t).exp().sort(dim=-1, descending=True).values  # (..., V_t)
    width = max(p_s.shape[-1], p_t.shape[-1])
    p_s = F.pad(p_s, (0, width - p_s.shape[-1]))  # zeros for the shorter vocab
    p_t = F.pad(p_t, (0, width - p_t.shape[-1]))
    return (p_t - p_s).abs().sum(dim=-1)


def _sparse_teacher_probs(teacher: TopK) -> tuple[Tensor, Tensor]:
    """A cached teacher's top-k probabilities, sorted in decreasing order (..., k), and its tail mass (...).

    Both are rescaled so they sum to 1, which undoes the rounding of a half-precision cache. Without a stored
    tail the tail is ``1 − Σ top-k`` (at least 0).
    """
    p_t = teacher.logprobs.float().exp().sort(dim=-1, descending=True).values  # (..., k)
    covered = p_t.sum(dim=-1)  # (...)
    if teacher.tail_logmass is None:
        tail = (1 - covered).clamp_min(0)
    else:
        tail = teacher.tail_logmass.float().exp()
    total = (covered + tail).clamp_min(1e-30)
    return p_t / total.unsqueeze(-1), tail / total


def _uld_sparse_tokens(s: Tensor, teacher: TopK) -> Tensor:
    p_t, t_tail = _sparse_teacher_probs(teacher)  # (..., k), (...)
    k = p_t.shape[-1]
    log_s = _log_probs(s)  # (..., V_s)
    kept = min(k, log_s.shape[-1])
    top_s, top_index = log_s.topk(kept, dim=-1)  # (..., kept), descending
    s_tail = _tail_logmass(log_s, top_index).exp()  # (...), 0 when kept = V_s
    p_s = F.pad(top_s.exp(), (0, k - kept))  # zeros past a small vocab
    return (p_t - p_s).abs().sum(dim=-1) + (s_tail - t_tail).abs()


def uld(
    student_logits: Tensor,
    teacher: Tensor | TopK,
    mask: Tensor | None = None,
    *,
    chunk_size: int | None = None,
) -> Tensor:
    """Universal logit distillation (Boizard et al. 2024): ``Σ_i |p_T(i) − p_S(i)|`` over sorted
    probabilities.

    Each probability vector is sorted in decreasing order and the shorter one padded with zeros, so teacher
    and student may use different tokenizers (V_T ≠ V_S). Positions must already be aligned: for causal LMs
    with different tokenizers the trainer pairs positions that have read the same text (:mod:`.align`) and
    masks the rest.

    With a sparse teacher (a :class:`TopK` from the cache) only the teacher's k largest probabilities are
    known one by one; the rest is known only by its total, the tail mass ``T``. The loss is then
    ``Σ_{i<k} |p_T(i) − p_S(i)| + |Σ_{i≥k} p_S(i) − T|`` (sorted probabilities, the student's zero-padded to k
    when V_S < k). The first sum is exact; the tail term is the tight lower bound of the dense tail sum
    ``Σ_{i≥k} |p_T(i) − p_S(i)|`` given what the cache holds (triangle inequality; equal whenever the
    differences past rank k all have one sign, e.g. when one tail is a scaled copy of the other). So the
    sparse value never exceeds the dense one, grows with k, and equals it when the cache holds the whole
    vocabulary (k = V_T, where the tail is empty).

    Args:
        student_logits: (..., V_S).
        teacher: dense teacher logits (..., V_T) with the same leading shape, or a :class:`TopK` with
            logprobs (..., k) and, optionally, tail_logmass (...).
        mask: (...) bool; None = all positions.
        chunk_size: positions per block; None = all at once.
    Returns:
        float32 scalar in [0, 2].
    """
    teacher_shape = teacher.logprobs.shape if isinstance(teacher, TopK) else teacher.shape
    if student_logits.shape[:-1] != teacher_shape[:-1]:
        raise ConfigError(
            f"Loss term 'uld' needs aligned positions; student logits {tuple(student_logits.shape)}"
            f" vs teacher {tuple(teacher_shape)}."
        )
    return token_mean(_uld_tokens, student_logits, teacher, mask, chunk_size=chunk_size)


# --- feature terms ------------------------------------------------------------------------------------------


def layer_pairs(
    layer_map: str | Sequence[int], student_layers: int, teacher_layers: int
) -> list[tuple[int, int]]:
    """Which teacher layer each distilled student layer is matched with, as 1-based layer numbers.

    ``uniform``: student layer l ↦ teacher layer round(l · L_T / L_S) (TinyBERT's g(m) = m·N/M; the last
    layers always meet); ``last``: only the last layers; a list: entry i is the teacher layer for student
    layer i + 1.

    Raises:
        ConfigError: an explicit list of the wrong length or naming a layer the teacher does not have.
    """
    if layer_map == "last":
        return [(student_layers, teacher_layers)]
    if layer_map == "uniform":
        return [
            (layer, max(1, math.floor(layer * teacher_layers / student_layers + 0.5)))
            for layer in range(1, student_layers + 1)
        ]
    ids = list(layer_map)
    if len(ids) != student_layers:
        raise ConfigError(
            f"The layer map {ids} has {len(ids)} entries but the student has {student_layers} "
            "layers: give one teacher layer per student layer."
        )
    if any(not 1 <= i <= teacher_layers for i in ids):
        raise ConfigError(f"The layer map {ids} names a teacher layer outside 1..{teacher_layers}.")
    return list(zip(range(1, student_layers + 1), ids, strict=True))


def _project(h: Tensor, projection: nn.Module | None, target_width: int, term: str) -> Tensor:
    h = h.float()
    if projection is not None:
        return projection(h)
    if h.shape[-1] != target_width:
        raise ConfigError(
            f"Loss term '{term}' compares widths {h.shape[-1]} (student) and {target_width} "
            "(teacher) and needs a learned projection: build the term modules with the model dims."
        )
    return h


def _hidden_pairs(
    student_hidden: Sequence[Tensor],
    teacher_hidden: Sequence[Tensor],
    layer_map: Any,
    projections: Sequence[nn.Module | None] | None,
    term: str,
):
    pairs = layer_pairs(layer_map, len(student_hidden) - 1, len(teacher_hidden) - 1)
    if projections is not None and len(projections) != len(pairs):
        raise ConfigError(
            f"Loss term '{term}' has {len(projections)} projections for {len(pairs)} mapped layers."
        )
    for i, (ls, lt) in enumerate(pairs):
        h_t = teacher_hidden[lt].float()  # (B, T, H_t)
        h_s = _project(
            student_hidden[ls], None if projections is None else projections[i], h_t.shape[-1], term
        )
        if h_s.shape[:-1] != h_t.shape[:-1]:
            raise ConfigError(
                f"Loss term '{term}' needs the same tokens for teacher and student; got "
                f"{tuple(h_s.shape[:-1])} and {tuple(h_t.shape[:-1])}."
            )
        yield h_s, h_t


def hidden_mse(
    student_hidden: Sequence[Tensor],
    teacher_hidden: Sequence[Tensor],
    mask: Tensor | None = None,
    *,
    layer_map: str | Sequence[int] = "uniform",
    projections: Sequence[nn.Module | None] | None = None,
) -> Tensor:
    """FitNets / TinyBERT hidden-state loss: ``Σ_l MSE(W_l·h_S^l, h_T^{map(l)})``.

    Args:
        student_hidden, teacher_hidden: Hugging Face ``hidden_states``: (B, T, H) per layer, [0] = embeddings.
        mask: (B, T) bool, real tokens; None = all.
        layer_map: ``uniform`` | ``last`` | teacher layer per student layer (see :func:`layer_pairs`).
        projections: one module per mapped layer (H_S → H_T) or None for identity; required when widths
        differ.
    Returns:
        float32 scalar: per layer the mean over real tokens and hidden units, summed over mapped layers.
    """
    total = torch.zeros((), dtype=torch.float32, device=student_hidden[0].device)
    for h_s, h_t in _hidden_pairs(student_hidden, teacher_hidden, layer_map, projections, "hidden_mse"):
        total = total + _masked_mean((h_s - h_t).pow(2).mean(dim=-1), mask)  # (B, T) → ()
    return total


def hidden_cosine(
    student_hidden: Sequence[Tensor],
    teacher_hidden: Sequence[Tensor],
    mask: Tensor | None = None,
    *,
    layer_map: str | Sequence[int] = "last",
    projections: Sequence[nn.Module | None] | None = None,
) -> Tensor:
    """DistilBERT cosine loss: ``1 − cos(h_S, h_T)`` per token, mean over real tokens, summed over mapped
    layers.

    Args/Returns: as :func:`hidden_mse` (projections only when widths differ).
    """
    total = torch.zeros((), dtype=torch.float32, device=student_hidden[0].device)
    for h_s, h_t in _hidden_pairs(student_hidden, teacher_hidden, layer_map, projections, "hidden_cosine"):
        total = total + _masked_mean(1 - F.cosine_similarity(h_s, h_t, dim=-1, eps=1e-8), mask)
    return total


def _pair_mask(mask: Tensor | None, like: Tensor) -> Tensor:
    """(B, T) token mask → (B, 1, T, T) mask of (query, key) pairs that are both real tokens."""
    if mask is None:
        return torch.ones_like(like, dtype=torch.bool)
    return mask[:, None, :, None] & mask[:, None, None, :]


def _attention_map_mse(
    student_maps: Sequence[Tensor],
    teacher_maps: Sequence[Tensor],
    mask: Tensor | None,
    layer_map: str | Sequence[int],
    term: str,
) -> Tensor:
    """Σ over mapped layers of the MSE between (B, heads, T, T) maps, over heads and real (query, key)
    pairs."""
    total = torch.zeros((), dtype=torch.float32, device=student_maps[0].device)
    for ls, lt in layer_pairs(layer_map, len(student_maps), len(teacher_maps)):
        a_s, a_t = student_maps[ls - 1].float(), teacher_maps[lt - 1].float()  # (B, h, T, T)
        if a_s.shape != a_t.shape:
            raise ConfigError(
                f"Loss term '{term}' needs attention maps of the same shape (heads, tokens); "
                f"got {tuple(a_s.shape)} (student) and {tuple(a_t.shape)} (teacher)."
            )
        pairs = _pair_mask(mask, a_s[:, :1]).expand_as(a_s)
        total = total + _masked_mean((a_s - a_t).pow(2), pairs)
    return total


def attention_mse(
    student_scores: Sequence[Tensor],
    teacher_scores: Sequence[Tensor],
    mask: Tensor | None = None,
    *,
    layer_map: str | Sequence[int] = "uniform",
) -> Tensor:
    """TinyBERT attention loss (Jiao et al. 2020, eq. 7): MSE between the pre-softmax attention scores
    ``Q·Kᵀ/√d`` of mapped layers (same number of heads), before the padding mask and the softmax.

    Args:
        student_scores, teacher_scores: (B, heads, T, T) per layer ([0] = first layer), from
            :mod:`workers.engine.attention`.
        mask: (B, T) bool, real tokens; pairs with a padded query or key do not count (TinyBERT zeroes them).
        layer_map: as :func:`hidden_mse`.
    Returns:
        float32 scalar: per layer the mean over heads and real (query, key) pairs, summed over layers.
    """
    return _attention_map_mse(student_scores, teacher_scores, mask, layer_map, "attention_mse")


def attention_prob_mse(
    student_attentions: Sequence[Tensor],
    teacher_attentions: Sequence[Tensor],
    mask: Tensor | None = None,
    *,
    layer_map: str | Sequence[int] = "uniform",
) -> Tensor:
    """MSE between the post-softmax attention probabilities of mapped layers (same number of heads): the
    variant of TinyBERT's loss on the maps ``output_attentions`` returns (what ``attention_mse`` computed
    before it fitted the scores).

    Args:
        student_attentions, teacher_attentions: (B, heads, T, T) probabilities per layer ([0] = first layer).
        mask: (B, T) bool, real tokens; pairs with a padded query or key do not count.
        layer_map: as :func:`hidden_mse`.
    Returns:
        float32 scalar: per layer the mean over heads and real (query, key) pairs, summed over layers.
    """
    return _attention_map_mse(student_attentions, teacher_attentions, mask, layer_map, "attention_prob_mse")


def _row_kl(p: Tensor, q: Tensor) -> Tensor:
    """KL(p‖q) over the last dim for probability tensors (0·log 0 = 0; q floored to keep it finite)."""
    return (torch.xlogy(p, p) - p * torch.log(q.clamp_min(1e-30))).sum(dim=-1)


def _value_relation(values: Tensor, mask: Tensor | None) -> Tensor:
    """MiniLM value relation ``softmax(V·Vᵀ/√d)`` over real keys: (B, h, T, d) → (B, h, T, T)."""
    v = values.float()
    scores = v @ v.transpose(-1, -2) / math.sqrt(v.shape[-1])
    if mask is not None:
        scores = scores.masked_fill(~mask[:, None, None, :], LOG_ZERO)
    return scores.softmax(dim=-1)


def attention_kl(
    student_attention: Tensor,
    teacher_attention: Tensor,
    student_values: Tensor,
    teacher_values: Tensor,
    mask: Tensor | None = None,
) -> Tensor:
    """MiniLM (Wang et al. 2020): ``KL(A_T ‖ A_S) + KL(VR_T ‖ VR_S)`` on the last layer.

    ``A`` are the self-attention distributions, ``VR = softmax(V·Vᵀ/√d)`` the value relations (the head
    widths d may differ; the head counts must match). Each KL is per (head, query) row over the keys, averaged
    over heads and real query tokens; padded keys are ignored.

    Args:
        student_attention, teacher_attention: (B, heads, T, T) last-layer attention probabilities.
        student_values, teacher_values: (B, heads, T, d) last-layer value vectors.
        mask: (B, T) bool, real tokens; None = all.
    Returns:
        float32 scalar.
    """
    if (
        student_attention.shape != teacher_attention.shape
        or student_values.shape[:3] != teacher_values.shape[:3]
    ):
        raise ConfigError(
            "Loss term 'attention_kl' needs the same number of heads and tokens for teacher and "
            f"student; got attentions {tuple(student_attention.shape)} and "
            f"{tuple(teacher_attention.shape)}."
        )
    a_s, a_t = student_attention.float(), teacher_attention.float()  # (B, h, T, T)
    if mask is not None:
        keys = mask[:, None, None, :]
        a_s, a_t = a_s.masked_fill(~keys, 0.0), a_t.masked_fill(~keys, 0.0)
    per_row = _row_kl(a_t, a_s) + _row_kl(
        _value_relation(teacher_values, mask), _value_relation(student_values, mask)
    )  # (B, h, T)
    rows = None if mask is None else mask[:, None, :].expand_as(per_row)
    return _masked_mean(per_row, rows)


def pool(hidden: Tensor, mask: Tensor | None, pooling: str) -> Tensor:
    """Sentence embedding from token states: (B, T, H) → (B, H); ``mean`` over real tokens, ``cls`` (first
    token) or ``last`` (last real token, right padding)."""
    h = hidden.float()
    if mask is None:
        mask = torch.ones(h.shape[:2], dtype=torch.bool, device=h.device)
    if pooling == "mean":
        m = mask.unsqueeze(-1).to(h.dtype)
        return (h * m).sum(dim=1) / m.sum(dim=1).clamp_min(1)
    if pooling == "cls":
        return h[:, 0]
    if pooling == "last":
        last = (mask.long().sum(dim=1) - 1).clamp_min(0)  # (B,)
        return h[torch.arange(h.shape[0], device=h.device), last]
    raise ConfigError(f"Unknown pooling '{pooling}'. Use one of: {', '.join(POOLINGS)}.")


def embedding_mse(
    student_embedding: Tensor,
    teacher_embedding: Tensor,
    mask: Tensor | None = None,
    *,
    pooling: str = "mean",
    projection: nn.Module | None = None,
) -> Tensor:
    """Sentence-embedding distillation (Reimers & Gurevych 2020): ``MSE(P·e_S, e_T)``.

    Args:
        student_embedding, teacher_embedding: pooled (B, D) embeddings, or token states (B, T, H) that are
            pooled here with ``pooling`` and ``mask``.
        mask: (B, T) bool real tokens, used for pooling only.
        pooling: mean | cls | last.
        projection: D_S → D_T module, required when the widths differ.
    Returns:
        float32 scalar: mean over examples and embedding dimensions.
    """
    e_s = pool(student_embedding, mask, pooling) if student_embedding.dim() == 3 else student_embedding
    e_t = (
        pool(teacher_embedding, mask, pooling) if teacher_embedding.dim() == 3 else teacher_embedding.float()
    )
    e_s = _project(e_s, projection, e_t.shape[-1], "embedding_mse")
    return (e_s - e_t.float()).pow(2).mean()


# --- registry -----------------------------------------------------------------------------------------------

# The function computing each catalogue entry (workers.engine.terms); its ``kind`` says how it is called.
_FUNCTIONS: dict[str, Callable[..., Tensor]] = {
    "ce": ce,
    "kd": kd,
    "reverse_kl": reverse_kl,
    "jsd": jsd,
    "skew_kl": skew_kl,
    "skew_reverse_kl": skew_reverse_kl,
    "tvd": tvd,
    "taid": taid,
    "topk": topk,
    "uld": uld,
    "hidden_mse": hidden_mse,
    "hidden_cosine": hidden_cosine,
    "attention_mse": attention_mse,
    "attention_prob_mse": attention_prob_mse,
    "attention_kl": attention_kl,
    "embedding_mse": embedding_mse,
}
if _FUNCTIONS.keys() != CATALOGUE.keys():
    raise RuntimeError(f"losses binds {sorted(_FUNCTIONS)}, but the catalogue has {sorted(CATALOGUE)}.")

# The catalogue's entries with their functions bound: what methods.combine computes.
LOSS_TERMS: dict[str, TermSpec] = {
    name: replace(spec, fn=_FUNCTIONS[name]) for name, spec in CATALOGUE.items()
}


class LossParts(NamedTuple):
    """``total`` carries the gradient; ``parts`` holds each term's detached, unweighted value by name;
    ``weights`` each term's weight at this step (schedules applied; Python floats, safe to log)."""

    total: Tensor
    parts: dict[str, Tensor]
    weights: Mapping[str, float] = MappingProxyType({})


def combine_terms(
    terms: Sequence[LossTermConfig], student_logits: Tensor, teacher_logits: Tensor | None, labels: Tensor
) -> LossParts:
    """Weighted sum of a recipe's logit terms (the pre-``methods.combine`` entry point; no schedules).

    Teacher terms see every classification row, labelled or not: there ``-100`` means "unlabelled" and
    the teacher's distribution is still a target (transfer set). For sequences (``student_logits.dim() > 2``)
    ``-100`` marks padding/prompt positions, which no term may use.

    Args:
        terms: validated terms (see ``terms.validate_terms``).
        student_logits: (B, V) or (B, T, V).
        teacher_logits: same shape as ``student_logits``, or None when no term needs a teacher.
        labels: (B,) or (B, T); -100 = no label.
    Returns:
        LossParts(total: float32 scalar, parts: {term name: detached float32 scalar}, weights).
    """
    mask = labels != IGNORE_INDEX if student_logits.dim() > 2 else None
    total = student_logits.new_zeros((), dtype=torch.float32)
    parts: dict[str, Tensor] = {}
    for term in terms:
        spec = LOSS_TERMS.get(term.name)
        if spec is None:
            raise ConfigError(f"Unknown loss term '{term.name}'. Available terms: {', '.join(LOSS_TERMS)}.")
        if spec.kind not in ("labels", "logits"):
            raise ConfigError(
                f"Loss term '{term.name}' needs more than logits; train it with methods.combine."
            )
        if spec.needs_teacher:
            if teacher_logits is None:
                raise ConfigError(
                    f"Loss term '{term.name}' needs a teacher, but there are no teacher logits."
                )
            value = spec.fn(student_logits, teacher_logits, mask, **term.params)
        else:
            value = spec.fn(student_logits, labels, **term.params)
        total = total + term.weight * value
        parts[term.name] = value.detach()
    return LossParts(total=total, parts=parts, weights={t.name: t.weight for t in terms})
