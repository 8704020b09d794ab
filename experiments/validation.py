"""Input rules shared by the forms, the services and (later) the API. Errors carry field keys."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from django.conf import settings
from django.core.exceptions import ValidationError

from workers.engine import sources

from .models import DatasetSpec, ModelSpec, Recipe

# name: (type, min, max, help). Shared by every run of an experiment so that comparisons are fair.
TRAIN_FIELDS: dict[str, tuple[type, float, float, str]] = {
    "max_steps": (int, 1, 1_000_000, "Optimizer steps per run"),
    "batch_size": (int, 1, 4096, "Examples per step"),
    "lr": (float, 1e-8, 1.0, "Peak learning rate (AdamW)"),
    "weight_decay": (float, 0.0, 1.0, "AdamW weight decay"),
    "warmup_steps": (int, 0, 1_000_000, "Linear warm-up steps"),
    "eval_every": (int, 1, 1_000_000, "Evaluate every N steps (on the validation slice with early stopping, "
                                      "else on the eval split)"),
    "save_every": (int, 1, 1_000_000, "Checkpoint every N steps"),
    "log_every": (int, 1, 100_000, "Log training losses every N steps"),
    "grad_clip": (float, 0.0, 1e6, "Gradient-norm clipping (0 = off)"),
    "labelled_fraction": (float, 0.01, 1.0, "Fraction of train rows whose labels are used (the rest are "
                                            "unlabelled inputs that only teacher terms learn from)"),
    "early_stopping_patience": (int, 0, 10_000, "Early stopping: stop after this many evaluations without "
                                                "improvement of the watched metric on the validation slice "
                                                "(0 = off)"),
    "validation_fraction": (float, 0.01, 0.5, "Early stopping: fraction of the labelled train rows held out of "
                                              "training to select on; the eval split is only reported"),
}
LR_SCHEDULES = ("constant", "linear", "cosine")
# Early stopping watches a task metric on the validation slice, improving upward (max) or downward (min). Only
# metrics every run has (the hard-label baseline has no teacher to agree with).
EARLY_STOPPING_METRICS: dict[str, dict[str, str]] = {
    "classification": {"accuracy": "max", "macro_f1": "max", "loss": "min", "ece": "min"},
    "causal_lm": {"loss": "min", "perplexity": "min", "bits_per_token": "min"},
    "embedding": {},
}
ALL_EARLY_STOPPING_METRICS = tuple(dict.fromkeys(m for ms in EARLY_STOPPING_METRICS.values() for m in ms))
# Settings that are not numbers (and never swept).
TRAIN_CHOICES = ("lr_schedule", "early_stopping_metric", "vary_labelled_subset")
MAX_SEEDS = 20

_CLS, _LM, _EMB = "classification", "causal_lm", "embedding"
# Packaged real data (DATA.md): the tasks each supports; label counts for classification.
BUILTIN_DATASETS = {
    "digits": {"num_labels": 10, "label_names": [str(i) for i in range(10)], "kind": "tabular",
               "splits_total": 1797, "tasks": (_CLS,)},
    "iris": {"num_labels": 3, "label_names": ["setosa", "versicolor", "virginica"], "kind": "tabular",
             "splits_total": 150, "tasks": (_CLS,)},
    "wine": {"num_labels": 3, "label_names": ["class_0", "class_1", "class_2"], "kind": "tabular",
             "splits_total": 178, "tasks": (_CLS,)},
    "breast_cancer": {"num_labels": 2, "label_names": ["malignant", "benign"], "kind": "tabular",
                      "splits_total": 569, "tasks": (_CLS,)},
    "bbc-news": {"num_labels": 5, "label_names": ["business", "entertainment", "politics", "sport", "tech"],
                 "kind": "text", "splits_total": 2225, "tasks": (_CLS, _LM, _EMB)},
    "tweets": {"num_labels": 3, "label_names": ["negative", "neutral", "positive"], "kind": "text",
               "splits_total": 38158, "tasks": (_CLS, _LM, _EMB)},
    "fortunes": {"num_labels": None, "label_names": [], "kind": "text", "splits_total": None,
                 "tasks": (_LM, _EMB)},
}
BUILTIN_ARCHS = {"mlp": "Multi-layer perceptron for tabular / flattened image data"}


# --- decoded input: only what the database can store ----------------------------------------------
# Every structured input (an API body, a YAML document, a JSON text typed into a form) passes this check where
# it is decoded, before any field reads it: Postgres refuses the NUL character in text and jsonb, a lone
# surrogate cannot be encoded as UTF-8, and jsonb has no NaN or infinity, so each would otherwise fail as a
# database error (a 500) long after the input was accepted.
MAX_NESTING = 20
_TEXT_LIMIT = 40  # characters of a key shown in a message


def _shown_key(key: str) -> str:
    """A key as it may appear in a message: escaped when it is not plain printable text, and cut short."""
    if key.isidentifier() and len(key) <= _TEXT_LIMIT:
        return key
    return json.dumps(key[:_TEXT_LIMIT])  # ASCII escapes: no NUL or surrogate reaches the message


def _text_problem(text: str) -> str | None:
    if "\x00" in text:
        return "contains the NUL character (\\u0000), which cannot be stored"
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return "is not valid Unicode (it holds a lone surrogate such as \\ud800)"
    return None


def _first_problem(value: Any, where: str) -> tuple[str, str] | None:
    """(where, what) of the first part of ``value`` that cannot be accepted, or None."""
    stack: list[tuple[Any, str, int]] = [(value, where, 0)]
    while stack:
        item, path, depth = stack.pop()
        if isinstance(item, str):
            if problem := _text_problem(item):
                return path, f"the text {problem}"
        elif isinstance(item, bool) or item is None or isinstance(item, int):
            continue
        elif isinstance(item, float):
            if not math.isfinite(item):
                return path, "give a finite number (not NaN or infinity)"
        elif isinstance(item, list | tuple | dict):
            if depth >= MAX_NESTING:
                return path, f"nested deeper than {MAX_NESTING} levels"
            if isinstance(item, dict):
                for key, child in item.items():
                    if not isinstance(key, str):
                        return path, f"keys must be text, not {type(key).__name__} ({str(key)[:_TEXT_LIMIT]})"
                    if problem := _text_problem(key):
                        return path, f"a key {problem}"
                    stack.append((child, f"{path}.{_shown_key(key)}" if path else _shown_key(key), depth + 1))
            else:
                stack.extend((child, f"{path}[{i}]", depth + 1) for i, child in enumerate(item))
        else:
            return path, (f"a {type(item).__name__} value is not accepted; give text, a number, true/false, null, "
                          f"a list or an object")
    return None


def _sentence(text: str) -> str:
    return text[:1].upper() + text[1:] + "."


def _message(found: tuple[str, str], *, field: str = "") -> str:
    """The problem as a message for ``field``'s errors: its path shown unless it is the field itself."""
    path, problem = found
    return _sentence(problem) if path in ("", field) else f"{path}: {problem}."


