"""The training loop: one readable function, progress reported through callbacks only.

Tasks (``RunConfig.task``): ``classification``, ``causal_lm`` (next-token prediction on text rows; the logits
at position t are trained against token t+1, padding and prompts masked with -100) and ``embedding`` (the student
learns the teacher's mean-pooled sentence embedding).

Schemes:
- ``hard_labels``: the student alone, ``ce`` on the labelled rows (the baseline of every experiment);
- ``offline``: the teacher's outputs on the train split come from the teacher-output cache (:mod:`.cache`):
  computed once, by whichever run needs them first, then reused by every run with the same key; a cache hit
  runs no teacher forward and loads no teacher weights. Classification caches full logits, causal LMs the
  top-k log-probabilities (so only the terms that read a sparse teacher, ``topk`` and ``uld``, train offline),
  embeddings the embeddings;
- ``online``: the teacher runs on every batch (needed for feature terms: hidden states, attentions, values);
- ``multi_teacher``: like ``offline``, with the weighted average of several teachers' distributions, each softened
  at the term's own temperature, as target (:func:`losses.mix_teachers`);
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

import contextlib
import functools
import hashlib
import math
import random
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from . import methods
from .align import align_positions, decoded_prefix_ends, gather_aligned, prefix_ends
from .attention import use_scores_attention
from .cache import (
    EVAL_TOPK,
    CacheEntry,
    TeacherCache,
    cache_key,
    dataset_description,
    gather_rows,
    gather_topk,
    model_files_fingerprint,
    pack_positions,
    row_tokens,
    state_dict_digest,
    topk_of,
    vocab_digest,
)
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
from .evaluate import (
    autocast,
    efficiency_metrics,
    eval_mode,
    evaluate,
    forward_outputs,
    lm_metrics_from_sums,
    predict_logits,
    shift_for_lm,
)
from .losses import LossParts, mix_teachers
from .memory import host_memory_bytes, out_of_memory_message
from .methods import TermInputs, TermState
from .models import LoadedModel, SentenceEmbedder, load_model, model_dims, save_model
from .schemes import SCHEMES, validate_scheme_params
from .sources import check_run_sources
from .terms import LOSS_TERMS, ModelDims

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
BEST_DIR = "best"                       # the best eval's weights while early stopping watches a metric
BEST_WEIGHTS_FILE = "model.safetensors"


@dataclass
class Callbacks:
    """How a caller follows and steers a run. Every field is optional.

    - ``on_metrics(step, metrics)``: training metrics every ``log_every`` steps (``loss``, one entry per term,
      ``weight/<term>`` and ``<param>/<term>`` for scheduled terms, ``lr``, ``samples_per_s``, for causal LMs
      ``tokens_per_s`` (non-padding tokens), on CUDA ``gpu_memory_bytes`` (peak allocated in the interval), and for
      ``on_policy`` ``student_generated``: the fraction of micro-batches sampled from the student) and eval
      metrics every ``eval_every`` steps: ``eval/loss``, ``eval/accuracy``, ... on the eval split, or, with early
      stopping, ``val/loss``, ``val/accuracy``, ... on the validation slice (the eval split is then evaluated only
      at the end); and the eval split's ``eval/...`` of the reported student at the last step.
    - ``on_progress(step, total)``: after every step; throttle on the caller's side.
    - ``on_checkpoint(step, path)``: registers a complete checkpoint folder; returning False refuses it (the
      caller lost the run): the folder is deleted and the run stops at once, writing nothing more.
    - ``should_stop()``: polled every ``log_every`` steps; True ends the run early, with a checkpoint of the step
      while the caller still owns the run.
    - ``owns_run()``: False once the caller lost the run (another worker took it over); checked before any
      weights are written (checkpoints, best weights, the final model), so a run that lost its owner saves nothing.
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

    ``stopped``: ``should_stop`` ended the run, or its caller lost it (nothing saved or evaluated). ``stopped_early``: early stopping
    ended it (saved and evaluated as usual); ``best_step`` / ``best_metric``: the best evaluation of the monitored
    metric on the validation slice (None without early stopping); ``restored_best``: the saved, evaluated student is the one of
    ``best_step`` (``train.early_stopping_restore_best``), not the last weights. ``teacher_cache``: one entry per teacher-output cache entry the run
    used (``key``, ``split``, ``stored``, ``hit``, ``seconds``, ``path``, ``bytes``, ``waited``).
    ``teacher_forwards``: teacher forward passes this run executed (0 when everything came from the cache).
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
    terms = methods.validate_terms(cfg.terms)
    if cfg.scheme == "hard_labels":
        ce = next((t for t in terms if t.name == "ce"), LossTermConfig("ce", 1.0, {}))
        return methods.validate_terms([LossTermConfig("ce", 1.0, ce.params)])
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
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
            raise ConfigError(f"train.{name} must be a number >= 0, got {value!r}.")
    if train.lr <= 0:
        raise ConfigError(f"train.lr must be > 0, got {train.lr!r}.")
    if train.lr_schedule not in LR_SCHEDULES:
        raise ConfigError(f"train.lr_schedule must be one of {', '.join(LR_SCHEDULES)}, got {train.lr_schedule!r}.")
    if train.early_stopping_mode not in EARLY_STOPPING_MODES:
        raise ConfigError(f"train.early_stopping_mode must be max or min, got {train.early_stopping_mode!r}.")
    fraction = train.validation_fraction
    if isinstance(fraction, bool) or not isinstance(fraction, int | float) or not 0 < fraction <= 0.5:
        raise ConfigError(f"train.validation_fraction must be a number in (0, 0.5], got {fraction!r}.")


def mix_teacher_logits(logits: list[Tensor], weights: list[float], *, temperature: float = 1.0) -> Tensor:
    """Teacher logits for ``multi_teacher``: ``τ · log Σ_i w_i softmax(z_i / τ)`` (see :func:`losses.mix_teachers`).

    At τ = 1 (what the caches store, for evaluation and the sparse LM top-k) these are the log-probabilities of
    the weighted average of the teachers' distributions. Training terms with their own τ mix the per-teacher
    logits again at that τ (``TermInputs.teacher_mixture``), so the target is the average of the softened
    teachers. Weights are normalised to sum to 1.

    Args:
        logits: one (..., V) tensor per teacher; weights: one number >= 0 per teacher.
    Returns:
        (..., V) float32.
    """
    return mix_teachers([z.float() for z in logits], weights, temperature=temperature)


