"""LoRA students through peft: the adapters a run trains instead of every weight, and the merged model it
saves.

With ``train.lora_r`` > 0, :func:`attach` wraps a transformers student (after it is loaded, before any
distributed wrap) with ``peft.get_peft_model``: LoRA adapters of rank ``lora_r`` on the ``lora_targets``
linear layers (empty: the attention projections of the student's architecture), every other weight frozen,
except a classification head, which trains in full (peft's ``modules_to_save``). Only trainable parameters
receive gradients, so AdamW keeps state for the adapters alone. ``lora_4bit`` (QLoRA) first stores the frozen
linear layers in 4 bits (bitsandbytes NF4, CUDA only).

Checkpoints need nothing of their own: the peft model's state dict (base weights and adapters) goes through
the ordinary checkpoint path. At the end :func:`finalize` writes the adapter alone (``adapter/``:
``adapter_model.safetensors`` + ``adapter_config.json``, loadable with ``PeftModel.from_pretrained`` on the
base) and merges the adapters into the weights (``merge_and_unload``), so the final model is a plain
transformers model in the usual format and export, registration and evaluation work as for any run.
"""

from __future__ import annotations

import os
import re
from typing import Any

import torch
from torch import nn

from .config import RunConfig, TrainConfig
from .errors import ConfigError

ADAPTER_DIR = "adapter"
QLORA_ON_CPU = (
    "4-bit QLoRA needs a CUDA GPU (bitsandbytes); this run would train on the CPU. "
    "Turn lora_4bit off or run it on a GPU queue."
)
# The attention projections LoRA adapts by default, by ``config.model_type`` (names are module-name suffixes).
ATTENTION_TARGETS: dict[str, tuple[str, ...]] = {
    **{
        t: ("q_proj", "k_proj", "v_proj", "o_proj")
        for t in ("llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "gemma",
                  "gemma2", "gemma3_text", "olmo", "olmo2", "granite", "smollm3", "cohere", "starcoder2")
    },
    **{t: ("q_proj", "k_proj", "v_proj", "out_proj") for t in ("opt", "bart", "whisper", "m2m_100")},
    **{t: ("query", "key", "value") for t in ("bert", "roberta", "xlm-roberta", "electra", "camembert")},
    "distilbert": ("q_lin", "k_lin", "v_lin", "out_lin"),
    "gpt2": ("c_attn",),
    "gpt_neox": ("query_key_value",),
    "phi": ("q_proj", "k_proj", "v_proj", "dense"),
    "phi3": ("qkv_proj", "o_proj"),
    "falcon": ("query_key_value",),
    "deberta-v2": ("query_proj", "key_proj", "value_proj"),
}
# A classification model's head: trained in full (peft ``modules_to_save``), since it starts untrained.
HEAD_NAMES = ("pre_classifier", "classifier", "score")
STATE_KEY = "lora"  # where attach records the parameter counts in ``LoadedModel.spec``


def enabled(train: TrainConfig) -> bool:
    return train.lora_r > 0


def check(cfg: RunConfig, device: torch.device) -> None:
    """Refuse a LoRA run that cannot train, with a message the user can act on (before anything loads).

    Raises:
        ConfigError: a builtin or embedding student, lora_4bit on the CPU or without bitsandbytes, settings
            out of range, or several sharded ranks.
    """
    tc = cfg.train
    if not enabled(tc):
        return
    if not 1 <= tc.lora_r <= 256:
        raise ConfigError(f"lora_r must be 0 (no adapter) or between 1 and 256, not {tc.lora_r}.")
    if not tc.lora_alpha > 0 or not 0 <= tc.lora_dropout < 1:
        raise ConfigError("lora_alpha must be above 0 and lora_dropout in [0, 1).")
    if cfg.student.source == "builtin" or cfg.task == "embedding":
        what = "a builtin net" if cfg.student.source == "builtin" else "an embedding student"
        raise ConfigError(
            "LoRA adapts transformers students (causal LM, or classification with a transformers encoder); "
            f"this student is {what}. Set lora_r to 0."
        )
    if tc.lora_4bit:
        if device.type != "cuda":
            raise ConfigError(QLORA_ON_CPU)
        try:
            import bitsandbytes  # noqa: F401
        except ImportError as exc:
            raise ConfigError(
                "4-bit QLoRA needs the bitsandbytes package, which this worker cannot import "
                f"({exc}). Install bitsandbytes on the GPU worker or turn lora_4bit off."
            ) from None
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and tc.strategy != "ddp":
        raise ConfigError(
            "A LoRA run on several ranks replicates the student: set strategy to ddp (fsdp shards the "
            "weights the adapters are merged into)."
        )


def resolve_targets(model: nn.Module, wanted: str) -> list[str]:
    """The module-name suffixes LoRA adapts: ``wanted`` (comma-separated), or the attention projections of
    the model's ``config.model_type``. Every name must match at least one linear layer.

    Raises:
        ConfigError: a name that matches no linear layer, or an architecture without a default.
    """
    names = [n.strip() for n in wanted.split(",") if n.strip()]
    linear = [name for name, m in model.named_modules() if _is_linear(m)]
    model_type = str(getattr(getattr(model, "config", None), "model_type", "") or "")
    if not names:
        names = list(ATTENTION_TARGETS.get(model_type, ()))
        if not names:
            raise ConfigError(
                f"No default LoRA targets for model type '{model_type or type(model).__name__}': name the "
                f"linear layers to adapt in lora_targets (e.g. {_examples(linear)})."
            )
    missing = [n for n in names if not any(_matches(full, n) for full in linear)]
    if missing:
        raise ConfigError(
            f"lora_targets: {', '.join(missing)} matches no linear layer of this "
            f"{model_type or type(model).__name__} student. Its linear layers end in: {_examples(linear)}."
        )
    return names


