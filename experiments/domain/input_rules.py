"""What each record's input takes: its fields' rules (``fields.Rule``: checks, choices, initial values,
parsers), the checks across fields, and the keyword arguments the services take. The web forms
(``experiments/forms.py``) render these rules with their widgets and help texts; the API validates JSON values
with them (``api/inputs.py``). Fields whose records depend on the user (team, dataset, models, recipes) are
cleaned against a queryset the caller passes.
"""

from __future__ import annotations

from collections.abc import Container, Mapping
from functools import partial
from typing import Any

from django import forms
from django.conf import settings

from experiments.domain import fields
from experiments.domain.engine_config import TRAIN_DEFAULTS
from experiments.domain.fields import AddError, Rule, rule
from experiments.domain.specs import BUILTIN_ARCHS, BUILTIN_DATASETS
from experiments.domain.validation import (
    ALL_EARLY_STOPPING_METRICS,
    LR_SCHEDULES,
    PRECISIONS,
    STRATEGIES,
    SWEPT_CHOICES,
    TRAIN_FIELDS,
)
from experiments.models import DatasetSpec, ModelSpec, Recipe, Task

Rules = Mapping[str, Rule]

TEAM = rule(forms.ModelChoiceField, queryset=None, empty_label=None)
RECORD_NAME = rule(forms.CharField, max_length=120)
NOTES = rule(forms.CharField, required=False)

# --- models -------------------------------------------------------------------------------------------------
MODEL_SOURCES = [
    (ModelSpec.Source.BUILTIN, "Builtin torch net (MLP)"),
    (ModelSpec.Source.CONFIG, "Random init from a transformers config"),
    (ModelSpec.Source.HF, "Hugging Face model (hub id or local folder)"),
    (ModelSpec.Source.SERVER, "Served by an inference server (vLLM, sglang; a causal-LM teacher only)"),
]


def teacher_server_choices() -> list[tuple[str, str]]:
    """The inference servers the admin configured (``DISTILLWEB_TEACHER_SERVERS``), by name: users never
    give a URL."""
    return [(name, name) for name in settings.TEACHER_SERVERS]


MODEL_SPEC: Rules = {
    "team": TEAM,
    "name": RECORD_NAME,
    "source": rule(forms.ChoiceField, choices=MODEL_SOURCES, initial=ModelSpec.Source.BUILTIN),
    "task": rule(forms.ChoiceField, choices=Task.choices, initial=Task.CLASSIFICATION, required=False),
    "num_labels": rule(forms.IntegerField, min_value=2, max_value=1_000_000, required=False),
    "builtin_arch": rule(
        forms.ChoiceField, choices=[(k, f"{k} — {v}") for k, v in BUILTIN_ARCHS.items()], required=False
    ),
    "hidden_sizes": rule(
        forms.CharField,
        required=False,
        initial="256,256",
        text=lambda text: fields.hidden_sizes(fields.comma_items(text)),
        value=fields.hidden_sizes,
    ),
    "config": rule(
        forms.CharField,
        required=False,
        text=fields.json_object_text,
        value=fields.model_config,
        takes=(dict,),
    ),
    "hub_id": rule(forms.CharField, max_length=200, required=False),
    "local_path": rule(forms.CharField, max_length=500, required=False),
    "revision": rule(forms.CharField, max_length=100, required=False),
    "tokenizer_id": rule(forms.CharField, max_length=200, required=False),
    "server": rule(forms.ChoiceField, choices=teacher_server_choices, required=False),
    "served_model": rule(forms.CharField, max_length=200, required=False),
    "notes": NOTES,
}


