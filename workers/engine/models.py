"""Build, load and save teachers and students.

Sources (see ``ModelConfig``):
- ``builtin``: small torch nets for tabular data (``mlp``);
- ``config``: a transformers model with random weights from a config dict; its tokenizer is a folder you name
  or a WordPiece vocabulary fitted on the train texts (:mod:`.tokenization`), so everything works offline;
- ``hf``: ``from_pretrained`` from the hub or a local folder;
- ``run``: the ``final`` folder a previous run wrote with :func:`save_model`;
- ``derived``: a smaller copy of a parent model (:mod:`.derive`).

Three tasks (``RunConfig.task``) decide the head:
- ``classification``: ``AutoModelForSequenceClassification`` (or a builtin net) with the dataset's labels;
- ``causal_lm``: ``AutoModelForCausalLM`` with its tokenizer (a pad token is ensured);
- ``embedding``: ``AutoModel`` wrapped in :class:`SentenceEmbedder` (mean pooling over real tokens), whose
  forward returns (B, D) sentence embeddings.

``trust_remote_code`` is passed to transformers only when ``ModelConfig.trust_remote_code`` is True (the
Django side sets it only where the server allows it). Every failure surfaces as ``ModelLoadError`` with a
message the user can act on.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from .config import TASKS, ModelConfig
from .data import LoadedDataset
from .embedder import SentenceEmbedder, st_normalizes
from .errors import ConfigError, ModelLoadError
from .sources import (
    ModelSource,
    describe_path,
    is_local_tokenizer,
    local_source,
    pretrained_source,
    resolve_source,
    run_id_of,
)

Role = Literal["teacher", "student"]
ModelKind = Literal["builtin", "transformers"]
Task = Literal["classification", "causal_lm", "embedding"]

METADATA_FILE = "distillweb_model.json"
WEIGHTS_FILE = "model.safetensors"


# --- builtin nets -------------------------------------------------------------------------------------------


class MLP(nn.Module):
    """Feed-forward classifier: ``[Linear → ReLU → Dropout] × len(hidden_sizes) → Linear``."""

    def __init__(
        self, input_dim: int, num_labels: int, hidden_sizes: list[int], dropout: float = 0.0
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        width = input_dim
        for size in hidden_sizes:
            layers += [nn.Linear(width, size), nn.ReLU(), nn.Dropout(dropout)]
            width = size
        layers.append(nn.Linear(width, num_labels))
        self.net = nn.Sequential(*layers)

    def forward(self, features: Tensor) -> Tensor:
        """(B, D) float features → (B, num_labels) logits."""
        return self.net(features)


@dataclass(frozen=True)
class BuiltinParam:
    """One parameter of a builtin architecture (for forms and validation)."""

    name: str
    default: Any
    description: str


BUILTIN_MODELS: dict[str, dict[str, BuiltinParam]] = {
    "mlp": {
        "hidden_sizes": BuiltinParam("hidden_sizes", [256], "Width of each hidden layer, e.g. [256, 256]."),
        "dropout": BuiltinParam("dropout", 0.0, "Dropout after each hidden layer, in [0, 1)."),
    },
}


def validate_builtin_params(arch: str, params: dict[str, Any]) -> dict[str, Any]:
    """Check a builtin architecture's parameters and fill defaults.

    Returns:
        e.g. ``{"hidden_sizes": [256, 256], "dropout": 0.0}``.
    Raises:
        ConfigError: unknown architecture or parameter, or a bad value.
    """
    schema = BUILTIN_MODELS.get(arch)
    if schema is None:
        raise ConfigError(f"Unknown builtin model '{arch}'. Available: {', '.join(BUILTIN_MODELS)}.")
    unknown = sorted(set(params) - set(schema))
    if unknown:
        raise ConfigError(
            f"Builtin model '{arch}' has no parameter '{unknown[0]}'. Its parameters: {', '.join(schema)}."
        )
    cleaned = {name: p.default for name, p in schema.items()} | dict(params)
    sizes = cleaned["hidden_sizes"]
    if not isinstance(sizes, list | tuple) or not all(
        isinstance(s, int) and not isinstance(s, bool) and 1 <= s <= 65536 for s in sizes
    ):
        raise ConfigError(f"hidden_sizes must be a list of integers between 1 and 65536, got {sizes!r}.")
    dropout = cleaned["dropout"]
    if isinstance(dropout, bool) or not isinstance(dropout, int | float) or not 0 <= dropout < 1:
        raise ConfigError(f"dropout must be a number in [0, 1), got {dropout!r}.")
    return {"hidden_sizes": [int(s) for s in sizes], "dropout": float(dropout)}


# --- loaded models ------------------------------------------------------------------------------------------


@dataclass
class LoadedModel:
    """A ready model. ``tokenizer`` is None for builtin nets (they read features).

    ``label_names`` is empty for ``causal_lm`` and ``embedding`` models. ``spec`` describes a builtin net
    (arch, params, input_dim) so :func:`save_model` can write it back; a derived model records how it was
    derived.
    """

    model: nn.Module
    tokenizer: Any
    kind: ModelKind
    label_names: list[str]
    spec: dict[str, Any] = field(default_factory=dict)
    task: Task = "classification"

    @property
    def num_labels(self) -> int:
        return len(self.label_names)

    def max_length(self, wanted: int) -> int:
        """The sequence length to truncate to: ``wanted`` capped by the model's position embeddings."""
        limit = getattr(getattr(self.model, "config", None), "max_position_embeddings", None)
        return min(wanted, limit) if isinstance(limit, int) and limit > 0 else wanted


