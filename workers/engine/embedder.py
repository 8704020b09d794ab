"""Sentence embeddings: a transformers encoder wrapped so that it returns one mean-pooled vector per text.

:class:`SentenceEmbedder` is the student or teacher of an ``embedding`` run: ``AutoModel`` with mean pooling
over real tokens (:func:`mean_pool`) and, when the sentence-transformers folder it came from normalises
(:func:`st_normalizes`), L2 normalisation; asked for hidden states or attentions it returns an
:class:`EmbeddingOutput`. It saves as the encoder it wraps, so a saved embedder loads back as a plain
transformers folder.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn


def mean_pool(hidden: Tensor, attention_mask: Tensor | None) -> Tensor:
    """Average token vectors over real tokens only.

    Args:
        hidden: (B, T, D) token vectors.
        attention_mask: (B, T), 1 = real token, 0 = padding; None = every token is real.
    Returns:
        (B, D) in ``hidden``'s dtype (summed in float32); a row without real tokens gives zeros, never NaN.
    """
    if attention_mask is None:
        return hidden.float().mean(dim=1).to(hidden.dtype)
    mask = attention_mask.to(torch.float32).unsqueeze(-1)  # (B, T, 1)
    summed = (hidden.float() * mask).sum(dim=1)  # (B, D)
    return (summed / mask.sum(dim=1).clamp_min(1.0)).to(hidden.dtype)


@dataclass
class EmbeddingOutput:
    """What :class:`SentenceEmbedder` returns when hidden states or attentions are asked for.

    ``logits`` is the embedding too, so code written for ``out.logits`` (e.g. :func:`forward_logits`) works.
    """

    embeddings: Tensor  # (B, D)
    last_hidden_state: Tensor  # (B, T, D)
    hidden_states: tuple[Tensor, ...] | None = None  # (B, T, D) per layer, [0] = embeddings layer
    attentions: tuple[Tensor, ...] | None = None  # (B, heads, T, T) per layer

    @property
    def logits(self) -> Tensor:
        return self.embeddings


class SentenceEmbedder(nn.Module):
    """A transformers encoder (``AutoModel``) + mean pooling (+ optional L2 normalisation), as in
    sentence-transformers' ``Transformer → Pooling(mean) [→ Normalize]``.

    ``forward(input_ids, attention_mask, ...)`` returns the (B, D) embeddings, or an :class:`EmbeddingOutput`
    when ``output_hidden_states`` / ``output_attentions`` is set. ``config`` and ``save_pretrained`` are the
    encoder's, so the wrapper saves and sizes like any transformers model.
    """

    def __init__(self, encoder: nn.Module, *, normalize: bool = False) -> None:
        super().__init__()
        self.encoder = encoder
        self.normalize = normalize

    @property
    def config(self) -> Any:
        return self.encoder.config

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        *,
        output_hidden_states: bool = False,
        output_attentions: bool = False,
        **kwargs: Any,
    ) -> Tensor | EmbeddingOutput:
        extra = {k: v for k, v in kwargs.items() if v is not None}
        out = self.encoder(
            input_ids=input_ids,
            attention_mask=attention_mask,
            return_dict=True,
            output_hidden_states=output_hidden_states,
            output_attentions=output_attentions,
            **extra,
        )
        embeddings = mean_pool(out.last_hidden_state, attention_mask)  # (B, D)
        if self.normalize:
            embeddings = nn.functional.normalize(embeddings.float(), dim=-1).to(embeddings.dtype)
        if not (output_hidden_states or output_attentions):
            return embeddings
        return EmbeddingOutput(
            embeddings,
            out.last_hidden_state,
            getattr(out, "hidden_states", None),
            getattr(out, "attentions", None),
        )

    def save_pretrained(self, folder: str | Path, **kwargs: Any) -> None:
        if kwargs.get("state_dict") is not None:  # this module's keys: the encoder's under "encoder."
            state = kwargs["state_dict"]
            prefix = "encoder."
            kwargs["state_dict"] = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
        self.encoder.save_pretrained(folder, **kwargs)


def st_normalizes(folder: Path) -> bool:
    """Whether a sentence-transformers folder's pipeline (``modules.json``) ends with L2 normalisation."""
    try:
        modules = json.loads((folder / "modules.json").read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return any(str(m.get("type", "")).endswith(".Normalize") for m in modules if isinstance(m, dict))