# --- what a run is, checked before anything is loaded ----------------------------------------------------------


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
        raise ConfigError(f"Scheme '{cfg.scheme}' is a chain of runs that the experiment builds; each of its runs "
                          "uses the offline scheme.")
    if cfg.scheme not in LOOP_SCHEMES or spec is None:
        raise ConfigError(f"Unknown training scheme '{cfg.scheme}'. Use one of: {', '.join(LOOP_SCHEMES)}.")
    if cfg.task not in spec.tasks:
        raise ConfigError(f"Scheme '{cfg.scheme}' works for {' and '.join(spec.tasks)} runs, not {cfg.task}.")
    scheme_params = validate_scheme_params(cfg.scheme, cfg.scheme_params)
    terms = recipe_terms(cfg)
    if cfg.task == "embedding":
        label_terms = [t.name for t in terms if LOSS_TERMS[t.name].kind == "labels"]
        if label_terms:
            raise ConfigError(f"Loss term '{label_terms[0]}' needs labels, but an embedding run has none. Use "
                              "embedding_mse (and an offline, online or multi_teacher scheme).")
    if cfg.scheme == "on_policy" and any(t.name == "ce" and t.weight > 0 for t in terms):
        raise ConfigError("The on_policy scheme scores student samples with the teacher; they have no ground "
                          "truth for ce. Remove ce, or use the online scheme.")
    needs = frozenset().union(*(LOSS_TERMS[t.name].needs for t in terms))
    if cfg.task != "embedding" and "embeddings" in needs:
        needs |= {"hidden_states"}  # pooled from the last hidden state, on every batch
    teacher_terms = [t.name for t in terms if LOSS_TERMS[t.name].needs]
    needs_teacher = bool(teacher_terms) or cfg.scheme == "seq_kd"
    if needs_teacher and cfg.teacher is None:
        first = teacher_terms[0] if teacher_terms else None
        what = f"Loss term '{first}' needs" if first else f"Scheme '{cfg.scheme}' needs"
        raise ConfigError(f"{what} a teacher, but the run has none. Add a teacher or use the hard_labels scheme.")
    if cfg.extra_teachers and cfg.scheme != "multi_teacher":
        raise ConfigError("Extra teachers are only used by the multi_teacher scheme.")
    teachers: tuple[ModelConfig, ...] = ()
    weights: tuple[float, ...] = ()
    if needs_teacher:
        teachers = (cfg.teacher, *cfg.extra_teachers) if cfg.scheme == "multi_teacher" else (cfg.teacher,)
        weights = tuple(cfg.teacher_weights) or (1.0,) * len(teachers)
        if len(weights) != len(teachers):
            raise ConfigError(f"teacher_weights has {len(weights)} entries for {len(teachers)} teachers; give one "
                              "weight per teacher (the main teacher first), or none for equal weights.")
        if any(isinstance(w, bool) or not math.isfinite(w) or w < 0 for w in weights) or sum(weights) <= 0:
            raise ConfigError("teacher_weights must be numbers >= 0 with a positive sum.")
    features = needs & FEATURE_NEEDS
    if features and cfg.scheme in ("offline", "multi_teacher"):
        term = next(t.name for t in terms if LOSS_TERMS[t.name].needs & features or
                    ("embeddings" in LOSS_TERMS[t.name].needs and cfg.task != "embedding"))
        raise ConfigError(f"Loss term '{term}' needs the teacher's {', '.join(sorted(features))} on every batch, "
                          f"which the {cfg.scheme} scheme does not keep (it caches outputs only). Use the online "
                          "scheme.")
    if cfg.scheme == "multi_teacher" and cfg.task == "embedding":
        raise ConfigError("multi_teacher averages the teachers' output distributions; embedding runs have none.")
    if cfg.scheme == "multi_teacher" and cfg.task == "causal_lm" and len(teachers) > 1:
        # The LM cache keeps the top-k of the τ = 1 mixture only; softening it afterwards is not the average of
        # the softened teachers.
        softened = [t.name for t in terms if t.params.get("temperature", 1.0) != 1 or "temperature" in t.schedule]
        if softened:
            raise ConfigError(f"Loss term '{softened[0]}' softens the teachers with a temperature other than 1, but "
                              "a causal-LM multi_teacher run caches the top-k of the teachers' average at "
                              "temperature 1 only. Set its temperature to 1 (without a schedule).")
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
        raise ConfigError(f"Early stopping cannot watch '{tc.early_stopping_metric}': a {cfg.task} run reports "
                          f"{', '.join(allowed) or 'no eval metric without a teacher'}.")


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
        self.best, self.best_step, self.bad_evals = state.get("best"), state.get("best_step"), state.get(
            "bad_evals", 0)


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


# What torch's allocators say when they fail: CUDA/MPS "out of memory", the CPU allocator "can't allocate memory"
# or "not enough memory" (and the OS's ENOMEM text).
OUT_OF_MEMORY_TEXTS = ("out of memory", "can't allocate memory", "cannot allocate memory", "not enough memory")
GPU_MEMORY_TEXTS = ("cuda", "gpu", "mps", "hip", "xpu")


def out_of_memory_error(exc: BaseException, cfg: RunConfig, during: str) -> TrainingError | None:
    """The run's message for an out-of-memory failure, or None when ``exc`` is something else.

    The one place that recognises out of memory in its forms: ``torch.OutOfMemoryError`` (CUDA), a RuntimeError
    of an allocator (the CPU's ``DefaultCPUAllocator: can't allocate memory``, MPS, ...) and Python's MemoryError
    (numpy, pure Python). The message names the phase (``during``: "at step 12", "while loading the student"),
    the run's memory estimate (:mod:`.memory`) and what to change.
    """
    text = str(exc).lower()
    if isinstance(exc, torch.OutOfMemoryError):
        gpu = True
    elif isinstance(exc, MemoryError):
        gpu = False
    elif isinstance(exc, RuntimeError) and any(marker in text for marker in OUT_OF_MEMORY_TEXTS):
        gpu = any(marker in text for marker in GPU_MEMORY_TEXTS)
    else:
        return None
    headline = f"Out of GPU memory {during}" if gpu else f"Out of memory (RAM) {during}"
    return TrainingError(out_of_memory_message(cfg.to_dict(), headline=headline, gpu=gpu,
                                               available_bytes=None if gpu else host_memory_bytes()))


@contextlib.contextmanager
def _out_of_memory_as_training_error(cfg: RunConfig, during: str) -> Iterator[None]:
    """Turn out of memory (:func:`out_of_memory_error`) raised inside the block into its TrainingError."""
    try:
        yield
    except (RuntimeError, MemoryError) as exc:
        error = out_of_memory_error(exc, cfg, during)
        if error is None:
            raise
        raise error from exc


def _reports_out_of_memory(function: Callable[..., TrainResult]) -> Callable[..., TrainResult]:
    """``train``'s last net: out of memory in a phase without a wrap of its own still reads as out of memory."""
    @functools.wraps(function)
    def wrapper(cfg: RunConfig, *args: Any, **kwargs: Any) -> TrainResult:
        with _out_of_memory_as_training_error(cfg, "during the run"):
            return function(cfg, *args, **kwargs)

    return wrapper


# --- models and batches ----------------------------------------------------------------------------------------


def lm_max_length(dataset: LoadedDataset, model: LoadedModel) -> int:
    """Token rows of a causal LM run are cut to the dataset's max_length, capped by the student's positions."""
    return model.max_length(dataset.max_length)


def make_batcher(split_name: str, dataset: LoadedDataset, model: LoadedModel, *,
                 max_length: int | None = None) -> Batcher | LMBatcher:
    """Batches of one split for ``model`` (tokenised with its own tokenizer)."""
    split = dataset.train if split_name == "train" else dataset.eval
    if dataset.task == "causal_lm":
        length = max_length or lm_max_length(dataset, model)
        return LMBatcher.from_texts(split.inputs, tokenizer=model.tokenizer, max_length=length, pack=dataset.pack)
    return Batcher(split, tokenizer=model.tokenizer, max_length=model.max_length(dataset.max_length))


def _core_model(model: nn.Module) -> nn.Module:
    return model.encoder if isinstance(model, SentenceEmbedder) else model


def _prepare_attention(loaded: LoadedModel, plan: RunPlan) -> None:
    """Attention maps need the eager attention implementation (SDPA does not return them); pre-softmax scores
    need the eager path that also records them (:mod:`.attention`, which returns the maps too)."""
    core = _core_model(loaded.model)
    if not hasattr(core, "set_attn_implementation"):
        return
    if "attention_scores" in plan.needs:
        use_scores_attention(core)
    elif "attentions" in plan.needs:
        core.set_attn_implementation("eager")


def run_dims(student: LoadedModel, teacher: dict[str, Any] | None, *, task: str, sparse: bool) -> ModelDims:
    """``methods.ModelDims`` from the student and the teacher's :func:`models.model_dims`."""
    s, t = model_dims(student), teacher or {}
    embedding = task == "embedding"
    return ModelDims(
        student_vocab_size=s["vocab_size"], teacher_vocab_size=t.get("vocab_size"),
        student_num_layers=s["num_layers"], teacher_num_layers=t.get("num_layers"),
        student_hidden_size=s["hidden_size"], teacher_hidden_size=t.get("hidden_size"),
        student_num_heads=s["num_heads"], teacher_num_heads=t.get("num_heads"),
        student_embedding_size=s["vocab_size"] if embedding else None,
        teacher_embedding_size=t.get("vocab_size") if embedding else None,
        sparse_teacher=sparse,
    )