def model_spec_checks(cleaned: dict[str, Any], errors: Container[str], add_error: AddError) -> None:
    """The checks across a model's fields (``add_error`` also drops the field from ``cleaned``); fills in the
    task, and no classes for a model that is no classifier."""
    source = cleaned.get("source")
    if source == ModelSpec.Source.BUILTIN and not cleaned.get("builtin_arch"):
        add_error("builtin_arch", "Choose an architecture.")
    if source == ModelSpec.Source.CONFIG and "config" in cleaned and not cleaned["config"]:
        add_error("config", "Paste a transformers config.")
    cleaned["task"] = cleaned.get("task") or Task.CLASSIFICATION
    if (
        cleaned.get("task") == Task.CLASSIFICATION
        and not cleaned.get("num_labels")
        and "num_labels" not in errors
    ):
        add_error("num_labels", "A classifier needs its number of classes (2 or more).")
    if cleaned.get("task") != Task.CLASSIFICATION:
        cleaned["num_labels"] = 0
    if source == ModelSpec.Source.BUILTIN and cleaned.get("task") != Task.CLASSIFICATION:
        add_error("task", "Builtin nets are classifiers.")
    if source == ModelSpec.Source.SERVER:
        if not settings.TEACHER_SERVERS:
            add_error("server", "No teacher server is configured on this site.")
        elif not cleaned.get("server") and "server" not in errors:
            add_error("server", "Choose one of the configured teacher servers.")
        if not (cleaned.get("served_model") or "").strip() and "served_model" not in errors:
            add_error("served_model", "Give the model name the server serves (as its /v1/models lists it).")
        if cleaned.get("task") != Task.CAUSAL_LM:
            add_error("task", "An inference server serves causal language models: choose causal_lm.")


def model_spec_service_fields(data: Mapping[str, Any]) -> dict[str, Any]:
    """Keyword arguments for ``records.model_spec_create`` (besides team and created_by)."""
    found: dict[str, Any] = {
        "name": data["name"],
        "source": data["source"],
        "num_labels": data["num_labels"],
        "task": data["task"],
        "notes": data["notes"],
        "tokenizer_id": data["tokenizer_id"],
    }
    match data["source"]:
        case ModelSpec.Source.BUILTIN:
            found.update(builtin_arch=data["builtin_arch"], config={"hidden_sizes": data["hidden_sizes"]})
        case ModelSpec.Source.CONFIG:
            found.update(config=data["config"])
        case ModelSpec.Source.HF:
            found.update(
                hub_id=data["hub_id"].strip(),
                local_path=data["local_path"].strip(),
                revision=data["revision"].strip(),
            )
        case ModelSpec.Source.SERVER:  # the served model name in hub_id, the server's name in the config
            found.update(hub_id=data["served_model"].strip(), config={"server": data["server"]})
    return found


def model_spec_error_aliases(data: Mapping[str, Any]) -> dict[str, str]:
    """Service error keys → a model's fields (a builtin net's config is its hidden sizes; a served model's
    hub id is its served name, its config its server)."""
    if data.get("source") == ModelSpec.Source.SERVER:
        return {"hub_id": "served_model", "config": "server"}
    return {"config": "hidden_sizes"} if data.get("source") == ModelSpec.Source.BUILTIN else {}


MODEL_DERIVE: Rules = {
    "name": RECORD_NAME,
    "layers": rule(
        forms.CharField,
        max_length=400,
        initial="every_other",
        text=fields.derive_layers,
        value=fields.derive_layers,
    ),
    "hidden_size": rule(forms.IntegerField, required=False, min_value=1, max_value=65536),
    "intermediate_size": rule(forms.IntegerField, required=False, min_value=1, max_value=262144),
    "num_attention_heads": rule(forms.IntegerField, required=False, min_value=1, max_value=1024),
}
# Service error keys → the derive input's fields.
MODEL_DERIVE_ALIASES = {"__all__": "name", "config": "layers", "parent": "__all__"}


def model_derive_kwargs(data: Mapping[str, Any]) -> dict[str, Any]:
    """Keyword arguments for ``records.model_derive`` (besides parent and created_by)."""
    return {k: data[k] for k in MODEL_DERIVE}


# --- datasets -----------------------------------------------------------------------------------------------
DATASET_SOURCES = [
    (DatasetSpec.Source.BUILTIN, "Packaged dataset"),
    (DatasetSpec.Source.HF, "Hugging Face hub dataset or local CSV / JSONL file"),
    (DatasetSpec.Source.UPLOAD, "Upload a file"),
]

