"""Output (logit) loss terms: cross-entropy on the labels and the divergences between two distributions.

``ce``, ``kd`` (Hinton et al.), ``reverse_kl``, ``jsd`` (generalised, with β), ``skew_kl``,
``skew_reverse_kl``, ``tvd`` and ``taid`` (with :func:`taid_update`, its adaptive interpolation) compare the
student's softened distribution with a dense teacher's at the same positions. Each is a per-position function
averaged over the mask by :func:`.loss_primitives.token_mean`, so every token-level term accepts
``chunk_size`` and never holds more than that many positions' float32 softmaxes at once.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .loss_primitives import (
    IGNORE_INDEX,
    _divergence,
    _kl,
    _log_probs,
    _mix_log,
    token_mean,
)


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