def attach(cfg: RunConfig, student: Any, device: torch.device) -> None:
    """Wrap ``student.model`` (a :class:`~.models.LoadedModel`'s, already on ``device``) with LoRA adapters
    when ``train.lora_r`` > 0; record the trainable and total parameter counts in ``student.spec``."""
    if not enabled(cfg.train):
        return
    check(cfg, device)
    from peft import LoraConfig, get_peft_model

    tc = cfg.train
    targets = resolve_targets(student.model, tc.lora_targets)
    heads = [n for n in HEAD_NAMES if isinstance(getattr(student.model, n, None), nn.Module)]
    if tc.lora_4bit:
        _quantize_frozen(student.model, device, targets=targets, keep=heads)
    lora = LoraConfig(
        r=tc.lora_r,
        lora_alpha=tc.lora_alpha,
        lora_dropout=tc.lora_dropout,
        target_modules=targets,
        modules_to_save=heads if cfg.task == "classification" and heads else None,
        bias="none",
    )
    student.model = get_peft_model(student.model, lora)
    student.model.to(device).train()
    student.spec[STATE_KEY] = parameter_counts(student.model)


def parameter_counts(model: nn.Module) -> dict[str, float]:
    """``trainable_params`` (what the optimizer updates) and ``total_params`` (shared tensors once)."""
    unique = {id(p): p for p in model.parameters()}.values()
    return {
        "trainable_params": float(sum(p.numel() for p in unique if p.requires_grad)),
        "total_params": float(sum(p.numel() for p in unique)),
    }


def trainable(params: list[nn.Parameter]) -> list[nn.Parameter]:
    """The parameters an optimizer should hold: those that require a gradient."""
    return [p for p in params if p.requires_grad]


def counts(student: Any) -> dict[str, float]:
    """The run result's parameter counts of a LoRA student ({} without an adapter)."""
    return dict(student.spec.get(STATE_KEY, {}))


def finalize(student: Any, final_dir: Any) -> None:
    """Before the final model is saved: write the adapter alone to ``final_dir/adapter`` and merge it into the
    weights, so ``student.model`` becomes the plain transformers model that is saved and evaluated. Nothing
    happens for a student without an adapter, or on a rank other than 0 (``final_dir`` None)."""
    from peft import PeftModel

    model = student.model
    if not isinstance(model, PeftModel):
        return
    if final_dir is not None:
        folder = os.path.join(str(final_dir), ADAPTER_DIR)
        model.save_pretrained(folder, safe_serialization=True)
        card = os.path.join(folder, "README.md")  # peft's model card template: nothing of this run's
        if os.path.isfile(card):
            os.remove(card)
    merged = model.merge_and_unload()
    _dequantize(merged)
    student.model = merged


# --- helpers ------------------------------------------------------------------------------------------------


def _is_linear(module: nn.Module) -> bool:
    if isinstance(module, nn.Linear):
        return True
    # transformers' GPT-2 style Conv1D is a linear layer with transposed weights; peft adapts it too.
    return type(module).__name__ == "Conv1D" and hasattr(module, "weight")


def _matches(full_name: str, target: str) -> bool:
    """peft's rule for a list of targets: the whole name, or its last dotted parts."""
    return full_name == target or full_name.endswith(f".{target}")


def _examples(linear: list[str]) -> str:
    suffixes = list(dict.fromkeys(re.sub(r"^.*\.", "", n) for n in linear))
    return ", ".join(suffixes[:12]) or "(none)"


def _quantize_frozen(model: nn.Module, device: torch.device, *, targets: list[str], keep: list[str]) -> None:
    """QLoRA: replace the decoder's linear layers by bitsandbytes NF4 layers (quantised as they move to
    ``device``), leaving the output head and a classification head in full precision."""
    import bitsandbytes as bnb

    skip = {"lm_head", *keep}
    dtype = next(model.parameters()).dtype
    compute = torch.bfloat16 if dtype in (torch.float32, torch.bfloat16) else dtype
    for name, module in list(model.named_modules()):
        if not isinstance(module, nn.Linear) or name.split(".")[0] in skip:
            continue
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        layer = bnb.nn.Linear4bit(
            module.in_features, module.out_features, bias=module.bias is not None,
            compute_dtype=compute, quant_type="nf4",
        )
        layer.weight = bnb.nn.Params4bit(
            module.weight.detach().to("cpu", torch.float16), requires_grad=False, quant_type="nf4"
        )
        if module.bias is not None:
            layer.bias = nn.Parameter(module.bias.detach().to(compute), requires_grad=False)
        setattr(parent, child, layer.to(device))
    del targets  # every linear layer of the body is stored in 4 bits, the adapted ones included


def _dequantize(model: nn.Module) -> None:
    """After a QLoRA merge: the 4-bit layers back as ordinary linear layers (the weights the student trained
    with, in its compute dtype), so the final model is saved in the usual format."""
    try:
        import bitsandbytes as bnb
    except ImportError:
        return
    for name, module in list(model.named_modules()):
        if not isinstance(module, bnb.nn.Linear4bit):
            continue
        weight = bnb.functional.dequantize_4bit(module.weight.data, module.weight.quant_state)
        layer = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None)
        layer = layer.to(device=weight.device, dtype=weight.dtype)
        layer.weight.data.copy_(weight)
        if module.bias is not None:
            layer.bias.data.copy_(module.bias.data.to(weight.dtype))
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, layer)