BUILTIN_DATASET_CHOICES = [
    (
        k,
        f"{k} — "
        + (f"{v['num_labels']} classes, " if v["num_labels"] else "")
        + (f"{v['splits_total']:,} rows, " if v["splits_total"] else "")
        + " / ".join(v["tasks"]),
    )
    for k, v in BUILTIN_DATASETS.items()
]

DATASET_SPEC: Rules = {
    "team": TEAM,
    "name": RECORD_NAME,
    "source": rule(forms.ChoiceField, choices=DATASET_SOURCES, initial=DatasetSpec.Source.BUILTIN),
    "task": rule(forms.ChoiceField, choices=Task.choices, initial=Task.CLASSIFICATION, required=False),
    "builtin_name": rule(forms.ChoiceField, required=False, choices=BUILTIN_DATASET_CHOICES),
    "hub_name": rule(forms.CharField, max_length=200, required=False),
    "local_path": rule(forms.CharField, max_length=500, required=False),
    "upload": rule(forms.FileField, required=False, allow_empty_file=False),
    "eval_local_path": rule(forms.CharField, max_length=500, required=False),
    "pack": rule(forms.BooleanField, required=False),
    "text_column": rule(forms.CharField, max_length=100, initial="text"),
    "label_column": rule(forms.CharField, max_length=100, initial="label"),
    "num_labels": rule(forms.IntegerField, min_value=2, max_value=1_000_000, required=False),
    "label_names": rule(
        forms.CharField, required=False, text=fields.label_names_text, value=fields.label_names
    ),
    "eval_fraction": rule(forms.FloatField, initial=0.2, min_value=0.01, max_value=0.9),
    "split_seed": rule(forms.IntegerField, initial=0, min_value=0, max_value=2**31 - 1),
    "max_length": rule(forms.IntegerField, initial=128, min_value=8, max_value=32768),
    "notes": NOTES,
}


def dataset_spec_checks(cleaned: dict[str, Any], errors: Container[str], add_error: AddError) -> None:
    """The checks across a dataset's fields; fills in the task."""
    names, num_labels = cleaned.get("label_names"), cleaned.get("num_labels")
    if names and num_labels and len(names) != num_labels:
        add_error("label_names", f"Give {num_labels} names (one per label) or none.")
    if cleaned.get("source") == DatasetSpec.Source.BUILTIN and not cleaned.get("builtin_name"):
        add_error("builtin_name", "Choose a packaged dataset.")
    if (
        cleaned.get("source") == DatasetSpec.Source.UPLOAD
        and not cleaned.get("upload")
        and "upload" not in errors
    ):
        add_error("upload", "Choose a file to upload.")
    cleaned["task"] = cleaned.get("task") or Task.CLASSIFICATION


def dataset_spec_service_fields(data: Mapping[str, Any]) -> dict[str, Any]:
    """Keyword arguments for ``records.dataset_spec_create``; empty values are left to the service."""
    keys = [
        "name",
        "source",
        "task",
        "text_column",
        "label_column",
        "eval_fraction",
        "split_seed",
        "max_length",
        "notes",
    ]
    if data["source"] == DatasetSpec.Source.BUILTIN:
        keys.append("builtin_name")
    elif data["source"] == DatasetSpec.Source.UPLOAD:
        keys.append("upload")
    else:
        keys += ["hub_name", "local_path", "eval_local_path"]
    if data.get("pack"):
        keys.append("pack")
    found = {k: data[k].strip() if isinstance(data[k], str) and k != "notes" else data[k] for k in keys}
    if data.get("num_labels"):
        found["num_labels"] = data["num_labels"]
    if data.get("label_names"):
        found["label_names"] = data["label_names"]
    return found


# --- recipes ------------------------------------------------------------------------------------------------
RECIPE: Rules = {
    "team": TEAM,
    "name": RECORD_NAME,
    # Read when the field is built, so schemes added to the model appear without touching the rules.
    "scheme": rule(forms.ChoiceField, choices=lambda: Recipe.Scheme.choices, initial=Recipe.Scheme.OFFLINE),
    "description": NOTES,
}

