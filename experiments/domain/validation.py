"""Validation rules shared by forms, services and the API: training settings, terms and their sweeps, seeds,
and whether an experiment's parts fit together. Messages name the field a user fixes."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from django.conf import settings
from django.core.exceptions import ValidationError

from experiments.domain import specs
from experiments.models import DatasetSpec, ModelSpec, Recipe

# The most GPUs one host offers: more would need a run across hosts (DESIGN.md §5), not supported yet.
MAX_GPUS_PER_RUN = 8
MULTI_HOST_MESSAGE = (
    f"At most {MAX_GPUS_PER_RUN} GPUs: a run on more would span several hosts, and multi-host runs are not "
    "supported yet."
)

# name: (type, min, max, help). Shared by every run of an experiment so that comparisons are fair.
TRAIN_FIELDS: dict[str, tuple[type, float, float, str]] = {
    "max_steps": (int, 1, 1_000_000, "Optimizer steps per run"),
    "batch_size": (int, 1, 4096, "Examples per step"),
    "lr": (float, 1e-8, 1.0, "Peak learning rate (AdamW)"),
    "weight_decay": (float, 0.0, 1.0, "AdamW weight decay"),
    "warmup_steps": (int, 0, 1_000_000, "Linear warm-up steps"),
    "eval_every": (
        int,
        1,
        1_000_000,
        "Evaluate every N steps (on the validation slice with early stopping, else on the eval split)",
    ),
    "save_every": (int, 1, 1_000_000, "Checkpoint every N steps"),
    "log_every": (int, 1, 100_000, "Log training losses every N steps"),
    "grad_clip": (float, 0.0, 1e6, "Gradient-norm clipping (0 = off)"),
    "labelled_fraction": (
        float,
        0.01,
        1.0,
        "Fraction of train rows whose labels are used (the rest are "
        "unlabelled inputs that only teacher terms learn from)",
    ),
    "early_stopping_patience": (
        int,
        0,
        10_000,
        "Early stopping: stop after this many evaluations without "
        "improvement of the watched metric on the validation slice "
        "(0 = off)",
    ),
    "validation_fraction": (
        float,
        0.01,
        0.5,
        "Early stopping: fraction of the labelled train rows held out of "
        "training to select on; the eval split is only reported",
    ),
    # Resources (the form's Resources section): how many ranks one run spans.
    "gpus": (int, 1, MAX_GPUS_PER_RUN, "GPUs per run, one rank each, on one host"),
    "processes": (int, 1, 8, "CPU processes (gloo ranks) per run when it trains without a GPU"),
    # LoRA (workers.engine.adapters): adapters of rank lora_r instead of every weight; transformers students.
    "lora_r": (
        int,
        0,
        256,
        "LoRA rank: train low-rank adapters on the student's linear layers instead of every weight "
        "(0 = full fine-tuning; transformers students only)",
    ),
    "lora_alpha": (float, 1e-3, 1e4, "LoRA alpha: the adapters' update is scaled by alpha / rank"),
    "lora_dropout": (float, 0.0, 0.99, "Dropout on the LoRA adapters' input"),
}

# Settings of the form's Resources section (the others are its training settings).
RESOURCE_FIELDS = ("gpus", "processes", "strategy", "precision", "activation_checkpointing")
# LoRA's settings (numbers in TRAIN_FIELDS, the targets and QLoRA among the choices), shown together.
LORA_FIELDS = ("lora_r", "lora_alpha", "lora_dropout", "lora_targets", "lora_4bit")
STRATEGIES = ("auto", "ddp", "fsdp")
PRECISIONS = ("auto", "bf16", "fp32")
# Settings that take one of a few names (or true/false) and may be swept as a list of them.
SWEPT_CHOICES: dict[str, tuple[Any, ...]] = {
    "strategy": STRATEGIES,
    "precision": PRECISIONS,
    "activation_checkpointing": (False, True),
    "lora_4bit": (False, True),
}
# LoRA's target modules: comma-separated module names (empty: the attention projections of the student).
LORA_TARGET_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.]{0,99}")


LR_SCHEDULES = ("constant", "linear", "cosine")


# Early stopping watches a task metric on the validation slice, improving upward (max) or downward (min). Only
# metrics every run has (the hard-label baseline has no teacher to agree with).
EARLY_STOPPING_METRICS: dict[str, dict[str, str]] = {
    "classification": {"accuracy": "max", "macro_f1": "max", "loss": "min", "ece": "min"},
    "causal_lm": {"loss": "min", "perplexity": "min", "bits_per_token": "min"},
    "embedding": {},
}


ALL_EARLY_STOPPING_METRICS = tuple(dict.fromkeys(m for ms in EARLY_STOPPING_METRICS.values() for m in ms))


# Settings that are not numbers: the first three are never swept, the resources' choices may be
# (``SWEPT_CHOICES``).
TRAIN_CHOICES = (
    "lr_schedule",
    "early_stopping_metric",
    "vary_labelled_subset",
    "lora_targets",
    *SWEPT_CHOICES,
)


MAX_SEEDS = 20


def _number(value: Any, kind: type, lo: float, hi: float, field: str) -> int | float:
    if isinstance(value, bool):
        raise ValidationError({field: "Enter a number."})
    try:
        number = kind(value)
    except (TypeError, ValueError):
        raise ValidationError({field: f"Enter {'a whole number' if kind is int else 'a number'}."}) from None
    if kind is int and isinstance(value, float) and not value.is_integer():
        raise ValidationError({field: "Enter a whole number."})
    if field == "gpus" and number > hi:
        raise ValidationError({field: MULTI_HOST_MESSAGE})
    if number != number or not lo <= number <= hi:  # NaN fails the range check too
        raise ValidationError({field: f"Must be between {lo:g} and {hi:g}."})
    return number


def clean_train(train: dict[str, Any], *, limit: int | None = None) -> dict[str, Any]:
    """Validate training settings and fill in the defaults.

    A numeric setting may be a list of values (a sweep): each value is checked like a single one, and the list
    stays a list (one value becomes a plain value). ``limit`` bounds a list's length (default
    ``MAX_RUNS_PER_EXPERIMENT``: more values than runs can never fit). Errors are keyed by setting.
    """
    limit = settings.MAX_RUNS_PER_EXPERIMENT if limit is None else limit
    errors: dict[str, list[str]] = {}
    cleaned: dict[str, Any] = {}
    named = {"lr_schedule": LR_SCHEDULES, "early_stopping_metric": ALL_EARLY_STOPPING_METRICS}
    for key, value in train.items():
        if value is None or value == "" or value == []:
            continue
        if key in named:
            if not isinstance(value, str) or value not in named[key]:
                errors[key] = [f"Choose one of: {', '.join(named[key])}."]
            else:
                cleaned[key] = value
            continue
        if key == "vary_labelled_subset":
            if not isinstance(value, bool):
                errors[key] = ["Give true or false."]
            elif value:
                cleaned[key] = True
            continue
        if key == "lora_targets":
            try:
                cleaned[key] = clean_lora_targets(value)
            except ValidationError as exc:
                errors.update(exc.message_dict)
            continue
        if key in SWEPT_CHOICES:
            try:
                cleaned[key] = clean_choice_sweep(key, value, limit=limit)
            except ValidationError as exc:
                errors.update(exc.message_dict)
            continue
        if key not in TRAIN_FIELDS:
            errors[key] = [f"Unknown training setting '{key}'."]
            continue
        kind, lo, hi, _ = TRAIN_FIELDS[key]
        try:
            if isinstance(value, list | tuple):
                cleaned[key] = _clean_sweep(list(value), kind, lo, hi, key, limit)
            else:
                cleaned[key] = _number(value, kind, lo, hi, key)
        except ValidationError as exc:
            errors.update(exc.message_dict)
    from experiments.domain.engine_config import TRAIN_DEFAULTS

    merged = {**TRAIN_DEFAULTS, **cleaned}
    if "warmup_steps" not in errors and "max_steps" not in errors:
        # Every combination of a sweep is trained, so the longest warm-up must fit the shortest run.
        warmup, steps = max(_as_list(merged["warmup_steps"])), min(_as_list(merged["max_steps"]))
        if warmup and warmup >= steps:
            errors["warmup_steps"] = [
                "Warm-up must be shorter than the run (max steps)."
                if not _swept(merged, "warmup_steps", "max_steps")
                else f"Warm-up must be shorter than the run: {warmup} warm-up steps do not fit "
                f"in a run of {steps} steps."
            ]
    if "early_stopping_patience" not in errors and "early_stopping_metric" not in errors:
        patience = max(_as_list(merged.get("early_stopping_patience", 0)))
        if patience and not merged.get("early_stopping_metric"):
            errors["early_stopping_metric"] = [
                "Choose the metric early stopping watches on the validation slice."
            ]
        elif merged.get("early_stopping_metric") and not patience:
            errors["early_stopping_patience"] = [
                "Give a patience of at least 1 evaluation, or clear the early-stopping metric."
            ]
    if "batch_size" not in errors:
        errors.update(_rank_split_errors(merged, errors))
    if errors:
        raise ValidationError(errors)
    return merged


def clean_lora_targets(value: Any) -> str:
    """LoRA's target modules as ``name,name``: a comma-separated text or a list of module names."""
    items = value.split(",") if isinstance(value, str) else value if isinstance(value, list | tuple) else None
    names = [str(n).strip() for n in items or () if str(n).strip()]
    if items is None or len(names) > 32 or not all(LORA_TARGET_NAME.fullmatch(n) for n in names):
        raise ValidationError(
            {"lora_targets": "Give module names separated by commas (e.g. q_proj,v_proj), at most 32."}
        )
    return ",".join(dict.fromkeys(names))


