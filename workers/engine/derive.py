"""Derived students: a smaller copy of a parent model, initialised from its weights (the DistilBERT recipe).

``ModelConfig(source="derived", parent=<any model config>, params={...})`` with params:

- ``layers``: ``"every_other"`` (parent layers 0, 2, 4, …), ``"every_third"`` (0, 3, 6, …), ``"all"``, or an
  explicit list of parent layer ids (e.g. ``[0, 2, 4, 7, 9, 11]``, the DistilBERT choice for BERT-base);
  kept layers keep their order and get the indices 0, 1, 2, … in the student;
- ``hidden_size`` (optional): a narrower (or wider) model width;
- ``intermediate_size`` (optional): the feed-forward width;
- ``num_attention_heads`` (optional): default keeps the parent's head size (``hidden_size / head_dim``);
- ``num_key_value_heads`` (optional, Llama family): default keeps the parent's query/key-value grouping.

Works for BERT-family encoders (``…encoder.layer.N…``) and Llama-family decoders (``…model.layers.N…``), with
their classification, LM or embedding heads; any transformers model whose blocks sit in one ``ModuleList`` of
``num_hidden_layers`` entries is handled the same way. The tokenizer is the parent's.

Weight copying (:func:`copy_weights`): every student tensor takes the parent tensor of the same name (kept
layers mapped to their new indices). When the shapes are equal the tensor is copied exactly. When a width
differs, the overlapping leading block is copied and the rest keeps the student's fresh initialisation:

- ordinary dimensions take the leading slice (``W_parent[:out, :in]``, embeddings ``E[:, :hidden]``, norms
  ``w[:hidden]``), which is what "keep the first ``hidden_size`` features" means;
- attention projections are sliced per head: query/key/value outputs and the attention output's input are
  viewed as (heads, head_dim) and the leading heads × leading head dims are copied, so a student with fewer
  heads keeps the parent's first heads intact. (Rotary models that also shrink the head size only get an
  approximate start: the rotary frequencies depend on the head size. Keeping the head size, the default,
  avoids that.)

A narrower model is only an initialisation: the parent's LayerNorm statistics were computed over all features,
so a narrowed student needs distillation to recover; a student that keeps every layer and width reproduces the
parent exactly.
"""

from __future__ import annotations

import copy
import math
import re
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .config import ModelConfig
from .errors import ConfigError, ModelLoadError

LAYER_PRESETS = {"all": 1, "every_other": 2, "every_third": 3}
DERIVE_PARAMS = ("layers", "hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads")
MAX_WIDTH = 65536

# Parameter-name patterns of attention projections, by which dimension carries (heads, head_dim).
_HEADS_OUT = re.compile(r"(attention\.self\.(query|key|value)|self_attn\.(q|k|v)_proj|attn\.(q|k|v)_proj)\.")
_HEADS_IN = re.compile(r"(attention\.output\.dense|self_attn\.o_proj|attn\.o_proj)\.weight$")
_KV = re.compile(r"(attention\.self\.(key|value)|(self_attn|attn)\.(k|v)_proj)\.")


# --- parameters ---------------------------------------------------------------------------------------------


def validate_derive_params(params: dict[str, Any]) -> dict[str, Any]:
    """Check the types and ranges of derive parameters that do not depend on the parent.

    Returns:
        the params with ``layers`` present (default ``"all"``) and an explicit layer list sorted.
    Raises:
        ConfigError: unknown parameter, bad layer spec, non-positive width.
    """
    if not isinstance(params, dict):
        raise ConfigError('Derive parameters must be a mapping, e.g. {"layers": "every_other"}.')
    unknown = sorted(set(params) - set(DERIVE_PARAMS))
    if unknown:
        raise ConfigError(f"Unknown derive parameter '{unknown[0]}'. Parameters: {', '.join(DERIVE_PARAMS)}.")
    cleaned: dict[str, Any] = {}
    layers = params.get("layers", "all")
    if isinstance(layers, str):
        if layers not in LAYER_PRESETS:
            raise ConfigError(
                f"layers must be one of {', '.join(LAYER_PRESETS)} or a list of layer ids, got '{layers}'."
            )
        cleaned["layers"] = layers
    elif isinstance(layers, list | tuple):
        if not layers:
            raise ConfigError("layers must keep at least one layer.")
        if not all(isinstance(i, int) and not isinstance(i, bool) for i in layers):
            raise ConfigError(f"layers must be whole layer ids, got {list(layers)!r}.")
        if any(i < 0 for i in layers):
            raise ConfigError(f"Layer ids start at 0; got {min(layers)}.")
        if len(set(layers)) != len(layers):
            raise ConfigError(f"Each layer may be kept once; got {list(layers)!r}.")
        cleaned["layers"] = sorted(layers)
    else:
        raise ConfigError(
            f"layers must be one of {', '.join(LAYER_PRESETS)} or a list of layer ids, got {layers!r}."
        )
    for name in DERIVE_PARAMS[1:]:
        value = params.get(name)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_WIDTH:
            raise ConfigError(f"{name} must be a whole number between 1 and {MAX_WIDTH}, got {value!r}.")
        cleaned[name] = value
    return cleaned


