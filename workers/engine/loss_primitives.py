"""What the distillation loss terms share: masked means, divergences, the sparse teacher and token chunking.

Shapes: logits are ``(..., V)``: ``(B, V)`` for classification, ``(B, T, V)`` for causal LMs. An optional
boolean ``mask`` of shape ``(...)`` marks the positions that count (``None`` = all). Every term returns the
mean over valid positions as a float32 scalar; with no valid position it returns 0 (never NaN) and its
gradient is 0. Softmaxes run in float32 whatever the input dtype (see METHODS.md). ``KL(a‖b) = Σ a·(log a −
log b)``; ``p^τ = softmax(z / τ)``. Token-level terms are written as a per-position function plus a public
wrapper that averages it over the mask through :func:`token_mean`; with ``chunk_size`` that goes through
:func:`chunked_token_loss`, which never holds more than ``chunk_size`` positions' float32 softmaxes at once,
in the forward or the backward. :class:`TopK` is the sparse teacher the LM teacher-output cache stores.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from .errors import ConfigError
from .terms import DIVERGENCES

# --- helpers ------------------------------------------------------------------------------------------------


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


class _ChunkedTokenMeans(torch.autograd.Function):
    """Several masked means of per-position losses computed together, block by block, and their weighted sum.

    As :class:`_ChunkedTokenMean`, for a ``per_token`` that returns several per-position values from one pass
    over a block (terms sharing the student's softmax): the forward keeps the gradient of the weighted sum
    (the weights are known then), one logits-sized buffer for all the terms. Outputs: the weighted sum (with
    the gradient) and each mean (without).
    """

    @staticmethod
    def forward(ctx, logits, per_token, targets, masks, weights, chunk_size):
        want_grad = ctx.needs_input_grad[0]
        grad = torch.zeros_like(logits, memory_format=torch.contiguous_format) if want_grad else None
        counts = [mask.sum().clamp_min(1).to(torch.float32) for mask in masks]
        parts = [torch.zeros((), dtype=torch.float32, device=logits.device) for _ in masks]

        def means(rows: Tensor, index: tuple) -> list[Tensor]:
            values = per_token(rows, *[_take(target, index) for target in targets])
            return [
                torch.where(mask[index], v, 0.0).sum() / count
                for v, mask, count in zip(values, masks, counts, strict=True)
            ]

        for index in _chunk_indices(logits.shape[:-1], chunk_size):
            if want_grad:
                with torch.enable_grad():
                    x = logits[index].detach().requires_grad_()
                    values = means(x, index)
                    weighted = sum(w * v for w, v in zip(weights, values, strict=True))
                    (g,) = torch.autograd.grad(weighted, x)
                grad[index] = g
            else:
                values = means(logits[index], index)
            for part, value in zip(parts, values, strict=True):
                part += value.detach()
        ctx.grad = grad
        total = sum(w * part for w, part in zip(weights, parts, strict=True))
        ctx.mark_non_differentiable(*parts)
        return (total, *parts)

    @staticmethod
    def backward(ctx, grad_output: Tensor, *_parts: Tensor):
        grad = ctx.grad
        if grad is None:
            raise RuntimeError("chunked_token_means supports a single backward pass.")
        ctx.grad = None
        return grad.mul_(grad_output.to(grad.dtype)), None, None, None, None, None


def token_means(
    per_token: Callable[..., tuple[Tensor, ...]],
    student_logits: Tensor,
    targets: Sequence[Any],
    masks: Sequence[Tensor | None],
    weights: Sequence[float | Tensor],
    *,
    chunk_size: int | None = None,
) -> tuple[Tensor, list[Tensor]]:
    """Masked means of several per-position losses that ``per_token(student_rows, *target_rows)`` returns
    together, and their weighted sum.

    Equal to ``Σ_i weights[i]·_masked_mean(per_token(...)[i], masks[i])``; with ``chunk_size`` smaller than
    the number of positions the blocks go through one chunked pass (:class:`_ChunkedTokenMeans`), the weights
    applied to the gradient in the forward.

    Returns:
        (total: float32 scalar with the gradient, [each mean, detached]).
    """
    every = torch.ones(student_logits.shape[:-1], dtype=torch.bool, device=student_logits.device)
    masks = [every if m is None else m for m in masks]
    positions = math.prod(student_logits.shape[:-1])
    if chunk_size is None or chunk_size >= positions:
        means = [_masked_mean(v, m) for v, m in zip(per_token(student_logits, *targets), masks, strict=True)]
        total = sum(w * m for w, m in zip(weights, means, strict=True))
        return total, [m.detach() for m in means]
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    total, *parts = _ChunkedTokenMeans.apply(
        student_logits, per_token, tuple(targets), tuple(masks), tuple(weights), chunk_size
    )
    return total, parts


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