def _check_cross_tokenizer_terms(terms: list[LossTermConfig], *, scheme: str, teacher_mode: str,
                                 student: LoadedModel, teacher: LoadedModel | None) -> None:
    """Raise ConfigError unless a causal-LM recipe can run with a teacher that uses another tokenizer.

    Across tokenizers only ``uld`` compares the two models, on the positions where both have read the same text
    (:mod:`.align`), online, from the top-k cache or on the student's samples (``on_policy``); ``ce`` trains on
    the data alone. Pairing cached positions needs the student's character offsets, pairing sampled text the
    teacher's: both come from fast (Rust) tokenizers only. ``teacher``: the loaded teacher, None when not
    loaded.
    """
    if not any(LOSS_TERMS[t.name].kind == "uld" for t in terms):
        raise ConfigError("The teacher and the student use different tokenizers, so their token positions "
                          "do not line up. Give them the same tokenizer, use the uld (cross-tokenizer) term, or "
                          "use seq_kd (trains on the teacher's text).")
    others = [t.name for t in terms if LOSS_TERMS[t.name].kind not in ("uld", "labels")]
    if others:
        raise ConfigError(f"The teacher and the student use different tokenizers, so only the uld term can compare "
                          "them (on the positions where both have read the same text); "
                          f"{', '.join(others)} compare{'s' if len(others) == 1 else ''} token positions one to "
                          f"one. Remove {'it' if len(others) == 1 else 'them'}, or give both models the same "
                          "tokenizer.")
    if teacher_mode == "cached" and not getattr(student.tokenizer, "is_fast", False):
        raise ConfigError("Cross-tokenizer uld from the teacher cache pairs positions by the characters each "
                          "token covers, which needs a fast (Rust) tokenizer, and the student's is a slow one.")
    if scheme == "on_policy" and teacher is not None and not getattr(teacher.tokenizer, "is_fast", False):
        raise ConfigError("Cross-tokenizer on_policy pairs the student's samples with the teacher's reading of "
                          "their text by the characters each token covers, which needs a fast (Rust) tokenizer, "
                          "and the teacher's is a slow one.")


def prompt_length(row: list[int], *, max_new_tokens: int, max_length: int, eos_id: int | None) -> int:
    """How many leading tokens of a text row serve as a generation prompt: the first half of the text (EOS not
    counted), at least 1, leaving room for ``max_new_tokens`` within ``max_length``."""
    n = len(row) - (1 if eos_id is not None and row and row[-1] == eos_id and len(row) > 1 else 0)
    return max(1, min(max(1, n // 2), max_length - max_new_tokens))


@torch.no_grad()
def generate_continuations(model: nn.Module, prompts: list[list[int]], *, max_new_tokens: int,
                           temperature: float, pad_id: int, eos_id: int | None, device: torch.device,
                           seed: int) -> list[list[int]]:
    """Continue each prompt with ``model.generate`` (greedy when ``temperature`` is 0, else sampled with a
    generator seeded by ``seed``, leaving the global RNG untouched). Prompts are left-padded into one batch.

    Returns:
        the new tokens of each prompt, up to and including the first EOS.
    """
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.as_tensor(p)
        mask[i, width - len(p):] = 1
    sample = temperature > 0
    kwargs: dict[str, Any] = {"do_sample": sample, "max_new_tokens": max_new_tokens, "pad_token_id": pad_id}
    if eos_id is not None:
        kwargs["eos_token_id"] = eos_id
    if sample:
        kwargs |= {"temperature": temperature, "top_k": 0, "top_p": 1.0}
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), eval_mode(model):
        torch.manual_seed(seed)
        out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), **kwargs)
    new = out[:, width:].tolist()
    result = []
    for tokens in new:
        if eos_id is not None and eos_id in tokens:
            tokens = tokens[: tokens.index(eos_id) + 1]
        result.append(tokens)
    return result


def _step_seed(seed: int, step: int, salt: int) -> int:
    return int(np.random.default_rng([seed, step, salt]).integers(2**62))


# --- the teacher side ------------------------------------------------------------------------------------------


class Teachers:
    """The run's teacher (or teachers, for multi_teacher), loaded only when something needs them.

    Loading runs inside a forked RNG seeded with the run's seed, so whether and when the teacher is loaded
    never changes the student's random numbers. Every forward of a loaded teacher is counted.
    """

    def __init__(self, cfg: RunConfig, plan: RunPlan, dataset: LoadedDataset, device: torch.device, *,
                 max_length: int) -> None:
        self.cfg, self.plan, self.dataset, self.device = cfg, plan, dataset, device
        self.max_length = max_length
        self.weights = list(plan.teacher_weights)
        self._loaded: list[LoadedModel] | None = None
        self._fingerprint: str | None = None
        self.forwards = 0

    @property
    def is_loaded(self) -> bool:
        return self._loaded is not None

    def models(self) -> list[LoadedModel]:
        if self._loaded is None:
            loaded = []
            devices = [self.device] if self.device.type == "cuda" else []
            for i, teacher_cfg in enumerate(self.plan.teachers):
                with torch.random.fork_rng(devices=devices), \
                        _out_of_memory_as_training_error(self.cfg, "while loading the teacher"):
                    torch.manual_seed(self.cfg.train.seed)
                    model = load_model(teacher_cfg, dataset=self.dataset, role="teacher")
                _prepare_attention(model, self.plan)
                if self.dataset.task == "causal_lm" and model.max_length(self.max_length) < self.max_length:
                    raise ConfigError(f"Teacher '{teacher_cfg.describe()}' reads at most "
                                      f"{model.max_length(self.max_length)} tokens, but the student's rows are "
                                      f"{self.max_length} long. Lower the dataset's max_length.")
                with _out_of_memory_as_training_error(self.cfg, "while loading the teacher"):
                    model.model.to(self.device).eval().requires_grad_(False)
                model.model.register_forward_hook(self._count)
                if i and self.dataset.task != "classification" and vocab_digest(model.tokenizer) != vocab_digest(
                        loaded[0].tokenizer):
                    raise ConfigError("multi_teacher needs teachers that share one tokenizer for a "
                                      f"{self.dataset.task} run; teacher {i + 1} has a different vocabulary.")
                loaded.append(model)
            self._loaded = loaded
        return self._loaded

    def _count(self, *_args: Any) -> None:
        self.forwards += 1

    @property
    def first(self) -> LoadedModel:
        return self.models()[0]

    def fingerprint(self) -> str:
        """What identifies the teachers' outputs: file digests where possible, else state-dict digests."""
        if self._fingerprint is None:
            parts = []
            for i, teacher_cfg in enumerate(self.plan.teachers):
                files = model_files_fingerprint(teacher_cfg)
                if files is None:
                    loaded = self.models()[i]
                    files = f"state:{state_dict_digest(loaded.model)}:vocab:{vocab_digest(loaded.tokenizer)}"
                parts.append(files)
            self._fingerprint = parts[0] if len(parts) == 1 else cache_key(
                {"teachers": parts, "weights": [w / sum(self.weights) for w in self.weights]})
        return self._fingerprint

    def describe(self) -> dict[str, Any]:
        """Manifest fields recorded with a computed entry, so a later hit needs no teacher to check the run."""
        first = self.first
        return {"teacher_dims": model_dims(first), "vocab_digest": vocab_digest(first.tokenizer),
                "teachers": [c.describe() for c in self.plan.teachers]}

    # -- dense outputs on a batch --
    def logits(self, batch_for: Callable[[LoadedModel], Batch]) -> Tensor:
        """The teachers' (mixed) logits on one batch; ``batch_for`` builds each teacher's view of it."""
        outs = []
        for loaded in self.models():
            batch = batch_for(loaded)
            with autocast(self.device):
                outs.append(forward_outputs(loaded.model, batch.inputs).logits.float())
        return outs[0] if len(outs) == 1 else mix_teacher_logits(outs, self.weights)


