"""The fields of a model or a dataset: builtin ones, hub ids, local paths under the configured roots, uploads
and derived students, each refused with a message on the field a user fixes."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from django.conf import settings
from django.core.exceptions import ValidationError

from experiments.domain import uploads as uploads_rules
from experiments.models import DatasetSpec, ModelSpec, Task
from workers.engine import sources

_CLS, _LM, _EMB = "classification", "causal_lm", "embedding"


# Packaged real data (DATA.md): the tasks each supports; label counts for classification.
BUILTIN_DATASETS = {
    "digits": {
        "num_labels": 10,
        "label_names": [str(i) for i in range(10)],
        "kind": "tabular",
        "splits_total": 1797,
        "tasks": (_CLS,),
    },
    "iris": {
        "num_labels": 3,
        "label_names": ["setosa", "versicolor", "virginica"],
        "kind": "tabular",
        "splits_total": 150,
        "tasks": (_CLS,),
    },
    "wine": {
        "num_labels": 3,
        "label_names": ["class_0", "class_1", "class_2"],
        "kind": "tabular",
        "splits_total": 178,
        "tasks": (_CLS,),
    },
    "breast_cancer": {
        "num_labels": 2,
        "label_names": ["malignant", "benign"],
        "kind": "tabular",
        "splits_total": 569,
        "tasks": (_CLS,),
    },
    "bbc-news": {
        "num_labels": 5,
        "label_names": ["business", "entertainment", "politics", "sport", "tech"],
        "kind": "text",
        "splits_total": 2225,
        "tasks": (_CLS, _LM, _EMB),
    },
    "tweets": {
        "num_labels": 3,
        "label_names": ["negative", "neutral", "positive"],
        "kind": "text",
        "splits_total": 38158,
        "tasks": (_CLS, _LM, _EMB),
    },
    "fortunes": {
        "num_labels": None,
        "label_names": [],
        "kind": "text",
        "splits_total": None,
        "tasks": (_LM, _EMB),
    },
}


BUILTIN_ARCHS = {"mlp": "Multi-layer perceptron for tabular / flattened image data"}


def check_local_path(path: str, *, roots: Sequence[Path], field: str, kind: str) -> str:
    """Accept a local path only if, after resolving symlinks, it lies under one of the configured roots and
    not under the artifact root (every team's runs and uploads: those are reachable only as ``run`` sources
    and uploads). Messages do not repeat the path."""
    if not roots:
        raise ValidationError(
            {field: f"Local {kind} paths are disabled on this server (no {kind} roots configured)."}
        )
    try:
        resolved = Path(path).expanduser().resolve()
    except (OSError, ValueError):
        raise ValidationError(
            {field: f"This is not a path of a {kind} folder or file on the server."}
        ) from None
    if sources.is_within(resolved, [settings.ARTIFACT_ROOT]) or not sources.is_within(resolved, roots):
        raise ValidationError({field: f"This path is outside the allowed {kind} folders."})
    if not resolved.exists():
        raise ValidationError({field: "Nothing exists at this path."})
    return str(resolved)


def check_hub_field(
    fields: dict[str, Any], field: str, problem_of=sources.repo_id_problem, *, what: str = "hub id"
) -> None:
    """A ValidationError keyed ``field`` when ``fields[field]`` is given and is not a ``what`` of the hub's
    syntax (``workers.engine.sources``): a hub identifier is never a path, a URL or an encoded string."""
    value = fields.get(field)
    if value in (None, ""):
        return
    problem = problem_of(value)
    if problem:
        example = {
            "hub id": "org/name",
            "revision": "main, v1.0 or a commit sha",
            "hub dataset name": "org/name",
        }.get(what, "org/name")
        raise ValidationError({field: f"Enter a {what} such as {example}: {problem}."})


def _check_config_tokenizer(config: dict[str, Any]) -> dict[str, Any]:
    """The tokenizer a ``config`` model names: a hub id, or an absolute path of a folder under a model
    root."""
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
        raise ValidationError(
            {
                "config": f'"tokenizer" must be a hub id such as org/name, or the absolute path of a '
                f"folder under a model root: {problem}."
            }
        )
    return config


def clean_model_fields(fields: dict[str, Any]) -> dict[str, Any]:
    fields = dict(fields)
    source = fields.get("source")
    if source == ModelSpec.Source.SERVER:
        return _clean_served_fields(fields)
    # Hub identifiers, whatever the source: a hub id is never a path (workers.engine.sources).
    check_hub_field(fields, "hub_id")
    check_hub_field(fields, "revision", sources.revision_problem, what="revision")
    check_hub_field(fields, "tokenizer_id")
    if source == ModelSpec.Source.BUILTIN:
        if fields.get("builtin_arch") not in BUILTIN_ARCHS:
            raise ValidationError({"builtin_arch": f"Choose one of: {', '.join(BUILTIN_ARCHS)}."})
        hidden = (fields.get("config") or {}).get("hidden_sizes", [])
        if not isinstance(hidden, list) or not all(isinstance(h, int) and 1 <= h <= 65536 for h in hidden):
            raise ValidationError(
                {"config": "hidden_sizes must be a list of layer widths between 1 and 65536."}
            )
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


def _clean_served_fields(fields: dict[str, Any]) -> dict[str, Any]:
    """A teacher served by an inference server: a configured server's name (never a URL) and the model name
    it serves (``hub_id``); a causal LM (:mod:`workers.engine.served_teacher`)."""
    from workers.engine.served_teacher import model_name_problem

    server = (fields.get("config") or {}).get("server")
    if server not in settings.TEACHER_SERVERS:
        known = ", ".join(settings.TEACHER_SERVERS) or "none is configured"
        raise ValidationError({"config": f"Choose one of the configured teacher servers ({known})."})
    if problem := model_name_problem(fields.get("hub_id")):
        raise ValidationError({"hub_id": f"{problem[0].upper()}{problem[1:]}."})
    if fields.get("task") != Task.CAUSAL_LM:
        raise ValidationError({"task": "An inference server serves causal language models: use causal_lm."})
    fields.update(config={"server": server}, local_path="", revision="", builtin_arch="", num_labels=0)
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


def clean_dataset_fields(fields: dict[str, Any], *, stored_path: str | Path | None = None) -> dict[str, Any]:
    """Check and complete a dataset's fields.

    ``stored_path`` is where the service stored an uploaded file (source ``upload``); an upload's path never
    comes from input.
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
                raise ValidationError(
                    {"num_labels": f"{fields['builtin_name']} has {info['num_labels']} labels."}
                )
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
        uploads_rules.refuse_upload_paths(fields)
        if not stored_path:
            raise ValidationError({"upload": "Choose a file to upload."})
        stored = Path(stored_path).resolve()
        if (
            not stored.is_relative_to(uploads_rules.upload_dir().resolve())
            or not stored.is_file()
            or uploads_rules.upload_suffix(stored.name) is None
        ):
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
        raise ValidationError(
            {"pack": "Packing texts into blocks applies to causal language modelling only."}
        )
    if fields.get("task", _CLS) == _CLS and (not fields.get("num_labels") or fields["num_labels"] < 2):
        raise ValidationError({"num_labels": "A classification dataset needs at least 2 labels."})
    return fields


def dataset_kind(dataset: DatasetSpec) -> str:
    """``tabular`` (numeric features) or ``text``."""
    if dataset.source == DatasetSpec.Source.BUILTIN:
        return BUILTIN_DATASETS.get(dataset.builtin_name, {}).get("kind", "text")
    return "text"


def model_kind(model: ModelSpec) -> str:
    if model.source == ModelSpec.Source.BUILTIN or (
        model.source == ModelSpec.Source.RUN and model.builtin_arch
    ):
        return "tabular"
    return "text"