def data_problem(value: Any, *, where: str = "") -> str | None:
    """Why ``value`` (decoded JSON or YAML) cannot be accepted as input, or None.

    Accepted: text, finite numbers, true/false, null, lists, and objects with text keys, nested at most
    ``MAX_NESTING`` levels; text (keys too) without NUL characters or lone surrogates. ``where`` names the value
    in the message ("config" gives "config.a: the text contains ...").
    """
    found = _first_problem(value, where)
    return _message(found) if found else None


def data_errors(data: Any) -> dict[str, list[str]]:
    """:func:`data_problem` for a whole request body or document: ``{field: [message]}`` keyed by the top-level
    key that holds the problem (a problem in a top-level key itself, or in a body that is not an object, under
    ``non_field_errors``). Empty when everything can be stored."""
    if not isinstance(data, dict):
        found = _first_problem(data, "")
        return {"non_field_errors": [_message(found)]} if found else {}
    errors: dict[str, list[str]] = {}
    for key, value in data.items():
        if not isinstance(key, str):
            errors.setdefault("non_field_errors", []).append("Field names must be text.")
        elif key_problem := _text_problem(key):
            errors.setdefault("non_field_errors", []).append(f"A field name {key_problem}.")
        elif found := _first_problem(value, key):
            errors[key] = [_message(found, field=key)]
    return errors


