"""A run's setup, one named step at a time: the data and models it loads, and the rows it trains on.

:func:`load_data_and_models` seeds everything, loads the dataset and the student on its device and prepares
the teachers (loaded only when first needed) and their cache entries; :func:`select_train_rows` picks the
train rows (seq_kd: the teacher's continuations) less the validation slice that early stopping decides on, a
pure function of the dataset's ``split_seed``; :func:`teacher_targets` hands the loop the teacher's part of
each batch, from the cache or online.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from . import adapters, phases
from .batching import Batcher, LMBatcher, steps_per_epoch
from .cache import TeacherCache
from .config import RunConfig
from .data import IGNORE_INDEX, LoadedDataset, Split, load_dataset
from .distributed import Ranks
from .errors import DataError
from .models import LoadedModel, load_model
from .planning import RunPlan
from .run_evaluation import EarlyStopping
from .runtime import (
    lm_max_length,
    make_batcher,
    out_of_memory_as_training_error,
    prepare_attention,
    resolve_device,
    seed_everything,
)
from .seq_kd import seq_kd_rows
from .splits import random_split, stratified_split
from .teacher_targets import TeacherTargets
from .teachers import TeacherOutputs, Teachers

VALIDATION_SALT = (
    2  # the slice's random stream: [split_seed, 2] (the labelled subset draws from [split_seed, 1])
)


def validation_rows(
    labels: np.ndarray, fraction: float, *, seed: int | Sequence[int], stratify: bool
) -> np.ndarray:
    """The validation slice of a train split: the rows held out of training for decisions (early stopping, the
    best weights), so that the eval split is only reported, never selected on.

    The slice comes from the labelled rows only (``labels != -100``), so it can score task metrics: stratified
    by class when ``stratify`` (each class with two or more labelled rows gives ``round(n_c · fraction)``
    rows, at least one, and keeps at least one to train on), else a random ``fraction`` of them. A pure
    function of (labels, fraction, seed).

    Args:
        labels: (N,) the train split's labels (-100 = withheld).
    Returns:
        sorted int64 row ids into the split; empty when fewer than two labelled rows exist.
    """
    labelled = np.flatnonzero(labels != IGNORE_INDEX)
    if len(labelled) < 2:
        return np.zeros(0, dtype=np.int64)
    if stratify:
        _, held = stratified_split(labels[labelled], fraction, seed=seed)
    else:
        _, held = random_split(len(labelled), fraction, seed=seed)
    return np.sort(labelled[held]).astype(np.int64)


def _validation_slice(
    cfg: RunConfig, dataset: LoadedDataset, train_batches: Batcher | LMBatcher
) -> np.ndarray:
    """Rows of ``train_batches`` held out of training for early stopping (``train.validation_fraction`` of the
    labelled rows, stratified by class for classification; for causal LMs, of the rows the student trains on,
    which are blocks when texts are packed), a pure function of the dataset's ``split_seed``.

    Raises:
        DataError: the train split is too small to hold a slice out.
    """
    if dataset.task == "classification":
        labels, stratify = dataset.train.labels, True
    else:
        labels, stratify = np.zeros(len(train_batches), dtype=np.int64), False
    rows = validation_rows(
        labels,
        cfg.train.validation_fraction,
        seed=[cfg.dataset.split_seed, VALIDATION_SALT],
        stratify=stratify,
    )
    if len(rows) == 0:
        raise DataError(
            "Early stopping selects on a validation slice held out of the train split, but the train "
            "split has fewer than two labelled rows. Turn early stopping off or use more data."
        )
    return rows


def _validation_view(
    dataset: LoadedDataset,
    train_batches: Batcher | LMBatcher,
    rows: np.ndarray,
    student: LoadedModel,
    *,
    max_length: int,
) -> tuple[LoadedDataset | None, Batcher | LMBatcher | None]:
    """The validation slice as a dataset whose eval split holds its rows (classification and embedding: what
    the teachers read), and the student's batches of it; (None, None) without a slice."""
    if len(rows) == 0:
        return None, None
    if dataset.task == "causal_lm":
        return None, LMBatcher(
            [train_batches.token_rows[i] for i in rows.tolist()], pad_id=train_batches.pad_id
        )
    split = dataset.train
    inputs = (
        split.inputs[rows]
        if isinstance(split.inputs, np.ndarray)
        else [split.inputs[i] for i in rows.tolist()]
    )
    view = replace(dataset, eval=Split(inputs, split.labels[rows].copy()))
    return view, make_batcher("eval", view, student, max_length=max_length)


@dataclass
class Loaded:
    """A run's data and models: the dataset, the student on its device, the teachers (loaded only when first
    needed) and the teacher-output cache entries it reads."""

    device: torch.device
    output_dir: Path
    cache: TeacherCache
    dataset: LoadedDataset
    student: LoadedModel
    max_length: int
    teachers: Teachers | None
    outputs: TeacherOutputs