def resolve_layers(layers: str | list[int], num_layers: int) -> list[int]:
    """The parent layer ids a layer spec keeps, in order.

    Raises:
        ModelLoadError: an explicit id is out of range for a parent with ``num_layers`` layers.
    """
    if isinstance(layers, str):
        return list(range(0, num_layers, LAYER_PRESETS[layers]))
    bad = [i for i in layers if not 0 <= i < num_layers]
    if bad:
        raise ModelLoadError(
            f"Layer {bad[0]} is out of range: the parent model has {num_layers} layers "
            f"(ids 0 to {num_layers - 1})."
        )
    return sorted(layers)


@dataclass(frozen=True)
class DerivePlan:
    """The student's shape, resolved against the parent's config."""

    kept_layers: tuple[int, ...]
    hidden_size: int
    intermediate_size: int | None
    num_attention_heads: int
    num_key_value_heads: int | None
    head_dim: int


def plan_derivation(config: Any, params: dict[str, Any]) -> DerivePlan:
    """Resolve ``params`` against a parent transformers config.

    Raises:
        ConfigError: bad parameters, a width not divisible by the number of heads, bad key/value grouping.
        ModelLoadError: the parent has no layer count or a layer id is out of range.
    """
    params = validate_derive_params(params)
    num_layers = getattr(config, "num_hidden_layers", None)
    hidden = getattr(config, "hidden_size", None)
    heads = getattr(config, "num_attention_heads", None)
    if not isinstance(num_layers, int) or not isinstance(hidden, int) or not isinstance(heads, int):
        kind = getattr(config, "model_type", "?")
        raise ModelLoadError(
            f"Cannot derive from a '{kind}' model: its config has no num_hidden_layers / "
            "hidden_size / num_attention_heads."
        )
    kept = resolve_layers(params["layers"], num_layers)
    parent_head_dim = getattr(config, "head_dim", None) or hidden // heads
    new_hidden = params.get("hidden_size", hidden)
    if "num_attention_heads" in params:
        new_heads = params["num_attention_heads"]
    elif new_hidden == hidden:
        new_heads = heads
    elif new_hidden % parent_head_dim == 0:
        new_heads = new_hidden // parent_head_dim  # keep the head size, drop heads
    else:
        raise ConfigError(
            f"hidden_size {new_hidden} is not a multiple of the parent's head size "
            f"{parent_head_dim}; give num_attention_heads (a divisor of {new_hidden})."
        )
    if new_hidden % new_heads:
        raise ConfigError(
            f"hidden_size {new_hidden} is not divisible by num_attention_heads {new_heads}: "
            "each head must get the same number of features."
        )
    head_dim = new_hidden // new_heads
    if new_hidden == hidden and new_heads == heads:
        head_dim = parent_head_dim  # some configs (e.g. Gemma) set head_dim independently of the width
    kv_heads = getattr(config, "num_key_value_heads", None)
    new_kv = None
    if isinstance(kv_heads, int):
        if "num_key_value_heads" in params:
            new_kv = params["num_key_value_heads"]
        elif new_heads == heads:
            new_kv = kv_heads
        elif kv_heads == heads:
            new_kv = new_heads  # plain multi-head attention stays so
        else:
            group = heads // kv_heads
            new_kv = new_heads // group if new_heads % group == 0 else math.gcd(new_heads, kv_heads)
        if new_heads % new_kv:
            raise ConfigError(
                f"num_attention_heads {new_heads} is not divisible by num_key_value_heads {new_kv}."
            )
    elif "num_key_value_heads" in params:
        raise ConfigError(f"A '{config.model_type}' model has no num_key_value_heads to set.")
    intermediate = params.get("intermediate_size", getattr(config, "intermediate_size", None))
    return DerivePlan(tuple(kept), new_hidden, intermediate, new_heads, new_kv, head_dim)


