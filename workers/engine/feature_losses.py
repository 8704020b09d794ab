"""Feature loss terms: the student's hidden states, attentions, values and embeddings against the teacher's.

``hidden_mse`` and ``hidden_cosine`` compare mapped layers (:func:`layer_pairs`) through a learned projection
when the widths differ; ``attention_mse`` (pre-softmax scores), ``attention_prob_mse`` (post-softmax maps)
and ``attention_kl`` (attention and value relations, MiniLM) compare attention on real (query, key) pairs;
``embedding_mse`` compares pooled sentence embeddings (:func:`pool`). They are computed once per batch, with
no token chunking.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .errors import ConfigError
from .loss_primitives import (
    LOG_ZERO,
    _masked_mean,
)
from .terms import POOLINGS


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
