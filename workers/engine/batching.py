"""Rows into model-ready batches: tokenised, padded and collated, and the rows each step trains on.

:class:`Batcher` turns a split's rows (features, or texts tokenised by the model's own tokenizer) into a
:class:`Batch` of tensors with the rows' indices, so per-example teacher outputs can be looked up in the
teacher-output cache; causal LMs go through :class:`LMBatcher`, over token rows (:func:`tokenize_for_lm`,
packed into blocks by :func:`pack_for_lm` when asked), labels shifted by the model and padding masked with
-100. The rows of step ``s`` are a pure function of (seed, s) (:func:`rows_for_step`), so a resumed run sees
the batches an uninterrupted one would.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .data import IGNORE_INDEX, Split
from .errors import DataError


@dataclass
class Batch:
    """Model inputs for some rows of one split.

    ``inputs`` are keyword arguments for the model (``features`` (B, D) for builtin nets, ``input_ids`` and
    ``attention_mask`` (B, L) for transformers); ``labels`` (B,), -100 = unlabelled; ``indices`` (B,) the
    rows' positions in their split.
    """

    inputs: dict[str, Tensor]
    labels: Tensor
    indices: Tensor

    def __len__(self) -> int:
        return len(self.labels)

    def to(self, device: torch.device | str) -> Batch:
        return Batch(
            {k: v.to(device, non_blocking=True) for k, v in self.inputs.items()},
            self.labels.to(device, non_blocking=True),
            self.indices.to(device, non_blocking=True),
        )


class Batcher:
    """Turns row ids of one split into batches for one model.

    Text is tokenised once up front (truncated to ``max_length``, no padding); each batch is padded to its
    longest row only, which is much faster than padding everything to ``max_length``.
    """

    def __init__(self, split: Split, *, tokenizer: Any = None, max_length: int = 128) -> None:
        self.split = split
        self.labels = torch.as_tensor(split.labels, dtype=torch.long)
        if tokenizer is None:
            if not isinstance(split.inputs, np.ndarray):
                raise DataError("Text data needs a tokenizer; this model has none.")
            self.features: Tensor | None = torch.as_tensor(split.inputs, dtype=torch.float32)
            self.token_ids: list[list[int]] = []
        else:
            if isinstance(split.inputs, np.ndarray):
                raise DataError("A transformers model needs text; this dataset has numeric features.")
            self.features = None
            encoded = tokenizer(list(split.inputs), truncation=True, max_length=max_length)
            self.token_ids = encoded["input_ids"]
            self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    def __len__(self) -> int:
        return len(self.labels)

    def batch(self, rows: np.ndarray | Sequence[int]) -> Batch:
        """Build the batch for ``rows`` (int ids into the split), in that order."""
        index = torch.as_tensor(np.asarray(rows, dtype=np.int64))
        if self.features is not None:
            inputs = {"features": self.features[index]}
        else:
            seqs = [self.token_ids[i] for i in index.tolist()]
            width = max(len(s) for s in seqs)
            ids = torch.full((len(seqs), width), self.pad_id, dtype=torch.long)  # (B, L)
            attention = torch.zeros((len(seqs), width), dtype=torch.long)  # (B, L)
            for row, seq in enumerate(seqs):
                ids[row, : len(seq)] = torch.as_tensor(seq, dtype=torch.long)
                attention[row, : len(seq)] = 1
            inputs = {"input_ids": ids, "attention_mask": attention}
        return Batch(inputs, self.labels[index], index)

    def iter_batches(self, batch_size: int, rows: np.ndarray | None = None) -> Iterator[Batch]:
        """Batches over ``rows`` (default: every row) in order; the last one may be smaller."""
        rows = np.arange(len(self)) if rows is None else rows
        for start in range(0, len(rows), batch_size):
            yield self.batch(rows[start : start + batch_size])


class LMBatcher:
    """Causal-LM batches: token rows right-padded per batch.

    ``Batch.labels`` (B, L) are the input ids with -100 at padding and at prompt positions (the part a model
    was given, not asked to produce). They are not shifted: the logits at position t predict token t+1, see
    ``evaluate.shift_for_lm``. Rows are built once, from texts (:meth:`from_texts`) or from token ids
    (generated continuations, :mod:`seq_kd <.trainer>`).
    """

    def __init__(
        self, token_rows: Sequence[Sequence[int]], *, pad_id: int, prompt_lengths: Sequence[int] | None = None
    ) -> None:
        self.token_rows = [list(map(int, r)) for r in token_rows]
        self.prompt_lengths = (
            list(prompt_lengths) if prompt_lengths is not None else [0] * len(self.token_rows)
        )
        self.pad_id = pad_id
        self.labels = torch.zeros(
            len(self.token_rows), dtype=torch.long
        )  # no class labels; kept for symmetry

    @classmethod
    def from_texts(
        cls, texts: Sequence[str], *, tokenizer: Any, max_length: int, pack: bool = False
    ) -> LMBatcher:
        """Tokenise ``texts`` (the tokenizer's own special tokens included) and cut them to ``max_length``
        tokens; a text that fits gets the tokenizer's EOS appended, so the model learns where texts end.
        ``pack``: see :func:`pack_for_lm`."""
        if pack:
            return cls(
                pack_for_lm(texts, tokenizer=tokenizer, max_length=max_length), pad_id=lm_pad_id(tokenizer)
            )
        rows = tokenize_for_lm(texts, tokenizer=tokenizer, max_length=max_length)
        return cls(rows, pad_id=lm_pad_id(tokenizer))

    def __len__(self) -> int:
        return len(self.token_rows)

    def batch(self, rows: np.ndarray | Sequence[int]) -> Batch:
        index = torch.as_tensor(np.asarray(rows, dtype=np.int64))
        seqs = [self.token_rows[i] for i in index.tolist()]
        width = max(1, max(len(s) for s in seqs))
        ids = torch.full((len(seqs), width), self.pad_id, dtype=torch.long)  # (B, L)
        attention = torch.zeros((len(seqs), width), dtype=torch.long)  # (B, L)
        labels = torch.full((len(seqs), width), IGNORE_INDEX, dtype=torch.long)  # (B, L)
        for row, (i, seq) in enumerate(zip(index.tolist(), seqs, strict=True)):
            ids[row, : len(seq)] = torch.as_tensor(seq, dtype=torch.long)
            attention[row, : len(seq)] = 1
            start = self.prompt_lengths[i]
            labels[row, start : len(seq)] = ids[row, start : len(seq)]
        return Batch({"input_ids": ids, "attention_mask": attention}, labels, index)

    def iter_batches(self, batch_size: int, rows: np.ndarray | None = None) -> Iterator[Batch]:
        rows = np.arange(len(self)) if rows is None else rows
        for start in range(0, len(rows), batch_size):
            yield self.batch(rows[start : start + batch_size])


def tokenize_for_lm(texts: Sequence[str], *, tokenizer: Any, max_length: int) -> list[list[int]]:
    """Token ids of each text, at most ``max_length``; EOS appended to texts that were not cut."""
    eos = tokenizer.eos_token_id
    encoded = tokenizer(list(texts), truncation=True, max_length=max_length + 1)["input_ids"]
    rows = []
    for ids in encoded:
        if len(ids) >= max_length:
            ids = ids[:max_length]
        elif eos is not None and (not ids or ids[-1] != eos):
            ids = [*ids, eos]
        rows.append(ids)
    return rows


def pack_for_lm(texts: Sequence[str], *, tokenizer: Any, max_length: int) -> list[list[int]]:
    """Every text whole, each followed by EOS, concatenated into one stream and cut into rows of
    ``max_length`` tokens (the last row may be shorter; a 1-token remainder, which predicts nothing, is
    dropped). Rows cross text boundaries; the EOS between texts marks where one ends."""
    eos = tokenizer.eos_token_id
    stream: list[int] = []
    for ids in tokenizer(list(texts), verbose=False)["input_ids"]:
        stream.extend(ids)
        if eos is not None and (not ids or ids[-1] != eos):
            stream.append(eos)
    rows = [stream[i : i + max_length] for i in range(0, len(stream), max_length)]
    return [r for r in rows if len(r) >= 2]


def lm_pad_id(tokenizer: Any) -> int:
    """The id padding uses: the pad token, else EOS, else 0 (padding is masked, so its id never matters)."""
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return int(candidate)
    return 0


def epoch_permutation(num_rows: int, *, seed: int, epoch: int) -> np.ndarray:
    """The shuffled row order of one epoch, a pure function of (seed, epoch) so a resumed run replays it."""
    return np.random.default_rng([seed, epoch]).permutation(num_rows)


def steps_per_epoch(n_rows: int, *, batch_size: int) -> int:
    """Steps in an epoch of :func:`rows_for_step` over ``n_rows`` rows (a trailing partial batch dropped)."""
    return max(1, n_rows // max(1, min(batch_size, n_rows)))


def rows_for_step(step: int, rows: np.ndarray, *, batch_size: int, seed: int) -> np.ndarray:
    """Row ids of the batch at ``step`` (0-based): epochs of ``len(rows) // batch_size`` full batches.

    The trailing partial batch of each epoch is dropped so every step has the same size; a new permutation
    each epoch means every row still gets used.
    """
    batch_size = min(batch_size, len(rows))
    epoch, position = divmod(step, steps_per_epoch(len(rows), batch_size=batch_size))
    order = epoch_permutation(len(rows), seed=seed, epoch=epoch)
    return rows[order[position * batch_size : (position + 1) * batch_size]]