def check_data(value: Any, *, field: str) -> Any:
    """``value`` unchanged, or a ValidationError keyed ``field`` saying what in it cannot be accepted."""
    if found := _first_problem(value, field):
        raise ValidationError({field: _message(found, field=field)})
    return value


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


def clean_train(train: dict[str, Any], *, limit: int | None = None) -> dict[str, Any]:
    """Validate training settings and fill in the defaults.

    A numeric setting may be a list of values (a sweep): each value is checked like a single one, and the list
    stays a list (one value becomes a plain value). ``limit`` bounds a list's length (default
    ``MAX_RUNS_PER_EXPERIMENT``: more values than runs can never fit). Errors are keyed by setting.
    """
    limit = settings.MAX_RUNS_PER_EXPERIMENT if limit is None else limit
    errors: dict[str, list[str]] = {}
    cleaned: dict[str, Any] = {}
    for key, value in train.items():
        if value is None or value == "" or value == []:
            continue
        if key == "lr_schedule":
            if not isinstance(value, str) or value not in LR_SCHEDULES:
                errors[key] = [f"Choose one of: {', '.join(LR_SCHEDULES)}."]
            else:
                cleaned[key] = value
            continue
        if key == "early_stopping_metric":
            if not isinstance(value, str) or value not in ALL_EARLY_STOPPING_METRICS:
                errors[key] = [f"Choose one of: {', '.join(ALL_EARLY_STOPPING_METRICS)}."]
            else:
                cleaned[key] = value
            continue
        if key == "vary_labelled_subset":
            if not isinstance(value, bool):
                errors[key] = ["Give true or false."]
            elif value:
                cleaned[key] = True
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
    from .engine_config import TRAIN_DEFAULTS

    merged = {**TRAIN_DEFAULTS, **cleaned}
    if "warmup_steps" not in errors and "max_steps" not in errors:
        # Every combination of a sweep is trained, so the longest warm-up must fit the shortest run.
        warmup, steps = max(_as_list(merged["warmup_steps"])), min(_as_list(merged["max_steps"]))
        if warmup and warmup >= steps:
            errors["warmup_steps"] = ["Warm-up must be shorter than the run (max steps)."
                                      if not _swept(merged, "warmup_steps", "max_steps") else
                                      f"Warm-up must be shorter than the run: {warmup} warm-up steps do not fit "
                                      f"in a run of {steps} steps."]
    if "early_stopping_patience" not in errors and "early_stopping_metric" not in errors:
        patience = max(_as_list(merged.get("early_stopping_patience", 0)))
        if patience and not merged.get("early_stopping_metric"):
            errors["early_stopping_metric"] = ["Choose the metric early stopping watches on the validation slice."]
        elif merged.get("early_stopping_metric") and not patience:
            errors["early_stopping_patience"] = ["Give a patience of at least 1 evaluation, or clear the "
                                                 "early-stopping metric."]
    if errors:
        raise ValidationError(errors)
    return merged


def check_selection(train: dict[str, Any], *, dataset: DatasetSpec) -> dict[str, Any]:
    """Early-stopping settings that depend on the dataset: the watched metric is one its task reports, and the
    validation slice (``validation_fraction`` of the labelled train rows) has rows to select on while leaving
    rows to train on. ``train`` is cleaned (:func:`clean_train`); returned unchanged."""
    metric = train.get("early_stopping_metric")
    if not metric or not max(_as_list(train.get("early_stopping_patience", 0))):
        return train
    allowed = EARLY_STOPPING_METRICS.get(dataset.task, {})
    if metric not in allowed:
        raise ValidationError({"early_stopping_metric": (
            f"A {dataset.task} run's validation slice reports {', '.join(allowed) or 'no metric every run has'}; "
            f"it cannot watch {metric}.")})
    counts = dataset.splits if isinstance(dataset.splits, dict) else {}
    rows = counts.get("train")
    if isinstance(rows, int) and not isinstance(rows, bool):
        labelled = rows * min(_as_list(train.get("labelled_fraction", 1.0))) if dataset.task == "classification" \
            else rows
        if round(labelled) < 2:
            raise ValidationError({"validation_fraction": (
                f"Early stopping holds a validation slice out of the labelled train rows, but this dataset has about "
                f"{round(labelled)} of them; at least 2 are needed (one to select on, one to train on).")})
    return train


