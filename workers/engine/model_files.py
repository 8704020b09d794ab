"""A model's shape, read from its files without loading any weights: configs, safetensors headers, hub cache.

What :mod:`.memory` sizes a model from: a transformers ``config.json`` with its per-architecture names made
canonical (:func:`canonical_config`), the stored tensor elements and dtype in a safetensors header (one file
or an index of shards), the hub cache's snapshot of a hub id (never the network), a run's
``distillweb_model.json`` for builtin nets, a ``config`` model's params completed by transformers, and the
child config a ``derived`` model would get from its parent. Anything unreadable counts as missing, so the
estimate falls back to the config formula instead of failing. :class:`ModelShape` is what the estimate
knows of one model; builtin nets get theirs from their params (:func:`builtin_shape`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

DTYPE_BYTES = {
    "float64": 8,
    "float32": 4,
    "float": 4,
    "float16": 2,
    "half": 2,
    "bfloat16": 2,
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
}


# Names of one quantity across transformers config classes (BERT/Llama, GPT-2, T5/OPT, …).
CONFIG_ALIASES = {
    "hidden_size": ("hidden_size", "n_embd", "d_model", "dim"),
    "num_hidden_layers": ("num_hidden_layers", "n_layer", "num_layers", "n_layers"),
    "num_attention_heads": ("num_attention_heads", "n_head", "num_heads", "n_heads"),
    "intermediate_size": ("intermediate_size", "n_inner", "ffn_dim", "d_ff", "hidden_dim"),
    "max_position_embeddings": ("max_position_embeddings", "n_positions", "n_ctx"),
}


def canonical_config(raw: Mapping[str, Any]) -> dict[str, Any]:
    """A transformers config dict with the canonical names (``hidden_size``, ``num_hidden_layers``, …) filled
    in from their per-architecture aliases; a multimodal config's ``text_config`` stands for the whole
    model."""
    config = dict(raw)
    text = config.get("text_config")
    if not positive_int(config.get("hidden_size")) and isinstance(text, Mapping):
        config = {**config, **text}
    for name, aliases in CONFIG_ALIASES.items():
        if not positive_int(config.get(name)):
            value = next((config[a] for a in aliases if positive_int(config.get(a))), None)
            if value is not None:
                config[name] = value
    return config


@dataclass(frozen=True)
class FoundModel:
    """A model's config dict and what its files say: stored tensor elements and the dtype it loads in."""

    config: dict[str, Any]
    stored_params: int | None = None
    bytes_per_param: int = 4
    builtin: Mapping[str, Any] | None = None  # distillweb_model.json of a builtin net


def config_from_params(params: Mapping[str, Any]) -> dict[str, Any]:
    """A ``config`` model's full config: transformers fills the defaults the params leave out (as the engine's
    ``AutoConfig.for_model`` does); the params alone when transformers does not know the model type."""
    params = {k: v for k, v in params.items() if k not in ("tokenizer", "normalize")}
    model_type = params.pop("model_type", "")
    try:
        from transformers import AutoConfig

        return {**AutoConfig.for_model(model_type, **params).to_dict(), **params}
    except Exception:  # unknown model type or bad params: the run reports that itself
        return params


def derived_config(parent: Mapping[str, Any], params: Mapping[str, Any]) -> dict[str, Any] | None:
    """The child config ``derive.plan_derivation`` makes from a parent config dict; None for bad params."""
    from .derive import child_config, plan_derivation

    namespace = SimpleNamespace(**canonical_config(parent))
    try:
        plan = plan_derivation(namespace, dict(params))
    except Exception:  # ConfigError / ModelLoadError: the run fails with the message, nothing to size
        return None
    return dict(vars(child_config(namespace, plan)))