def child_config(config: Any, plan: DerivePlan) -> Any:
    """The parent's config with the student's depth and widths (and per-layer lists subset to kept layers)."""
    child = copy.deepcopy(config)
    n_parent = config.num_hidden_layers
    child.num_hidden_layers = len(plan.kept_layers)
    child.hidden_size = plan.hidden_size
    child.num_attention_heads = plan.num_attention_heads
    if plan.intermediate_size is not None and hasattr(config, "intermediate_size"):
        child.intermediate_size = plan.intermediate_size
    if plan.num_key_value_heads is not None:
        child.num_key_value_heads = plan.num_key_value_heads
    if getattr(config, "head_dim", None) is not None:
        child.head_dim = plan.head_dim
    # Per-layer settings (e.g. layer_types for sliding-window attention) follow the kept layers.
    for name, value in vars(config).items():
        if isinstance(value, list) and len(value) == n_parent and name.startswith("layer"):
            setattr(child, name, [value[i] for i in plan.kept_layers])
    child._name_or_path = ""
    return child


# --- weight copying -----------------------------------------------------------------------------------------


@dataclass
class CopyReport:
    """How each student tensor was initialised."""

    exact: list[str] = field(default_factory=list)
    sliced: list[str] = field(default_factory=list)
    fresh: list[str] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        return {
            "copied": len(self.exact),
            "sliced": len(self.sliced),
            "fresh": len(self.fresh),
            "fresh_names": self.fresh[:20],
        }


def find_layer_stack(model: nn.Module, num_layers: int) -> str:
    """The dotted name of the ``ModuleList`` holding the model's ``num_layers`` transformer blocks.

    Raises:
        ModelLoadError: no (or more than one) such list.
    """
    candidates = [
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.ModuleList) and len(module) == num_layers and name
    ]
    preferred = [n for n in candidates if re.search(r"(^|\.)(encoder\.layer|layers|h|block)$", n)]
    found = preferred or candidates
    if len(found) != 1:
        raise ModelLoadError(
            f"Cannot find the layer stack of a {type(model).__name__} to derive from "
            f"(candidates: {', '.join(found) or 'none'})."
        )
    return found[0]


Heads = tuple[int, int, int | None]  # (num_heads, head_dim, num_key_value_heads or None)


def copy_weights(
    parent: nn.Module,
    child: nn.Module,
    *,
    stack: str,
    kept_layers: list[int] | tuple[int, ...],
    parent_heads: Heads,
    child_heads: Heads,
) -> CopyReport:
    """Initialise ``child`` from ``parent`` in place (see the module docstring for the slicing rules).

    Args:
        stack: dotted name of the layer ``ModuleList`` (the same in both models).
        kept_layers: parent layer id of each child layer.
        parent_heads / child_heads: (num_heads, head_dim, num_key_value_heads or None).
    Returns:
        which tensors were copied exactly, sliced, or left freshly initialised.
    """
    layer_key = re.compile(rf"^{re.escape(stack)}\.(\d+)\.")
    parent_state = parent.state_dict()
    report = CopyReport()
    with torch.no_grad():
        for name, target in child.state_dict().items():
            match = layer_key.match(name)
            source_name = name
            if match:
                source_name = f"{stack}.{kept_layers[int(match.group(1))]}.{name[match.end() :]}"
            source = parent_state.get(source_name)
            if source is None or source.dim() != target.dim():
                report.fresh.append(name)
                continue
            if source.shape == target.shape:
                target.copy_(source)
                report.exact.append(name)
                continue
            _copy_overlap(name, source, target, parent_heads, child_heads)
            report.sliced.append(name)
    return report


