"""One training step's inputs, and the watch that stops a run whose loss stopped being finite.

:class:`StepInputs` builds what a micro-batch feeds the terms: the batch (on_policy: with probability λ, the
student's own continuations), the student's forward with the features the terms need, and the teacher's
part. :class:`NonFiniteWatch` remembers the first step whose loss was NaN or infinite without a CPU-GPU sync
every step, and raises ``TrainingError`` at the next log step or before anything is saved.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from .batching import Batch, Batcher, LMBatcher
from .config import RunConfig
from .distributed import is_sharded
from .errors import TrainingError
from .evaluate import ModelOutputs, forward_outputs, shift_for_lm
from .losses import LossParts
from .methods import TermInputs
from .planning import RunPlan
from .runtime import (
    generate_continuations,
    prompt_length,
    step_seed,
)
from .teacher_targets import TeacherTargets

if TYPE_CHECKING:
    from .run_setup import Loaded


def _rank() -> int:
    """This process's rank (0 without a process group)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank()
    return 0


class NonFiniteWatch:
    """Remembers the first step whose loss was NaN or infinite, without a CPU-GPU sync every step.

    ``check()`` (one sync) runs at log steps and before anything is saved, so no bad checkpoint is written.
    """

    def __init__(self, term_names: list[str], device: torch.device) -> None:
        self.term_names = term_names
        self.first_step = torch.full((), -1, dtype=torch.long, device=device)
        self.first_term = torch.full((), -1, dtype=torch.long, device=device)

    def update(self, step: int, parts: LossParts) -> None:
        terms = torch.stack([parts.parts[n].float() for n in self.term_names])  # (T,)
        term_bad = ~torch.isfinite(terms)
        bad = term_bad.any() | ~torch.isfinite(parts.total.detach())
        is_first = bad & (self.first_step < 0)
        which = torch.where(term_bad.any(), term_bad.long().argmax(), -1)
        self.first_step = torch.where(is_first, step, self.first_step)
        self.first_term = torch.where(is_first, which, self.first_term)

    def check(self) -> None:
        step = int(self.first_step.item())
        if step >= 0:
            index = int(self.first_term.item())
            term = self.term_names[index] if index >= 0 else "total"
            raise TrainingError(
                f"Loss became NaN at step {step} (term: {term}). Try a lower learning rate or temperature."
            )


@dataclass
class StepInputs:
    """What a micro-batch feeds the terms: its batch (on_policy: with probability λ, student continuations),
    the student's forward and the teacher's part."""

    cfg: RunConfig
    plan: RunPlan
    run: Loaded
    batches: Batcher | LMBatcher
    targets: TeacherTargets | None
    # The student's forward the steps call (``forward_outputs`` on it, or a DDP wrapper around that); None:
    # ``forward_outputs`` on the student.
    forward: Callable[..., ModelOutputs] | None = None

    def micro_batch(
        self, rows: np.ndarray, at_step: int, index: int
    ) -> tuple[Batch, np.ndarray | None, bool]:
        """The batch for ``rows``; on_policy replaces it, with probability λ, by student continuations."""
        cfg, device, student, batches = self.cfg, self.run.device, self.run.student, self.batches
        batch = batches.batch(rows)
        if cfg.scheme != "on_policy":
            return batch.to(device), rows, False
        p = self.plan.scheme_params
        if np.random.default_rng([cfg.train.seed, at_step, index, 1]).random() >= p["lmbda"]:
            return batch.to(device), rows, False
        eos = student.tokenizer.eos_token_id
        token_rows = [batches.token_rows[i] for i in rows]
        prompts = [
            r[
                : prompt_length(
                    r, max_new_tokens=p["max_new_tokens"], max_length=self.run.max_length, eos_id=eos
                )
            ]
            for r in token_rows
        ]
        new = generate_continuations(
            student.model,
            prompts,
            max_new_tokens=p["max_new_tokens"],
            temperature=p["temperature"],
            pad_id=batches.pad_id,
            eos_id=eos,
            device=device,
            seed=step_seed(cfg.train.seed, at_step, index, rank=_rank()),
            synced=is_sharded(student.model),
        )
        sampled = LMBatcher(
            [a + b for a, b in zip(prompts, new, strict=True)],
            pad_id=batches.pad_id,
            prompt_lengths=[len(a) for a in prompts],
        )
        return sampled.batch(np.arange(len(prompts))).to(device), None, True

    def term_inputs(self, batch: Batch, rows: np.ndarray | None, at_step: int) -> TermInputs:
        """Student forward + the teacher's part, as the terms need them."""
        needs, task = self.plan.needs, self.cfg.task
        forward = self.forward or functools.partial(forward_outputs, self.run.student.model)
        out = forward(
            batch.inputs,
            hidden="hidden_states" in needs,
            attentions="attentions" in needs,
            values="values" in needs,
            embedding=task == "embedding",
            scores="attention_scores" in needs,
        )
        logits, labels = out.logits, batch.labels
        if task == "causal_lm":
            logits, labels = shift_for_lm(logits, labels)
        teacher_fields = self.targets.fields(batch, rows, plan=self.plan) if self.targets else {}
        return TermInputs(
            student_logits=logits,
            labels=labels,
            student_hidden=out.hidden,
            student_attentions=out.attentions,
            student_attention_scores=out.scores,
            student_values=out.values,
            student_embedding=out.embedding,
            attention_mask=batch.inputs.get("attention_mask"),
            step=at_step,
            total_steps=self.cfg.train.max_steps,
            **teacher_fields,
        )
