"""The training loop: one readable function, progress reported through callbacks only.

Tasks (``RunConfig.task``): ``classification``, ``causal_lm`` (next-token prediction on text rows; the logits
at position t are trained against token t+1, padding and prompts masked with -100) and ``embedding`` (the
student learns the teacher's mean-pooled sentence embedding).

Schemes:
- ``hard_labels``: the student alone, ``ce`` on the labelled rows (the baseline of every experiment);
- ``offline``: the teacher's outputs on the train split come from the teacher-output cache (:mod:`.cache`):
  computed once, by whichever run needs them first, then reused by every run with the same key; a cache hit
  runs no teacher forward and loads no teacher weights. Classification caches full logits, causal LMs the
  top-k log-probabilities (so only the terms that read a sparse teacher, ``topk`` and ``uld``, train offline),
  embeddings the embeddings;
- ``online``: the teacher runs on every batch (needed for feature terms: hidden states, attentions, values);
- ``multi_teacher``: like ``offline``, with the weighted average of several teachers' distributions, each
  softened at the term's own temperature, as target (:func:`losses.mix_teachers`);
- ``seq_kd`` (causal LM): the teacher writes continuations of the train rows' prompts once (cached); the
  student is trained on prompt + continuation with the loss on the continuation only;
- ``on_policy`` (causal LM): with probability λ a step's continuations are sampled from the student and scored
  by the online teacher with the recipe's divergences; otherwise the step trains on the dataset's text.

Causal LMs whose teacher uses another tokenizer train with ``uld`` (plus ``ce`` on the data) in the offline,
online and on_policy schemes, on the positions where both models have read the same text (:mod:`.align`); the
other terms compare token positions one to one and are refused. ``seq_kd`` re-tokenises the teacher's text.
``self_distillation`` and ``teacher_assistant`` are chains of ``offline`` runs built by the caller.

A run is repeatable bit for bit on CPU: everything is seeded from ``train.seed``, the batch at step ``s`` is a
pure function of (seed, s), and the term state, early-stopping state and RNG states are checkpointed, so a run
resumed from a checkpoint continues exactly like an uninterrupted one.
"""

from __future__ import annotations

import functools
import math
import random
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from . import methods
from .cache import CacheEntry, TeacherCache, gather_topk, vocab_digest
from .checkpoint import (
    CHECKPOINTS,
    STATE_FILE,
    clean_for_resume,
    latest_checkpoint,
    load_checkpoint,
    owned_name,
    prune,
    write_checkpoint,
)
from .config import TASKS, LossTermConfig, ModelConfig, RunConfig, TrainConfig
from .data import (
    Batch,
    Batcher,
    LMBatcher,
    LoadedDataset,
    Split,
    load_dataset,
    rows_for_step,
    validation_rows,
)
from .errors import ConfigError, DataError, TrainingError
from .evaluate import autocast, evaluate, forward_outputs, shift_for_lm
from .losses import LossParts
from .methods import TermInputs, TermState
from .models import LoadedModel, load_model, model_dims, save_model
from .runtime import (
    generate_continuations,
    lm_max_length,
    make_batcher,
    out_of_memory_as_training_error,
    prepare_attention,
    prompt_length,
    step_seed,
)
from .schemes import SCHEMES, validate_scheme_params
from .sources import check_run_sources
from .teachers import TeacherOutputs, Teachers, TeacherTargets, _seq_kd_rows, _teacher_metrics
from .terms import LOSS_TERMS, ModelDims, validate_terms

LR_SCHEDULES = ("constant", "linear", "cosine")
# Schemes this loop runs; the chained ones are sequences of offline runs the caller builds.
LOOP_SCHEMES = ("offline", "online", "hard_labels", "multi_teacher", "seq_kd", "on_policy")
FEATURE_NEEDS = frozenset({"hidden_states", "attentions", "attention_scores", "values"})
# Eval metrics streamed during training (efficiency is measured once, at the end), by task.
STREAMED_EVAL_METRICS = {
    "classification": ("loss", "accuracy", "macro_f1", "ece", "agreement", "kl_to_teacher"),
    "causal_lm": ("loss", "perplexity", "bits_per_token", "agreement", "kl_to_teacher"),
    "embedding": ("cosine_to_teacher",),
}
TEACHER_METRICS = ("agreement", "kl_to_teacher", "cosine_to_teacher")
EARLY_STOPPING_MODES = ("max", "min")
TERM_MODULES_FILE = "term_modules.safetensors"
BEST_DIR = "best"  # the best eval's weights while early stopping watches a metric
BEST_WEIGHTS_FILE = "model.safetensors"