def clean_choice_sweep(key: str, value: Any, *, limit: int) -> Any:
    """One of ``SWEPT_CHOICES[key]``, or a list of them (a sweep; one value is kept plain)."""
    choices = SWEPT_CHOICES[key]
    values = list(value) if isinstance(value, list | tuple) else [value]
    boolean = choices == (False, True)
    # True == 1 in Python: a choice must be of the choices' own type.
    if not values or not all(isinstance(v, bool) == boolean and v in choices for v in values):
        raise ValidationError(
            {key: "Give true or false, or both as a list [false, true] (a sweep)." if boolean
             else f"Choose one of: {', '.join(choices)} (or a list of them, a sweep)."}
        )
    if len(values) > limit:
        raise ValidationError(
            {key: f"This gives {len(values):,} values; at most {limit:,} fit in one experiment."}
        )
    if len(set(values)) != len(values):
        raise ValidationError({key: "Each swept value may appear once."})
    return values if len(values) > 1 else values[0]


def _rank_split_errors(train: dict[str, Any], errors: dict[str, list[str]]) -> dict[str, list[str]]:
    """A step's batch is split evenly over the run's ranks: ``gpus`` on a GPU, ``processes`` on a CPU. Which
    of the two a run gets is known only when it is routed (a run on the ``auto`` device trains where its
    queue's worker has a GPU or not), so the batch must divide by both, for every swept combination."""
    ranks = [
        (n, what)
        for key, what in (("gpus", "GPUs (one rank per GPU)"), ("processes", "CPU processes"))
        if key not in errors
        for n in _as_list(train.get(key, 1))
    ]
    for batch in _as_list(train["batch_size"]):
        for n, what in ranks:
            if batch % n:
                return {"batch_size": [
                    f"The batch is split evenly over the run's ranks: batch size {batch} does not divide by "
                    f"{n} {what}. Give a multiple of {n}."
                ]}
    return {}


