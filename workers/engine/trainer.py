"""The training loop: one readable function, progress reported through callbacks only.

Schemes:
- ``hard_labels``: the student alone, ``ce`` on the labelled rows (the baseline of every experiment);
- ``offline``: teacher logits for the whole train split are computed once, up front, and looked up per batch;
- ``online``: the teacher runs on every batch.

A run is repeatable bit for bit on CPU: everything is seeded from ``train.seed``, and the batch at step ``s`` is
a pure function of (seed, s), so a run resumed from a checkpoint continues exactly like an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import math
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from .config import LossTermConfig, RunConfig, TrainConfig
from .data import Batch, Batcher, LoadedDataset, load_dataset, rows_for_step
from .errors import ConfigError, DataError, TrainingError
from .evaluate import autocast, evaluate, predict_logits
from .losses import LOSS_TERMS, LossParts, combine_terms, validate_terms
from .models import LoadedModel, forward_logits, load_model, save_model

LR_SCHEDULES = ("constant", "linear", "cosine")
# Eval metrics streamed during training (efficiency is measured once, at the end).
STREAMED_EVAL_METRICS = ("loss", "accuracy", "macro_f1", "ece", "agreement", "kl_to_teacher")


@dataclass
class Callbacks:
    """How a caller follows and steers a run. Every field is optional.

    - ``on_metrics(step, metrics)``: training metrics every ``log_every`` steps (``loss``, one entry per term,
      ``lr``, ``samples_per_s``) and eval metrics every ``eval_every`` steps and at the end (``eval/loss``,
      ``eval/accuracy``, ``eval/macro_f1``, ...).
    - ``on_progress(step, total)``: after every step; throttle on the caller's side.
    - ``on_checkpoint(step, path)``: after a checkpoint folder is complete.
    - ``should_stop()``: polled every ``log_every`` steps; True saves a checkpoint and ends the run early.
    """

    on_metrics: Callable[[int, dict[str, float]], None] | None = None
    on_progress: Callable[[int, int], None] | None = None
    on_checkpoint: Callable[[int, str], None] | None = None
    should_stop: Callable[[], bool] | None = None


@dataclass
class TrainResult:
    """What a run produced. ``student``/``teacher`` are :func:`evaluate` metrics on the eval split."""

    steps: int
    stopped: bool
    final_dir: str | None
    student: dict[str, float]
    teacher: dict[str, float] | None
    train_seconds: float
    last_checkpoint: str | None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# --- pure helpers ----------------------------------------------------------------------------------------------


def lr_at(step: int, train: TrainConfig) -> float:
    """Learning rate for 0-based ``step``: linear warm-up, then constant, linear or cosine decay to 0."""
    if step < train.warmup_steps:
        return train.lr * (step + 1) / train.warmup_steps
    if train.lr_schedule == "constant":
        return train.lr
    progress = (step - train.warmup_steps) / max(1, train.max_steps - train.warmup_steps)
    if train.lr_schedule == "linear":
        return train.lr * (1.0 - progress)
    return train.lr * 0.5 * (1.0 + math.cos(math.pi * progress))


def resolve_device(name: str) -> torch.device:
    """``auto`` → ``cuda`` when available, else ``cpu``; other names are checked."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise ConfigError(f"Unknown device '{name}'. Use auto, cpu, cuda or cuda:N.") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"Device '{name}' was requested but CUDA is not available on this worker.")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ConfigError(f"Device '{name}' does not exist; this worker has {torch.cuda.device_count()} GPU(s).")
    return device


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # seeds every CUDA device too


def recipe_terms(cfg: RunConfig) -> list[LossTermConfig]:
    """The validated terms this run optimises.

    ``hard_labels`` keeps only ``ce`` (with its parameters) at weight 1: the baseline must train at the same
    effective learning rate as a plain classifier, not at the ce weight the distillation recipe used.
    """
    terms = validate_terms(cfg.terms)
    if cfg.scheme == "hard_labels":
        ce = next((t for t in terms if t.name == "ce"), LossTermConfig("ce", 1.0, {}))
        return validate_terms([LossTermConfig("ce", 1.0, ce.params)])
    return terms


def check_train_config(train: TrainConfig) -> None:
    """Raise ConfigError for settings the loop cannot run with."""
    positive_ints = ("max_steps", "batch_size", "log_every", "eval_every", "save_every")
    for name in positive_ints:
        value = getattr(train, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"train.{name} must be a whole number >= 1, got {value!r}.")
    if not isinstance(train.warmup_steps, int) or train.warmup_steps < 0:
        raise ConfigError(f"train.warmup_steps must be a whole number >= 0, got {train.warmup_steps!r}.")
    for name in ("lr", "weight_decay", "grad_clip"):
        value = getattr(train, name)
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
            raise ConfigError(f"train.{name} must be a number >= 0, got {value!r}.")
    if train.lr <= 0:
        raise ConfigError(f"train.lr must be > 0, got {train.lr!r}.")
    if train.lr_schedule not in LR_SCHEDULES:
        raise ConfigError(f"train.lr_schedule must be one of {', '.join(LR_SCHEDULES)}, got {train.lr_schedule!r}.")