@dataclass
class Callbacks:
    """How a caller follows and steers a run. Every field is optional.

    - ``on_metrics(step, metrics)``: training metrics every ``log_every`` steps (``loss``, one entry per term,
      ``weight/<term>`` and ``<param>/<term>`` for scheduled terms, ``lr``, ``samples_per_s``, for causal LMs
      ``tokens_per_s`` (non-padding tokens), on CUDA ``gpu_memory_bytes`` (peak allocated in the interval),
      and for ``on_policy`` ``student_generated``: the fraction of micro-batches sampled from the student) and
      eval metrics every ``eval_every`` steps: ``eval/loss``, ``eval/accuracy``, ... on the eval split, or,
      with early stopping, ``val/loss``, ``val/accuracy``, ... on the validation slice (the eval split is then
      evaluated only at the end); and the eval split's ``eval/...`` of the reported student at the last step.
    - ``on_progress(step, total)``: after every step; throttle on the caller's side.
    - ``on_checkpoint(step, path)``: registers a complete checkpoint folder; returning False refuses it (the
      caller lost the run): the folder is deleted and the run stops at once, writing nothing more.
    - ``should_stop()``: polled every ``log_every`` steps; True ends the run early, with a checkpoint of the
      step while the caller still owns the run.
    - ``owns_run()``: False once the caller lost the run (another worker took it over); checked before any
      weights are written (checkpoints, best weights, the final model), so a run that lost its owner saves
      nothing.
    """

    on_metrics: Callable[[int, dict[str, float]], None] | None = None
    on_progress: Callable[[int, int], None] | None = None
    on_checkpoint: Callable[[int, str], bool | None] | None = None
    should_stop: Callable[[], bool] | None = None
    owns_run: Callable[[], bool] | None = None

    def owned(self) -> bool:
        return self.owns_run is None or self.owns_run()


@dataclass
class TrainResult:
    """What a run produced. ``student``/``teacher`` are :func:`evaluate` metrics on the eval split.

    ``stopped``: ``should_stop`` ended the run, or its caller lost it (nothing saved or evaluated).
    ``stopped_early``: early stopping ended it (saved and evaluated as usual); ``best_step`` /
    ``best_metric``: the best evaluation of the monitored metric on the validation slice (None without early
    stopping); ``restored_best``: the saved, evaluated student is the one of ``best_step``
    (``train.early_stopping_restore_best``), not the last weights. ``teacher_cache``: one entry per
    teacher-output cache entry the run used (``key``, ``split``, ``stored``, ``hit``, ``seconds``, ``path``,
    ``bytes``, ``waited``). ``teacher_forwards``: teacher forward passes this run executed (0 when everything
    came from the cache).
    """

    steps: int
    stopped: bool
    final_dir: str | None
    student: dict[str, float]
    teacher: dict[str, float] | None
    train_seconds: float
    last_checkpoint: str | None
    task: str = "classification"
    scheme: str = "offline"
    stopped_early: bool = False
    best_step: int | None = None
    best_metric: float | None = None
    restored_best: bool = False
    teacher_cache: list[dict[str, Any]] = field(default_factory=list)
    teacher_forwards: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# --- pure helpers -------------------------------------------------------------------------------------------


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
        raise ConfigError(
            f"Device '{name}' does not exist; this worker has {torch.cuda.device_count()} GPU(s)."
        )
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
    positive_ints = ("max_steps", "batch_size", "log_every", "eval_every", "save_every", "grad_accum_steps")
    for name in positive_ints:
        value = getattr(train, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"train.{name} must be a whole number >= 1, got {value!r}.")
    for name in ("warmup_steps", "early_stopping_patience"):
        value = getattr(train, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ConfigError(f"train.{name} must be a whole number >= 0, got {value!r}.")
    for name in ("lr", "weight_decay", "grad_clip"):
        value = getattr(train, name)
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not math.isfinite(value)
            or value < 0
        ):
            raise ConfigError(f"train.{name} must be a number >= 0, got {value!r}.")
    if train.lr <= 0:
        raise ConfigError(f"train.lr must be > 0, got {train.lr!r}.")
    if train.lr_schedule not in LR_SCHEDULES:
        raise ConfigError(
            f"train.lr_schedule must be one of {', '.join(LR_SCHEDULES)}, got {train.lr_schedule!r}."
        )
    if train.early_stopping_mode not in EARLY_STOPPING_MODES:
        raise ConfigError(f"train.early_stopping_mode must be max or min, got {train.early_stopping_mode!r}.")
    fraction = train.validation_fraction
    if isinstance(fraction, bool) or not isinstance(fraction, int | float) or not 0 < fraction <= 0.5:
        raise ConfigError(f"train.validation_fraction must be a number in (0, 0.5], got {fraction!r}.")


# --- what a run is, checked before anything is loaded -------------------------------------------------------


@dataclass(frozen=True)
class RunPlan:
    """The checked shape of a run: terms, what they need, and how the teacher takes part.

    ``teacher_mode``: ``none`` (no term reads the teacher), ``cached`` (outputs from the teacher-output cache)
    or ``online`` (the teacher runs on each batch).
    """

    terms: list[LossTermConfig]
    needs: frozenset[str]
    scheme_params: dict[str, Any]
    teacher_mode: str
    teachers: tuple[ModelConfig, ...]
    teacher_weights: tuple[float, ...]

    @property
    def features(self) -> frozenset[str]:
        return self.needs & FEATURE_NEEDS

    @property
    def uses_teacher(self) -> bool:
        return bool(self.teachers)