def check_selection(train: dict[str, Any], *, dataset: DatasetSpec) -> dict[str, Any]:
    """Early-stopping settings that depend on the dataset: the watched metric is one its task reports, and the
    validation slice (``validation_fraction`` of the labelled train rows) has rows to select on while leaving
    rows to train on. ``train`` is cleaned (:func:`clean_train`); returned unchanged."""
    _check_lora(train, dataset=dataset)
    metric = train.get("early_stopping_metric")
    if not metric or not max(_as_list(train.get("early_stopping_patience", 0))):
        return train
    allowed = EARLY_STOPPING_METRICS.get(dataset.task, {})
    if metric not in allowed:
        raise ValidationError(
            {
                "early_stopping_metric": (
                    f"A {dataset.task} run's validation slice reports "
                    f"{', '.join(allowed) or 'no metric every run has'}; "
                    f"it cannot watch {metric}."
                )
            }
        )
    counts = dataset.splits if isinstance(dataset.splits, dict) else {}
    rows = counts.get("train")
    if isinstance(rows, int) and not isinstance(rows, bool):
        labelled = (
            rows * min(_as_list(train.get("labelled_fraction", 1.0)))
            if dataset.task == "classification"
            else rows
        )
        if round(labelled) < 2:
            raise ValidationError(
                {
                    "validation_fraction": (
                        "Early stopping holds a validation slice out of the labelled train rows, but this "
                        f"dataset has about {round(labelled)} of them; at least 2 are needed "
                        "(one to select on, one to train on)."
                    )
                }
            )
    return train


