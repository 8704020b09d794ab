"""Cross-tokenizer position alignment for causal LMs (used by the ``uld`` term).

A teacher and a student with different tokenizers cut the same text into different tokens, so position ``i``
of one is not position ``i`` of the other. Two positions are comparable when both models have read exactly
the same prefix of the text: the student's logits at position ``i`` (after reading tokens ``0..i``) and the
teacher's at ``j`` predict the continuation of the same characters when the text covered by their first
``i + 1`` and ``j + 1`` tokens ends at the same character. Each token row therefore gets its *prefix ends*
(the character offset where the text read so far ends), and positions with equal prefix ends are paired;
student positions without a partner are left out of the loss.

Special tokens (BOS, CLS) cover no characters: they keep the previous prefix end (0 at the start). An end of
text token (appended EOS) gets ``len(text) + 1``, so the two models' final positions pair with each other.
Needs fast (Rust) tokenizers for character offsets; :func:`prefix_ends` returns None otherwise.

Rows that were not made from a text (a student's sampled continuations, ``on_policy``) get their text and
prefix ends by decoding (:func:`decoded_prefix_ends`); the teacher then reads that text with its own
tokenizer. The teacher-output cache stores the prefix ends of the teacher's predicting positions beside its
top-k, so a cached cross-tokenizer run pairs positions without the teacher (``teacher_predicting_only``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from .loss_primitives import TopK

# The prefix end of a position whose text cannot be told (a decoded prefix that is not a prefix of the decoded
# row, e.g. half of a multi-byte character): it pairs with nothing.
UNPAIRABLE = -1


def prefix_ends(
    texts: Sequence[str], token_rows: Sequence[Sequence[int]], *, tokenizer: Any
) -> list[list[int]] | None:
    """Per row, the character offset where the text read up to and including each token ends.

    Args:
        texts: the texts ``token_rows`` were made from (by :func:`batching.tokenize_for_lm`).
        token_rows: the token ids of each text (possibly cut short, possibly with an appended EOS).
        tokenizer: the fast tokenizer that made them.
    Returns:
        One list per row, as long as its token row; None when the tokenizer gives no character offsets.
    """
    if not getattr(tokenizer, "is_fast", False):
        return None
    encoded = tokenizer(list(texts), return_offsets_mapping=True)
    eos = tokenizer.eos_token_id
    out: list[list[int]] = []
    for text, row, ids, offsets in zip(
        texts, token_rows, encoded["input_ids"], encoded["offset_mapping"], strict=True
    ):
        ends, last = [], 0
        for k, token in enumerate(row):
            start, end = offsets[k] if k < len(ids) and ids[k] == token else (0, 0)
            if end > start:  # a token that covers text (special tokens cover none)
                last = max(last, end)
            elif token == eos and k == len(row) - 1:
                last = len(text) + 1  # end of text, appended by tokenize_for_lm or the tokenizer
            ends.append(last)
        out.append(ends)
    return out


def decoded_prefix_ends(
    token_rows: Sequence[Sequence[int]], *, tokenizer: Any
) -> tuple[list[str], list[list[int]]]:
    """The text of token rows that were not made from one (sampled continuations), and their prefix ends.

    Each row is decoded (special tokens skipped) into its text; position ``k`` ends where the decoding of the
    row's first ``k + 1`` tokens ends. Where that decoding is not a prefix of the row's text (a token that
    stops inside a multi-byte character, or a decoder that tidies spaces differently once more follows), the
    position gets :data:`UNPAIRABLE`. A final EOS gets ``len(text) + 1``, as in :func:`prefix_ends`; tokens
    that add no text (other special tokens) keep the previous end. Decodes every prefix: O(L²) characters per
    row.

    Args:
        token_rows: token ids of the ``tokenizer`` (padding removed).
        tokenizer: any tokenizer with ``decode``; no character offsets needed.
    Returns:
        (texts, ends): one text and one list as long as its token row per row.
    """
    eos = tokenizer.eos_token_id
    texts, out = [], []
    for row in token_rows:
        row = list(row)
        text = tokenizer.decode(row, skip_special_tokens=True)
        ends = []
        for k in range(len(row)):
            if eos is not None and row[k] == eos and k == len(row) - 1:
                ends.append(len(text) + 1)
                continue
            prefix = tokenizer.decode(row[: k + 1], skip_special_tokens=True)
            ends.append(len(prefix) if text.startswith(prefix) else UNPAIRABLE)
        texts.append(text)
        out.append(ends)
    return texts, out


def align_positions(
    student_ends: Sequence[Sequence[int]],
    teacher_ends: Sequence[Sequence[int]],
    *,
    student_width: int,
    teacher_width: int,
    teacher_predicting_only: bool = False,
) -> Tensor:
    """For each predicting student position, the teacher position that has read the same text.

    Args:
        student_ends, teacher_ends: prefix ends of the batch's rows (same rows, same order).
        student_width, teacher_width: predicting positions per row (sequence width − 1).
        teacher_predicting_only: ``teacher_ends`` list the predicting positions only (a row's last token left
            out), as the teacher-output cache stores them.
    Returns:
        (B, student_width) int64: the teacher position, or -1 where the teacher has no position ending there
        (the student is mid-way through one of the teacher's tokens). Where several teacher positions end at
        the same character (tokens that split one character's bytes), only the last of each side is paired.
        Positions marked :data:`UNPAIRABLE` are never paired.
    """
    index = torch.full((len(student_ends), student_width), -1, dtype=torch.long)
    for b, (s_row, t_row) in enumerate(zip(student_ends, teacher_ends, strict=True)):
        # Predicting positions only (a row's last token predicts nothing); later positions win.
        t_count = len(t_row) if teacher_predicting_only else len(t_row) - 1
        teacher_at = {end: j for j, end in enumerate(t_row[: min(teacher_width, t_count)])}
        student_at = {end: i for i, end in enumerate(s_row[: min(student_width, len(s_row) - 1)])}
        for end, i in student_at.items():
            j = teacher_at.get(end)
            if j is not None and end != UNPAIRABLE:
                index[b, i] = j
    return index


def gather_aligned(teacher: Tensor | TopK, index: Tensor) -> tuple[Tensor | TopK, Tensor]:
    """Teacher outputs picked at the paired positions.

    Args:
        teacher: logits (B, T_t, V_t), or a :class:`TopK` with logprobs and indices (B, T_t, k) and
            tail_logmass (B, T_t).
        index: (B, T_s) from :func:`align_positions`.
    Returns:
        (picked, paired): the teacher outputs laid out like the student, (B, T_s, V_t) or a TopK of
        (B, T_s, k), and the (B, T_s) bool mask of positions that have a partner (unpaired positions hold the
        teacher's first position).
    """
    device = teacher.logprobs.device if isinstance(teacher, TopK) else teacher.device
    paired = index >= 0
    safe = index.clamp(min=0).to(device)  # (B, T_s)

    def pick(values: Tensor) -> Tensor:
        if values.dim() == 2:
            return torch.gather(values, 1, safe)
        return torch.gather(values, 1, safe.unsqueeze(-1).expand(-1, -1, values.shape[-1]))

    if isinstance(teacher, TopK):
        tail = None if teacher.tail_logmass is None else pick(teacher.tail_logmass)
        return TopK(pick(teacher.logprobs), pick(teacher.indices), tail), paired.to(device)
    return pick(teacher), paired.to(device)
