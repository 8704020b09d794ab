"""The student's evaluations during and after training, and the early stopping that watches them.

:class:`Evaluation` evaluates the student on the eval split or on the validation slice, beside the teachers'
outputs on the same rows (always through the teacher-output cache), and streams the metrics as ``eval/...``
or ``val/...``; :class:`EarlyStopping` stops a run when the watched metric, measured on the validation slice,
has not improved for ``patience`` evaluations in a row, and is checkpointed with the run.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import nn

from . import phases
from .batching import Batcher, LMBatcher
from .cache import CacheEntry, gather_topk
from .config import RunConfig, TrainConfig
from .evaluate import evaluate
from .planning import STREAMED_EVAL_METRICS, watched_metric
from .runtime import (
    out_of_memory_as_training_error,
)

if TYPE_CHECKING:
    from .run_setup import Loaded, TrainRows
    from .trainer import Callbacks


class EarlyStopping:
    """Stops when the watched metric, measured on the validation slice, has not improved for ``patience``
    evaluations in a row."""

    def __init__(self, train: TrainConfig) -> None:
        self.metric = watched_metric(train.early_stopping_metric)
        self.mode = train.early_stopping_mode
        self.patience = train.early_stopping_patience if self.metric else 0
        self.best: float | None = None
        self.best_step: int | None = None
        self.bad_evals = 0

    @property
    def enabled(self) -> bool:
        return self.patience > 0

    def update(self, step: int, metrics: dict[str, float]) -> bool:
        """Record an evaluation; True when training should stop."""
        if not self.enabled:
            return False
        value = metrics.get("nll" if self.metric == "loss" else self.metric)
        if value is None:
            return False
        better = self.best is None or (value > self.best if self.mode == "max" else value < self.best)
        if better:
            self.best, self.best_step, self.bad_evals = float(value), step, 0
        else:
            self.bad_evals += 1
        return self.bad_evals >= self.patience

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "best_step": self.best_step, "bad_evals": self.bad_evals}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best, self.best_step, self.bad_evals = (
            state.get("best"),
            state.get("best_step"),
            state.get("bad_evals", 0),
        )


@dataclass
class Evaluation:
    """The student's evaluations, on the eval split or (``validation``) on the validation slice, beside the
    teachers' outputs on the same rows, which always come through the cache."""

    cfg: RunConfig
    cb: Callbacks
    run: Loaded
    rows: TrainRows
    modules: nn.ModuleDict
    eval_batches: Batcher | LMBatcher
    final_dir: Path

    def teacher_entry(self, *, validation: bool = False) -> CacheEntry | None:
        """The teacher's outputs on the eval split (or the validation slice), from the cache or computed now;
        a sharded teacher is gathered for it on every rank (one rank computes while the others wait on the
        entry's lock)."""
        teachers = self.run.teachers
        with teachers.gathered() if teachers is not None else contextlib.nullcontext():
            if validation:
                return self.run.outputs.validation_entry(
                    self.rows.val_dataset, self.rows.val_batches, self.rows.held_out
                )
            return self.run.outputs.eval_entry(self.eval_batches, same_vocab=self.rows.same_vocab)

    def student(self, final: bool, *, validation: bool = False) -> dict[str, float]:
        """The student's metrics on the eval split, or (``validation``) on the validation slice."""
        task, device = self.cfg.task, self.run.device
        entry = (
            self.teacher_entry(validation=validation)
            if self.run.teachers is not None and self.rows.same_vocab
            else None
        )
        saved = self.final_dir if final else None
        kwargs: dict[str, Any] = {}
        if entry is not None and task == "classification":
            kwargs["teacher_logits"] = entry.tensors["logits"].to(device)
        elif entry is not None and task == "causal_lm":
            kwargs["teacher_topk"] = lambda batch, width: gather_topk(
                entry, batch.indices.cpu(), width, device
            )
        elif entry is not None:
            kwargs["teacher_embeddings"] = entry.tensors["embeddings"]
        modules = self.modules
        projection = modules["embedding_mse"] if task == "embedding" and "embedding_mse" in modules else None
        batches = self.rows.val_batches if validation else self.eval_batches
        with (
            phases.within(phases.EVALUATION),
            out_of_memory_as_training_error(self.cfg, "while evaluating the student"),
        ):
            return evaluate(
                self.run.student.model,
                batches,
                device=device,
                batch_size=self.cfg.train.batch_size,
                efficiency=final,
                saved_dir=saved,
                task=task,
                projection=projection,
                **kwargs,
            )

    def emit(self, at_step: int, metrics: dict[str, float], prefix: str = "eval") -> None:
        """Stream ``prefix/<metric>``: ``eval/`` for the eval split, ``val/`` for the validation slice."""
        if self.cb.on_metrics:
            streamed = {"loss": metrics.get("nll")} | metrics
            self.cb.on_metrics(
                at_step,
                {
                    f"{prefix}/{k}": float(streamed[k])
                    for k in STREAMED_EVAL_METRICS[self.cfg.task]
                    if streamed.get(k) is not None
                },
            )