def _check_lora(train: dict[str, Any], *, dataset: DatasetSpec) -> None:
    """LoRA adapts transformers students of causal-LM or classification data: numeric (tabular) data is read
    by builtin nets (mlp) and embedding students are pooled encoders, neither of which takes an adapter."""
    if not max(_as_list(train.get("lora_r", 0))):
        return
    if dataset.task == "embedding":
        raise ValidationError(
            {"lora_r": "LoRA adapts causal-LM and classification students, not embedding students: set 0."}
        )
    if specs.dataset_kind(dataset) == "tabular":
        raise ValidationError(
            {"lora_r": f"LoRA adapts transformers students; {dataset} is read by builtin nets (mlp), which "
                       "train every weight: set 0."}
        )


def _as_list(value: Any) -> list[Any]:
    return list(value) if isinstance(value, list) else [value]


def _swept(train: dict[str, Any], *keys: str) -> bool:
    return any(isinstance(train.get(k), list) for k in keys)


def _clean_sweep(values: list[Any], kind: type, lo: float, hi: float, field: str, limit: int) -> Any:
    """A swept setting: every value checked, none repeated, at most ``limit``; one value is kept plain."""
    if len(values) > limit:
        raise ValidationError(
            {field: f"This gives {len(values):,} values; at most {limit:,} fit in one experiment."}
        )
    cleaned = [_number(v, kind, lo, hi, field) for v in values]
    if len(set(cleaned)) != len(cleaned):
        raise ValidationError({field: "Each swept value may appear once."})
    return cleaned if len(cleaned) > 1 else cleaned[0]


def clean_term_sweeps(
    term_sweeps: Any, *, recipes: Sequence[Recipe], limit: int | None = None
) -> dict[str, list]:
    """Validate sweeps of recipe term parameters (``{"kd.temperature": [2, 4]}``) against the engine's schema
    and the chosen recipes: every swept term must be in at least one chosen recipe (hard-label baselines
    aside).

    Errors are keyed ``term_sweeps``. Combinations (a recipe's terms with the swept values set) are checked
    when the runs are planned, once the grid is known to be small enough.
    """
    from experiments.domain.sweeps import SweepError, check_term_values, term_axis

    limit = settings.MAX_RUNS_PER_EXPERIMENT if limit is None else limit
    if not term_sweeps:
        return {}
    if not isinstance(term_sweeps, dict):
        raise ValidationError({"term_sweeps": "Give term sweeps as {TERM.PARAM: [values]}."})
    distilling = [r for r in recipes if r.scheme != Recipe.Scheme.HARD_LABELS]
    present = {t.get("name") for r in distilling for t in r.terms}
    cleaned: dict[str, list] = {}
    errors: list[str] = []
    for axis, values in term_sweeps.items():
        try:
            if not isinstance(values, list | tuple):
                raise SweepError("give a list of values.")
            cleaned[axis] = check_term_values(str(axis), list(values), limit=limit)
        except SweepError as exc:
            errors.append(f"{axis}: {exc}")
            continue
        term = term_axis(axis)[0]
        if term not in present:
            errors.append(
                f"{axis}: no chosen recipe has a {term} term; choose one that does, or remove this line."
            )
    if errors:
        raise ValidationError({"term_sweeps": errors})
    return cleaned


def clean_seeds(seeds: Sequence[Any]) -> list[int]:
    if not seeds:
        raise ValidationError({"seeds": "Give at least one seed."})
    if len(seeds) > MAX_SEEDS:
        raise ValidationError({"seeds": f"At most {MAX_SEEDS} seeds."})
    cleaned = [_number(s, int, 0, 2**31 - 1, "seeds") for s in seeds]
    if len(set(cleaned)) != len(cleaned):
        raise ValidationError({"seeds": "Seeds must be different from each other."})
    return cleaned


