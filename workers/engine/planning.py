"""What a run is, checked before any data or weights are read, then once more against the loaded models.

:func:`plan_run` validates the train settings, the sources, the task, the scheme and its parameters, and the
recipe's terms, and decides how the teacher takes part (:class:`RunPlan`: ``none``, ``cached`` or
``online``); :func:`check_with_models` checks the terms against both models' sizes and what a teacher with
another tokenizer allows, reading the teacher's sizes from an existing cache entry when there is one. The
eval metrics a run streams and the early-stopping settings it accepts are named here too. Everything raises
``ConfigError`` with a message the user can act on; nothing here trains.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .cache import vocab_digest
from .config import TASKS, LossTermConfig, ModelConfig, RunConfig, TrainConfig
from .errors import ConfigError
from .models import LoadedModel, model_dims
from .recipe_rules import FEATURE_NEEDS, cross_tokenizer_problem, recipe_problems
from .schemes import SCHEMES, validate_scheme_params
from .sources import check_run_sources
from .terms import LOSS_TERMS, ModelDims, validate_terms

if TYPE_CHECKING:
    from .run_setup import Loaded


LR_SCHEDULES = ("constant", "linear", "cosine")


# Schemes this loop runs; the chained ones are sequences of offline runs the caller builds.
LOOP_SCHEMES = ("offline", "online", "hard_labels", "multi_teacher", "seq_kd", "on_policy")



# Eval metrics streamed during training (efficiency is measured once, at the end), by task.
STREAMED_EVAL_METRICS = {
    "classification": ("loss", "accuracy", "macro_f1", "ece", "agreement", "kl_to_teacher"),
    "causal_lm": ("loss", "perplexity", "bits_per_token", "agreement", "kl_to_teacher"),
    "embedding": ("cosine_to_teacher",),
}


TEACHER_METRICS = ("agreement", "kl_to_teacher", "cosine_to_teacher")


EARLY_STOPPING_MODES = ("max", "min")


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
    scheme_params = validate_scheme_params(cfg.scheme, cfg.scheme_params)
    terms = recipe_terms(cfg)
    # The scheme × term × task rules, shared with the web (recipe save and pre-flight) so both give this
    # message.
    problems = recipe_problems(
        cfg.scheme, terms, cfg.task, several_teachers=cfg.teacher is not None and bool(cfg.extra_teachers)
    )
    if problems:
        raise ConfigError(problems[0].message)
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
    name = watched_metric(tc.early_stopping_metric)
    allowed = [m for m in STREAMED_EVAL_METRICS[cfg.task] if has_teacher or m not in TEACHER_METRICS]
    if name not in allowed:
        raise ConfigError(
            f"Early stopping cannot watch '{tc.early_stopping_metric}': a {cfg.task} run reports "
            f"{', '.join(allowed) or 'no eval metric without a teacher'}."
        )


def watched_metric(name: str) -> str:
    """The early-stopping metric without a split prefix: it is always measured on the validation slice."""
    return name.removeprefix("val/").removeprefix("eval/")


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
    if problem := cross_tokenizer_problem(scheme, terms):  # shared with the web's pre-flight
        raise ConfigError(problem)
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
            t_dims, t_vocab = teachers.dims(), teachers.vocab()
    sparse = task == "causal_lm" and (plan.teacher_mode == "cached" or bool(teachers and teachers.is_served))
    dims = run_dims(run.student, t_dims, task=task, sparse=sparse)
    terms = validate_terms(plan.terms, dims=dims)
    same_vocab = t_vocab is None or t_vocab == vocab_digest(run.student.tokenizer)
    if task == "causal_lm" and not same_vocab:
        if cfg.scheme == "seq_kd":
            if problem := cross_tokenizer_problem(cfg.scheme, terms):
                raise ConfigError(problem)
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