class TeacherTargets:
    """The teacher's part of each training batch's :class:`TermInputs`.

    ``cached``: looked up by row in a teacher-output cache entry (no teacher forward). ``online``: the teacher
    runs on the batch, returning what the terms need (logits, hidden states, attentions, values, embeddings).

    Causal LMs across tokenizers (``same_tokens`` False) pair each student position with the teacher position
    that has read the same text (:mod:`.align`) and add ``teacher_paired``: from the cache, the entry's rows
    (the teacher's tokens of the same texts) are gathered at the paired positions; online, the teacher reads the
    batch's texts with its own tokenizer; on student samples (``on_policy``, no dataset rows), it reads their
    decoded text.
    """

    def __init__(self, teachers: Teachers, *, entry: CacheEntry | None, task: str, same_tokens: bool,
                 student: LoadedModel | None = None, student_rows: LMBatcher | None = None) -> None:
        self.teachers, self.entry, self.task, self.same_tokens = teachers, entry, task, same_tokens
        self.student, self.student_rows = student, student_rows
        self._own: dict[int, Any] = {}
        self._ends: dict[str, list[list[int]] | None] = {}

    def _prefix_ends(self, key: str, rows: LMBatcher, tokenizer: Any) -> list[list[int]] | None:
        if key not in self._ends:
            self._ends[key] = prefix_ends(self.teachers.dataset.train.inputs, rows.token_rows, tokenizer=tokenizer)
        return self._ends[key]

    def _alignment(self, loaded: LoadedModel, rows: np.ndarray | None, student_width: int,
                   teacher_width: int) -> Tensor | None:
        """Cross-tokenizer pairs of positions that have read the same text (:mod:`.align`); None when either
        tokenizer gives no character offsets (positions are then paired by index)."""
        if rows is None or self.student is None or self.student_rows is None:
            return None
        s_ends = self._prefix_ends("student", self.student_rows, self.student.tokenizer)
        t_ends = self._prefix_ends(f"teacher-{id(loaded)}", self._own[id(loaded)], loaded.tokenizer)
        if s_ends is None or t_ends is None:
            return None
        ids = rows.tolist()
        return align_positions([s_ends[i] for i in ids], [t_ends[i] for i in ids],
                               student_width=student_width, teacher_width=teacher_width)

    def _teacher_batch(self, loaded: LoadedModel, batch: Batch, rows: np.ndarray) -> Batch:
        """The teacher's view of a batch: the same tensors when it shares the student's inputs, else the same
        rows tokenised with its own tokenizer."""
        if self.same_tokens:
            return batch
        key = id(loaded)
        if key not in self._own:
            self._own[key] = make_batcher("train", self.teachers.dataset, loaded)
        return self._own[key].batch(rows).to(self.teachers.device)

    def _cached_teacher_ends(self) -> list[list[int]]:
        """Prefix ends of the cache entry's predicting positions, one list per train row: stored in the entry,
        or (an entry written before they were stored) from the teacher's tokenizer, which loads the teacher."""
        if "cached" not in self._ends:
            t = self.entry.tensors
            offsets = t["offsets"].tolist()
            if "prefix_end" in t:
                flat = t["prefix_end"].tolist()
                ends: list[list[int]] | None = [flat[offsets[i] : offsets[i + 1]] for i in range(len(offsets) - 1)]
            else:
                loaded = self.teachers.first
                rows = make_batcher("train", self.teachers.dataset, loaded, max_length=self.teachers.max_length)
                full = prefix_ends(self.teachers.dataset.train.inputs, rows.token_rows, tokenizer=loaded.tokenizer)
                ends = None if full is None else [
                    row[: offsets[i + 1] - offsets[i]] for i, row in enumerate(full)]
            if ends is None:
                raise ConfigError("Cross-tokenizer uld from the teacher cache pairs positions by the characters each "
                                  "token covers, which needs a fast (Rust) tokenizer, and the teacher's is a slow "
                                  "one.")
            self._ends["cached"] = ends
        return self._ends["cached"]

    def _cached_across_tokenizers(self, rows: Tensor, width: int) -> dict[str, Any]:
        """The cached top-k of the teacher positions paired with each of the student's ``width`` predicting
        positions, and the ``teacher_paired`` mask."""
        s_ends = self._prefix_ends("student", self.student_rows, self.student.tokenizer)
        if s_ends is None:
            raise ConfigError("Cross-tokenizer uld from the teacher cache pairs positions by the characters each "
                              "token covers, which needs a fast (Rust) tokenizer, and the student's is a slow one.")
        t_ends = self._cached_teacher_ends()
        ids = rows.tolist()
        t_width = max(1, max(len(t_ends[i]) for i in ids))
        top = gather_topk(self.entry, rows, t_width, self.teachers.device)                  # (B, T_t, k)
        index = align_positions([s_ends[i] for i in ids], [t_ends[i] for i in ids], student_width=width,
                                teacher_width=t_width, teacher_predicting_only=True)      # (B, width)
        picked, paired = gather_aligned(top, index)
        return {"teacher_topk": picked, "teacher_paired": paired}

    def _sampled_view(self, loaded: LoadedModel, batch: Batch) -> tuple[Batch, Tensor]:
        """Student-sampled rows (``on_policy``) for a teacher with another tokenizer: their decoded text read by
        the teacher, and the (B, T_s − 1) pairs of positions that have read the same text."""
        ids, lengths = batch.inputs["input_ids"].cpu(), batch.inputs["attention_mask"].sum(1).tolist()
        student_rows = [ids[b, : int(n)].tolist() for b, n in enumerate(lengths)]
        texts, s_ends = decoded_prefix_ends(student_rows, tokenizer=self.student.tokenizer)
        own = LMBatcher.from_texts(texts, tokenizer=loaded.tokenizer,
                                   max_length=lm_max_length(self.teachers.dataset, loaded))
        t_ends = prefix_ends(texts, own.token_rows, tokenizer=loaded.tokenizer)
        if t_ends is None:
            raise ConfigError("Cross-tokenizer on_policy pairs the student's samples with the teacher's reading of "
                              "their text by the characters each token covers, which needs a fast (Rust) "
                              "tokenizer, and the teacher's is a slow one.")
        teacher_batch = own.batch(np.arange(len(texts))).to(self.teachers.device)
        index = align_positions(s_ends, t_ends, student_width=ids.shape[1] - 1,
                                teacher_width=teacher_batch.inputs["input_ids"].shape[1] - 1)
        return teacher_batch, index

    @torch.no_grad()
    def fields(self, batch: Batch, rows: np.ndarray | None, *, plan: RunPlan) -> dict[str, Any]:
        device = self.teachers.device
        if self.entry is not None:
            t = self.entry.tensors
            if self.task == "classification":
                fields = {"teacher_logits": t["logits"].to(device)[batch.indices]}
                if "teacher_logits" in t:    # multi_teacher: each teacher's logits, (K, B, C)
                    fields |= {"teacher_mixture": t["teacher_logits"].to(device)[:, batch.indices],
                               "teacher_weights": tuple(self.teachers.weights)}
                return fields
            if self.task == "embedding":
                return {"teacher_embedding": t["embeddings"].to(device)[batch.indices]}
            width = batch.inputs["input_ids"].shape[1] - 1
            if self.same_tokens:
                return {"teacher_topk": gather_topk(self.entry, batch.indices.cpu(), width, device)}
            return self._cached_across_tokenizers(batch.indices.cpu(), width)
        needs = plan.needs
        loaded = self.teachers.first
        index: Tensor | None = None
        if self.task == "causal_lm" and not self.same_tokens and rows is None:
            teacher_batch, index = self._sampled_view(loaded, batch)
        else:
            teacher_batch = self._teacher_batch(loaded, batch, rows)
        with autocast(device):
            out = forward_outputs(loaded.model, teacher_batch.inputs, hidden="hidden_states" in needs,
                                  attentions="attentions" in needs, values="values" in needs,
                                  embedding=self.task == "embedding", scores="attention_scores" in needs)
        fields: dict[str, Any] = {"teacher_hidden": out.hidden, "teacher_attentions": out.attentions,
                                  "teacher_values": out.values, "teacher_embedding": out.embedding,
                                  "teacher_attention_scores": out.scores}
        if self.task == "causal_lm":
            logits = out.logits.float()[:, :-1]
            student_width = batch.inputs["input_ids"].shape[1] - 1
            if index is None and not self.same_tokens:
                index = self._alignment(loaded, rows, student_width, logits.shape[1])
            if index is None:
                fields["teacher_logits"] = _fit_width(logits, student_width)
            else:
                fields["teacher_logits"], fields["teacher_paired"] = gather_aligned(logits, index)
        elif self.task == "classification":
            fields["teacher_logits"] = out.logits.float()
        return fields


def _fit_width(logits: Tensor, width: int) -> Tensor:
    """Crop or pad (B, T, V) teacher logits to ``width`` positions (cross-tokenizer rows differ in length; the
    padding is a uniform distribution, and positions the student masks never count)."""
    if logits.shape[1] >= width:
        return logits[:, :width]
    pad = logits.new_zeros(logits.shape[0], width - logits.shape[1], logits.shape[2])
    return torch.cat([logits, pad], dim=1)


# --- teacher outputs for the cache -----------------------------------------------------------------------------


