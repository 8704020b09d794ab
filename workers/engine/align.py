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
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor


def prefix_ends(texts: Sequence[str], token_rows: Sequence[Sequence[int]], *, tokenizer: Any
                ) -> list[list[int]] | None:
    """Per row, the character offset where the text read up to and including each token ends.

    Args:
        texts: the texts ``token_rows`` were made from (by :func:`data.tokenize_for_lm`).
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
    for text, row, ids, offsets in zip(texts, token_rows, encoded["input_ids"], encoded["offset_mapping"],
                                       strict=True):
        ends, last = [], 0
        for k, token in enumerate(row):
            start, end = offsets[k] if k < len(ids) and ids[k] == token else (0, 0)
            if end > start:                  # a token that covers text (special tokens cover none)
                last = max(last, end)
            elif token == eos and k == len(row) - 1:
                last = len(text) + 1         # end of text, appended by tokenize_for_lm or the tokenizer
            ends.append(last)
        out.append(ends)
    return out


def align_positions(student_ends: Sequence[Sequence[int]], teacher_ends: Sequence[Sequence[int]], *,
                    student_width: int, teacher_width: int) -> Tensor:
    """For each predicting student position, the teacher position that has read the same text.

    Args:
        student_ends, teacher_ends: prefix ends of the batch's rows (same rows, same order).
        student_width, teacher_width: predicting positions per row (sequence width − 1).
    Returns:
        (B, student_width) int64: the teacher position, or -1 where the teacher has no position ending there
        (the student is mid-way through one of the teacher's tokens). Where several teacher positions end at
        the same character (tokens that split one character's bytes), only the last of each side is paired.
    """
    index = torch.full((len(student_ends), student_width), -1, dtype=torch.long)
    for b, (s_row, t_row) in enumerate(zip(student_ends, teacher_ends, strict=True)):
        # Predicting positions only (a row's last token predicts nothing); later positions win.
        teacher_at = {end: j for j, end in enumerate(t_row[: min(teacher_width, len(t_row) - 1)])}
        student_at = {end: i for i, end in enumerate(s_row[: min(student_width, len(s_row) - 1)])}
        for end, i in student_at.items():
            j = teacher_at.get(end)
            if j is not None:
                index[b, i] = j
    return index


def gather_aligned(teacher_logits: Tensor, index: Tensor) -> tuple[Tensor, Tensor]:
    """Teacher logits (B, T_t, V_t) picked at ``index`` (B, T_s); returns them (B, T_s, V_t) and the (B, T_s)
    bool mask of positions that have a partner (unpaired positions hold the teacher's first position)."""
    paired = index >= 0
    safe = index.clamp(min=0).to(teacher_logits.device)
    picked = torch.gather(teacher_logits, 1, safe.unsqueeze(-1).expand(-1, -1, teacher_logits.shape[-1]))
    return picked, paired.to(teacher_logits.device)