def forward_logits(model: nn.Module, inputs: dict[str, Tensor]) -> Tensor:
    """Run ``model(**inputs)`` and return its logits (B, num_labels) / (B, T, V), or (B, D) embeddings for a
    :class:`SentenceEmbedder`, whatever the model returns."""
    out = model(**inputs)
    return out if isinstance(out, Tensor) else out.logits


# --- sentence embeddings ------------------------------------------------------------------------------------


def load_model(
    cfg: ModelConfig, *, dataset: LoadedDataset | None = None, role: Role, task: str | None = None
) -> LoadedModel:
    """Build or load a model for ``dataset`` and ``task``.

    Args:
        cfg: where the model comes from.
        dataset: decides the label count, the input kind (features or text) and, for ``config`` models
            without a tokenizer folder, the texts the tokenizer is fitted on. Optional for ``causal_lm`` and
            ``embedding`` models that bring their own tokenizer.
        role: ``teacher`` or ``student`` (only used in messages).
        task: ``classification``, ``causal_lm`` or ``embedding``; default: the dataset's task, else
            ``classification``.
    Returns:
        LoadedModel in train mode on the CPU.
    Raises:
        ModelLoadError: missing folder, unknown hub id, wrong input kind, label-count mismatch.
        ConfigError: invalid builtin or derive parameters, unknown task.
    """
    task = task or getattr(dataset, "task", None) or "classification"
    if task not in TASKS:
        raise ConfigError(f"Unknown task '{task}'. Use one of: {', '.join(TASKS)}.")
    what = f"{role.capitalize()} model '{cfg.describe()}'"
    if cfg.source == "derived":
        from .derive import derive_model

        return derive_model(cfg, dataset=dataset, role=role, task=task)
    if cfg.source == "run":
        _check_run_folder(Path(cfg.path), what)
    if task != "classification":
        return _load_text_model(cfg, dataset, task, what)
    if dataset is None:
        raise ModelLoadError(f"{what} is a classifier and needs a dataset to know its labels.")
    if cfg.num_labels and cfg.num_labels != dataset.num_labels:
        raise ModelLoadError(
            f"{what} is configured for {cfg.num_labels} labels but dataset "
            f"'{dataset.name}' has {dataset.num_labels}."
        )
    if cfg.source == "builtin":
        return _build_builtin(cfg.name, cfg.params, dataset, what)
    if cfg.source in ("config", "hf", "run") and dataset.kind != "text" and not _is_builtin_run(cfg):
        raise ModelLoadError(
            f"{what} is a transformers model and needs text, but dataset "
            f"'{dataset.name}' has numeric features. Use a builtin model (e.g. mlp)."
        )
    if cfg.source == "config":
        return _build_from_config(cfg, dataset, what)
    if cfg.source == "hf":
        return _load_pretrained(cfg, dataset, what)
    if cfg.source == "run":
        return _load_run(Path(cfg.path), dataset, what)
    raise ModelLoadError(
        f"{what} has an unknown source '{cfg.source}'. Use builtin, config, hf, run or derived."
    )


