"""Loss terms that read a sparse (top-k) teacher or a teacher with another vocabulary: ``topk`` and ``uld``.

``topk`` compares the student with the teacher's top-k log-probabilities from the LM teacher-output cache
(:class:`.loss_primitives.TopK`), with the tail mass outside the top k as one more outcome
(:func:`topk_log_probs`); ``uld`` (universal logit distillation) compares sorted probabilities, so teacher
and student may use different tokenizers, exactly with a dense teacher and as a tight lower bound with a
sparse one. Both are token-level terms averaged over the mask, chunked like the logit terms.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .errors import ConfigError
from .loss_primitives import (
    LOG_ZERO,
    TopK,
    _divergence,
    _log_probs,
    _tau_squared,
    token_mean,
)


def _tail_logmass(log_probs: Tensor, indices: Tensor) -> Tensor:
    """log of the probability outside ``indices``: (..., V), (..., k) → (...)."""
    return torch.logsumexp(log_probs.scatter(-1, indices, LOG_ZERO), dim=-1)


# Below these probabilities float32 loses digits (values under 1e-38 are denormal, then 0): a row whose tail
# mass (a sum of up to ~2.5e5 such values), or one of whose kept tokens, is that small is computed in log
# space, exactly, instead.
_TINY = 1e-25


class _StudentTopK(torch.autograd.Function):
    """The student's log-probabilities at ``indices`` and of the tail (every other token), from raw logits.

    Equal to gathering ``log_softmax(z)`` at ``indices`` and taking :func:`_tail_logmass` of it, with fewer
    passes over the vocabulary: one fused softmax (on a contiguous copy: the softmax kernels are far slower on
    the shifted, strided logits), one sum for the tail after zeroing the kept entries (so no ``1 − Σ``
    cancellation); the backward turns the probabilities into the gradient in place (``p_j·c`` per row, the
    k kept entries overwritten). A top-k term then costs about what a cross-entropy does. ``indices`` must be
    distinct within a row (a top-k always is). Rows with a kept probability or a tail mass below ``_TINY``
    are computed in log space (exact where float32 probabilities would lose digits). One backward pass (the
    gradient reuses the saved probabilities; autograd refuses a second).
    """

    @staticmethod
    def forward(ctx, z: Tensor, indices: Tensor, with_tail: bool) -> tuple[Tensor, Tensor]:
        probs = torch.softmax(z.contiguous(), dim=-1)  # (..., V)
        kept = probs.gather(-1, indices)  # (..., k)
        log_k = kept.log()
        small = kept.amin(-1) < _TINY  # (...)
        if with_tail:
            probs.scatter_(-1, indices, 0.0)  # the mass of every other token, summed without cancellation
            tail = probs.sum(-1)  # (...)
            log_tail = tail.log()
            small |= tail < _TINY
        else:
            log_tail = log_k.new_zeros(log_k.shape[:-1])
        tiny = small if bool(small.any()) else None
        if tiny is not None:
            exact = torch.log_softmax(z[tiny], dim=-1)
            log_k[tiny] = exact.gather(-1, indices[tiny])
            if with_tail:
                log_tail[tiny] = _tail_logmass(exact, indices[tiny])
        ctx.with_tail = with_tail
        ctx.save_for_backward(z, indices, probs, log_k, log_tail, tiny)
        return log_k, log_tail

    @staticmethod
    def backward(ctx, grad_k: Tensor, grad_tail: Tensor) -> tuple[Tensor, None, None]:
        z, indices, probs, log_k, log_tail, tiny = ctx.saved_tensors
        total = grad_k.sum(-1, keepdim=True)  # (..., 1)
        if ctx.with_tail:
            g_tail = grad_tail.unsqueeze(-1)
            total = total + g_tail
            # any other token j: g_tail·p_j/T − total·p_j (T the tail mass); the kept ones are set below
            grad = probs.mul_(g_tail * (-log_tail).exp().unsqueeze(-1) - total)
        else:
            grad = probs.mul_(-total)
        if tiny is not None:
            log_p = torch.log_softmax(z[tiny], dim=-1)
            rows = -log_p.exp() * total[tiny]
            if ctx.with_tail:
                rows += (log_p - log_tail[tiny].unsqueeze(-1)).exp() * g_tail[tiny]
            grad[tiny] = rows
        grad.scatter_(-1, indices, grad_k - log_k.exp() * total)
        return grad, None, None


def _student_log_probs(
    student_logits: Tensor, indices: Tensor, *, tail: bool, temperature: float | Tensor
) -> Tensor:
    """The student's log-probabilities at ``indices`` (..., k), plus the tail's as entry k with ``tail``."""
    z = student_logits.float()
    if not (isinstance(temperature, int | float) and temperature == 1):
        z = z / temperature
    log_s, log_tail = _StudentTopK.apply(z, indices, tail)
    return torch.cat([log_s, log_tail.unsqueeze(-1)], dim=-1) if tail else log_s


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
    log_s = _student_log_probs(student_logits, indices, tail=tail, temperature=temperature)  # (..., k [+ 1])
    if tail:
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