def _copy_overlap(
    name: str, source: torch.Tensor, target: torch.Tensor, parent_heads: Heads, child_heads: Heads
) -> None:
    """Copy the leading block of ``source`` into ``target``; attention dims are sliced per head."""
    src, dst = source, target
    head_dim_axis = None
    kv = bool(_KV.search(name))
    if _HEADS_OUT.search(name):
        head_dim_axis = 0
    elif _HEADS_IN.search(name):
        head_dim_axis = 1
    if head_dim_axis is not None:
        p_heads = (parent_heads[2] or parent_heads[0]) if kv else parent_heads[0]
        c_heads = (child_heads[2] or child_heads[0]) if kv else child_heads[0]
        p_dim, c_dim = parent_heads[1], child_heads[1]
        if src.shape[head_dim_axis] == p_heads * p_dim and dst.shape[head_dim_axis] == c_heads * c_dim:
            src = src.unflatten(head_dim_axis, (p_heads, p_dim))
            dst = dst.unflatten(head_dim_axis, (c_heads, c_dim))  # a view: writes land in ``target``
    region = tuple(slice(0, min(a, b)) for a, b in zip(src.shape, dst.shape, strict=True))
    dst[region].copy_(src[region])


# --- building -----------------------------------------------------------------------------------------------


def derive_model(cfg: ModelConfig, *, dataset: Any, role: str, task: str) -> Any:
    """Build the derived model ``cfg`` describes (see the module docstring).

    Returns:
        a ``LoadedModel`` with the parent's tokenizer and labels; ``spec["derived"]`` records the kept layers,
        the widths and how many tensors were copied, sliced or freshly initialised.
    Raises:
        ModelLoadError: no parent, a builtin parent, layer ids out of range, no layer stack found.
        ConfigError: bad parameters or a width the heads do not divide.
    """
    from .models import load_model

    what = f"{role.capitalize()} model '{cfg.describe()}'"
    if cfg.parent is None:
        raise ModelLoadError(f"{what} is derived but names no parent model.")
    try:
        validate_derive_params(cfg.params)
    except ConfigError as exc:
        raise ConfigError(f"{what}: {exc}") from None
    parent = load_model(cfg.parent, dataset=dataset, role=role, task=task)  # type: ignore[arg-type]
    if parent.kind != "transformers":
        raise ModelLoadError(
            f"{what}: only transformers models can be derived from; the parent "
            f"'{cfg.parent.describe()}' is a builtin net."
        )
    return derive_from_loaded(parent, cfg.params, what=what)


def derive_from_loaded(parent: Any, params: dict[str, Any], *, what: str = "Derived model") -> Any:
    """Derive a student from an already loaded parent (``LoadedModel``); the parent is left unchanged."""
    from .embedder import SentenceEmbedder
    from .models import LoadedModel

    core = parent.model.encoder if isinstance(parent.model, SentenceEmbedder) else parent.model
    config = core.config
    try:
        plan = plan_derivation(config, params)
    except (ConfigError, ModelLoadError) as exc:
        raise type(exc)(f"{what}: {exc}") from None
    stack = find_layer_stack(core, config.num_hidden_layers)
    new_config = child_config(config, plan)
    try:
        child = type(core)(new_config)
    except Exception as exc:
        raise ModelLoadError(f"{what} could not be built: {' '.join(str(exc).split())[:300]}") from exc
    parent_head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    parent_heads = (config.num_attention_heads, parent_head_dim, getattr(config, "num_key_value_heads", None))
    child_heads = (plan.num_attention_heads, plan.head_dim, plan.num_key_value_heads)
    report = copy_weights(
        core,
        child,
        stack=stack,
        kept_layers=plan.kept_layers,
        parent_heads=parent_heads,
        child_heads=child_heads,
    )
    child.train(core.training)
    model = SentenceEmbedder(child, normalize=parent.model.normalize) if core is not parent.model else child
    derived = {
        "kept_layers": list(plan.kept_layers),
        "parent_layers": config.num_hidden_layers,
        "hidden_size": plan.hidden_size,
        "intermediate_size": plan.intermediate_size,
        "num_attention_heads": plan.num_attention_heads,
        "num_key_value_heads": plan.num_key_value_heads,
        "init": report.summary(),
    }
    return LoadedModel(
        model,
        parent.tokenizer,
        "transformers",
        list(parent.label_names),
        {"derived": derived},
        task=parent.task,
    )
