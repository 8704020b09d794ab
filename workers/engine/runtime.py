"""What the training loop and the teacher side (:mod:`.teachers`) both use: out-of-memory reporting, a split's
batches for a model, the attention implementation a run's terms need, generation (``seq_kd``'s teacher
continuations, ``on_policy``'s student samples), the run's device and its seeds."""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from . import phases
from .attention import use_scores_attention
from .batching import Batcher, LMBatcher
from .config import RunConfig
from .data import LoadedDataset
from .embedder import SentenceEmbedder
from .errors import ConfigError, TrainingError
from .evaluate import eval_mode
from .models import LoadedModel
from .out_of_memory import host_memory_bytes, out_of_memory_message

if TYPE_CHECKING:
    from .planning import RunPlan

# --- out of memory ------------------------------------------------------------------------------------------

# What torch's allocators say when they fail: CUDA/MPS "out of memory", the CPU allocator "can't allocate
# memory" or "not enough memory" (and the OS's ENOMEM text).
OUT_OF_MEMORY_TEXTS = (
    "out of memory",
    "can't allocate memory",
    "cannot allocate memory",
    "not enough memory",
)
GPU_MEMORY_TEXTS = ("cuda", "gpu", "mps", "hip", "xpu")


def out_of_memory_error(exc: BaseException, cfg: RunConfig, during: str) -> TrainingError | None:
    """The run's message for an out-of-memory failure, or None when ``exc`` is something else.

    The one place that recognises out of memory in its forms: ``torch.OutOfMemoryError`` (CUDA), a
    RuntimeError of an allocator (the CPU's ``DefaultCPUAllocator: can't allocate memory``, MPS, ...) and
    Python's MemoryError (numpy, pure Python). The message names the phase (``during``: "at step 12", "while
    loading the student"), the run's memory estimate (:mod:`.memory`) and what to change.
    """
    text = str(exc).lower()
    if isinstance(exc, torch.OutOfMemoryError):
        gpu = True
    elif isinstance(exc, MemoryError):
        gpu = False
    elif isinstance(exc, RuntimeError) and any(marker in text for marker in OUT_OF_MEMORY_TEXTS):
        gpu = any(marker in text for marker in GPU_MEMORY_TEXTS)
    else:
        return None
    headline = f"Out of GPU memory {during}" if gpu else f"Out of memory (RAM) {during}"
    return TrainingError(
        out_of_memory_message(
            cfg.to_dict(), headline=headline, gpu=gpu, available_bytes=None if gpu else host_memory_bytes()
        )
    )


@contextlib.contextmanager
def out_of_memory_as_training_error(cfg: RunConfig, during: str) -> Iterator[None]:
    """Turn out of memory (:func:`out_of_memory_error`) raised inside the block into its TrainingError."""
    try:
        yield
    except (RuntimeError, MemoryError) as exc:
        error = out_of_memory_error(exc, cfg, during)
        if error is None:
            raise
        raise error from exc


# --- models and batches -------------------------------------------------------------------------------------


def lm_max_length(dataset: LoadedDataset, model: LoadedModel) -> int:
    """Token rows of a causal LM run are cut to the dataset's max_length, capped by the student's
    positions."""
    return model.max_length(dataset.max_length)


def make_batcher(
    split_name: str, dataset: LoadedDataset, model: LoadedModel, *, max_length: int | None = None
) -> Batcher | LMBatcher:
    """Batches of one split for ``model`` (tokenised with its own tokenizer)."""
    split = dataset.train if split_name == "train" else dataset.eval
    with phases.part(phases.LOADING):  # tokenising the split
        if dataset.task == "causal_lm":
            length = max_length or lm_max_length(dataset, model)
            return LMBatcher.from_texts(
                split.inputs, tokenizer=model.tokenizer, max_length=length, pack=dataset.pack
            )
        return Batcher(split, tokenizer=model.tokenizer, max_length=model.max_length(dataset.max_length))


def _core_model(model: nn.Module) -> nn.Module:
    return model.encoder if isinstance(model, SentenceEmbedder) else model


def prepare_attention(loaded: LoadedModel, plan: RunPlan) -> None:
    """Attention maps need the eager attention implementation (SDPA does not return them); pre-softmax scores
    need the eager path that also records them (:mod:`.attention`, which returns the maps too)."""
    core = _core_model(loaded.model)
    if not hasattr(core, "set_attn_implementation"):
        return
    if "attention_scores" in plan.needs:
        use_scores_attention(core)
    elif "attentions" in plan.needs:
        core.set_attn_implementation("eager")


# --- generation ---------------------------------------------------------------------------------------------


def prompt_length(row: list[int], *, max_new_tokens: int, max_length: int, eos_id: int | None) -> int:
    """How many leading tokens of a text row serve as a generation prompt: the first half of the text (EOS not
    counted), at least 1, leaving room for ``max_new_tokens`` within ``max_length``."""
    n = len(row) - (1 if eos_id is not None and row and row[-1] == eos_id and len(row) > 1 else 0)
    return max(1, min(max(1, n // 2), max_length - max_new_tokens))


@torch.no_grad()
def generate_continuations(
    model: nn.Module,
    prompts: list[list[int]],
    *,
    max_new_tokens: int,
    temperature: float,
    pad_id: int,
    eos_id: int | None,
    device: torch.device,
    seed: int,
    synced: bool = False,
) -> list[list[int]]:
    """Continue each prompt with ``model.generate`` (greedy when ``temperature`` is 0, else sampled with a
    generator seeded by ``seed``, leaving the global RNG untouched). Prompts are left-padded into one batch.

    ``synced``: the model is sharded over the ranks (FSDP), whose every forward is a collective: all ranks
    step in lockstep until the last rank's rows are done (``generate``'s ``synced_gpus``; a rank whose rows
    all ended runs its forwards without sampling), so none stops early and leaves the others waiting.

    Returns:
        the new tokens of each prompt, up to and including the first EOS.
    """
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = torch.as_tensor(p)
        mask[i, width - len(p) :] = 1
    sample = temperature > 0
    kwargs: dict[str, Any] = {"do_sample": sample, "max_new_tokens": max_new_tokens, "pad_token_id": pad_id}
    kwargs["synced_gpus"] = synced
    if eos_id is not None:
        kwargs["eos_token_id"] = eos_id
    if sample:
        kwargs |= {"temperature": temperature, "top_k": 0, "top_p": 1.0}
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), eval_mode(model):
        torch.manual_seed(seed)
        out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), **kwargs)
    new = out[:, width:].tolist()
    result = []
    for tokens in new:
        if eos_id is not None and eos_id in tokens:
            tokens = tokens[: tokens.index(eos_id) + 1]
        result.append(tokens)
    return result


def step_seed(seed: int, step: int, salt: int, rank: int = 0) -> int:
    """A seed for (``seed``, ``step``, ``salt``); rank r > 0 of a multi-rank run draws its own (rank 0 and a
    one-process run draw the same), so the ranks' rows are sampled independently, repeatably."""
    key = [seed, step, salt] if rank == 0 else [seed, step, salt, rank]
    return int(np.random.default_rng(key).integers(2**62))


# --- device and seeds ---------------------------------------------------------------------------------------


def resolve_device(name: str) -> torch.device:
    """``auto`` → ``cuda`` when available, else ``cpu``; other names are checked."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise ConfigError(f"Unknown device '{name}'. Use auto, cpu, cuda or cuda:N.") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"Device '{name}' was requested but CUDA is not available on this worker.")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ConfigError(
            f"Device '{name}' does not exist; this worker has {torch.cuda.device_count()} GPU(s)."
        )
    return device


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # seeds every CUDA device too