def load_data_and_models(cfg: RunConfig, plan: RunPlan, ranks: Ranks | None = None) -> Loaded:
    """Load the dataset and the student (after seeding everything); the teachers load later, if ever. Under
    FSDP, ranks other than 0 may build the student on the meta device (``Ranks.empty_init``): its weights
    arrive once it is sharded."""
    ranks = ranks or Ranks()
    device = resolve_device(cfg.train.device)
    output_dir = Path(cfg.output_dir)
    cache = TeacherCache(Path(cfg.cache_dir) if cfg.cache_dir else output_dir / "teacher-cache")
    with phases.part(phases.LOADING):
        dataset = load_dataset(cfg.dataset, task=cfg.task)
    if len(dataset.train) == 0 or len(dataset.eval) == 0:
        raise DataError(f"Dataset '{dataset.name}' has an empty train or eval split.")
    seed_everything(cfg.train.seed)
    with phases.part(phases.LOADING), out_of_memory_as_training_error(cfg, "while loading the student"):
        with ranks.building():
            student = load_model(cfg.student, dataset=dataset, role="student")
        ranks.follow_rank0_rng()
        prepare_attention(student, plan)
        (student.model if ranks.builds_empty else student.model.to(device)).train()
        adapters.attach(cfg, student, device)  # LoRA (train.lora_r > 0): only the adapters train
    max_length = lm_max_length(dataset, student) if cfg.task == "causal_lm" else dataset.max_length
    teachers = Teachers(cfg, plan, dataset, device, max_length=max_length, ranks=ranks, student=student)
    teachers = teachers if plan.uses_teacher else None
    outputs = TeacherOutputs(cfg, plan, teachers, cache, terms=plan.terms, max_length=max_length)
    return Loaded(device, output_dir, cache, dataset, student, max_length, teachers, outputs)


@dataclass
class TrainRows:
    """The rows the student trains on (``batches``, sampled from ``rows``) and the validation slice held out
    of them for early stopping (``held_out``, empty without it). ``same_vocab``: the teacher's tokens are the
    student's (seq_kd: also those of the generated rows)."""

    batches: Batcher | LMBatcher
    rows: np.ndarray
    held_out: np.ndarray
    val_dataset: LoadedDataset | None
    val_batches: Batcher | LMBatcher | None
    same_vocab: bool


def select_train_rows(cfg: RunConfig, plan: RunPlan, run: Loaded, *, same_vocab: bool) -> TrainRows:
    """The train rows (seq_kd: prompts continued by the teacher, once, through the cache), less the
    validation slice. With early stopping, decisions are taken on that slice; the eval split is evaluated
    once, at the end, for the result."""
    dataset, student, max_length = run.dataset, run.student, run.max_length
    batches = make_batcher("train", dataset, student, max_length=max_length)
    selecting = EarlyStopping(cfg.train).enabled
    held_out = _validation_slice(cfg, dataset, batches) if selecting else np.zeros(0, dtype=np.int64)
    val_dataset, val_batches = _validation_view(dataset, batches, held_out, student, max_length=max_length)
    if cfg.scheme == "seq_kd":
        batches, generated_same_vocab = seq_kd_rows(
            cfg, plan, student, run.teachers, batches, max_length, run.outputs.entry_for
        )
        same_vocab = same_vocab and generated_same_vocab
    # Without teacher terms, unlabelled rows teach nothing: sample labelled rows only.
    rows = (
        dataset.train.labelled_rows
        if plan.teacher_mode == "none" and cfg.task == "classification"
        else np.arange(len(batches))
    )
    if len(held_out):
        rows = np.setdiff1d(rows, held_out).astype(np.int64)
    if len(rows) == 0:
        raise DataError("The train split has no labelled rows to train on.")
    return TrainRows(batches, rows, held_out, val_dataset, val_batches, same_vocab)


def teacher_targets(
    cfg: RunConfig, plan: RunPlan, run: Loaded, rows: TrainRows, *, step: int, ranks: Ranks | None = None
) -> TeacherTargets | None:
    """The teacher's part of each batch: looked up in the train split's cache entry, which a miss fills
    while the first epoch trains (:mod:`.cache_fill`; up front where it cannot), or computed online; None
    when no term reads the teacher or no step is left to train."""
    if plan.teacher_mode == "none" or step >= cfg.train.max_steps:
        return None
    entry, fill = None, None
    if plan.teacher_mode == "cached":
        n, tc = len(rows.rows), cfg.train
        epoch = steps_per_epoch(n, batch_size=min(tc.batch_size, n) * tc.grad_accum_steps)  # as the loop
        fill = run.outputs.train_fill(
            rows.batches, same_vocab=rows.same_vocab, until_step=epoch, ranks=ranks or Ranks()
        )
        if fill is None:
            entry = run.outputs.train_entry(rows.batches, same_vocab=rows.same_vocab)
    same_tokens = cfg.task == "causal_lm" and rows.same_vocab
    return TeacherTargets(
        run.teachers,
        entry=entry,
        task=cfg.task,
        same_tokens=same_tokens,
        student=run.student,
        student_rows=rows.batches if isinstance(rows.batches, LMBatcher) else None,
        fill=fill,
    )