def _check_run_folder(folder: Path, what: str) -> None:
    """A ``run`` source's folder must still exist (a registered run's files may have been deleted since)."""
    if not folder.is_dir():
        run_id = run_id_of(folder)
        gone = (
            f"the model folder of run {run_id} no longer exists"
            if run_id is not None
            else "its model folder does not exist"
        )
        raise ModelLoadError(
            f"{what} could not be loaded: {gone}. Train the model again, or register the model of "
            "a run whose files remain."
        )


def _is_builtin_run(cfg: ModelConfig) -> bool:
    meta = Path(cfg.path) / METADATA_FILE
    return cfg.source == "run" and meta.is_file() and _read_metadata(meta).get("format") == "builtin"


def _build_builtin(arch: str, params: dict[str, Any], dataset: LoadedDataset, what: str) -> LoadedModel:
    if dataset.kind != "tabular":
        raise ModelLoadError(
            f"{what} is a builtin net for numeric features, but dataset '{dataset.name}' is "
            "text. Use a transformers model (source 'config' or 'hf')."
        )
    cleaned = validate_builtin_params(arch, params)
    model = MLP(dataset.input_dim, dataset.num_labels, cleaned["hidden_sizes"], cleaned["dropout"])
    spec = {"arch": arch, "params": cleaned, "input_dim": dataset.input_dim}
    return LoadedModel(model, None, "builtin", list(dataset.label_names), spec)


def _config_and_tokenizer(cfg: ModelConfig, dataset: LoadedDataset | None, what: str) -> tuple[Any, Any]:
    """A transformers config from ``cfg.params`` and its tokenizer (a named folder, or fitted on texts)."""
    from transformers import AutoConfig

    params = dict(cfg.params)
    tokenizer_source = params.pop("tokenizer", "") or cfg.path
    model_type = params.pop("model_type", "")
    if not model_type:
        raise ModelLoadError(f"{what} needs a 'model_type' in its config (e.g. \"bert\").")
    try:
        config = AutoConfig.for_model(model_type, **params)
    except Exception as exc:
        raise ModelLoadError(f"{what} could not be built: {_short(exc)}") from exc

    max_positions = getattr(config, "max_position_embeddings", 512)
    if tokenizer_source:
        from transformers import AutoTokenizer

        if is_local_tokenizer(tokenizer_source):
            source = local_source(tokenizer_source, "", f"{what}'s tokenizer")
        else:
            source = resolve_source(tokenizer_source, "", f"{what}'s tokenizer")
        tokenizer = _from_pretrained(AutoTokenizer, source, what)
    else:
        from .tokenization import fit_wordpiece_tokenizer

        if dataset is None or dataset.kind != "text":
            raise ModelLoadError(
                f"{what} has no tokenizer: name a tokenizer folder in its config "
                '("tokenizer") or give it a text dataset to fit one on.'
            )
        vocab_size = getattr(config, "vocab_size", None)
        if not isinstance(vocab_size, int) or vocab_size < 64:
            raise ModelLoadError(
                f"{what} needs a vocab_size of at least 64 to fit a tokenizer, got {vocab_size}."
            )
        tokenizer = fit_wordpiece_tokenizer(
            dataset.train_texts, vocab_size=vocab_size, model_max_length=max_positions
        )
    if len(tokenizer) > getattr(config, "vocab_size", math.inf):
        raise ModelLoadError(
            f"{what}: the tokenizer has {len(tokenizer)} tokens but the config's vocab_size is "
            f"only {config.vocab_size}."
        )
    if tokenizer.pad_token_id is not None:
        config.pad_token_id = tokenizer.pad_token_id
    return config, tokenizer


def _build_from_config(cfg: ModelConfig, dataset: LoadedDataset, what: str) -> LoadedModel:
    from transformers import AutoModelForSequenceClassification

    config, tokenizer = _config_and_tokenizer(cfg, dataset, what)
    _set_labels(config, dataset.label_names)
    try:
        model = AutoModelForSequenceClassification.from_config(config)
    except Exception as exc:
        raise ModelLoadError(f"{what} could not be built: {_short(exc)}") from exc
    _ensure_pad_token(model, tokenizer)
    return LoadedModel(model, tokenizer, "transformers", list(dataset.label_names))