def plan_run(cfg: RunConfig) -> RunPlan:
    """Check everything about ``cfg`` that needs no data and no model.

    Raises:
        ConfigError: with a message the user can act on.
    """
    check_train_config(cfg.train)
    check_run_sources(cfg)  # hub ids and local paths, before any file is read
    if not cfg.output_dir:
        raise ConfigError("The run has no output_dir.")
    if cfg.task not in TASKS:
        raise ConfigError(f"Unknown task '{cfg.task}'. Use one of: {', '.join(TASKS)}.")
    spec = SCHEMES.get(cfg.scheme)
    if spec is not None and spec.chained:
        raise ConfigError(
            f"Scheme '{cfg.scheme}' is a chain of runs that the experiment builds; each of its runs "
            "uses the offline scheme."
        )
    if cfg.scheme not in LOOP_SCHEMES or spec is None:
        raise ConfigError(f"Unknown training scheme '{cfg.scheme}'. Use one of: {', '.join(LOOP_SCHEMES)}.")
    if cfg.task not in spec.tasks:
        raise ConfigError(f"Scheme '{cfg.scheme}' works for {' and '.join(spec.tasks)} runs, not {cfg.task}.")
    scheme_params = validate_scheme_params(cfg.scheme, cfg.scheme_params)
    terms = recipe_terms(cfg)
    if cfg.task == "embedding":
        label_terms = [t.name for t in terms if LOSS_TERMS[t.name].kind == "labels"]
        if label_terms:
            raise ConfigError(
                f"Loss term '{label_terms[0]}' needs labels, but an embedding run has none. Use "
                "embedding_mse (and an offline, online or multi_teacher scheme)."
            )
    if cfg.scheme == "on_policy" and any(t.name == "ce" and t.weight > 0 for t in terms):
        raise ConfigError(
            "The on_policy scheme scores student samples with the teacher; they have no ground "
            "truth for ce. Remove ce, or use the online scheme."
        )
    needs = frozenset().union(*(LOSS_TERMS[t.name].needs for t in terms))
    if cfg.task != "embedding" and "embeddings" in needs:
        needs |= {"hidden_states"}  # pooled from the last hidden state, on every batch
    teacher_terms = [t.name for t in terms if LOSS_TERMS[t.name].needs]
    needs_teacher = bool(teacher_terms) or cfg.scheme == "seq_kd"
    if needs_teacher and cfg.teacher is None:
        first = teacher_terms[0] if teacher_terms else None
        what = f"Loss term '{first}' needs" if first else f"Scheme '{cfg.scheme}' needs"
        raise ConfigError(
            f"{what} a teacher, but the run has none. Add a teacher or use the hard_labels scheme."
        )
    if cfg.extra_teachers and cfg.scheme != "multi_teacher":
        raise ConfigError("Extra teachers are only used by the multi_teacher scheme.")
    teachers: tuple[ModelConfig, ...] = ()
    weights: tuple[float, ...] = ()
    if needs_teacher:
        teachers = (cfg.teacher, *cfg.extra_teachers) if cfg.scheme == "multi_teacher" else (cfg.teacher,)
        weights = tuple(cfg.teacher_weights) or (1.0,) * len(teachers)
        if len(weights) != len(teachers):
            raise ConfigError(
                f"teacher_weights has {len(weights)} entries for {len(teachers)} teachers; give one "
                "weight per teacher (the main teacher first), or none for equal weights."
            )
        if any(isinstance(w, bool) or not math.isfinite(w) or w < 0 for w in weights) or sum(weights) <= 0:
            raise ConfigError("teacher_weights must be numbers >= 0 with a positive sum.")
    features = needs & FEATURE_NEEDS
    if features and cfg.scheme in ("offline", "multi_teacher"):
        term = next(
            t.name
            for t in terms
            if LOSS_TERMS[t.name].needs & features
            or ("embeddings" in LOSS_TERMS[t.name].needs and cfg.task != "embedding")
        )
        raise ConfigError(
            f"Loss term '{term}' needs the teacher's {', '.join(sorted(features))} on every batch, "
            f"which the {cfg.scheme} scheme does not keep (it caches outputs only). Use the online "
            "scheme."
        )
    if cfg.scheme == "multi_teacher" and cfg.task == "embedding":
        raise ConfigError(
            "multi_teacher averages the teachers' output distributions; embedding runs have none."
        )
    if cfg.scheme == "multi_teacher" and cfg.task == "causal_lm" and len(teachers) > 1:
        # The LM cache keeps the top-k of the τ = 1 mixture only; softening it afterwards is not the average
        # of the softened teachers.
        softened = [
            t.name for t in terms if t.params.get("temperature", 1.0) != 1 or "temperature" in t.schedule
        ]
        if softened:
            raise ConfigError(
                f"Loss term '{softened[0]}' softens the teachers with a temperature other than 1, but "
                "a causal-LM multi_teacher run caches the top-k of the teachers' average at "
                "temperature 1 only. Set its temperature to 1 (without a schedule)."
            )
    if not teacher_terms:
        mode = "none"
    elif cfg.scheme in ("offline", "multi_teacher"):
        mode = "cached"
    else:
        mode = "online"
    _check_early_stopping(cfg, has_teacher=bool(teacher_terms))
    return RunPlan(terms, needs, scheme_params, mode, teachers, weights)


