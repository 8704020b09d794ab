"""Pre-softmax attention scores for the TinyBERT attention loss: an eager attention path that records them.

Hugging Face models return attention *probabilities* (``output_attentions``); TinyBERT (Jiao et al. 2020, eq.
7) fits the student's attention *scores* ``Q·Kᵀ/√d`` (before the mask and the softmax) to the teacher's.
   Models whose
attention layers dispatch through transformers' ``AttentionInterface`` (BERT, RoBERTa, DistilBERT, GPT-2,
Llama, Qwen2, ...) are switched to :data:`SCORES_ATTENTION`: the eager computation (``softmax(Q·Kᵀ·scaling +
mask)·V``, returning the probabilities as usual, so ``output_attentions`` and the post-softmax terms are
unchanged), which also appends each layer's ``Q·Kᵀ·scaling`` to the list opened by :func:`capture_scores`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextvars import ContextVar
from typing import Any

import torch
from torch import Tensor, nn

from .errors import ConfigError

SCORES_ATTENTION = "distillweb_eager_scores"
_SINK: ContextVar[list[Tensor] | None] = ContextVar("distillweb_attention_scores", default=None)
# Eager variants this path does not reproduce: their scores are not plain Q·Kᵀ·scaling.
_UNSUPPORTED_KWARGS = ("softcap", "s_aux", "sinks")


def eager_attention_with_scores(
    module: nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[Tensor, Tensor]:
    """Eager attention (as transformers' own ``eager_attention_forward``), recording the pre-softmax scores.

    Args:
        query: (B, h, T, d); key, value: (B, h_kv, S, d) (grouped-query attention repeats them to h heads);
        attention_mask: additive (B, 1, T, S) float mask or None.
    Returns:
        the attention output (B, T, h, d) and the probabilities (B, h, T, S).
    """
    if any(kwargs.get(name) is not None for name in _UNSUPPORTED_KWARGS):
        raise ConfigError(
            f"{type(module).__name__} changes its attention scores (soft-capping or sinks), so its "
            "pre-softmax scores cannot be compared; use attention_prob_mse or attention_kl."
        )
    groups = query.shape[1] // key.shape[1]
    if groups > 1:
        key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling  # (B, h, T, S)
    sink = _SINK.get()
    if sink is not None:
        sink.append(scores)
    weights = scores if attention_mask is None else scores + attention_mask[:, :, :, : key.shape[-2]]
    weights = torch.softmax(weights, dim=-1, dtype=torch.float32).to(query.dtype)
    weights = nn.functional.dropout(weights, p=dropout, training=module.training)
    output = torch.matmul(weights, value).transpose(1, 2).contiguous()  # (B, T, h, d)
    return output, weights


def register() -> None:
    """Make :data:`SCORES_ATTENTION` a valid ``attn_implementation`` (with the eager mask). Idempotent."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    AttentionInterface.register(SCORES_ATTENTION, eager_attention_with_scores)
    AttentionMaskInterface.register(SCORES_ATTENTION, eager_mask)


def use_scores_attention(model: nn.Module) -> None:
    """Switch a transformers model to the eager path that records scores.

    Raises:
        ConfigError: the model has no switchable attention (e.g. a builtin MLP).
    """
    if not hasattr(model, "set_attn_implementation"):
        raise ConfigError(
            f"{type(model).__name__} has no attention layers to read scores from; attention_mse "
            "needs transformers models (BERT, GPT-2, Llama, ...)."
        )
    register()
    model.set_attn_implementation(SCORES_ATTENTION)


@contextlib.contextmanager
def capture_scores() -> Iterator[list[Tensor]]:
    """Collect the pre-softmax scores (B, h, T, S) of every attention layer run inside the block, in order."""
    scores: list[Tensor] = []
    token = _SINK.set(scores)
    try:
        yield scores
    finally:
        _SINK.reset(token)