def _remote_kwargs(cfg: ModelConfig) -> dict[str, Any]:
    """``trust_remote_code`` only when the config asks for it: never pass the flag otherwise."""
    return {"trust_remote_code": True} if cfg.trust_remote_code else {}


def _load_pretrained(cfg: ModelConfig, dataset: LoadedDataset, what: str) -> LoadedModel:
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    source = pretrained_source(cfg, what)
    remote = _remote_kwargs(cfg)
    config = _from_pretrained(AutoConfig, source, what, **remote)
    _check_head(config, dataset, what)
    _set_labels(config, dataset.label_names)
    tokenizer = _from_pretrained(AutoTokenizer, source, what, **remote)
    model = _from_pretrained(AutoModelForSequenceClassification, source, what, config=config, **remote)
    _ensure_pad_token(model, tokenizer)
    return LoadedModel(model, tokenizer, "transformers", list(dataset.label_names))


def _load_run(folder: Path, dataset: LoadedDataset, what: str) -> LoadedModel:
    _check_run_folder(folder, what)
    meta_path = folder / METADATA_FILE
    meta = _read_metadata(meta_path) if meta_path.is_file() else {"format": "transformers"}
    _check_run_task(meta, "classification", what)
    if meta.get("num_labels") not in (None, dataset.num_labels):
        raise ModelLoadError(
            f"{what} has {meta['num_labels']} output labels but dataset '{dataset.name}' has "
            f"{dataset.num_labels}."
        )
    if meta.get("format") != "builtin":
        # A transformers folder loads like a local pretrained model, head included.
        return _load_pretrained(ModelConfig(source="hf", path=str(folder)), dataset, what)
    if dataset.kind != "tabular" or dataset.input_dim != meta["input_dim"]:
        got = dataset.input_dim if dataset.kind == "tabular" else "text"
        raise ModelLoadError(
            f"{what} reads {meta['input_dim']} features but dataset '{dataset.name}' has {got}."
        )
    loaded = _build_builtin(meta["arch"], meta["params"], dataset, what)
    try:
        loaded.model.load_state_dict(load_file(folder / WEIGHTS_FILE))
    except Exception as exc:
        raise ModelLoadError(f"{what} could not be loaded: {_short(exc)}") from exc
    return loaded


def _check_run_task(meta: dict[str, Any], task: str, what: str) -> None:
    saved = meta.get("task", "classification")
    if saved != task:
        raise ModelLoadError(f"{what} was saved by a {saved} run and cannot be loaded for a {task} run.")


# --- causal LMs and sentence embedders ----------------------------------------------------------------------


def _load_text_model(cfg: ModelConfig, dataset: LoadedDataset | None, task: str, what: str) -> LoadedModel:
    """A ``causal_lm`` or ``embedding`` model from a config, a hub id / local folder, or a run folder."""
    if dataset is not None and dataset.kind != "text":
        raise ModelLoadError(
            f"{what}: a {task} model needs text, but dataset '{dataset.name}' has numeric features."
        )
    if cfg.source == "builtin":
        raise ModelLoadError(
            f"{what}: builtin nets are classifiers only; a {task} run needs a transformers "
            "model (source 'config', 'hf', 'run' or 'derived')."
        )
    normalize = cfg.params.get("normalize") if cfg.source != "config" else None
    if cfg.source == "config":
        params = dict(cfg.params)
        normalize = params.pop("normalize", None)
        config, tokenizer = _config_and_tokenizer(replace(cfg, params=params), dataset, what)
        _align_special_tokens(config, tokenizer)
        model_cls = _text_model_class(task)
        try:
            model = model_cls.from_config(config)
        except Exception as exc:
            raise ModelLoadError(f"{what} could not be built as a {task} model: {_short(exc)}") from exc
        folder = None
    elif cfg.source in ("hf", "run"):
        if cfg.source == "run":
            folder = Path(cfg.path)
            _check_run_folder(folder, what)
            meta_path = folder / METADATA_FILE
            meta = _read_metadata(meta_path) if meta_path.is_file() else {"task": task}
            _check_run_task(meta, task, what)
            if normalize is None:
                normalize = meta.get("normalize")
            source = ModelSource(str(folder), "", local_only=True, unreachable=False)
            remote: dict[str, Any] = {}
        else:
            source = pretrained_source(cfg, what)
            folder = Path(cfg.path) if cfg.path else None
            remote = _remote_kwargs(cfg)
        from transformers import AutoTokenizer

        tokenizer = _from_pretrained(AutoTokenizer, source, what, **remote)
        model = _from_pretrained(_text_model_class(task), source, what, **remote)
    else:
        raise ModelLoadError(f"{what} has an unknown source '{cfg.source}'. Use config, hf, run or derived.")
    if task == "embedding":
        if normalize is None:
            normalize = folder is not None and st_normalizes(folder)
        model = SentenceEmbedder(model, normalize=bool(normalize))
    _ensure_pad_token(model, tokenizer)
    return LoadedModel(model, tokenizer, "transformers", [], task=task)  # type: ignore[arg-type]