def _as_list(value: Any) -> list[Any]:
    return list(value) if isinstance(value, list) else [value]


def _swept(train: dict[str, Any], *keys: str) -> bool:
    return any(isinstance(train.get(k), list) for k in keys)


def _clean_sweep(values: list[Any], kind: type, lo: float, hi: float, field: str, limit: int) -> Any:
    """A swept setting: every value checked, none repeated, at most ``limit``; one value is kept plain."""
    if len(values) > limit:
        raise ValidationError({field: f"This gives {len(values):,} values; at most {limit:,} fit in one experiment."})
    cleaned = [_number(v, kind, lo, hi, field) for v in values]
    if len(set(cleaned)) != len(cleaned):
        raise ValidationError({field: "Each swept value may appear once."})
    return cleaned if len(cleaned) > 1 else cleaned[0]


def clean_term_sweeps(term_sweeps: Any, *, recipes: Sequence[Recipe], limit: int | None = None) -> dict[str, list]:
    """Validate sweeps of recipe term parameters (``{"kd.temperature": [2, 4]}``) against the engine's schema and
    the chosen recipes: every swept term must be in at least one chosen recipe (hard-label baselines aside).

    Errors are keyed ``term_sweeps``. Combinations (a recipe's terms with the swept values set) are checked when
    the runs are planned, once the grid is known to be small enough.
    """
    from .sweeps import SweepError, check_term_values, term_axis

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
            errors.append(f"{axis}: no chosen recipe has a {term} term; choose one that does, or remove this line.")
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
    """Validate a recipe's weighted loss terms (parameters and optional schedules) against the engine's schema.

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
            valid = validate_term(LossTermConfig(term["name"], weight, term.get("params") or {},
                                                 term.get("schedule") or {}))
        except ConfigError as exc:
            raise ValidationError({"terms": f"Term {i} ({term['name']}): {exc}"}) from None
        cleaned.append({"name": valid.name, "weight": valid.weight, "params": valid.params,
                        **({"schedule": valid.schedule} if valid.schedule else {})})
    if not any(max_weight(t["weight"], t.get("schedule", {})) > 0 for t in cleaned):
        raise ValidationError({"terms": "At least one term needs a positive weight."})
    names = [t["name"] for t in cleaned]
    if len(set(names)) != len(names):
        raise ValidationError({"terms": "Each loss term may appear once."})
    if scheme == Recipe.Scheme.HARD_LABELS and names != ["ce"]:
        raise ValidationError({"scheme": "The hard-labels scheme trains with the ce term only."})
    return cleaned


def clean_scheme_params(scheme: str, params: dict[str, Any]) -> dict[str, Any]:
    """Validate a recipe's scheme parameters against the scheme's schema (defaults filled in)."""
    from workers.engine.errors import ConfigError
    from workers.engine.schemes import validate_scheme_params

    try:
        return validate_scheme_params(scheme, params)
    except ConfigError as exc:
        raise ValidationError({"scheme_params": str(exc)}) from None


def check_local_path(path: str, *, roots: Sequence[Path], field: str, kind: str) -> str:
    """Accept a local path only if, after resolving symlinks, it lies under one of the configured roots and not
    under the artifact root (every team's runs and uploads: those are reachable only as ``run`` sources and
    uploads). Messages do not repeat the path."""
    if not roots:
        raise ValidationError({field: f"Local {kind} paths are disabled on this server (no {kind} roots configured)."})
    try:
        resolved = Path(path).expanduser().resolve()
    except (OSError, ValueError):
        raise ValidationError({field: f"This is not a path of a {kind} folder or file on the server."}) from None
    if sources.is_within(resolved, [settings.ARTIFACT_ROOT]) or not sources.is_within(resolved, roots):
        raise ValidationError({field: f"This path is outside the allowed {kind} folders."})
    if not resolved.exists():
        raise ValidationError({field: "Nothing exists at this path."})
    return str(resolved)


def check_hub_field(fields: dict[str, Any], field: str, problem_of=sources.repo_id_problem, *,
                    what: str = "hub id") -> None:
    """A ValidationError keyed ``field`` when ``fields[field]`` is given and is not a ``what`` of the hub's syntax
    (``workers.engine.sources``): a hub identifier is never a path, a URL or an encoded string."""
    value = fields.get(field)
    if value in (None, ""):
        return
    problem = problem_of(value)
    if problem:
        example = {"hub id": "org/name", "revision": "main, v1.0 or a commit sha",
                   "hub dataset name": "org/name"}.get(what, "org/name")
        raise ValidationError({field: f"Enter a {what} such as {example}: {problem}."})


def _check_config_tokenizer(config: dict[str, Any]) -> dict[str, Any]:
    """The tokenizer a ``config`` model names: a hub id, or an absolute path of a folder under a model root."""
    tokenizer = config.get("tokenizer")
    if tokenizer in (None, ""):
        return config
    if not isinstance(tokenizer, str):
        raise ValidationError({"config": '"tokenizer" must be a hub id or a model folder, as text.'})
    if sources.is_local_tokenizer(tokenizer):
        try:
            local = check_local_path(tokenizer, roots=settings.MODEL_ROOTS, field="config", kind="model")
        except ValidationError as exc:
            raise ValidationError({"config": f'"tokenizer": {" ".join(exc.messages)}'}) from None
        return {**config, "tokenizer": local}
    problem = sources.repo_id_problem(tokenizer)
    if problem:
        raise ValidationError({"config": f'"tokenizer" must be a hub id such as org/name, or the absolute path of a '
                                         f"folder under a model root: {problem}."})
    return config


def clean_model_fields(fields: dict[str, Any]) -> dict[str, Any]:
    fields = dict(fields)
    source = fields.get("source")
    # Hub identifiers, whatever the source: a hub id is never a path (workers.engine.sources).
    check_hub_field(fields, "hub_id")
    check_hub_field(fields, "revision", sources.revision_problem, what="revision")
    check_hub_field(fields, "tokenizer_id")
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
        fields["config"] = _check_config_tokenizer(config)
    elif source == ModelSpec.Source.HF:
        if bool(fields.get("hub_id")) == bool(fields.get("local_path")):
            raise ValidationError({"hub_id": "Give either a hub id or a local folder."})
        if fields.get("local_path"):
            fields["local_path"] = check_local_path(
                fields["local_path"], roots=settings.MODEL_ROOTS, field="local_path", kind="model"
            )
        if (fields.get("config") or {}).get("trust_remote_code") and not settings.ALLOW_TRUST_REMOTE_CODE:
            raise ValidationError({"config": "trust_remote_code is disabled on this server."})
    elif source == ModelSpec.Source.DERIVED:
        parent = fields.get("parent")
        if parent is None:
            raise ValidationError({"parent": "Choose the model to derive from."})
        fields["config"] = clean_derive_params(parent, fields.get("config") or {})
    elif source == ModelSpec.Source.RUN:
        raise ValidationError({"source": "Register trained models from their run page."})
    else:
        raise ValidationError({"source": "Choose a model source."})
    return fields


DERIVE_FIELDS = ("layers", "hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads")


def clean_derive_params(parent: ModelSpec, params: dict[str, Any]) -> dict[str, Any]:
    """Validate how a student is derived from ``parent`` (engine rules, see ``workers.engine.derive``).

    Layer ids and widths are checked against the parent's architecture when it is known here without loading
    weights (a config, a local folder, or a derived model built on those); otherwise the worker checks them
    when the run starts. Errors are keyed by the offending parameter.
    """
    from workers.engine.derive import plan_derivation, validate_derive_params
    from workers.engine.errors import ConfigError, ModelLoadError

    if model_kind(parent) != "text":
        message = f"{parent} is a builtin net; only transformers models can be derived from."
        raise ValidationError({"parent": message})
    try:
        cleaned = validate_derive_params(params)
        architecture = parent_architecture(parent)
        if architecture is not None:
            plan_derivation(architecture, cleaned)
    except (ConfigError, ModelLoadError) as exc:
        raise ValidationError({_derive_error_field(str(exc)): str(exc)}) from None
    return cleaned


def _derive_error_field(message: str) -> str:
    lowered = message.lower()
    if lowered.startswith("cannot derive"):
        return "parent"
    if lowered.startswith(("layer", "each layer")):
        return "layers"
    if lowered.startswith("unknown derive"):
        return "config"
    positions = {name: lowered.find(name) for name in DERIVE_FIELDS if name in lowered}
    return min(positions, key=positions.get) if positions else "config"


def parent_architecture(spec: ModelSpec) -> Any | None:
    """The transformers config of ``spec`` when it can be known without weights or network, else None."""
    from workers.engine.errors import ConfigError, ModelLoadError

    try:
        if spec.source == ModelSpec.Source.CONFIG:
            from transformers import AutoConfig

            skip = ("model_type", "tokenizer", "normalize")  # engine-side keys, not config attributes
            params = {k: v for k, v in spec.config.items() if k not in skip}
            return AutoConfig.for_model(spec.config["model_type"], **params)
        if spec.source == ModelSpec.Source.HF and spec.local_path:
            from transformers import AutoConfig

            return AutoConfig.from_pretrained(spec.local_path, local_files_only=True)
        if spec.source == ModelSpec.Source.DERIVED and spec.parent is not None:
            from workers.engine.derive import child_config, plan_derivation

            parent = parent_architecture(spec.parent)
            return child_config(parent, plan_derivation(parent, spec.config)) if parent is not None else None
    except (ConfigError, ModelLoadError):
        raise
    except Exception:  # an unreadable folder or config: the worker reports it with the run
        return None
    return None


# File types an uploaded dataset may have (the engine reads them by suffix); the stored file gets the same suffix.
UPLOAD_SUFFIXES = (".csv", ".jsonl", ".json", ".parquet", ".txt")


def upload_suffix(filename: str) -> str | None:
    """The whitelisted suffix of an uploaded file's name (lower-cased), or None. Only the suffix is ever used."""
    suffix = Path(str(filename).replace("\\", "/")).suffix.lower()
    return suffix if suffix in UPLOAD_SUFFIXES else None


