"""Loss terms that read a sparse (top-k) teacher or a teacher with another vocabulary: ``topk`` and ``uld``.

``topk`` compares the student with the teacher's top-k log-probabilities from the LM teacher-output cache
(:class:`.loss_primitives.TopK`), with the tail mass outside the top k as one more outcome
(:func:`topk_log_probs`); ``uld`` (universal logit distillation) compares sorted probabilities, so teacher
and student may use different tokenizers, exactly with a dense teacher and as a tight lower bound with a
sparse one. Both are token-level terms averaged over the mask, chunked like the logit terms.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor

from .errors import ConfigError
from .loss_primitives import (
    IGNORE_INDEX,
    LOG_ZERO,
    TopK,
    _divergence,
    _log_probs,
    _tau_squared,
    token_mean,
    token_means,
)


def _tail_logmass(log_probs: Tensor, indices: Tensor) -> Tensor:
    """log of the probability outside ``indices``: (..., V), (..., k) → (...)."""
    return torch.logsumexp(log_probs.scatter(-1, indices, LOG_ZERO), dim=-1)


# Below these probabilities float32 loses digits (values under 1e-38 are denormal, then 0): a row whose tail
# mass (a sum of up to ~2.5e5 such values), or one of whose kept tokens, is that small is computed in log
# space, exactly, instead.
_TINY = 1e-25


class _StudentTopK(torch.autograd.Function):
    """The student's log-probabilities at ``indices``, of the tail (every other token) and, optionally, of one
    more token per position (the label), from raw logits.

    Equal to gathering ``log_softmax(z)`` at ``indices`` (and at ``labels``) and taking :func:`_tail_logmass`
    of it, with fewer passes over the vocabulary: one fused softmax (on a contiguous copy: the softmax kernels
    are far slower on the shifted, strided logits), one sum for the tail after zeroing the kept entries (so no
    ``1 − Σ`` cancellation); the backward turns the probabilities into the gradient in place (``p_j·c`` per
    row, the k kept entries overwritten, the label's ``+g`` added). A top-k term then costs about what a
    cross-entropy does, and a cross-entropy on the same logits (``−log p_label``) adds only a gather and one
    scattered entry. ``indices`` must be distinct within a row (a top-k always is); the label may be one of
    them. Rows with a kept probability, the label's or a tail mass below ``_TINY`` are computed in log space
    (exact where float32 probabilities would lose digits). One backward pass (the gradient reuses the saved
    probabilities; autograd refuses a second).
    """

    @staticmethod
    def forward(
        ctx, z: Tensor, indices: Tensor, with_tail: bool, labels: Tensor | None = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        probs = torch.softmax(z.contiguous(), dim=-1)  # (..., V)
        kept = probs.gather(-1, indices)  # (..., k)
        log_k = kept.log()
        small = kept.amin(-1) < _TINY  # (...)
        if labels is not None:
            at_label = probs.gather(-1, labels.unsqueeze(-1)).squeeze(-1)  # (...)
            log_label = at_label.log()
            small |= at_label < _TINY
        else:
            log_label = log_k.new_zeros(log_k.shape[:-1])
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
            if labels is not None:
                log_label[tiny] = exact.gather(-1, labels[tiny].unsqueeze(-1)).squeeze(-1)
            if with_tail:
                log_tail[tiny] = _tail_logmass(exact, indices[tiny])
        ctx.with_tail = with_tail
        ctx.save_for_backward(z, indices, probs, log_k, log_tail, tiny, labels)
        return log_k, log_tail, log_label

    @staticmethod
    def backward(
        ctx, grad_k: Tensor, grad_tail: Tensor, grad_label: Tensor
    ) -> tuple[Tensor, None, None, None]:
        z, indices, probs, log_k, log_tail, tiny, labels = ctx.saved_tensors
        total = grad_k.sum(-1, keepdim=True)  # (..., 1)
        if labels is not None:
            total = total + grad_label.unsqueeze(-1)  # d log p_label / dz_j = δ_j,label − p_j
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
        if labels is not None:
            grad.scatter_add_(-1, labels.unsqueeze(-1), grad_label.unsqueeze(-1))
        return grad, None, None, None


def _student_log_probs(
    student_logits: Tensor, indices: Tensor, *, tail: bool, temperature: float | Tensor
) -> Tensor:
    """The student's log-probabilities at ``indices`` (..., k), plus the tail's as entry k with ``tail``."""
    z = student_logits.float()
    if not (isinstance(temperature, int | float) and temperature == 1):
        z = z / temperature
    log_s, log_tail, _ = _StudentTopK.apply(z, indices, tail)
    return torch.cat([log_s, log_tail.unsqueeze(-1)], dim=-1) if tail else log_s


def _teacher_log_probs(
    teacher: Tensor | TopK, *, k: int, tail: bool, temperature: float = 1.0
) -> tuple[Tensor, Tensor]:
    """The teacher side of :func:`topk_log_probs`: its log-probabilities at its top-k tokens (plus the tail's
    as entry k with ``tail``), not yet renormalised, and the token ids (..., k)."""
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
    if tail:
        log_t = torch.cat([log_t, t_tail.unsqueeze(-1)], dim=-1)
    return log_t, indices


def _renormalised(log_p: Tensor) -> Tensor:
    # A no-op with the tail (up to rounding in a half-precision cache), the restriction without.
    return log_p - torch.logsumexp(log_p, -1, keepdim=True)


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
    log_t, indices = _teacher_log_probs(teacher, k=k, tail=tail, temperature=temperature)
    log_s = _student_log_probs(student_logits, indices, tail=tail, temperature=temperature)  # (..., k [+ 1])
    return _renormalised(log_s), _renormalised(log_t)


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


def _ce_topk_tokens(
    s: Tensor, labels: Tensor, teacher: Tensor | TopK, *, k: int, divergence: str, tail: bool, beta: float
) -> tuple[Tensor, Tensor]:
    """Per position: the cross-entropy with ``labels`` (any value at -100, masked later) and the top-k term at
    τ = 1, from one student softmax (:class:`_StudentTopK` with the label as one more gathered token)."""
    log_t, indices = _teacher_log_probs(teacher, k=k, tail=tail)
    log_k, log_tail, log_label = _StudentTopK.apply(s.float(), indices, tail, labels.clamp_min(0))
    log_s = torch.cat([log_k, log_tail.unsqueeze(-1)], dim=-1) if tail else log_k
    return -log_label, _divergence(divergence, _renormalised(log_s), _renormalised(log_t), beta=beta)


def ce_topk(
    student_logits: Tensor,
    labels: Tensor,
    teacher: Tensor | TopK,
    mask: Tensor | None = None,
    *,
    ce_weight: float | Tensor = 1.0,
    topk_weight: float | Tensor = 1.0,
    k: int = 64,
    divergence: str = "kd",
    tail: bool = True,
    beta: float = 0.5,
    chunk_size: int | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """``ce_weight·ce(student_logits, labels) + topk_weight·topk(student_logits, teacher, mask)`` at τ = 1
    (ce without label smoothing), both terms from one student softmax and one gradient buffer.

    Equal to the two terms computed apart (values and gradient), at about the cost of one of them: the label's
    ``−log p`` is one more gathered entry of the top-k term's softmax, its gradient one more scattered entry.
    ``ce`` averages over the labelled positions (``labels != -100``), ``topk`` over ``mask`` (for
    classification None: every row, unlabelled ones too). Not for a cache holding the whole vocabulary
    (k = V), which :func:`topk` computes densely.

    Returns:
        (the weighted sum, float32 scalar with the gradient; ce's value; topk's value), the values detached.
    """
    if labels.shape != student_logits.shape[:-1]:
        raise ConfigError(
            f"Labels {tuple(labels.shape)} do not match the logits' positions "
            f"{tuple(student_logits.shape[:-1])}."
        )
    total, (ce_value, topk_value) = token_means(
        functools.partial(_ce_topk_tokens, k=k, divergence=divergence, tail=tail, beta=beta),
        student_logits,
        (labels, teacher),
        (labels != IGNORE_INDEX, mask),
        (ce_weight, topk_weight),
        chunk_size=chunk_size,
    )
    return total, ce_value, topk_value


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