def _align_special_tokens(config: Any, tokenizer: Any) -> None:
    """A config built from scratch (e.g. GPT-2's) names BOS/EOS ids of its original vocabulary; use the
    tokenizer's instead, taking a BERT-style tokenizer's [CLS]/[SEP] as BOS/EOS when it has none."""
    if tokenizer.bos_token is None and getattr(tokenizer, "cls_token", None) is not None:
        tokenizer.bos_token = tokenizer.cls_token
    if tokenizer.eos_token is None and getattr(tokenizer, "sep_token", None) is not None:
        tokenizer.eos_token = tokenizer.sep_token
    config.bos_token_id = tokenizer.bos_token_id
    config.eos_token_id = tokenizer.eos_token_id


def _text_model_class(task: str) -> Any:
    from transformers import AutoModel, AutoModelForCausalLM

    return AutoModelForCausalLM if task == "causal_lm" else AutoModel


def _read_metadata(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelLoadError(
            f"Model metadata {path.name} of {describe_path(path.parent)} is unreadable."
        ) from exc


def _check_head(config: Any, dataset: LoadedDataset, what: str) -> None:
    """A checkpoint that already has a classification head must have the dataset's label count."""
    architectures = getattr(config, "architectures", None) or []
    has_head = any(a.endswith("ForSequenceClassification") for a in architectures)
    if has_head and config.num_labels != dataset.num_labels:
        raise ModelLoadError(
            f"{what} has {config.num_labels} output labels but dataset '{dataset.name}' has "
            f"{dataset.num_labels}."
        )


def _set_labels(config: Any, label_names: list[str]) -> None:
    config.num_labels = len(label_names)
    config.id2label = dict(enumerate(label_names))
    config.label2id = {name: i for i, name in enumerate(label_names)}


def _ensure_pad_token(model: nn.Module, tokenizer: Any) -> None:
    """Decoder-only tokenizers often lack a pad token; batching (and sequence classification, which looks for
    the last real token) needs one. Use the EOS token, or add a ``<pad>`` token (and grow the embeddings) if
    there is none either."""
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token is not None:
            tokenizer.pad_token = tokenizer.eos_token
        else:
            tokenizer.add_special_tokens({"pad_token": "<pad>"})
            core = model.encoder if isinstance(model, SentenceEmbedder) else model
            if len(tokenizer) > core.get_input_embeddings().num_embeddings:
                core.resize_token_embeddings(len(tokenizer))
    if getattr(model.config, "pad_token_id", None) is None and tokenizer.pad_token_id is not None:
        model.config.pad_token_id = tokenizer.pad_token_id


# --- sizes of a loaded model --------------------------------------------------------------------------------


def model_dims(loaded: LoadedModel) -> dict[str, int | None]:
    """Sizes the loss terms' cross-checks need: ``vocab_size`` (output width: classes, vocabulary or embedding
    size), ``num_layers``, ``hidden_size``, ``num_heads``; None where a model has no such thing (builtin nets
    have no heads; their hidden size is the last hidden layer's width).

    Per model; :func:`pair_dims` combines a teacher's and a student's into ``terms.ModelDims``.
    """
    if loaded.kind == "builtin":
        sizes = list(loaded.spec.get("params", {}).get("hidden_sizes", []))
        return {
            "vocab_size": loaded.num_labels,
            "num_layers": len(sizes),
            "hidden_size": sizes[-1] if sizes else None,
            "num_heads": None,
        }
    config = loaded.model.config
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    hidden = getattr(text, "hidden_size", None)
    if loaded.task == "classification":
        width = loaded.num_labels
    elif loaded.task == "embedding":
        width = hidden
    else:
        head = loaded.model.get_output_embeddings()
        width = head.out_features if head is not None else getattr(text, "vocab_size", None)
    return {
        "vocab_size": width,
        "num_layers": getattr(text, "num_hidden_layers", None),
        "hidden_size": hidden,
        "num_heads": getattr(text, "num_attention_heads", None),
    }


def pair_dims(
    *, student: LoadedModel, teacher: LoadedModel | None = None, sparse_teacher: bool = False
) -> Any:
    """``terms.ModelDims`` for a student and (optionally) its teacher, from :func:`model_dims`."""
    from .terms import ModelDims

    s = model_dims(student)
    t = model_dims(teacher) if teacher is not None else {}
    return ModelDims(
        student_vocab_size=s["vocab_size"],
        teacher_vocab_size=t.get("vocab_size"),
        student_num_layers=s["num_layers"],
        teacher_num_layers=t.get("num_layers"),
        student_hidden_size=s["hidden_size"],
        teacher_hidden_size=t.get("hidden_size"),
        student_num_heads=s["num_heads"],
        teacher_num_heads=t.get("num_heads"),
        sparse_teacher=sparse_teacher,
    )


def _from_pretrained(loader: Any, source: ModelSource, what: str, **kwargs: Any) -> Any:
    """``loader.from_pretrained`` for ``source``, with every failure turned into a ModelLoadError."""
    try:
        return loader.from_pretrained(
            source.name, revision=source.revision or None, local_files_only=source.local_only, **kwargs
        )
    except Exception as exc:
        if source.unreachable:
            raise ModelLoadError(
                f"{what} could not be loaded: the Hugging Face hub cannot be reached and the "
                "model is not in the local cache."
            ) from exc
        raise ModelLoadError(f"{what} could not be loaded: {_short(exc)}") from exc


# --- saving and sizes ---------------------------------------------------------------------------------------


def save_model(loaded: LoadedModel, folder: str | Path, *, state_dict: dict[str, Any] | None = None) -> Path:
    """Write ``loaded`` (its weights: ``state_dict`` when given, e.g. gathered from sharded ranks) so a
    ``run`` source can load it back.

    Builtin nets: ``model.safetensors`` + ``distillweb_model.json`` (arch, params, input_dim, num_labels,
    label_names). Transformers: ``save_pretrained`` (safetensors) + the tokenizer + the same JSON, which also
    records the task (and, for sentence embedders, the pooling) and how a derived model was derived.

    Returns:
        the folder.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    meta: dict[str, Any] = {
        "format": loaded.kind,
        "task": loaded.task,
        "num_labels": loaded.num_labels,
        "label_names": loaded.label_names,
    }
    if isinstance(loaded.model, SentenceEmbedder):
        meta |= {"pooling": "mean", "normalize": loaded.model.normalize}
    if "derived" in loaded.spec:
        meta["derived"] = loaded.spec["derived"]
    if loaded.kind == "builtin":
        weights = loaded.model.state_dict() if state_dict is None else state_dict
        state = {k: v.detach().cpu().contiguous() for k, v in weights.items()}
        save_file(state, folder / WEIGHTS_FILE)
        meta |= loaded.spec
    else:
        loaded.model.save_pretrained(folder, **({} if state_dict is None else {"state_dict": state_dict}))
        loaded.tokenizer.save_pretrained(folder)
    (folder / METADATA_FILE).write_text(json.dumps(meta, indent=2))
    return folder


def count_parameters(model: nn.Module) -> int:
    """Total number of parameters (shared tensors counted once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def count_non_embedding_parameters(model: nn.Module) -> int:
    """Parameters outside ``nn.Embedding`` layers (token, position and type embeddings)."""
    embedding_ids = {id(p) for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters()}
    unique = {id(p): p for p in model.parameters()}
    return sum(p.numel() for pid, p in unique.items() if pid not in embedding_ids)


def _short(exc: BaseException, limit: int = 300) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 1] + "…"