def clean_terms(terms: list[dict[str, Any]], *, scheme: str) -> list[dict[str, Any]]:
    """Validate a recipe's weighted loss terms (parameters and optional schedules) against the engine's
    schema.

    Returns plain JSON: ``{"name", "weight", "params"}`` plus ``"schedule"`` when the term has one.
    """
    from workers.engine.config import LossTermConfig
    from workers.engine.errors import ConfigError
    from workers.engine.schedules import max_weight
    from workers.engine.terms import validate_term

    if not isinstance(terms, list) or not terms:
        raise ValidationError({"terms": "A recipe needs at least one loss term."})
    cleaned = []
    for i, term in enumerate(terms, 1):
        if not isinstance(term, dict) or "name" not in term:
            raise ValidationError({"terms": f"Term {i} needs a name."})
        weight = _number(term.get("weight", 1.0), float, 0.0, 1e6, "terms")
        try:
            valid = validate_term(
                LossTermConfig(term["name"], weight, term.get("params") or {}, term.get("schedule") or {})
            )
        except ConfigError as exc:
            raise ValidationError({"terms": f"Term {i} ({term['name']}): {exc}"}) from None
        cleaned.append(
            {
                "name": valid.name,
                "weight": valid.weight,
                "params": valid.params,
                **({"schedule": valid.schedule} if valid.schedule else {}),
            }
        )
    if not any(max_weight(t["weight"], t.get("schedule", {})) > 0 for t in cleaned):
        raise ValidationError({"terms": "At least one term needs a positive weight."})
    names = [t["name"] for t in cleaned]
    if len(set(names)) != len(names):
        raise ValidationError({"terms": "Each loss term may appear once."})
    if scheme == Recipe.Scheme.HARD_LABELS and names != ["ce"]:
        raise ValidationError({"scheme": "The hard-labels scheme trains with the ce term only."})
    check_recipe_rules(scheme=scheme, terms=cleaned)
    return cleaned


def engine_terms(terms: Sequence[dict[str, Any]]) -> list[Any]:
    """A recipe's stored terms as the engine validates them (parameters complete); terms the engine refuses
    are left out (their own validation reports them)."""
    from workers.engine.config import LossTermConfig
    from workers.engine.errors import ConfigError
    from workers.engine.terms import validate_term

    valid = []
    for term in terms:
        try:
            valid.append(
                validate_term(
                    LossTermConfig(
                        term["name"],
                        term.get("weight", 1.0),
                        term.get("params") or {},
                        term.get("schedule") or {},
                    )
                )
            )
        except (ConfigError, KeyError, TypeError):
            continue
    return valid


def recipe_rule_errors(
    *, scheme: str, terms: Sequence[dict[str, Any]], task: str | None = None
) -> dict[str, list[str]]:
    """The scheme × term × task rules the engine enforces before training
    (``workers.engine.recipe_rules``), by recipe field, with the engine's messages. ``task`` None: only the
    rules that hold on any dataset (a recipe does not name its task)."""
    from workers.engine.recipe_rules import recipe_errors

    return recipe_errors(scheme, engine_terms(terms), task)


def check_recipe_rules(*, scheme: str, terms: Sequence[dict[str, Any]]) -> None:
    """Refuse a recipe that cannot run on any dataset (an offline recipe with a hidden-state term, ...)."""
    if errors := recipe_rule_errors(scheme=scheme, terms=terms):
        raise ValidationError(errors)


def recipe_cross_tokenizer_problem(recipe: Recipe) -> str | None:
    """Why the engine refuses ``recipe`` in a causal-LM run whose teacher has another tokenizer, or None."""
    from workers.engine.recipe_rules import cross_tokenizer_problem

    return cross_tokenizer_problem(recipe.scheme, engine_terms(recipe.terms))


def recipe_task_problems(recipe: Recipe, *, task: str) -> list[str]:
    """Why ``recipe`` cannot run on ``task`` data, in the engine's words (empty: it can)."""
    errors = recipe_rule_errors(scheme=recipe.scheme, terms=recipe.terms, task=task)
    return [message for messages in errors.values() for message in messages]