def hub_cache_folder(name: str, revision: str) -> Path | None:
    """The hub cache's snapshot folder of ``name`` when its config.json is cached; never touches the
    network."""
    if not name:
        return None
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(name, "config.json", revision=revision or None)
    except Exception:  # an invalid repo id, or huggingface_hub missing
        return None
    return Path(found).parent if isinstance(found, str) else None


def read_model_folder(folder: Path) -> FoundModel | None:
    """A model folder's config.json, its safetensors headers (tensor elements, no weights) and load dtype."""
    meta = read_json_dict(folder / "distillweb_model.json")
    if meta and meta.get("format") == "builtin":
        return FoundModel({}, builtin=meta)
    config = read_json_dict(folder / "config.json")
    if config is None:
        return None
    stored, stored_dtype = _safetensors_elements(folder)
    declared = config.get("dtype") or config.get("torch_dtype")
    # dtype="auto" (transformers' default) loads the dtype config.json declares, else the checkpoint's own.
    width = DTYPE_BYTES.get(str(declared).removeprefix("torch.")) or DTYPE_BYTES.get(stored_dtype or "") or 4
    return FoundModel(config, stored or None, width)


def _safetensors_elements(folder: Path) -> tuple[int, str | None]:
    """Elements of the floating-point tensors in the folder's safetensors file(s) (one file or an index of
    shards), read from the headers only, and the first one's dtype; (0, None) without safetensors."""
    index = read_json_dict(folder / "model.safetensors.index.json")
    if index and isinstance(index.get("weight_map"), Mapping):
        files = sorted({folder / str(name) for name in index["weight_map"].values()})
    else:
        files = [folder / "model.safetensors"]
    total, dtype = 0, None
    try:
        from safetensors import safe_open

        for path in files:
            if not path.is_file():
                return 0, None
            with safe_open(str(path), framework="numpy") as handle:
                for key in handle.keys():
                    tensor = handle.get_slice(key)
                    kind = tensor.get_dtype()
                    if kind.startswith(
                        ("F", "BF")
                    ):  # integer buffers (e.g. BERT's position_ids) are no weights
                        total += math.prod(tensor.get_shape())
                        dtype = dtype or kind
    except Exception:  # a truncated or foreign file: fall back to the config formula
        return 0, None
    return total, dtype


def read_json_dict(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def positive_int(value: Any) -> int:
    """A positive int, or 0 (None, bools, strings and other junk in a config count as missing)."""
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


@dataclass(frozen=True)
class ModelShape:
    """What the estimate needs to know about one model, read without loading it.

    ``params`` counts the model the run builds (with its task head); ``bytes_per_param`` is the dtype it is
    loaded in. Builtin nets have ``num_layers`` hidden layers of at most ``hidden_size`` units.
    """

    params: int
    bytes_per_param: int
    hidden_size: int
    num_layers: int
    num_heads: int = 1
    intermediate_size: int = 0
    vocab_size: int = 0
    num_labels: int = 0
    max_positions: int | None = None
    builtin: bool = False

    @property
    def weight_bytes(self) -> int:
        return self.params * self.bytes_per_param

    def sequence_length(self, wanted: int) -> int:
        """Tokens per row: the dataset's max_length capped by the model's positions (1 for builtin nets)."""
        if self.builtin:
            return 1
        return min(wanted, self.max_positions) if self.max_positions else wanted


def builtin_shape(params: Mapping[str, Any], *, input_width: int, num_labels: int) -> ModelShape:
    """An MLP's shape: ``[Linear → ReLU → Dropout] × len(hidden_sizes) → Linear`` (defaults as in
    models.py)."""
    sizes = [int(s) for s in params.get("hidden_sizes", [256]) if positive_int(s)]
    widths = [input_width, *sizes, max(num_labels, 2)]
    count = sum(a * b + b for a, b in zip(widths, widths[1:], strict=False))
    return ModelShape(
        params=count,
        bytes_per_param=4,
        hidden_size=max(sizes, default=1),
        num_layers=len(sizes),
        num_labels=num_labels,
        builtin=True,
    )
