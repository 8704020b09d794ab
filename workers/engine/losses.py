"""The distillation loss terms, bound to the term catalogue of :mod:`.terms`: what :mod:`.methods` computes.

The terms are pure, typed, masked functions in three families: output (logit) terms in :mod:`.logit_losses`,
the terms that read a sparse (top-k) teacher or another tokenizer's in :mod:`.sparse_losses`, and feature
terms in :mod:`.feature_losses`, on the shared means, divergences and chunking of :mod:`.loss_primitives`.
This module binds each catalogue entry to its function (:data:`LOSS_TERMS`) and names what a step's loss is
made of (:class:`LossParts`). ``kd`` and ``chunked_token_loss`` stay importable from here for the
benchmarks.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import replace
from types import MappingProxyType
from typing import NamedTuple

from torch import Tensor

from .feature_losses import (
    attention_kl,
    attention_mse,
    attention_prob_mse,
    embedding_mse,
    hidden_cosine,
    hidden_mse,
)
from .logit_losses import ce, jsd, kd, reverse_kl, skew_kl, skew_reverse_kl, taid, tvd
from .loss_primitives import chunked_token_loss
from .sparse_losses import topk, uld
from .terms import LOSS_TERMS as CATALOGUE
from .terms import TermSpec

__all__ = ["LOSS_TERMS", "LossParts", "chunked_token_loss", "kd"]

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