def clean_scheme_params(scheme: str, params: dict[str, Any]) -> dict[str, Any]:
    """Validate a recipe's scheme parameters against the scheme's schema (defaults filled in)."""
    from workers.engine.errors import ConfigError
    from workers.engine.schemes import validate_scheme_params

    try:
        return validate_scheme_params(scheme, params)
    except ConfigError as exc:
        raise ValidationError({"scheme_params": str(exc)}) from None


def check_experiment(
    *,
    team,
    dataset: DatasetSpec,
    teacher: ModelSpec | None,
    students: Sequence[ModelSpec],
    recipes: Sequence[Recipe],
    assistant: ModelSpec | None = None,
    extra_teachers: Sequence[ModelSpec] = (),
    teacher_weights: Sequence[Any] = (),
) -> list[float]:
    """Pre-flight checks that make a whole experiment invalid (nothing is created).

    Returns the cleaned multi-teacher weights (main teacher first; equal weights when none are given).
    """
    errors: dict[str, list[str]] = {}

    def err(field: str, message: str) -> None:
        errors.setdefault(field, []).append(message)

    others = [m for m in (teacher, assistant, *extra_teachers) if m is not None]
    records = [dataset, *students, *recipes, *others]
    if any(r.team_id != team.id for r in records):
        err("__all__", "Every record must belong to the experiment's team.")
    if not students:
        err("students", "Choose at least one student.")
    if not recipes:
        err("recipes", "Choose at least one recipe.")
    needing = [r for r in recipes if r.needs_teacher]
    if needing and teacher is None:
        err("teacher", f"Recipe {', '.join(str(r) for r in needing)} distills from a teacher: choose one.")
    schemes = {r.scheme for r in recipes}
    if Recipe.Scheme.TEACHER_ASSISTANT in schemes and assistant is None:
        err("assistant", "A teacher-assistant recipe needs an assistant model.")
    weights: list[float] = []
    if Recipe.Scheme.MULTI_TEACHER in schemes:
        if not extra_teachers:
            err("extra_teachers", "A multi-teacher recipe needs at least one more teacher.")
        weights = _clean_teacher_weights(teacher_weights, 1 + len(extra_teachers), err)
    for recipe in recipes:
        for message in recipe_task_problems(recipe, task=dataset.task):
            err("recipes", f"Recipe {recipe}: {message}")
    if teacher is not None and teacher in students:
        err("students", "The teacher cannot also be a student.")
    data_kind = specs.dataset_kind(dataset)
    for field, models in (
        ("teacher", [teacher]),
        ("assistant", [assistant]),
        ("extra_teachers", extra_teachers),
        ("students", students),
    ):
        for model in models:
            if model is None:
                continue
            if model.task != dataset.task:
                err(
                    field,
                    f"{model} is a {model.get_task_display().lower()} model but {dataset} is "
                    f"{dataset.get_task_display().lower()} data.",
                )
            elif specs.model_kind(model) != data_kind:
                need = (
                    "numeric features (builtin nets such as mlp)"
                    if data_kind == "tabular"
                    else "text (transformers)"
                )
                err(field, f"{model} cannot read {dataset}: that dataset needs a model for {need}.")
            elif dataset.task == "classification" and model.num_labels != dataset.num_labels:
                err(
                    field,
                    f"{model} predicts {model.num_labels} labels but {dataset} has {dataset.num_labels}.",
                )
    if errors:
        raise ValidationError(errors)
    return weights


def _clean_teacher_weights(raw: Sequence[Any], count: int, err) -> list[float]:
    if not raw:
        return [1.0 / count] * count
    if len(raw) != count:
        err("teacher_weights", f"Give one weight per teacher ({count}: the main teacher first).")
        return []
    try:
        weights = [_number(w, float, 0.0, 1e6, "teacher_weights") for w in raw]
    except ValidationError as exc:
        err("teacher_weights", exc.message_dict["teacher_weights"][0])
        return []
    if sum(weights) <= 0:
        err("teacher_weights", "At least one teacher weight must be positive.")
        return []
    return [w / sum(weights) for w in weights]