def _check_early_stopping(cfg: RunConfig, *, has_teacher: bool) -> None:
    tc = cfg.train
    if not tc.early_stopping_metric or tc.early_stopping_patience == 0:
        return
    name = _watched_metric(tc.early_stopping_metric)
    allowed = [m for m in STREAMED_EVAL_METRICS[cfg.task] if has_teacher or m not in TEACHER_METRICS]
    if name not in allowed:
        raise ConfigError(
            f"Early stopping cannot watch '{tc.early_stopping_metric}': a {cfg.task} run reports "
            f"{', '.join(allowed) or 'no eval metric without a teacher'}."
        )


def _watched_metric(name: str) -> str:
    """The early-stopping metric without a split prefix: it is always measured on the validation slice."""
    return name.removeprefix("val/").removeprefix("eval/")


class EarlyStopping:
    """Stops when the watched metric, measured on the validation slice, has not improved for ``patience``
    evaluations in a row."""

    def __init__(self, train: TrainConfig) -> None:
        self.metric = _watched_metric(train.early_stopping_metric)
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


class _NonFiniteWatch:
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


def _reports_out_of_memory(function: Callable[..., TrainResult]) -> Callable[..., TrainResult]:
    """``train``'s last net: out of memory in a phase without a wrap of its own still reads as out of
    memory."""

    @functools.wraps(function)
    def wrapper(cfg: RunConfig, *args: Any, **kwargs: Any) -> TrainResult:
        with out_of_memory_as_training_error(cfg, "during the run"):
            return function(cfg, *args, **kwargs)

    return wrapper


# --- checks that need the models ----------------------------------------------------------------------------


def run_dims(student: LoadedModel, teacher: dict[str, Any] | None, *, task: str, sparse: bool) -> ModelDims:
    """``methods.ModelDims`` from the student and the teacher's :func:`models.model_dims`."""
    s, t = model_dims(student), teacher or {}
    embedding = task == "embedding"
    return ModelDims(
        student_vocab_size=s["vocab_size"],
        teacher_vocab_size=t.get("vocab_size"),
        student_num_layers=s["num_layers"],
        teacher_num_layers=t.get("num_layers"),
        student_hidden_size=s["hidden_size"],
        teacher_hidden_size=t.get("hidden_size"),
        student_num_heads=s["num_heads"],
        teacher_num_heads=t.get("num_heads"),
        student_embedding_size=s["vocab_size"] if embedding else None,
        teacher_embedding_size=t.get("vocab_size") if embedding else None,
        sparse_teacher=sparse,
    )


def _check_cross_tokenizer_terms(
    terms: list[LossTermConfig],
    *,
    scheme: str,
    teacher_mode: str,
    student: LoadedModel,
    teacher: LoadedModel | None,
) -> None:
    """Raise ConfigError unless a causal-LM recipe can run with a teacher that uses another tokenizer.

    Across tokenizers only ``uld`` compares the two models, on the positions where both have read the same
    text (:mod:`.align`), online, from the top-k cache or on the student's samples (``on_policy``); ``ce``
    trains on the data alone. Pairing cached positions needs the student's character offsets, pairing sampled
    text the teacher's: both come from fast (Rust) tokenizers only. ``teacher``: the loaded teacher, None when
    not loaded.
    """
    if not any(LOSS_TERMS[t.name].kind == "uld" for t in terms):
        raise ConfigError(
            "The teacher and the student use different tokenizers, so their token positions "
            "do not line up. Give them the same tokenizer, use the uld (cross-tokenizer) term, or "
            "use seq_kd (trains on the teacher's text)."
        )
    others = [t.name for t in terms if LOSS_TERMS[t.name].kind not in ("uld", "labels")]
    if others:
        raise ConfigError(
            f"The teacher and the student use different tokenizers, so only the uld term can compare "
            "them (on the positions where both have read the same text); "
            f"{', '.join(others)} compare{'s' if len(others) == 1 else ''} token positions one to "
            f"one. Remove {'it' if len(others) == 1 else 'them'}, or give both models the same "
            "tokenizer."
        )
    if teacher_mode == "cached" and not getattr(student.tokenizer, "is_fast", False):
        raise ConfigError(
            "Cross-tokenizer uld from the teacher cache pairs positions by the characters each "
            "token covers, which needs a fast (Rust) tokenizer, and the student's is a slow one."
        )
    if scheme == "on_policy" and teacher is not None and not getattr(teacher.tokenizer, "is_fast", False):
        raise ConfigError(
            "Cross-tokenizer on_policy pairs the student's samples with the teacher's reading of "
            "their text by the characters each token covers, which needs a fast (Rust) tokenizer, "
            "and the teacher's is a slow one."
        )