@torch.no_grad()
def _classification_outputs(teachers: Teachers, split: str, batch_size: int, *,
                            dataset: LoadedDataset | None = None) -> dict[str, Tensor]:
    """The teachers' logits on ``split`` of ``dataset`` (default: the run's dataset)."""
    per_teacher = []
    for loaded in teachers.models():
        batcher = make_batcher(split, dataset or teachers.dataset, loaded)
        per_teacher.append(predict_logits(loaded.model, batcher, device=teachers.device, batch_size=batch_size))
    if len(per_teacher) == 1:
        return {"logits": per_teacher[0]}
    # The τ = 1 mixture (evaluation, agreement) and each teacher's logits, so every term can mix at its own τ.
    return {"logits": mix_teacher_logits(per_teacher, teachers.weights),
            "teacher_logits": torch.stack(per_teacher)}                                # (K, N, C)


@torch.no_grad()
def _embedding_outputs(teachers: Teachers, split: str, batch_size: int, *,
                       dataset: LoadedDataset | None = None) -> dict[str, Tensor]:
    loaded = teachers.first
    batcher = make_batcher(split, dataset or teachers.dataset, loaded)
    return {"embeddings": predict_logits(loaded.model, batcher, device=teachers.device, batch_size=batch_size)}


@torch.no_grad()
def _lm_topk_outputs(teachers: Teachers, batcher: LMBatcher, *, k: int, batch_size: int,
                     texts: list[str] | None = None) -> dict[str, Tensor]:
    """Top-k log-probs (+ tail, + the target token's log-prob) at every predicted position of every row.

    With ``texts`` (the texts the rows were made from, one per row) and a fast teacher tokenizer, also the
    ``prefix_end`` of every predicted position (:func:`align.prefix_ends`), so a run whose student uses another
    tokenizer can pair its positions with the entry's without the teacher.
    """
    ends = prefix_ends(texts, batcher.token_rows, tokenizer=teachers.first.tokenizer) if texts is not None \
        else None
    per_row: list[dict[str, Tensor]] = []
    with contextlib.ExitStack() as stack:
        for loaded in teachers.models():
            stack.enter_context(eval_mode(loaded.model))
        for batch in batcher.iter_batches(batch_size):
            batch = batch.to(teachers.device)
            logits, labels = shift_for_lm(teachers.logits(lambda _loaded, b=batch: b), batch.inputs["input_ids"])
            top = topk_of(logits, k)
            target = torch.log_softmax(logits.float(), dim=-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
            lengths = batch.inputs["attention_mask"].sum(1).tolist()
            for b, (length, row) in enumerate(zip(lengths, batch.indices.tolist(), strict=True)):
                n = max(int(length) - 1, 0)
                per_row.append({"logprobs": top.logprobs[b, :n].half().cpu(),
                                "indices": top.indices[b, :n].int().cpu(),
                                "tail_logmass": top.tail_logmass[b, :n].half().cpu(),
                                "target_logprob": target[b, :n].float().cpu()})
                if ends is not None:
                    per_row[-1]["prefix_end"] = torch.as_tensor(ends[row][:n], dtype=torch.int64)
    return pack_positions(per_row)


# --- the validation slice --------------------------------------------------------------------------------------

VALIDATION_SALT = 2  # the slice's random stream: [split_seed, 2] (the labelled subset draws from [split_seed, 1])


def _validation_slice(cfg: RunConfig, dataset: LoadedDataset, train_batches: Batcher | LMBatcher) -> np.ndarray:
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
    rows = validation_rows(labels, cfg.train.validation_fraction, seed=[cfg.dataset.split_seed, VALIDATION_SALT],
                           stratify=stratify)
    if len(rows) == 0:
        raise DataError("Early stopping selects on a validation slice held out of the train split, but the train "
                        "split has fewer than two labelled rows. Turn early stopping off or use more data.")
    return rows


def _validation_view(dataset: LoadedDataset, train_batches: Batcher | LMBatcher, rows: np.ndarray,
                     student: LoadedModel, *, max_length: int
                     ) -> tuple[LoadedDataset | None, Batcher | LMBatcher | None]:
    """The validation slice as a dataset whose eval split holds its rows (classification and embedding: what the
    teachers read), and the student's batches of it; (None, None) without a slice."""
    if len(rows) == 0:
        return None, None
    if dataset.task == "causal_lm":
        return None, LMBatcher([train_batches.token_rows[i] for i in rows.tolist()], pad_id=train_batches.pad_id)
    split = dataset.train
    inputs = split.inputs[rows] if isinstance(split.inputs, np.ndarray) else [split.inputs[i] for i in rows.tolist()]
    view = replace(dataset, eval=Split(inputs, split.labels[rows].copy()))
    return view, make_batcher("eval", view, student, max_length=max_length)


def _rows_digest(rows: np.ndarray) -> str:
    return hashlib.sha256(np.asarray(rows, dtype=np.int64).tobytes()).hexdigest()[:32]


# --- the loop --------------------------------------------------------------------------------------------------


def resume_point(cfg: RunConfig) -> Path | None:
    """The checkpoint a run continues from: for an owned attempt, the one its owner registered last (never
    merely the newest on disk); without an attempt, the newest complete one in ``output_dir``."""
    if not cfg.attempt:
        return latest_checkpoint(cfg.output_dir)
    if not cfg.resume_from:
        return None
    path = Path(cfg.resume_from)
    if not (path / STATE_FILE).is_file():
        raise TrainingError(f"The checkpoint this run resumes from ({path.name}) is missing or incomplete, so it "
                            "cannot continue where it stopped. Requeueing it will not help; launch the run again.")
    return path


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
    tc = cfg.train
    plan = plan_run(cfg)
    terms, task = plan.terms, cfg.task
    device = resolve_device(tc.device)
    output_dir = Path(cfg.output_dir)
    cache = TeacherCache(Path(cfg.cache_dir) if cfg.cache_dir else output_dir / "teacher-cache")

    dataset = load_dataset(cfg.dataset, task=task)
    if len(dataset.train) == 0 or len(dataset.eval) == 0:
        raise DataError(f"Dataset '{dataset.name}' has an empty train or eval split.")
    seed_everything(tc.seed)
    with _out_of_memory_as_training_error(cfg, "while loading the student"):
        student = load_model(cfg.student, dataset=dataset, role="student")
        _prepare_attention(student, plan)
        student.model.to(device).train()
    max_length = lm_max_length(dataset, student) if task == "causal_lm" else dataset.max_length
    teachers = Teachers(cfg, plan, dataset, device, max_length=max_length) if plan.uses_teacher else None

    def stored_for(split: str) -> dict[str, Any]:
        """What a cache entry of ``split`` holds (LM train entries keep the largest k the topk terms ask for, else
        EVAL_TOPK; uld reads whatever k the entry holds)."""
        if task == "classification":
            # Several teachers: each one's logits are stored beside their mixture (terms mix at their own τ).
            return {"kind": "logits", "dtype": "float32",
                    **({"per_teacher": True} if split == "train" and len(plan.teachers) > 1 else {})}
        if task == "embedding":
            return {"kind": "embeddings", "dtype": "float32"}
        ks = [t.params["k"] for t in terms if LOSS_TERMS[t.name].kind == "topk"] if split == "train" else []
        return {"kind": "topk", "k": max(ks) if ks else EVAL_TOPK, "tail": True, "dtype": "float16"}

    def describe(split: str, stored: dict[str, Any]) -> dict[str, Any]:
        """Everything the cache key of an entry depends on."""
        return {"teacher": teachers.fingerprint(), "split": split, "stored": stored,
                "dataset": dataset_description(cfg.dataset, task=task, max_length=max_length)}

    def entry_for(split: str, stored: dict[str, Any], compute: Callable[[], dict[str, Tensor]]) -> CacheEntry:
        """A teacher-output cache entry for ``split``; ``compute`` runs (and loads the teacher) on a miss."""
        description = describe(split, stored)
        with _out_of_memory_as_training_error(cfg, f"while the teacher computed its outputs on the {split} split"):
            return cache.get_or_compute(cache_key(description), lambda: (compute(), teachers.describe()),
                                        split=split, stored=stored, description=description)

    # --- checks that need the models, before any training or teacher work: the teacher's sizes and vocabulary
    # come from an existing cache entry when there is one (no teacher load), else from the teacher itself ---
    t_dims, t_vocab = None, None
    if plan.teacher_mode != "none":
        existing = cache.lookup(cache_key(describe("train", stored_for("train")))) \
            if plan.teacher_mode == "cached" else None
        if existing is not None and not teachers.is_loaded:
            t_dims, t_vocab = existing.manifest["teacher_dims"], existing.manifest["vocab_digest"]
        else:
            t_dims, t_vocab = model_dims(teachers.first), vocab_digest(teachers.first.tokenizer)
    dims = run_dims(student, t_dims, task=task, sparse=plan.teacher_mode == "cached" and task == "causal_lm")
    terms = methods.validate_terms(terms, dims=dims)
    same_vocab = t_vocab is None or t_vocab == vocab_digest(student.tokenizer)
    if task == "causal_lm" and not same_vocab:
        if cfg.scheme == "seq_kd":
            if any(LOSS_TERMS[t.name].kind != "labels" for t in terms):
                raise ConfigError("seq_kd across tokenizers trains the student on the teacher's text, re-tokenised "
                                  "with its own tokenizer; only ce can score it. Remove the other terms.")
        else:
            _check_cross_tokenizer_terms(terms, scheme=cfg.scheme, teacher_mode=plan.teacher_mode, student=student,
                                         teacher=teachers.first if teachers.is_loaded else None)
        if cfg.dataset.pack:
            raise ConfigError("Cross-tokenizer (uld) runs pair positions within each text, so they cannot pack "
                              "texts into blocks: turn packing off.")

    # --- the train rows (seq_kd: prompts continued by the teacher, once, through the cache) ---
    train_batches = make_batcher("train", dataset, student, max_length=max_length)
    # With early stopping, decisions are taken on a validation slice held out of the train rows; the eval split is
    # evaluated once, at the end, for the result.
    selecting = EarlyStopping(tc).enabled
    held_out = _validation_slice(cfg, dataset, train_batches) if selecting else np.zeros(0, dtype=np.int64)
    val_dataset, val_batches = _validation_view(dataset, train_batches, held_out, student, max_length=max_length)
    if cfg.scheme == "seq_kd":
        train_batches, generated_same_vocab = _seq_kd_rows(cfg, plan, student, teachers, train_batches, max_length,
                                                           entry_for)
        same_vocab = same_vocab and generated_same_vocab
    # Without teacher terms, unlabelled rows teach nothing: sample labelled rows only.
    train_rows = dataset.train.labelled_rows if plan.teacher_mode == "none" and task == "classification" \
        else np.arange(len(train_batches))
    if len(held_out):
        train_rows = np.setdiff1d(train_rows, held_out).astype(np.int64)
    if len(train_rows) == 0:
        raise DataError("The train split has no labelled rows to train on.")
    accum = tc.grad_accum_steps
    batch_size = min(tc.batch_size, len(train_rows))
    modules = methods.build_term_modules(terms, dims).to(device)
    term_state = TermState()
    params = list(student.model.parameters()) + list(modules.parameters())
    optimizer = torch.optim.AdamW(params, lr=tc.lr, weight_decay=tc.weight_decay)
    config_dict = cfg.to_dict()
    stopper = EarlyStopping(tc)
    step = 0
    attempt = cfg.attempt
    best_name = ""  # the folder under best/ holding the best eval's weights (early stopping)
    last_checkpoint = resume_point(cfg)
    clean_for_resume(output_dir, attempt=attempt, resume_from=last_checkpoint)
    if last_checkpoint is not None:
        step, extra = load_checkpoint(last_checkpoint, model=student.model, optimizer=optimizer,
                                      config=config_dict, device=device, modules=modules)
        term_state.load_state_dict(extra.get("term_state", {}))
        stopper.load_state_dict(extra.get("early_stopping", {}))
        best_name = extra.get("best_weights", "")
    # Best weights that no registered checkpoint refers to (a lost worker's, a crash's) never count.
    prune(output_dir / BEST_DIR, attempt=attempt + 1, keep=0, protect=(best_name,))

    def train_entry_compute() -> dict[str, Tensor]:
        if task == "classification":
            return _classification_outputs(teachers, "train", tc.batch_size)
        if task == "embedding":
            return _embedding_outputs(teachers, "train", tc.batch_size)
        # The teacher's own tokens (they are the student's unless a cross-tokenizer run), cut at the same max
        # length either way, so the entry is the same whichever student asks for it first.
        rows = train_batches if same_vocab else make_batcher("train", dataset, teachers.first, max_length=max_length)
        return _lm_topk_outputs(teachers, rows, k=stored_for("train")["k"], batch_size=tc.batch_size,
                                texts=None if dataset.pack else dataset.train.inputs)

    started = time.perf_counter()
    targets = None
    if plan.teacher_mode != "none" and step < tc.max_steps:
        entry = None
        if plan.teacher_mode == "cached":
            entry = entry_for("train", stored_for("train"), train_entry_compute)
        same_tokens = task == "causal_lm" and same_vocab
        targets = TeacherTargets(teachers, entry=entry, task=task, same_tokens=same_tokens, student=student,
                                 student_rows=train_batches if isinstance(train_batches, LMBatcher) else None)

    # --- evaluation (teacher outputs on the eval split always come through the cache) ---
    eval_batches = make_batcher("eval", dataset, student, max_length=max_length)
    eval_entry: CacheEntry | None = None

    def teacher_eval_entry() -> CacheEntry | None:
        nonlocal eval_entry
        if teachers is not None and eval_entry is None:
            def compute() -> dict[str, Tensor]:
                if task == "classification":
                    return _classification_outputs(teachers, "eval", tc.batch_size)
                if task == "embedding":
                    return _embedding_outputs(teachers, "eval", tc.batch_size)
                # The teacher's own tokens (they are the student's unless a cross-tokenizer run), cut at the run's
                # max length like the train entry: the key holds that length.
                rows = eval_batches if same_vocab else make_batcher("eval", dataset, teachers.first,
                                                                    max_length=max_length)
                return _lm_topk_outputs(teachers, rows, k=EVAL_TOPK, batch_size=tc.batch_size)

            eval_entry = entry_for("eval", stored_for("eval"), compute)
        return eval_entry

    val_entry: CacheEntry | None = None

    def teacher_val_entry() -> CacheEntry | None:
        """The teachers' outputs on the validation slice: an entry of its own, keyed by the slice's rows."""
        nonlocal val_entry
        if teachers is not None and val_entry is None:
            def compute() -> dict[str, Tensor]:
                if task == "classification":
                    return _classification_outputs(teachers, "eval", tc.batch_size, dataset=val_dataset)
                if task == "embedding":
                    return _embedding_outputs(teachers, "eval", tc.batch_size, dataset=val_dataset)
                return _lm_topk_outputs(teachers, val_batches, k=EVAL_TOPK, batch_size=tc.batch_size)

            stored = stored_for("eval") | {"validation_rows": _rows_digest(held_out)}
            val_entry = entry_for("validation", stored, compute)
        return val_entry

    final_dir = output_dir / owned_name("final", attempt)

    def run_eval(final: bool, *, validation: bool = False) -> dict[str, float]:
        """The student's metrics on the eval split, or (``validation``) on the validation slice."""
        teacher_entry = teacher_val_entry if validation else teacher_eval_entry
        entry = teacher_entry() if teachers is not None and same_vocab else None
        saved = final_dir if final else None
        kwargs: dict[str, Any] = {}
        if entry is not None and task == "classification":
            kwargs["teacher_logits"] = entry.tensors["logits"].to(device)
        elif entry is not None and task == "causal_lm":
            kwargs["teacher_topk"] = lambda batch, width: gather_topk(entry, batch.indices.cpu(), width, device)
        elif entry is not None:
            kwargs["teacher_embeddings"] = entry.tensors["embeddings"]
        projection = modules["embedding_mse"] if task == "embedding" and "embedding_mse" in modules else None
        with _out_of_memory_as_training_error(cfg, "while evaluating the student"):
            metrics = evaluate(student.model, val_batches if validation else eval_batches, device=device,
                               batch_size=tc.batch_size,
                               efficiency=final, saved_dir=saved, task=task, projection=projection, **kwargs)
        return metrics

    def emit_eval(at_step: int, metrics: dict[str, float], prefix: str = "eval") -> None:
        """Stream ``prefix/<metric>``: ``eval/`` for the eval split, ``val/`` for the validation slice."""
        if cb.on_metrics:
            streamed = {"loss": metrics.get("nll")} | metrics
            cb.on_metrics(at_step, {f"{prefix}/{k}": float(streamed[k]) for k in STREAMED_EVAL_METRICS[task]
                                    if streamed.get(k) is not None})

    def checkpoint(at_step: int) -> Path | None:
        """Write, register and prune; None when the caller lost the run (nothing of it stays on disk)."""
        if not cb.owned():
            return None
        watch.check()  # never persist weights that came from a NaN step
        extra = {"term_state": term_state.state_dict(), "early_stopping": stopper.state_dict(),
                 "best_weights": best_name}
        path = write_checkpoint(output_dir, step=at_step, model=student.model, optimizer=optimizer,
                                config=config_dict, attempt=attempt, modules=modules, extra=extra)
        if cb.on_checkpoint and cb.on_checkpoint(at_step, str(path)) is False:
            shutil.rmtree(path, ignore_errors=True)
            return None
        # Registered: older checkpoints and best weights no registered checkpoint refers to can go.
        prune(output_dir / CHECKPOINTS, attempt=attempt, keep=cfg.keep_checkpoints)
        prune(output_dir / BEST_DIR, attempt=attempt, keep=0, protect=(best_name,))
        return path

    restore_best = stopper.enabled and tc.early_stopping_restore_best

    def save_best(at_step: int) -> None:
        """The student (and the terms' learned projections) of the best eval so far, in a folder of its own that
        the next registered checkpoint refers to."""
        nonlocal best_name
        from safetensors.torch import save_model as save_weights_of

        if not cb.owned():
            return
        name = owned_name(f"step-{at_step}", attempt)
        best = output_dir / BEST_DIR / name
        tmp = best.with_name(f".{name}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        for module, file in ((student.model, BEST_WEIGHTS_FILE), (modules, TERM_MODULES_FILE)):
            if module is modules and not len(modules.state_dict()):
                continue
            save_weights_of(module, str(tmp / file))
        shutil.rmtree(best, ignore_errors=True)
        tmp.replace(best)
        best_name = name

    def load_best() -> None:
        from safetensors.torch import load_model as load_weights_into

        best = output_dir / BEST_DIR / best_name
        load_weights_into(student.model, str(best / BEST_WEIGHTS_FILE), device=str(device))
        if len(modules.state_dict()) and (best / TERM_MODULES_FILE).exists():
            load_weights_into(modules, str(best / TERM_MODULES_FILE), device=str(device))

    def term_inputs(batch: Batch, rows: np.ndarray | None, at_step: int) -> TermInputs:
        """Student forward + the teacher's part, as the terms need them."""
        needs = plan.needs
        out = forward_outputs(student.model, batch.inputs, hidden="hidden_states" in needs,
                              attentions="attentions" in needs, values="values" in needs,
                              embedding=task == "embedding", scores="attention_scores" in needs)
        logits, labels = out.logits, batch.labels
        if task == "causal_lm":
            logits, labels = shift_for_lm(logits, labels)
        teacher_fields = targets.fields(batch, rows, plan=plan) if targets else {}
        return TermInputs(student_logits=logits, labels=labels, student_hidden=out.hidden,
                          student_attentions=out.attentions, student_attention_scores=out.scores,
                          student_values=out.values,
                          student_embedding=out.embedding, attention_mask=batch.inputs.get("attention_mask"),
                          step=at_step, total_steps=tc.max_steps, **teacher_fields)

    def micro_batch(rows: np.ndarray, at_step: int, index: int) -> tuple[Batch, np.ndarray | None, bool]:
        """The batch for ``rows``; on_policy replaces it, with probability λ, by student continuations."""
        batch = train_batches.batch(rows)
        if cfg.scheme != "on_policy":
            return batch.to(device), rows, False
        p = plan.scheme_params
        if np.random.default_rng([tc.seed, at_step, index, 1]).random() >= p["lmbda"]:
            return batch.to(device), rows, False
        eos = student.tokenizer.eos_token_id
        token_rows = [train_batches.token_rows[i] for i in rows]
        prompts = [r[: prompt_length(r, max_new_tokens=p["max_new_tokens"], max_length=max_length, eos_id=eos)]
                   for r in token_rows]
        new = generate_continuations(student.model, prompts, max_new_tokens=p["max_new_tokens"],
                                     temperature=p["temperature"], pad_id=train_batches.pad_id, eos_id=eos,
                                     device=device, seed=_step_seed(tc.seed, at_step, index))
        sampled = LMBatcher([a + b for a, b in zip(prompts, new, strict=True)], pad_id=train_batches.pad_id,
                            prompt_lengths=[len(a) for a in prompts])
        return sampled.batch(np.arange(len(prompts))).to(device), None, True

    term_names = [t.name for t in terms]
    scheduled = [t for t in terms if t.schedule]
    watch = _NonFiniteWatch(term_names, device)
    sums = torch.zeros(1 + len(term_names), device=device)   # running totals for the log interval, no sync
    tokens = torch.zeros((), dtype=torch.long, device=device)   # causal LM: real tokens in the interval
    interval_steps, interval_start, generated = 0, time.perf_counter(), 0
    stopped = stopped_early = False
    while step < tc.max_steps:
        step_rows = rows_for_step(step, train_rows, batch_size=batch_size * accum, seed=tc.seed)
        lr = lr_at(step, tc)
        for group in optimizer.param_groups:
            group["lr"] = lr
        with _out_of_memory_as_training_error(cfg, f"at step {step + 1}"):
            for index, rows in enumerate(np.array_split(step_rows, accum)):    # gradient accumulation
                batch, batch_rows, sampled = micro_batch(rows, step, index)
                with autocast(device):
                    inputs = term_inputs(batch, batch_rows, step)
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
            means = (sums / interval_steps).tolist()    # the one sync of the interval
            elapsed = time.perf_counter() - interval_start
            logged = {"loss": means[0], **dict(zip(term_names, means[1:], strict=True)), "lr": lr,
                      "samples_per_s": interval_steps * batch_size * accum / max(elapsed, 1e-9)}
            if task == "causal_lm":
                logged["tokens_per_s"] = float(tokens.item()) / max(elapsed, 1e-9)
                tokens.zero_()
            if device.type == "cuda":
                logged["gpu_memory_bytes"] = float(torch.cuda.max_memory_allocated(device))
                torch.cuda.reset_peak_memory_stats(device)
            for term in scheduled:
                weight, values = methods.current_params(term, step - 1, tc.max_steps)
                logged |= {(f"weight/{term.name}" if target == "weight" else f"{target}/{term.name}"):
                           float(weight if target == "weight" else values[target]) for target in term.schedule}
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
            # Early stopping decides on the validation slice; without it the eval split's curve is only a curve.
            metrics = run_eval(final=False, validation=selecting)
            emit_eval(step, metrics, "val" if selecting else "eval")
            stopped_early = stopper.update(step, metrics)
            if restore_best and stopper.best_step == step:
                save_best(step)
        saved_now = False
        if step % tc.save_every == 0:
            saved = checkpoint(step)
            if saved is None:  # another worker owns the run now: stop, writing nothing more
                stopped = True
                break
            last_checkpoint, saved_now = saved, True
        if stopped_early:
            break
        if step % tc.log_every == 0 and step < tc.max_steps and cb.should_stop and cb.should_stop():
            if not saved_now:
                last_checkpoint = checkpoint(step) or last_checkpoint
            stopped = True
            break
    watch.check()
    train_seconds = time.perf_counter() - started

    common = {"task": task, "scheme": cfg.scheme, "teacher_cache": [u.to_dict() for u in cache.uses]}
    if stopped or not cb.owned():
        return TrainResult(steps=step, stopped=True, final_dir=None, student={}, teacher=None,
                           train_seconds=train_seconds,
                           last_checkpoint=str(last_checkpoint) if last_checkpoint else None,
                           teacher_forwards=teachers.forwards if teachers else 0, **common)
    restored = False
    if restore_best:
        if not stopped_early:  # the last weights are a candidate too, judged on the validation slice
            last_metrics = run_eval(final=False, validation=True)
            emit_eval(step, last_metrics, "val")
            stopper.update(step, last_metrics)
        if stopper.best_step not in (None, step) and best_name \
                and (output_dir / BEST_DIR / best_name / BEST_WEIGHTS_FILE).exists():
            load_best()
            restored = True
    if not cb.owned():
        return TrainResult(steps=step, stopped=True, final_dir=None, student={}, teacher=None,
                           train_seconds=train_seconds, last_checkpoint=None, **common)
    save_model(student, final_dir)
    if len(modules.state_dict()):
        from safetensors.torch import save_model as save_weights_of

        save_weights_of(modules, str(final_dir / TERM_MODULES_FILE))
    student_metrics = run_eval(final=True)
    # The eval split's point of the reported student (with early stopping, the eval split's only point: every
    # decision was taken on the validation slice).
    emit_eval(step, student_metrics)
    if not stopped_early and not restore_best and stopper.enabled:  # the last weights' val point, for best_step
        last_metrics = run_eval(final=False, validation=True)
        emit_eval(step, last_metrics, "val")
        stopper.update(step, last_metrics)
    teacher_metrics = None
    if teachers is not None and cfg.evaluate_teacher:
        teacher_rows = eval_batches if same_vocab else make_batcher("eval", dataset, teachers.first,
                                                                    max_length=max_length)
        teacher_metrics = _teacher_metrics(teachers, teacher_eval_entry(), cache, dataset, teacher_rows,
                                           task=task, batch_size=tc.batch_size)
    common["teacher_cache"] = [u.to_dict() for u in cache.uses]
    return TrainResult(steps=step, stopped=False, final_dir=str(final_dir), student=student_metrics,
                       teacher=teacher_metrics, train_seconds=train_seconds,
                       last_checkpoint=str(last_checkpoint) if last_checkpoint else None,
                       stopped_early=stopped_early, best_step=stopper.best_step if stopper.enabled else None,
                       best_metric=stopper.best if stopper.enabled else None, restored_best=restored,
                       teacher_forwards=teachers.forwards if teachers else 0, **common)


def _seq_kd_rows(cfg: RunConfig, plan: RunPlan, student: LoadedModel, teachers: Teachers, text_rows: LMBatcher,
                 max_length: int,
                 entry_for: Callable[[str, dict[str, Any], Callable[[], dict[str, Tensor]]], CacheEntry]
                 ) -> tuple[LMBatcher, bool]:
    """seq_kd's train rows: each train row's prompt (its first half) continued by the teacher, loss on the
    continuation. Generated once and kept in the teacher-output cache. Also returns whether the teacher's
    tokenizer is the student's (else the rows were re-tokenised for the student)."""
    p = plan.scheme_params
    stored = {"kind": "generations", "max_new_tokens": p["max_new_tokens"], "temperature": p["temperature"],
              "prompt": "first-half", "batch_size": cfg.train.batch_size,
              "seed": cfg.train.seed if p["temperature"] > 0 else None}

    def compute() -> dict[str, Tensor]:
        teacher = teachers.first
        # Prompts in the teacher's own tokens (the student's, unless the two tokenizers differ).
        source = text_rows if vocab_digest(teacher.tokenizer) == vocab_digest(student.tokenizer) else \
            make_batcher("train", teachers.dataset, teacher, max_length=max_length)
        t_eos = teacher.tokenizer.eos_token_id
        prompts = [r[: prompt_length(r, max_new_tokens=p["max_new_tokens"], max_length=max_length, eos_id=t_eos)]
                   for r in source.token_rows]
        rows, lengths = [], []
        size = cfg.train.batch_size
        for start in range(0, len(prompts), size):
            chunk = prompts[start : start + size]
            new = generate_continuations(teacher.model, chunk, max_new_tokens=p["max_new_tokens"],
                                         temperature=p["temperature"], pad_id=source.pad_id, eos_id=t_eos,
                                         device=teachers.device, seed=_step_seed(cfg.train.seed, start, 2))
            rows += [a + b for a, b in zip(chunk, new, strict=True)]
            lengths += [len(a) for a in chunk]
        flat = [{"tokens": torch.as_tensor(r, dtype=torch.int32)} for r in rows]
        return pack_positions(flat) | {"prompt_lengths": torch.as_tensor(lengths, dtype=torch.int64)}

    entry = entry_for("train", stored, compute)
    rows, lengths = row_tokens(entry)
    same = entry.manifest["vocab_digest"] == vocab_digest(student.tokenizer)
    if not same:
        rows, lengths = retokenize_rows(rows, lengths, source=teachers.first.tokenizer, target=student.tokenizer,
                                        max_length=max_length)
    return LMBatcher(rows, pad_id=text_rows.pad_id, prompt_lengths=lengths), same


def retokenize_rows(rows: list[list[int]], prompt_lengths: list[int], *, source: Any, target: Any,
                    max_length: int) -> tuple[list[list[int]], list[int]]:
    """Token rows of one tokenizer as rows of another: each row is decoded to text and tokenised again, the
    prompt/continuation boundary moved to the nearest token of the new tokenization. A row that ended with
    the source's EOS ends with the target's; one cut short does not get one."""
    s_eos, t_eos = source.eos_token_id, target.eos_token_id
    out_rows, out_lengths = [], []
    for row, prompt in zip(rows, prompt_lengths, strict=True):
        ended = s_eos is not None and bool(row) and row[-1] == s_eos
        ids = list(target(source.decode(row, skip_special_tokens=True))["input_ids"])
        if t_eos is not None and ids and ids[-1] == t_eos:
            ids.pop()                                   # the tokenizer's own end marker; decided below
        ids = ids[: max_length - 1 if ended and t_eos is not None else max_length]
        if ended and t_eos is not None:
            ids.append(t_eos)
        prompt_ids = list(target(source.decode(row[:prompt], skip_special_tokens=True))["input_ids"])
        n_prompt = len(prompt_ids) - (1 if t_eos is not None and prompt_ids and prompt_ids[-1] == t_eos else 0)
        out_rows.append(ids)
        out_lengths.append(max(1, min(n_prompt, len(ids) - 1)))
    return out_rows, out_lengths


def _teacher_metrics(teachers: Teachers, entry: CacheEntry, cache: TeacherCache, dataset: LoadedDataset,
                     eval_batches: Batcher | LMBatcher, *, task: str, batch_size: int) -> dict[str, float]:
    """The teacher's own eval metrics: quality from its cached eval outputs, efficiency measured once per
    device and kept beside the entry (so a cache hit needs no teacher at all)."""
    if task == "classification":
        from .evaluate import classification_metrics

        metrics = classification_metrics(entry.tensors["logits"], torch.as_tensor(dataset.eval.labels))
    elif task == "causal_lm":
        total, count = 0.0, 0
        for batch in eval_batches.iter_batches(batch_size):
            _, labels = shift_for_lm(batch.inputs["input_ids"], batch.labels)
            target = gather_rows(entry, "target_logprob", batch.indices, labels.shape[1])
            mask = labels != -100
            total -= float(target[mask].double().sum())
            count += int(mask.sum())
        metrics = lm_metrics_from_sums(total, count)
    else:
        metrics = {}
    device = teachers.device
    label = f"{device.type}:{torch.cuda.get_device_name(device)}" if device.type == "cuda" else "cpu"
    efficiency = (entry.extra("efficiency") or {}).get(label)
    if efficiency is None:
        efficiency = {}
        for loaded in teachers.models():
            one = efficiency_metrics(loaded.model, make_batcher("eval", dataset, loaded), device=device)
            efficiency = one if not efficiency else _sum_efficiency(efficiency, one)
        cache.write_extra(entry, "efficiency", {**(entry.extra("efficiency") or {}), label: efficiency})
    return metrics | efficiency


def _sum_efficiency(a: dict[str, float], b: dict[str, float]) -> dict[str, float]:
    """Efficiency of running two models one after the other (a multi-teacher ensemble)."""
    out = {k: a[k] + b[k] for k in ("params", "params_non_embedding", "size_bytes", "latency_ms_p50",
                                    "latency_ms_p95")}
    for k in ("throughput_per_s", "tokens_per_s"):
        if k in a and k in b:
            out[k] = 1.0 / (1.0 / a[k] + 1.0 / b[k])
    out["peak_memory_bytes"] = max(a["peak_memory_bytes"], b["peak_memory_bytes"])
    return out