class _NonFiniteWatch:
    """Remembers the first step whose loss was NaN or infinite, without a CPU-GPU sync every step.

    ``check()`` (one sync) runs at log steps and before anything is saved, so no bad checkpoint is written.
    """

    def __init__(self, term_names: list[str], device: torch.device) -> None:
        self.term_names = term_names
        self.first_step = torch.full((), -1, dtype=torch.long, device=device)
        self.first_term = torch.full((), -1, dtype=torch.long, device=device)

    def update(self, step: int, parts: LossParts) -> None:
        terms = torch.stack([parts.parts[n].float() for n in self.term_names])        # (T,)
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
            raise TrainingError(f"Loss became NaN at step {step} (term: {term}). "
                                "Try a lower learning rate or temperature.")


@contextlib.contextmanager
def _out_of_memory_as_training_error(step: int, batch_size: int) -> Iterator[None]:
    """Turn CUDA OOM (``OutOfMemoryError`` or a RuntimeError saying so) into an actionable TrainingError."""
    try:
        yield
    except RuntimeError as exc:
        if isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower():
            raise TrainingError(f"Out of GPU memory at step {step} with batch size {batch_size}. "
                                "Lower the batch size or max length.") from exc
        raise


def _batcher(split_name: str, dataset: LoadedDataset, model: LoadedModel) -> Batcher:
    split = dataset.train if split_name == "train" else dataset.eval
    return Batcher(split, tokenizer=model.tokenizer, max_length=model.max_length(dataset.max_length))


class TeacherTargets:
    """Teacher logits for training batches.

    ``offline``: logits for the whole train split are computed once, here, and each batch looks its rows up by
    index, so the teacher never runs during the loop. ``online``: the teacher runs on every batch.
    """

    def __init__(self, teacher: LoadedModel, dataset: LoadedDataset, *, scheme: str, device: torch.device,
                 batch_size: int) -> None:
        self.teacher = teacher
        self.device = device
        self.batches = _batcher("train", dataset, teacher)   # tokenised with the teacher's own tokenizer
        self.cache: Tensor | None = None                     # (N_train, C)
        if scheme == "offline":
            with _out_of_memory_as_training_error(0, batch_size):
                self.cache = predict_logits(teacher.model, self.batches, device=device, batch_size=batch_size)

    @torch.no_grad()
    def for_batch(self, batch: Batch, rows: np.ndarray) -> Tensor:
        """(B, C) teacher logits for the student's ``batch`` (built from train ``rows``)."""
        if self.cache is not None:
            return self.cache[batch.indices]
        inputs = self.batches.batch(rows).to(self.device).inputs
        return forward_logits(self.teacher.model, inputs).float()


# --- the loop --------------------------------------------------------------------------------------------------