# --- the validation slice -----------------------------------------------------------------------------------

VALIDATION_SALT = (
    2  # the slice's random stream: [split_seed, 2] (the labelled subset draws from [split_seed, 1])
)


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


# --- the run's setup, one named step at a time --------------------------------------------------------------


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


def load_data_and_models(cfg: RunConfig, plan: RunPlan) -> Loaded:
    """Load the dataset and the student (after seeding everything); the teachers load later, if ever."""
    device = resolve_device(cfg.train.device)
    output_dir = Path(cfg.output_dir)
    cache = TeacherCache(Path(cfg.cache_dir) if cfg.cache_dir else output_dir / "teacher-cache")
    dataset = load_dataset(cfg.dataset, task=cfg.task)
    if len(dataset.train) == 0 or len(dataset.eval) == 0:
        raise DataError(f"Dataset '{dataset.name}' has an empty train or eval split.")
    seed_everything(cfg.train.seed)
    with out_of_memory_as_training_error(cfg, "while loading the student"):
        student = load_model(cfg.student, dataset=dataset, role="student")
        prepare_attention(student, plan)
        student.model.to(device).train()
    max_length = lm_max_length(dataset, student) if cfg.task == "causal_lm" else dataset.max_length
    teachers = Teachers(cfg, plan, dataset, device, max_length=max_length) if plan.uses_teacher else None
    outputs = TeacherOutputs(cfg, plan, teachers, cache, terms=plan.terms, max_length=max_length)
    return Loaded(device, output_dir, cache, dataset, student, max_length, teachers, outputs)


def check_with_models(
    cfg: RunConfig, plan: RunPlan, run: Loaded
) -> tuple[list[LossTermConfig], ModelDims, bool]:
    """Checks that need the models, before any training or teacher work: the terms against both models' sizes,
    and what a teacher with another tokenizer allows. The teacher's sizes and vocabulary come from an existing
    cache entry when there is one (no teacher load), else from the teacher itself.

    Returns:
        the validated terms, the models' dims, and whether the teacher's vocabulary is the student's.
    """
    task, teachers = cfg.task, run.teachers
    t_dims, t_vocab = None, None
    if plan.teacher_mode != "none":
        existing = run.outputs.existing_train_entry() if plan.teacher_mode == "cached" else None
        if existing is not None and not teachers.is_loaded:
            t_dims, t_vocab = existing.manifest["teacher_dims"], existing.manifest["vocab_digest"]
        else:
            t_dims, t_vocab = model_dims(teachers.first), vocab_digest(teachers.first.tokenizer)
    sparse = plan.teacher_mode == "cached" and task == "causal_lm"
    dims = run_dims(run.student, t_dims, task=task, sparse=sparse)
    terms = validate_terms(plan.terms, dims=dims)
    same_vocab = t_vocab is None or t_vocab == vocab_digest(run.student.tokenizer)
    if task == "causal_lm" and not same_vocab:
        if cfg.scheme == "seq_kd":
            if any(LOSS_TERMS[t.name].kind != "labels" for t in terms):
                raise ConfigError(
                    "seq_kd across tokenizers trains the student on the teacher's text, re-tokenised "
                    "with its own tokenizer; only ce can score it. Remove the other terms."
                )
        else:
            _check_cross_tokenizer_terms(
                terms,
                scheme=cfg.scheme,
                teacher_mode=plan.teacher_mode,
                student=run.student,
                teacher=teachers.first if teachers.is_loaded else None,
            )
        if cfg.dataset.pack:
            raise ConfigError(
                "Cross-tokenizer (uld) runs pair positions within each text, so they cannot pack "
                "texts into blocks: turn packing off."
            )
    return terms, dims, same_vocab


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
        batches, generated_same_vocab = _seq_kd_rows(
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
    cfg: RunConfig, plan: RunPlan, run: Loaded, rows: TrainRows, *, step: int
) -> TeacherTargets | None:
    """The teacher's part of each batch: looked up in the train split's cache entry (computed now on a miss)
    or computed online; None when no term reads the teacher or no step is left to train."""
    if plan.teacher_mode == "none" or step >= cfg.train.max_steps:
        return None
    entry = None
    if plan.teacher_mode == "cached":
        entry = run.outputs.train_entry(rows.batches, same_vocab=rows.same_vocab)
    same_tokens = cfg.task == "causal_lm" and rows.same_vocab
    return TeacherTargets(
        run.teachers,
        entry=entry,
        task=cfg.task,
        same_tokens=same_tokens,
        student=run.student,
        student_rows=rows.batches if isinstance(rows.batches, LMBatcher) else None,
    )


# --- resume: the run's checkpoints and best weights ---------------------------------------------------------