# --- experiments --------------------------------------------------------------------------------------------
DERIVE_STUDENT_CHOICES = [
    ("", "— no —"),
    ("every_other", "keep every other layer"),
    ("every_third", "keep every third layer"),
]


def _train_rule(name: str) -> Rule:
    """A numeric training setting: one value or a sweep, as text (``sweeps.SYNTAX_HELP``) or a list."""
    return rule(
        forms.CharField,
        max_length=200,
        required=False,
        initial=TRAIN_DEFAULTS.get(name),
        text=partial(fields.train_sweep_text, name),
        value=partial(fields.train_sweep_value, name),
        shape=fields.train_sweep_shape,
        takes=(list, dict),
    )


def _choice_sweep_rule(name: str, kind: type[forms.Field], **options: Any) -> Rule:
    """A resource choice: one name or true/false, or a list of them (a sweep); text as the page posts it."""
    return rule(
        kind,
        required=False,
        text=partial(fields.choice_sweep_text, name),
        value=partial(fields.choice_sweep_value, name),
        takes=(list, str) if kind is forms.MultipleChoiceField else (list, bool),
        **options,
    )


# activation_checkpointing on the page: off, on, or both (a sweep); true/false or a list of them as a value.
ON_OFF_CHOICES = [("off", "off"), ("on", "on"), ("both", "off and on (a sweep)")]

EXPERIMENT: Rules = {
    "team": TEAM,
    "name": rule(forms.CharField, max_length=200),
    "description": rule(forms.CharField, required=False, max_length=5000),
    "dataset": rule(forms.ModelChoiceField, queryset=None),
    "teacher": rule(forms.ModelChoiceField, queryset=None, required=False),
    "students": rule(forms.ModelMultipleChoiceField, queryset=None, required=False),
    "derive_student": rule(forms.ChoiceField, required=False, choices=DERIVE_STUDENT_CHOICES),
    "recipes": rule(forms.ModelMultipleChoiceField, queryset=None),
    "term_sweeps": rule(
        forms.CharField,
        max_length=fields.TERM_SWEEPS_CAP,
        required=False,
        text=fields.term_sweeps_text,
        value=fields.term_sweeps_value,
        shape=fields.term_sweeps_shape,
        takes=(list, dict),
    ),
    "assistant": rule(forms.ModelChoiceField, queryset=None, required=False),
    "extra_teachers": rule(forms.ModelMultipleChoiceField, queryset=None, required=False),
    "teacher_weights": rule(
        forms.CharField,
        required=False,
        max_length=200,
        text=lambda text: fields.teacher_weights(fields.comma_items(text)),
        value=fields.teacher_weights,
    ),
    "seeds": rule(forms.CharField, initial="0", max_length=200, text=fields.seeds_text, value=fields.seeds),
    **{name: _train_rule(name) for name in TRAIN_FIELDS},
    "lr_schedule": rule(
        forms.ChoiceField,
        choices=[(s, s) for s in LR_SCHEDULES],
        required=False,
        initial=TRAIN_DEFAULTS["lr_schedule"],
    ),
    "early_stopping_metric": rule(
        forms.ChoiceField,
        required=False,
        choices=[("", "off"), *((m, m) for m in ALL_EARLY_STOPPING_METRICS)],
    ),
    "vary_labelled_subset": rule(forms.BooleanField, required=False),
    # Resources: the ranks of numbers above (gpus, processes), and the choices here.
    "strategy": _choice_sweep_rule(
        "strategy", forms.MultipleChoiceField, choices=[(s, s) for s in STRATEGIES]
    ),
    "precision": _choice_sweep_rule(
        "precision", forms.MultipleChoiceField, choices=[(p, p) for p in PRECISIONS]
    ),
    "activation_checkpointing": _choice_sweep_rule(
        "activation_checkpointing", forms.CharField, max_length=20
    ),
    # LoRA: the numbers above (lora_r, lora_alpha, lora_dropout), the target modules and QLoRA here.
    "lora_targets": rule(forms.CharField, required=False, max_length=500),
    "lora_4bit": _choice_sweep_rule("lora_4bit", forms.CharField, max_length=20),
}
EXPERIMENT_TEAM_FIELDS = ("dataset", "teacher", "students", "recipes", "assistant", "extra_teachers")