def train(cfg: RunConfig, callbacks: Callbacks | None = None) -> TrainResult:
    """Train ``cfg.student`` (distilling from ``cfg.teacher`` if the recipe asks), save it and evaluate it.

    Resumes from the newest checkpoint in ``cfg.output_dir`` when there is one.

    Args:
        cfg: the run config; ``output_dir`` must be set.
        callbacks: progress, metrics, checkpoint and stop hooks.
    Returns:
        TrainResult; when ``should_stop`` ended the run, ``stopped`` is True, the final model is not saved
        and nothing is evaluated.
    Raises:
        ConfigError, DataError, ModelLoadError: before training starts.
        TrainingError: NaN/inf loss or out of GPU memory.
    """
    cb = callbacks or Callbacks()
    tc = cfg.train
    check_train_config(tc)
    if cfg.scheme not in ("offline", "online", "hard_labels"):
        raise ConfigError(f"Unknown training scheme '{cfg.scheme}'. Use offline, online or hard_labels.")
    if not cfg.output_dir:
        raise ConfigError("The run has no output_dir.")
    terms = recipe_terms(cfg)
    teacher_terms = [t.name for t in terms if LOSS_TERMS[t.name].needs_teacher]
    if teacher_terms and cfg.teacher is None:
        raise ConfigError(f"Loss term '{teacher_terms[0]}' needs a teacher, but the run has none. Add a teacher "
                          "or use the hard_labels scheme.")
    device = resolve_device(tc.device)
    output_dir = Path(cfg.output_dir)

    dataset = load_dataset(cfg.dataset)
    teacher: LoadedModel | None = None
    if teacher_terms:
        seed_everything(tc.seed)
        teacher = load_model(cfg.teacher, dataset=dataset, role="teacher")
        teacher.model.to(device).eval().requires_grad_(False)
    # Re-seed so the student's initial weights do not depend on whether a teacher was built first.
    seed_everything(tc.seed)
    student = load_model(cfg.student, dataset=dataset, role="student")
    student.model.to(device).train()
    train_batches = _batcher("train", dataset, student)
    # Without teacher terms, unlabelled rows teach nothing: sample labelled rows only.
    train_rows = np.arange(len(dataset.train)) if teacher_terms else dataset.train.labelled_rows
    if len(train_rows) == 0:
        raise DataError("The train split has no labelled rows to train on.")
    batch_size = min(tc.batch_size, len(train_rows))

    optimizer = torch.optim.AdamW(student.model.parameters(), lr=tc.lr, weight_decay=tc.weight_decay)
    config_dict = cfg.to_dict()
    step = 0
    last_checkpoint = latest_checkpoint(output_dir)
    if last_checkpoint is not None:
        step = load_checkpoint(last_checkpoint, model=student.model, optimizer=optimizer, config=config_dict,
                               device=device)

    started = time.perf_counter()
    targets = None
    if teacher is not None and step < tc.max_steps:
        targets = TeacherTargets(teacher, dataset, scheme=cfg.scheme, device=device, batch_size=tc.batch_size)

    eval_batches = _batcher("eval", dataset, student)
    teacher_eval_logits: Tensor | None = None

    def run_eval(final: bool) -> dict[str, float]:
        nonlocal teacher_eval_logits
        if teacher is not None and teacher_eval_logits is None:
            teacher_eval_logits = predict_logits(teacher.model, _batcher("eval", dataset, teacher),
                                                 device=device, batch_size=tc.batch_size)
        saved = output_dir / "final" if final else None
        return evaluate(student.model, eval_batches, device=device, teacher_logits=teacher_eval_logits,
                        batch_size=tc.batch_size, efficiency=final, saved_dir=saved)

    def emit_eval(at_step: int, metrics: dict[str, float]) -> None:
        if cb.on_metrics:
            streamed = {"loss": metrics.get("nll")} | metrics
            cb.on_metrics(at_step, {f"eval/{k}": float(streamed[k]) for k in STREAMED_EVAL_METRICS
                                    if streamed.get(k) is not None})

    def checkpoint(at_step: int) -> Path:
        watch.check()  # never persist weights that came from a NaN step
        path = save_checkpoint(output_dir, step=at_step, model=student.model, optimizer=optimizer,
                               config=config_dict)
        if cb.on_checkpoint:
            cb.on_checkpoint(at_step, str(path))
        return path

    term_names = [t.name for t in terms]
    watch = _NonFiniteWatch(term_names, device)
    sums = torch.zeros(1 + len(term_names), device=device)   # running totals for the log interval, no sync
    interval_steps, interval_start = 0, time.perf_counter()
    stopped = False
    while step < tc.max_steps:
        rows = rows_for_step(step, train_rows, batch_size=batch_size, seed=tc.seed)
        batch = train_batches.batch(rows).to(device)
        lr = lr_at(step, tc)
        for group in optimizer.param_groups:
            group["lr"] = lr
        with _out_of_memory_as_training_error(step + 1, batch_size):
            with autocast(device):
                student_logits = forward_logits(student.model, batch.inputs)                  # (B, C)
                teacher_logits = targets.for_batch(batch, rows) if targets else None          # (B, C)
            parts = combine_terms(terms, student_logits, teacher_logits, batch.labels)
            parts.total.backward()
            if tc.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(student.model.parameters(), tc.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        step += 1
        watch.update(step, parts)
        sums += torch.stack([parts.total.detach()] + [parts.parts[n] for n in term_names])
        interval_steps += 1
        if cb.on_progress:
            cb.on_progress(step, tc.max_steps)

        if step % tc.log_every == 0 or step == tc.max_steps:
            watch.check()
            means = (sums / interval_steps).tolist()    # the one sync of the interval
            elapsed = time.perf_counter() - interval_start
            if cb.on_metrics:
                cb.on_metrics(step, {"loss": means[0], **dict(zip(term_names, means[1:], strict=True)),
                                     "lr": lr, "samples_per_s": interval_steps * batch_size / max(elapsed, 1e-9)})
            sums.zero_()
            interval_steps, interval_start = 0, time.perf_counter()
        saved_now = False
        if step % tc.save_every == 0:
            last_checkpoint, saved_now = checkpoint(step), True
        if step % tc.eval_every == 0 and step < tc.max_steps:
            watch.check()
            emit_eval(step, run_eval(final=False))
        if step % tc.log_every == 0 and step < tc.max_steps and cb.should_stop and cb.should_stop():
            if not saved_now:
                last_checkpoint = checkpoint(step)
            stopped = True
            break
    watch.check()
    train_seconds = time.perf_counter() - started

    if stopped:
        return TrainResult(steps=step, stopped=True, final_dir=None, student={}, teacher=None,
                           train_seconds=train_seconds, last_checkpoint=str(last_checkpoint))
    final_dir = save_model(student, output_dir / "final")
    student_metrics = run_eval(final=True)
    emit_eval(step, student_metrics)
    teacher_metrics = None
    if teacher is not None and cfg.evaluate_teacher:
        teacher_metrics = evaluate(teacher.model, _batcher("eval", dataset, teacher), device=device,
                                   batch_size=tc.batch_size)
    return TrainResult(steps=step, stopped=False, final_dir=str(final_dir), student=student_metrics,
                       teacher=teacher_metrics, train_seconds=train_seconds,
                       last_checkpoint=str(last_checkpoint) if last_checkpoint else None)