def resume_point(cfg: RunConfig) -> Path | None:
    """The checkpoint a run continues from: for an owned attempt, the one its owner registered last (never
    merely the newest on disk); without an attempt, the newest complete one in ``output_dir``."""
    if not cfg.attempt:
        return latest_checkpoint(cfg.output_dir)
    if not cfg.resume_from:
        return None
    path = Path(cfg.resume_from)
    if not (path / STATE_FILE).is_file():
        raise TrainingError(
            f"The checkpoint this run resumes from ({path.name}) is missing or incomplete, so it "
            "cannot continue where it stopped. Requeueing it will not help; launch the run again."
        )
    return path


@dataclass
class Checkpoints:
    """The run's checkpoints and best weights, in folders of its attempt. Nothing is written once the caller
    lost the run (``Callbacks.owned()`` False), and a checkpoint that ``on_checkpoint`` refuses is deleted at
    once."""

    cfg: RunConfig
    cb: Callbacks
    student: LoadedModel
    modules: nn.ModuleDict
    optimizer: torch.optim.Optimizer
    term_state: TermState
    stopper: EarlyStopping
    watch: _NonFiniteWatch
    device: torch.device
    best_name: str = ""  # the folder under best/ holding the best eval's weights (early stopping)

    def __post_init__(self) -> None:
        self.output_dir, self.attempt = Path(self.cfg.output_dir), self.cfg.attempt
        self.config_dict = self.cfg.to_dict()

    def resume(self) -> tuple[int, Path | None]:
        """Clear what no registered checkpoint owns, then load the one the run continues from (weights,
        optimizer, RNG, term and early-stopping state), if any.

        Returns:
            the step to start at, and that checkpoint (None when the run starts afresh).
        """
        step = 0
        last_checkpoint = resume_point(self.cfg)
        clean_for_resume(self.output_dir, attempt=self.attempt, resume_from=last_checkpoint)
        if last_checkpoint is not None:
            step, extra = load_checkpoint(
                last_checkpoint,
                model=self.student.model,
                optimizer=self.optimizer,
                config=self.config_dict,
                device=self.device,
                modules=self.modules,
            )
            self.term_state.load_state_dict(extra.get("term_state", {}))
            self.stopper.load_state_dict(extra.get("early_stopping", {}))
            self.best_name = extra.get("best_weights", "")
        # Best weights that no registered checkpoint refers to (a lost worker's, a crash's) never count.
        prune(self.output_dir / BEST_DIR, attempt=self.attempt + 1, keep=0, protect=(self.best_name,))
        return step, last_checkpoint

    def checkpoint(self, at_step: int) -> Path | None:
        """Write, register and prune; None when the caller lost the run (nothing of it stays on disk)."""
        if not self.cb.owned():
            return None
        self.watch.check()  # never persist weights that came from a NaN step
        extra = {
            "term_state": self.term_state.state_dict(),
            "early_stopping": self.stopper.state_dict(),
            "best_weights": self.best_name,
        }
        path = write_checkpoint(
            self.output_dir,
            step=at_step,
            model=self.student.model,
            optimizer=self.optimizer,
            config=self.config_dict,
            attempt=self.attempt,
            modules=self.modules,
            extra=extra,
        )
        if self.cb.on_checkpoint and self.cb.on_checkpoint(at_step, str(path)) is False:
            shutil.rmtree(path, ignore_errors=True)
            return None
        # Registered: older checkpoints and best weights no registered checkpoint refers to can go.
        prune(self.output_dir / CHECKPOINTS, attempt=self.attempt, keep=self.cfg.keep_checkpoints)
        prune(self.output_dir / BEST_DIR, attempt=self.attempt, keep=0, protect=(self.best_name,))
        return path

    def save_best(self, at_step: int) -> None:
        """The student (and the terms' learned projections) of the best eval so far, in a folder of its own
        that the next registered checkpoint refers to."""
        from safetensors.torch import save_model as save_weights_of

        if not self.cb.owned():
            return
        name = owned_name(f"step-{at_step}", self.attempt)
        best = self.output_dir / BEST_DIR / name
        tmp = best.with_name(f".{name}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        for module, file in ((self.student.model, BEST_WEIGHTS_FILE), (self.modules, TERM_MODULES_FILE)):
            if module is self.modules and not len(self.modules.state_dict()):
                continue
            save_weights_of(module, str(tmp / file))
        shutil.rmtree(best, ignore_errors=True)
        tmp.replace(best)
        self.best_name = name

    def has_best(self) -> bool:
        best = self.output_dir / BEST_DIR / self.best_name
        return bool(self.best_name) and (best / BEST_WEIGHTS_FILE).exists()

    def load_best(self) -> None:
        from safetensors.torch import load_model as load_weights_into

        best = self.output_dir / BEST_DIR / self.best_name
        load_weights_into(self.student.model, str(best / BEST_WEIGHTS_FILE), device=str(self.device))
        if len(self.modules.state_dict()) and (best / TERM_MODULES_FILE).exists():
            load_weights_into(self.modules, str(best / TERM_MODULES_FILE), device=str(self.device))


# --- evaluation ---------------------------------------------------------------------------------------------


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
        with out_of_memory_as_training_error(self.cfg, "while evaluating the student"):
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


# --- one training step's inputs -----------------------------------------------------------------------------


@dataclass
class StepInputs:
    """What a micro-batch feeds the terms: its batch (on_policy: with probability λ, student continuations),
    the student's forward and the teacher's part."""

    cfg: RunConfig
    plan: RunPlan
    run: Loaded
    batches: Batcher | LMBatcher
    targets: TeacherTargets | None

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
            seed=step_seed(cfg.train.seed, at_step, index),
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
        out = forward_outputs(
            self.run.student.model,
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


# --- the loop -----------------------------------------------------------------------------------------------


@_reports_out_of_memory
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
        TrainingError: NaN/inf loss, or out of memory (GPU or RAM, in any phase), with the run's estimate.
    """
    cb = callbacks or Callbacks()
    tc, task = cfg.train, cfg.task
    plan = plan_run(cfg)
    run = load_data_and_models(cfg, plan)
    device, student = run.device, run.student
    terms, dims, same_vocab = check_with_models(cfg, plan, run)
    run.outputs.terms = terms  # the train entry keeps the largest k the validated topk terms ask for
    rows = select_train_rows(cfg, plan, run, same_vocab=same_vocab)
    accum = tc.grad_accum_steps
    batch_size = min(tc.batch_size, len(rows.rows))
    modules = methods.build_term_modules(terms, dims).to(device)
    term_state = TermState()
    params = list(student.model.parameters()) + list(modules.parameters())
    optimizer = torch.optim.AdamW(params, lr=tc.lr, weight_decay=tc.weight_decay)
    stopper = EarlyStopping(tc)
    term_names = [t.name for t in terms]
    watch = _NonFiniteWatch(term_names, device)
    saves = Checkpoints(cfg, cb, student, modules, optimizer, term_state, stopper, watch, device)
    step, last_checkpoint = saves.resume()

    started = time.perf_counter()
    inputs_of = StepInputs(cfg, plan, run, rows.batches, teacher_targets(cfg, plan, run, rows, step=step))
    eval_batches = make_batcher("eval", run.dataset, student, max_length=run.max_length)
    evaluation = Evaluation(
        cfg,
        cb,
        run,
        rows,
        modules,
        eval_batches=eval_batches,
        final_dir=run.output_dir / owned_name("final", cfg.attempt),
    )
    restore_best = stopper.enabled and tc.early_stopping_restore_best
    scheduled = [t for t in terms if t.schedule]
    sums = torch.zeros(1 + len(term_names), device=device)  # running totals for the log interval, no sync
    tokens = torch.zeros((), dtype=torch.long, device=device)  # causal LM: real tokens in the interval
    interval_steps, interval_start, generated = 0, time.perf_counter(), 0
    stopped = stopped_early = False
    while step < tc.max_steps:
        step_rows = rows_for_step(step, rows.rows, batch_size=batch_size * accum, seed=tc.seed)
        lr = lr_at(step, tc)
        for group in optimizer.param_groups:
            group["lr"] = lr
        with out_of_memory_as_training_error(cfg, f"at step {step + 1}"):
            for index, micro_rows in enumerate(np.array_split(step_rows, accum)):  # gradient accumulation
                batch, batch_rows, sampled = inputs_of.micro_batch(micro_rows, step, index)
                with autocast(device):
                    inputs = inputs_of.term_inputs(batch, batch_rows, step)
                parts = methods.combine(terms, inputs, modules=modules, state=term_state)
                (parts.total / accum).backward()
                watch.update(step + 1, parts)
                sums += torch.stack([parts.total.detach()] + [parts.parts[n] for n in term_names]) / accum
                if task == "causal_lm":
                    tokens += batch.inputs["attention_mask"].sum()
                generated += sampled
            if tc.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(params, tc.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        step += 1
        interval_steps += 1
        if cb.on_progress:
            cb.on_progress(step, tc.max_steps)

        if step % tc.log_every == 0 or step == tc.max_steps:
            watch.check()
            means = (sums / interval_steps).tolist()  # the one sync of the interval
            elapsed = time.perf_counter() - interval_start
            logged = {
                "loss": means[0],
                **dict(zip(term_names, means[1:], strict=True)),
                "lr": lr,
                "samples_per_s": interval_steps * batch_size * accum / max(elapsed, 1e-9),
            }
            if task == "causal_lm":
                logged["tokens_per_s"] = float(tokens.item()) / max(elapsed, 1e-9)
                tokens.zero_()
            if device.type == "cuda":
                logged["gpu_memory_bytes"] = float(torch.cuda.max_memory_allocated(device))
                torch.cuda.reset_peak_memory_stats(device)
            for term in scheduled:
                weight, values = methods.current_params(term, step - 1, tc.max_steps)
                logged |= {
                    (f"weight/{term.name}" if target == "weight" else f"{target}/{term.name}"): float(
                        weight if target == "weight" else values[target]
                    )
                    for target in term.schedule
                }
            for name, values in term_state.terms.items():
                if "t" in values:  # taid's interpolation
                    logged[f"t/{name}"] = float(values["t"])
            if cfg.scheme == "on_policy":
                logged["student_generated"] = generated / (interval_steps * accum)
            if cb.on_metrics:
                cb.on_metrics(step, logged)
            sums.zero_()
            interval_steps, interval_start, generated = 0, time.perf_counter(), 0
        if step % tc.eval_every == 0 and step < tc.max_steps:
            watch.check()
            # Early stopping decides on the validation slice; without it the eval split's curve is only a
            # curve.
            metrics = evaluation.student(final=False, validation=stopper.enabled)
            evaluation.emit(step, metrics, "val" if stopper.enabled else "eval")
            stopped_early = stopper.update(step, metrics)
            if restore_best and stopper.best_step == step:
                saves.save_best(step)
        saved_now = False
        if step % tc.save_every == 0:
            saved = saves.checkpoint(step)
            if saved is None:  # another worker owns the run now: stop, writing nothing more
                stopped = True
                break
            last_checkpoint, saved_now = saved, True
        if stopped_early:
            break
        if step % tc.log_every == 0 and step < tc.max_steps and cb.should_stop and cb.should_stop():
            if not saved_now:
                last_checkpoint = saves.checkpoint(step) or last_checkpoint
            stopped = True
            break
    watch.check()
    return finish(
        cfg,
        cb,
        run,
        evaluation,
        saves,
        step=step,
        stopped=stopped,
        stopped_early=stopped_early,
        restore_best=restore_best,
        train_seconds=time.perf_counter() - started,
        last_checkpoint=last_checkpoint,
    )


# --- the finish ---------------------------------------------------------------------------------------------


def finish(
    cfg: RunConfig,
    cb: Callbacks,
    run: Loaded,
    evaluation: Evaluation,
    saves: Checkpoints,
    *,
    step: int,
    stopped: bool,
    stopped_early: bool,
    restore_best: bool,
    train_seconds: float,
    last_checkpoint: Path | None,
) -> TrainResult:
    """After the loop: restore the best weights (early stopping), save the final model, evaluate the student
    (and the teacher) on the eval split. A run that was stopped or lost its owner saves and evaluates
    nothing."""
    teachers, stopper, modules = run.teachers, saves.stopper, saves.modules
    common = {"task": cfg.task, "scheme": cfg.scheme, "teacher_cache": [u.to_dict() for u in run.cache.uses]}
    if stopped or not cb.owned():
        return TrainResult(
            steps=step,
            stopped=True,
            final_dir=None,
            student={},
            teacher=None,
            train_seconds=train_seconds,
            last_checkpoint=str(last_checkpoint) if last_checkpoint else None,
            teacher_forwards=teachers.forwards if teachers else 0,
            **common,
        )
    restored = False
    if restore_best:
        if not stopped_early:  # the last weights are a candidate too, judged on the validation slice
            last_metrics = evaluation.student(final=False, validation=True)
            evaluation.emit(step, last_metrics, "val")
            stopper.update(step, last_metrics)
        if stopper.best_step not in (None, step) and saves.has_best():
            saves.load_best()
            restored = True
    if not cb.owned():
        return TrainResult(
            steps=step,
            stopped=True,
            final_dir=None,
            student={},
            teacher=None,
            train_seconds=train_seconds,
            last_checkpoint=None,
            **common,
        )
    final_dir = evaluation.final_dir
    save_model(run.student, final_dir)
    if len(modules.state_dict()):
        from safetensors.torch import save_model as save_weights_of

        save_weights_of(modules, str(final_dir / TERM_MODULES_FILE))
    student_metrics = evaluation.student(final=True)
    # The eval split's point of the reported student (with early stopping, the eval split's only point: every
    # decision was taken on the validation slice).
    evaluation.emit(step, student_metrics)
    if (
        not stopped_early and not restore_best and stopper.enabled
    ):  # the last weights' val point, for best_step
        last_metrics = evaluation.student(final=False, validation=True)
        evaluation.emit(step, last_metrics, "val")
        stopper.update(step, last_metrics)
    teacher_metrics = None
    if teachers is not None and cfg.evaluate_teacher:
        teacher_rows = (
            evaluation.eval_batches
            if evaluation.rows.same_vocab
            else make_batcher("eval", run.dataset, teachers.first, max_length=run.max_length)
        )
        teacher_metrics = _teacher_metrics(
            teachers,
            evaluation.teacher_entry(),
            run.cache,
            run.dataset,
            teacher_rows,
            task=cfg.task,
            batch_size=cfg.train.batch_size,
        )
    common["teacher_cache"] = [u.to_dict() for u in run.cache.uses]
    return TrainResult(
        steps=step,
        stopped=False,
        final_dir=str(final_dir),
        student=student_metrics,
        teacher=teacher_metrics,
        train_seconds=train_seconds,
        last_checkpoint=str(last_checkpoint) if last_checkpoint else None,
        stopped_early=stopped_early,
        best_step=stopper.best_step if stopper.enabled else None,
        best_metric=stopper.best if stopper.enabled else None,
        restored_best=restored,
        teacher_forwards=teachers.forwards if teachers else 0,
        **common,
    )
