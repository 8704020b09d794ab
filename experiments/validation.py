"""Input rules shared by the forms, the services and (later) the API. Errors carry field keys."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from django.conf import settings
from django.core.exceptions import ValidationError

from .models import DatasetSpec, ModelSpec, Recipe

# name: (type, min, max, help). Shared by every run of an experiment so that comparisons are fair.
TRAIN_FIELDS: dict[str, tuple[type, float, float, str]] = {
    "max_steps": (int, 1, 1_000_000, "Optimizer steps per run"),
    "batch_size": (int, 1, 4096, "Examples per step"),
    "lr": (float, 1e-8, 1.0, "Peak learning rate (AdamW)"),
    "weight_decay": (float, 0.0, 1.0, "AdamW weight decay"),
    "warmup_steps": (int, 0, 1_000_000, "Linear warm-up steps"),
    "eval_every": (int, 1, 1_000_000, "Evaluate on the eval split every N steps"),
    "save_every": (int, 1, 1_000_000, "Checkpoint every N steps"),
    "log_every": (int, 1, 100_000, "Log training losses every N steps"),
    "grad_clip": (float, 0.0, 1e6, "Gradient-norm clipping (0 = off)"),
    "labelled_fraction": (float, 0.01, 1.0, "Fraction of train rows whose labels are used (the rest are "
                                            "unlabelled inputs that only teacher terms learn from)"),
}
LR_SCHEDULES = ("constant", "linear", "cosine")
MAX_SEEDS = 20

BUILTIN_DATASETS = {
    "digits": {"num_labels": 10, "label_names": [str(i) for i in range(10)], "kind": "tabular",
               "splits_total": 1797},
    "bbc-news": {"num_labels": 5, "label_names": ["business", "entertainment", "politics", "sport", "tech"],
                 "kind": "text", "splits_total": 2225},
}
BUILTIN_ARCHS = {"mlp": "Multi-layer perceptron for tabular / flattened image data"}


def _number(value: Any, kind: type, lo: float, hi: float, field: str) -> int | float:
    if isinstance(value, bool):
        raise ValidationError({field: "Enter a number."})
    try:
        number = kind(value)
    except (TypeError, ValueError):
        raise ValidationError({field: f"Enter {'a whole number' if kind is int else 'a number'}."}) from None
    if kind is int and isinstance(value, float) and not value.is_integer():
        raise ValidationError({field: "Enter a whole number."})
    if number != number or not lo <= number <= hi:  # NaN fails the range check too
        raise ValidationError({field: f"Must be between {lo:g} and {hi:g}."})
    return number


def clean_train(train: dict[str, Any]) -> dict[str, Any]:
    errors: dict[str, list[str]] = {}
    cleaned: dict[str, Any] = {}
    for key, value in train.items():
        if value is None or value == "":
            continue
        if key == "lr_schedule":
            if value not in LR_SCHEDULES:
                errors[key] = [f"Choose one of: {', '.join(LR_SCHEDULES)}."]
            else:
                cleaned[key] = value
            continue
        if key not in TRAIN_FIELDS:
            errors[key] = [f"Unknown training setting '{key}'."]
            continue
        kind, lo, hi, _ = TRAIN_FIELDS[key]
        try:
            cleaned[key] = _number(value, kind, lo, hi, key)
        except ValidationError as exc:
            errors.update(exc.message_dict)
    from .engine_config import TRAIN_DEFAULTS

    merged = {**TRAIN_DEFAULTS, **cleaned}
    if "warmup_steps" not in errors and merged["warmup_steps"] >= merged["max_steps"] and merged["warmup_steps"]:
        errors["warmup_steps"] = ["Warm-up must be shorter than the run (max steps)."]
    if errors:
        raise ValidationError(errors)
    return merged


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
    """Validate a recipe's weighted loss terms against each method's parameter schema."""
    from workers.engine.errors import ConfigError
    from workers.engine.losses import validate_term_params

    if not isinstance(terms, list) or not terms:
        raise ValidationError({"terms": "A recipe needs at least one loss term."})
    cleaned = []
    for i, term in enumerate(terms, 1):
        if not isinstance(term, dict) or "name" not in term:
            raise ValidationError({"terms": f"Term {i} needs a name."})
        weight = _number(term.get("weight", 1.0), float, 0.0, 1e6, "terms")
        try:
            params = validate_term_params(term["name"], term.get("params") or {})
        except ConfigError as exc:
            raise ValidationError({"terms": f"Term {i} ({term['name']}): {exc}"}) from None
        cleaned.append({"name": term["name"], "weight": weight, "params": params})
    if sum(t["weight"] for t in cleaned) <= 0:
        raise ValidationError({"terms": "At least one term needs a positive weight."})
    names = [t["name"] for t in cleaned]
    if len(set(names)) != len(names):
        raise ValidationError({"terms": "Each loss term may appear once."})
    if scheme == Recipe.Scheme.HARD_LABELS and names != ["ce"]:
        raise ValidationError({"scheme": "The hard-labels scheme trains with the ce term only."})
    return cleaned


def check_local_path(path: str, *, roots: Sequence[Path], field: str, kind: str) -> str:
    """Accept a local path only if, after resolving symlinks, it lies under one of the configured roots."""
    if not roots:
        raise ValidationError({field: f"Local {kind} paths are disabled on this server (no {kind} roots configured)."})
    resolved = Path(path).expanduser().resolve()
    for root in roots:
        if resolved.is_relative_to(Path(root).resolve()):
            if not resolved.exists():
                raise ValidationError({field: f"{path} does not exist."})
            return str(resolved)
    raise ValidationError({field: f"{path} is outside the allowed {kind} folders."})


def clean_model_fields(fields: dict[str, Any]) -> dict[str, Any]:
    fields = dict(fields)
    source = fields.get("source")
    if source == ModelSpec.Source.BUILTIN:
        if fields.get("builtin_arch") not in BUILTIN_ARCHS:
            raise ValidationError({"builtin_arch": f"Choose one of: {', '.join(BUILTIN_ARCHS)}."})
        hidden = (fields.get("config") or {}).get("hidden_sizes", [])
        if not isinstance(hidden, list) or not all(isinstance(h, int) and 1 <= h <= 65536 for h in hidden):
            raise ValidationError({"config": "hidden_sizes must be a list of layer widths between 1 and 65536."})
    elif source == ModelSpec.Source.CONFIG:
        config = fields.get("config")
        if not isinstance(config, dict) or not config.get("model_type"):
            raise ValidationError({"config": 'A transformers config needs a "model_type", e.g. "bert".'})
    elif source == ModelSpec.Source.HF:
        if bool(fields.get("hub_id")) == bool(fields.get("local_path")):
            raise ValidationError({"hub_id": "Give either a hub id or a local folder."})
        if fields.get("local_path"):
            fields["local_path"] = check_local_path(
                fields["local_path"], roots=settings.MODEL_ROOTS, field="local_path", kind="model"
            )
        if (fields.get("config") or {}).get("trust_remote_code") and not settings.ALLOW_TRUST_REMOTE_CODE:
            raise ValidationError({"config": "trust_remote_code is disabled on this server."})
    elif source in (ModelSpec.Source.RUN, ModelSpec.Source.DERIVED):
        raise ValidationError({"source": "Register trained models from their run page."})
    else:
        raise ValidationError({"source": "Choose a model source."})
    return fields


def clean_dataset_fields(fields: dict[str, Any]) -> dict[str, Any]:
    fields = dict(fields)
    source = fields.get("source")
    if source == DatasetSpec.Source.BUILTIN:
        info = BUILTIN_DATASETS.get(fields.get("builtin_name", ""))
        if info is None:
            raise ValidationError({"builtin_name": f"Choose one of: {', '.join(BUILTIN_DATASETS)}."})
        fields.setdefault("num_labels", info["num_labels"])
        fields.setdefault("label_names", info["label_names"])
        if fields["num_labels"] != info["num_labels"]:
            raise ValidationError({"num_labels": f"{fields['builtin_name']} has {info['num_labels']} labels."})
        fields["label_names"] = fields["label_names"] or info["label_names"]
        total = info["splits_total"]
        eval_rows = round(total * fields.get("eval_fraction", 0.2))
        fields["splits"] = {"train": total - eval_rows, "eval": eval_rows}
    elif source == DatasetSpec.Source.HF:
        if bool(fields.get("hub_name")) == bool(fields.get("local_path")):
            raise ValidationError({"hub_name": "Give either a hub dataset name or a local CSV / JSONL file."})
        if fields.get("local_path"):
            fields["local_path"] = check_local_path(
                fields["local_path"], roots=settings.DATASET_ROOTS, field="local_path", kind="dataset"
            )
    else:
        raise ValidationError({"source": "Choose a dataset source."})
    if not fields.get("num_labels") or fields["num_labels"] < 2:
        raise ValidationError({"num_labels": "A classification dataset needs at least 2 labels."})
    return fields


def dataset_kind(dataset: DatasetSpec) -> str:
    """``tabular`` (numeric features) or ``text``."""
    if dataset.source == DatasetSpec.Source.BUILTIN:
        return BUILTIN_DATASETS.get(dataset.builtin_name, {}).get("kind", "text")
    return "text"


def model_kind(model: ModelSpec) -> str:
    if model.source == ModelSpec.Source.BUILTIN or (model.source == ModelSpec.Source.RUN and model.builtin_arch):
        return "tabular"
    return "text"


def check_experiment(*, team, dataset: DatasetSpec, teacher: ModelSpec | None, students: Sequence[ModelSpec],
                     recipes: Sequence[Recipe]) -> None:
    """Pre-flight checks that make a whole experiment invalid (nothing is created)."""
    errors: dict[str, list[str]] = {}
    records = [dataset, *students, *recipes] + ([teacher] if teacher else [])
    if any(r.team_id != team.id for r in records):
        errors.setdefault("__all__", []).append("Every record must belong to the experiment's team.")
    if not students:
        errors.setdefault("students", []).append("Choose at least one student.")
    if not recipes:
        errors.setdefault("recipes", []).append("Choose at least one recipe.")
    needing = [r for r in recipes if r.needs_teacher]
    if needing and teacher is None:
        names = ", ".join(str(r) for r in needing)
        errors.setdefault("teacher", []).append(f"Recipe {names} distills from a teacher: choose one.")
    if teacher is not None:
        if teacher.num_labels != dataset.num_labels:
            errors.setdefault("teacher", []).append(
                f"{teacher} predicts {teacher.num_labels} labels but {dataset} has {dataset.num_labels}."
            )
        if teacher in students:
            errors.setdefault("students", []).append("The teacher cannot also be a student.")
    data_kind = dataset_kind(dataset)
    for model in [*students, *([teacher] if teacher else [])]:
        if model_kind(model) != data_kind:
            field = "teacher" if model == teacher else "students"
            need = "numeric features (builtin nets such as mlp)" if data_kind == "tabular" else "text (transformers)"
            errors.setdefault(field, []).append(f"{model} cannot read {dataset}: that dataset needs a model for {need}.")
    for student in students:
        if student.num_labels != dataset.num_labels:
            errors.setdefault("students", []).append(
                f"{student} predicts {student.num_labels} labels but {dataset} has {dataset.num_labels}."
            )
    if errors:
        raise ValidationError(errors)