def upload_dir() -> Path:
    """Where uploaded dataset files are stored: ``ARTIFACT_ROOT/datasets`` (one sub-folder per team)."""
    return Path(settings.ARTIFACT_ROOT) / "datasets"


def refuse_upload_paths(fields: dict[str, Any]) -> None:
    """An uploaded dataset's file is stored by the server: no path or other source may come with it."""
    given = [key for key in ("local_path", "eval_local_path", "hub_name", "builtin_name") if fields.get(key)]
    if given:
        raise ValidationError({key: "An uploaded dataset's file is stored by the server; leave this empty."
                               for key in given})


def clean_dataset_fields(fields: dict[str, Any], *, stored_path: str | Path | None = None) -> dict[str, Any]:
    """Check and complete a dataset's fields.

    ``stored_path`` is where the service stored an uploaded file (source ``upload``); an upload's path never comes
    from input.
    """
    fields = dict(fields)
    source = fields.get("source")
    if source == DatasetSpec.Source.BUILTIN:
        info = BUILTIN_DATASETS.get(fields.get("builtin_name", ""))
        if info is None:
            raise ValidationError({"builtin_name": f"Choose one of: {', '.join(BUILTIN_DATASETS)}."})
        task = fields.setdefault("task", info["tasks"][0])
        if task not in info["tasks"]:
            raise ValidationError({"task": f"{fields['builtin_name']} supports: {', '.join(info['tasks'])}."})
        if task == _CLS:
            fields.setdefault("num_labels", info["num_labels"])
            fields.setdefault("label_names", info["label_names"])
            if fields["num_labels"] != info["num_labels"]:
                raise ValidationError({"num_labels": f"{fields['builtin_name']} has {info['num_labels']} labels."})
            fields["label_names"] = fields["label_names"] or info["label_names"]
        else:
            fields["num_labels"], fields["label_names"] = 0, []
        total = info["splits_total"]
        if total:
            eval_rows = round(total * fields.get("eval_fraction", 0.2))
            fields["splits"] = {"train": total - eval_rows, "eval": eval_rows}
    elif source == DatasetSpec.Source.HF:
        if bool(fields.get("hub_name")) == bool(fields.get("local_path")):
            raise ValidationError({"hub_name": "Give either a hub dataset name or a local CSV / JSONL file."})
        check_hub_field(fields, "hub_name", sources.dataset_name_problem, what="hub dataset name")
        if fields.get("local_path"):
            fields["local_path"] = check_local_path(
                fields["local_path"], roots=settings.DATASET_ROOTS, field="local_path", kind="dataset"
            )
    elif source == DatasetSpec.Source.UPLOAD:
        refuse_upload_paths(fields)
        if not stored_path:
            raise ValidationError({"upload": "Choose a file to upload."})
        stored = Path(stored_path).resolve()
        if not stored.is_relative_to(upload_dir().resolve()) or not stored.is_file() \
                or upload_suffix(stored.name) is None:
            raise ValidationError({"upload": "The uploaded file was not stored where expected."})
        fields["local_path"] = str(stored)
    else:
        raise ValidationError({"source": "Choose a dataset source."})
    if fields.get("eval_local_path"):
        if not fields.get("local_path"):
            raise ValidationError({"eval_local_path": "A separate eval file needs a local train file."})
        fields["eval_local_path"] = check_local_path(
            fields["eval_local_path"], roots=settings.DATASET_ROOTS, field="eval_local_path", kind="dataset"
        )
    if fields.get("pack") and fields.get("task", _CLS) != _LM:
        raise ValidationError({"pack": "Packing texts into blocks applies to causal language modelling only."})
    if fields.get("task", _CLS) == _CLS and (not fields.get("num_labels") or fields["num_labels"] < 2):
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
                     recipes: Sequence[Recipe], assistant: ModelSpec | None = None,
                     extra_teachers: Sequence[ModelSpec] = (), teacher_weights: Sequence[Any] = ()) -> list[float]:
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
        allowed = SCHEME_TASKS.get(recipe.scheme)
        if allowed and dataset.task not in allowed:
            err("recipes", f"Recipe {recipe} ({recipe.scheme}) works on {' / '.join(allowed)} data, "
                           f"not {dataset.task}.")
    if teacher is not None and teacher in students:
        err("students", "The teacher cannot also be a student.")
    data_kind = dataset_kind(dataset)
    for field, models in (("teacher", [teacher]), ("assistant", [assistant]), ("extra_teachers", extra_teachers),
                          ("students", students)):
        for model in models:
            if model is None:
                continue
            if model.task != dataset.task:
                err(field, f"{model} is a {model.get_task_display().lower()} model but {dataset} is "
                           f"{dataset.get_task_display().lower()} data.")
            elif model_kind(model) != data_kind:
                need = "numeric features (builtin nets such as mlp)" if data_kind == "tabular" else "text (transformers)"
                err(field, f"{model} cannot read {dataset}: that dataset needs a model for {need}.")
            elif dataset.task == "classification" and model.num_labels != dataset.num_labels:
                err(field, f"{model} predicts {model.num_labels} labels but {dataset} has {dataset.num_labels}.")
    if errors:
        raise ValidationError(errors)
    return weights


SCHEME_TASKS = {
    Recipe.Scheme.SEQ_KD: ("causal_lm",),
    Recipe.Scheme.ON_POLICY: ("causal_lm",),
}


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