def experiment_checks(cleaned: dict[str, Any], errors: Container[str], add_error: AddError) -> None:
    """The checks across an experiment's fields: a student to train, and a teacher to derive one from."""
    if not cleaned.get("students") and not cleaned.get("derive_student") and "students" not in errors:
        add_error("students", "Choose at least one student, or derive one from the teacher.")
    if cleaned.get("derive_student") and not cleaned.get("teacher") and "teacher" not in errors:
        add_error("derive_student", "Choose a teacher to derive a student from.")


def experiment_train_settings(data: Mapping[str, Any]) -> dict[str, Any]:
    """The training settings given: one value as itself, a sweep as its list of values."""
    train: dict[str, Any] = {}
    for name in TRAIN_FIELDS:
        values = data.get(name) or []
        if values:
            train[name] = values[0] if len(values) == 1 else list(values)
    if data.get("lr_schedule"):
        train["lr_schedule"] = data["lr_schedule"]
    if data.get("early_stopping_metric"):
        train["early_stopping_metric"] = data["early_stopping_metric"]
    if data.get("vary_labelled_subset"):
        train["vary_labelled_subset"] = True
    if data.get("lora_targets"):
        train["lora_targets"] = data["lora_targets"]
    for name in SWEPT_CHOICES:  # False is a choice of its own (activation checkpointing off)
        if data.get(name) is not None:
            train[name] = data[name]
    return train


def experiment_preflight_kwargs(data: Mapping[str, Any]) -> dict[str, Any]:
    """Keyword arguments for ``preflight.experiment_preflight``."""
    return {
        "dataset": data["dataset"],
        "teacher": data["teacher"],
        "students": list(data["students"]),
        "recipes": list(data["recipes"]),
        "assistant": data.get("assistant"),
        "extra_teachers": list(data.get("extra_teachers") or ()),
        "seeds": data["seeds"],
        "train": experiment_train_settings(data),
        "term_sweeps": data.get("term_sweeps") or {},
    }


def experiment_service_kwargs(data: Mapping[str, Any]) -> dict[str, Any]:
    """Keyword arguments for ``launch.experiment_create`` (besides created_by)."""
    return {
        "team": data["team"],
        "name": data["name"],
        "description": data["description"],
        **experiment_preflight_kwargs(data),
        "teacher_weights": data.get("teacher_weights") or [],
        "derive_student": data.get("derive_student") or "",
    }


# --- runs and leaderboards ----------------------------------------------------------------------------------
REGISTER_MODEL: Rules = {"name": RECORD_NAME}
REGISTER_MODEL_ALIASES = {"__all__": "name"}

LEADERBOARD_SCOPES = [("team", "This team"), ("global", "All my teams")]

# A size / latency budget: rows above it are hidden and the rest ranked among themselves.
LEADERBOARD_BUDGET: Rules = {
    "max_params": rule(forms.IntegerField, min_value=1, required=False),
    "max_latency_ms": rule(forms.FloatField, min_value=0, required=False),
}
# The budget plus the benchmark (eval split, metric), scope and row filters. The options (metric names, eval
# splits, recipes, families) come from the data, so those are free text; an unknown one falls back to the
# default in the selectors.
LEADERBOARD_QUERY: Rules = {
    **LEADERBOARD_BUDGET,
    "split": rule(forms.CharField, max_length=64, required=False),
    "metric": rule(forms.CharField, max_length=64, required=False),
    "scope": rule(forms.ChoiceField, choices=LEADERBOARD_SCOPES, required=False),
    "recipe": rule(forms.CharField, max_length=120, required=False),
    "family": rule(forms.CharField, max_length=64, required=False),
}
