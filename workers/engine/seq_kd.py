"""Sequence-level KD's rows: the teacher's continuations of the train prompts, written once through the cache.

``seq_kd`` trains the student on prompt + teacher continuation, with the loss on the continuation only.
:func:`seq_kd_rows` has the teachers continue every train row's prompt once (the continuations are a
teacher-output cache entry, so later runs with the same key generate nothing) and returns the rows the
student trains on; a teacher with another tokenizer has its text re-tokenised by the student's
(:func:`retokenize_rows`). A served teacher (:mod:`.served_teacher`) writes them on its server, with the same
decoding settings.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from . import phases
from .batching import LMBatcher
from .cache import (
    CacheEntry,
    pack_positions,
    row_tokens,
    vocab_digest,
)
from .config import RunConfig
from .models import LoadedModel
from .runtime import (
    generate_continuations,
    make_batcher,
    prompt_length,
    step_seed,
)
from .teachers import Teachers

if TYPE_CHECKING:
    from .planning import RunPlan


def seq_kd_rows(
    cfg: RunConfig,
    plan: RunPlan,
    student: LoadedModel,
    teachers: Teachers,
    text_rows: LMBatcher,
    max_length: int,
    entry_for: Callable[[str, dict[str, Any], Callable[[], dict[str, Tensor]]], CacheEntry],
) -> tuple[LMBatcher, bool]:
    """seq_kd's train rows: each train row's prompt (its first half) continued by the teacher, loss on the
    continuation. Generated once and kept in the teacher-output cache. Also returns whether the teacher's
    tokenizer is the student's (else the rows were re-tokenised for the student)."""
    p = plan.scheme_params
    stored = {
        "kind": "generations",
        "max_new_tokens": p["max_new_tokens"],
        "temperature": p["temperature"],
        "prompt": "first-half",
        "batch_size": cfg.train.batch_size,
        "seed": cfg.train.seed if p["temperature"] > 0 else None,
    }

    def compute() -> dict[str, Tensor]:
        served = teachers.served
        teacher = None if served is not None else teachers.first
        # Prompts in the teacher's own tokens (the student's, unless the two tokenizers differ).
        source = (
            text_rows
            if vocab_digest(teachers.tokenizer) == vocab_digest(student.tokenizer)
            else make_batcher("train", teachers.dataset, teacher, max_length=max_length)
        )
        t_eos = teachers.tokenizer.eos_token_id
        prompts = [
            r[: prompt_length(r, max_new_tokens=p["max_new_tokens"], max_length=max_length, eos_id=t_eos)]
            for r in source.token_rows
        ]
        rows, lengths = [], []
        size = cfg.train.batch_size
        phases.report(phases.SEQ_KD, 0, len(prompts))
        for start in range(0, len(prompts), size):
            chunk = prompts[start : start + size]
            decoding = {"max_new_tokens": p["max_new_tokens"], "temperature": p["temperature"]}
            seed = step_seed(cfg.train.seed, start, 2)
            if served is not None:
                new = served.generate(chunk, **decoding, seed=seed, eos_id=t_eos)
            else:
                new = generate_continuations(
                    teacher.model, chunk, **decoding, pad_id=source.pad_id, eos_id=t_eos,
                    device=teachers.device, seed=seed,
                )
            rows += [a + b for a, b in zip(chunk, new, strict=True)]
            lengths += [len(a) for a in chunk]
            phases.report(phases.SEQ_KD, len(rows), len(prompts))
        flat = [{"tokens": torch.as_tensor(r, dtype=torch.int32)} for r in rows]
        return pack_positions(flat) | {"prompt_lengths": torch.as_tensor(lengths, dtype=torch.int64)}

    entry = entry_for("train", stored, compute)
    rows, lengths = row_tokens(entry)
    same = entry.manifest["vocab_digest"] == vocab_digest(student.tokenizer)
    if not same:
        rows, lengths = retokenize_rows(
            rows, lengths, source=teachers.tokenizer, target=student.tokenizer, max_length=max_length
        )
    return LMBatcher(rows, pad_id=text_rows.pad_id, prompt_lengths=lengths), same


def retokenize_rows(
    rows: list[list[int]], prompt_lengths: list[int], *, source: Any, target: Any, max_length: int
) -> tuple[list[list[int]], list[int]]:
    """Token rows of one tokenizer as rows of another: each row is decoded to text and tokenised again, the
    prompt/continuation boundary moved to the nearest token of the new tokenization. A row that ended with
    the source's EOS ends with the target's; one cut short does not get one."""
    s_eos, t_eos = source.eos_token_id, target.eos_token_id
    out_rows, out_lengths = [], []
    for row, prompt in zip(rows, prompt_lengths, strict=True):
        ended = s_eos is not None and bool(row) and row[-1] == s_eos
        ids = list(target(source.decode(row, skip_special_tokens=True))["input_ids"])
        if t_eos is not None and ids and ids[-1] == t_eos:
            ids.pop()  # the tokenizer's own end marker; decided below
        ids = ids[: max_length - 1 if ended and t_eos is not None else max_length]
        if ended and t_eos is not None:
            ids.append(t_eos)
        prompt_ids = list(target(source.decode(row[:prompt], skip_special_tokens=True))["input_ids"])
        n_prompt = len(prompt_ids) - (
            1 if t_eos is not None and prompt_ids and prompt_ids[-1] == t_eos else 0
        )
        out_rows.append(ids)
        out_lengths.append(max(1, min(n_prompt, len(ids) - 1)))
    return out_rows, out_lengths
