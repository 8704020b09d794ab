"""Peak GPU memory of a run, estimated from its frozen config without loading any weights.

The router (``experiments.domain.routing``) matches this estimate against the memory a queue declares. It adds
up:

- the CUDA context (about 500 MiB on every GPU process; nothing on a ``cpu`` device);
- the student's weights and gradients, in the dtype the engine loads them in (a checkpoint's own dtype for
  ``hf`` and ``run`` models, which transformers' ``dtype="auto"`` keeps; float32 for ``config``, ``derived``
  and builtin models), and AdamW's two moments, counted as float32;
- the student's stored activations: batch × sequence × hidden × layers × 34 bytes, the per-layer figure for
  bf16 mixed precision without recomputation (Korthikanti et al., 2022, "Reducing Activation Recomputation in
  Large Transformer Models"), plus the attention maps when a term needs them (eager attention);
- the logits and loss buffers: causal LMs hold batch × sequence × vocabulary logits and their gradient
  (bf16, 4 bytes per entry together); the logit terms are computed in blocks (``methods.CHUNK_ELEMENTS``), so
  their float32 softmaxes are bounded by one block;
- the teachers' weights whenever the run loads them: ``online`` and ``on_policy`` teachers run on every batch;
  ``offline`` and ``multi_teacher`` teachers fill the shared teacher-output cache and stay loaded for the rest
  of that run (a later run that finds the entry loads no teacher, but which run comes first is not known when
  it is routed, so every one counts them); ``seq_kd`` teachers write the continuations;
- an online teacher's forward pass: one layer's transient buffers, its logits, and the hidden states or
  attention maps the terms read.

A run of several ranks (``train.gpus`` on a GPU, ``train.processes`` on a CPU) is estimated per rank, which
is what one GPU must hold: each rank trains on ``batch_size / ranks`` rows of a step, so activations, logits
and the teacher's forward pass shrink with the ranks; FSDP (``strategy`` fsdp, or auto with several ranks)
shards the student's weights, gradients and AdamW states over the ranks (1/N of each per rank), DDP
replicates them; teachers are frozen (no gradients, no optimizer state) and replicated on every rank, but an
online teacher beside an FSDP student is sharded too (its weights 1/N per rank; see :func:`teacher_shards`).
Activation checkpointing keeps only each block's input (2 bytes per token and hidden unit in bf16) and
recomputes one block at a time in the backward pass, so one block's full activations are stored at once.
The activation figure above is bf16's; fp32 precision doubles it (``precision`` auto is bf16 on a GPU and fp32
on a CPU, as the engine trains).

LoRA (``lora_r`` > 0): the weights stay, gradients and AdamW states count only the adapters (float32),
r·(d_in + d_out) parameters for each adapted linear layer of each block (the attention projections by default,
about 2·hidden wide each; an MLP projection hidden + intermediate) plus a classification head; with
``lora_4bit`` the frozen weights count half a byte per parameter.

Not counted: evaluation (a no-grad pass, smaller than a training step), the key/value caches of generation
(``on_policy``, ``seq_kd``), and allocator fragmentation, which the router's headroom covers.

Model sizes come from configs and file headers only (:mod:`.model_files`): ``config.json`` (parameters by the
standard transformer formula) or the tensor shapes in a safetensors header (exact), the hub cache for hub ids,
a run's ``distillweb_model.json`` for builtin nets, and the parent's config with the kept layers for
``derived`` models. No Django here; torch is imported only to plan a derived model
(``derive.plan_derivation``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .model_files import (
    FoundModel,
    ModelShape,
    builtin_shape,
    canonical_config,
    config_from_params,
    derived_config,
    hub_cache_folder,
    positive_int,
    read_model_folder,
)

MIB = 1024**2
GIB = 1024**3
CUDA_CONTEXT_BYTES = 500 * MIB
# Stored activations per layer, token and hidden unit under bf16 autocast (Korthikanti et al., 2022).
ACTIVATION_BYTES = 34
# Eager attention keeps, per layer, head and (query, key) pair: the scores, the softmax and the dropout mask.
ATTENTION_MAP_BYTES = 5
ADAMW_STATE_BYTES = 8  # exp_avg + exp_avg_sq, float32 each
# workers.engine.methods.CHUNK_ELEMENTS (a test checks they agree): logit terms over more positions ×
# vocabulary entries than twice this are computed in blocks of this many, so at most this many float32 values
# per buffer.
LOSS_CHUNK_ELEMENTS = 2**22
LOSS_BUFFERS = 4  # float32 (positions × V) buffers a logit term holds at once: log-softmaxes, their gradient
BUILTIN_INPUT_WIDTH = (
    1024  # builtin nets read tabular features whose width only the data knows: a generous bound
)

HIDDEN_TERMS = frozenset({"hidden_mse", "hidden_cosine"})
ATTENTION_TERMS = frozenset({"attention_mse", "attention_prob_mse", "attention_kl"})
CACHED_SCHEMES = frozenset({"offline", "multi_teacher"})
# LoRA: the default targets (the attention projections, workers.engine.adapters) and the MLP projections,
# whose (d_in + d_out) is hidden + intermediate rather than about 2·hidden.
LORA_DEFAULT_TARGETS = 4
LORA_MLP_NAMES = frozenset({"gate_proj", "up_proj", "down_proj", "fc1", "fc2", "c_fc", "dense_h_to_4h",
                            "dense_4h_to_h", "w1", "w2", "w3", "lin1", "lin2", "intermediate.dense"})


@dataclass(frozen=True)
class MemoryEstimate:
    """Peak memory of a run by component, in bytes (see the module docstring for what each one counts).

    ``unknown`` names the models whose size could not be read; their components are 0, so ``total_bytes`` is
    then a lower bound.
    """

    cuda_context: int = 0
    student_weights: int = 0
    student_grads: int = 0
    optimizer_states: int = 0
    activations: int = 0
    logits: int = 0
    teacher_weights: int = 0
    teacher_forward: int = 0
    device: str = "auto"
    teacher_mode: str = "none"
    unknown: tuple[str, ...] = ()
    # The run's ranks (one per GPU, or CPU processes) and how they share the student; components are per rank.
    ranks: int = 1
    strategy: str = "single"  # single (one rank) | ddp | fsdp
    precision: str = "auto"
    activation_checkpointing: bool = False

    COMPONENTS = (
        ("cuda_context", "CUDA context"),
        ("student_weights", "Student weights"),
        ("student_grads", "Student gradients"),
        ("optimizer_states", "AdamW states"),
        ("activations", "Activations"),
        ("logits", "Logits and loss buffers"),
        ("teacher_weights", "Teacher weights"),
        ("teacher_forward", "Teacher forward pass"),
    )

    @property
    def total_bytes(self) -> int:
        return sum(getattr(self, name) for name, _ in self.COMPONENTS)

    @property
    def total_text(self) -> str:
        return size_text(self.total_bytes)

    @property
    def needs_gpu(self) -> bool:
        """False for runs pinned to the CPU (``train.device == "cpu"``): they need no GPU memory at all."""
        return self.device != "cpu"

    @property
    def complete(self) -> bool:
        return not self.unknown

    @property
    def model_bytes(self) -> int:
        """Everything but the CUDA context: what the run holds in memory on whichever device it trains."""
        return self.total_bytes - self.cuda_context

    @property
    def host_bytes(self) -> int:
        """What every rank of a run on one host's CPU holds together: its per-rank figure times its ranks."""
        return self.model_bytes * self.ranks

    def breakdown(self) -> list[tuple[str, int, str]]:
        """The non-zero components as (label, bytes, "1.2 GiB") rows, in display order."""
        return [
            (label, getattr(self, name), size_text(getattr(self, name)))
            for name, label in self.COMPONENTS
            if getattr(self, name)
        ]

    def as_dict(self) -> dict[str, Any]:
        """Plain JSON: every component, the total, the device and the models of unknown size."""
        return {
            **{name: getattr(self, name) for name, _ in self.COMPONENTS},
            "total": self.total_bytes,
            "device": self.device,
            "teacher_mode": self.teacher_mode,
            "unknown": list(self.unknown),
            "ranks": self.ranks,
            "strategy": self.strategy,
            "precision": self.precision,
            "activation_checkpointing": self.activation_checkpointing,
        }


def size_text(n_bytes: float) -> str:
    """``1288490188`` → ``"1.2 GiB"``; whole MiB below 1 GiB, and ``"< 1 MiB"`` below that."""
    if n_bytes >= GIB:
        return f"{n_bytes / GIB:.1f} GiB"
    return f"{n_bytes / MIB:.0f} MiB" if n_bytes >= MIB else "< 1 MiB"


# --- parameter counts ---------------------------------------------------------------------------------------


def count_transformer_params(config: Mapping[str, Any], *, task: str, num_labels: int = 0) -> int:
    """Parameters of the transformers model a run builds from ``config``, by the standard formula.

    Decoders with grouped key/value heads (configs with ``num_key_value_heads``: Llama, Mistral, Qwen, Gemma,
    …) get a gated MLP (3·H·I), RMS norms and rotary positions; the others (BERT, GPT-2 families) a plain MLP
    (2·H·I), biases, LayerNorms, learned positions and, for BERT-style encoders, token types and a pooler.

    Args:
        config: a config dict (canonical names or their aliases).
        task: ``classification`` adds a head of ``num_labels`` outputs, ``causal_lm`` an LM head unless the
            embeddings are tied, ``embedding`` nothing.
    Returns:
        the parameter count; 0 when the config lacks the hidden size, depth or vocabulary.
    """
    c = canonical_config(config)
    hidden, layers, vocab = (
        positive_int(c.get("hidden_size")),
        positive_int(c.get("num_hidden_layers")),
        positive_int(c.get("vocab_size")),
    )
    if not (hidden and layers and vocab):
        return 0
    heads = positive_int(c.get("num_attention_heads")) or 1
    head_dim = positive_int(c.get("head_dim")) or hidden // heads
    inner = positive_int(c.get("intermediate_size")) or 4 * hidden
    kv_heads = positive_int(c.get("num_key_value_heads"))
    bert_like = positive_int(c.get("type_vocab_size")) > 0
    if kv_heads:
        q_width, kv_width = heads * head_dim, kv_heads * head_dim
        attention = hidden * q_width + 2 * hidden * kv_width + q_width * hidden
        if c.get("attention_bias"):
            attention += q_width + 2 * kv_width
        mlp = 3 * hidden * inner + (inner * 2 + hidden if c.get("mlp_bias") else 0)
        per_layer = attention + mlp + 2 * hidden
        embeddings, final_norm = vocab * hidden, hidden
    else:
        width = heads * head_dim
        attention = 3 * (hidden * width + width) + width * hidden + hidden
        mlp = 2 * hidden * inner + inner + hidden
        per_layer = attention + mlp + 4 * hidden
        positions = positive_int(c.get("max_position_embeddings"))
        learned = (
            positions
            and c.get("position_embedding_type", "absolute") == "absolute"
            and not any(key.startswith(("rope", "rotary")) for key in c)
        )
        embeddings = vocab * hidden + (positions * hidden if learned else 0)
        embeddings += positive_int(c.get("type_vocab_size")) * hidden
        final_norm = 2 * hidden  # BERT's embedding LayerNorm, or GPT-2's final one
    total = embeddings + layers * per_layer + final_norm
    pooler = hidden * hidden + hidden if bert_like else 0
    if task == "classification":
        total += pooler + hidden * max(num_labels, 2) + (max(num_labels, 2) if bert_like else 0)
    elif task == "causal_lm":
        total += 0 if c.get("tie_word_embeddings", True) else vocab * hidden
    else:
        total += pooler
    return total


# --- reading shapes -----------------------------------------------------------------------------------------


PendingRun = Callable[[str], Mapping[str, Any] | None]


class ModelShapeReader:
    """Reads model shapes from configs, folders and the hub cache; remembers each for the reader's lifetime.

    Args:
        artifact_root: where ``run`` models' relative paths (``runs/12/final``) point.
        pending_run: for a ``run`` model whose folder does not exist yet (its run has not finished), the model
            config of the student that run trains, from the path; None when unknown.
    """

    MAX_DEPTH = 8  # derived-from-derived and run-of-a-run chains

    def __init__(self, *, artifact_root: Path | None = None, pending_run: PendingRun | None = None) -> None:
        self.artifact_root = artifact_root
        self.pending_run = pending_run
        self._shapes: dict[str, ModelShape | None] = {}

    def shape(self, model: Mapping[str, Any], *, task: str) -> ModelShape | None:
        """The shape of the model a run builds from ``model`` (an engine model config) for ``task``; None when
        its size cannot be read (a hub model not in the local cache, a missing folder, a malformed config)."""
        key = json.dumps([model, task], sort_keys=True, default=str)
        if key not in self._shapes:
            self._shapes[key] = self._read(model, task=task, depth=0)
        return self._shapes[key]

    def _read(self, model: Mapping[str, Any], *, task: str, depth: int) -> ModelShape | None:
        num_labels = positive_int(model.get("num_labels"))
        if model.get("source") == "builtin":
            return builtin_shape(
                model.get("params") or {}, input_width=BUILTIN_INPUT_WIDTH, num_labels=num_labels
            )
        found = self._find(model, task=task, depth=depth)
        if found is None:
            return None
        if found.builtin is not None:
            meta = found.builtin
            return builtin_shape(
                meta.get("params") or {},
                input_width=positive_int(meta.get("input_dim")) or 1,
                num_labels=positive_int(meta.get("num_labels")) or num_labels,
            )
        c = canonical_config(found.config)
        labels = num_labels or positive_int(c.get("num_labels")) or len(c.get("id2label") or {})
        hidden = positive_int(c.get("hidden_size"))
        if found.stored_params:
            params = found.stored_params + (hidden * max(labels, 2) if task == "classification" else 0)
        else:
            params = count_transformer_params(c, task=task, num_labels=labels)
        if not params or not hidden:
            return None
        return ModelShape(
            params=params,
            bytes_per_param=found.bytes_per_param,
            hidden_size=hidden,
            num_layers=positive_int(c.get("num_hidden_layers")) or 1,
            num_heads=positive_int(c.get("num_attention_heads")) or 1,
            intermediate_size=positive_int(c.get("intermediate_size")) or 4 * hidden,
            vocab_size=positive_int(c.get("vocab_size")),
            num_labels=labels,
            max_positions=positive_int(c.get("max_position_embeddings")) or None,
        )

    def _find(self, model: Mapping[str, Any], *, task: str, depth: int) -> FoundModel | None:
        if depth > self.MAX_DEPTH:
            return None
        source = model.get("source")
        if source == "config":
            return FoundModel(config_from_params(model.get("params") or {}))
        if source == "hf":
            path = str(model.get("path") or "")
            folder = (
                Path(path)
                if path and Path(path).is_dir()
                else hub_cache_folder(str(model.get("name") or path), str(model.get("revision") or ""))
            )
            return read_model_folder(folder) if folder is not None else None
        if source == "run":
            path = str(model.get("path") or "")
            folder = Path(path)
            if not folder.is_absolute() and self.artifact_root is not None:
                folder = self.artifact_root / folder
            if path and folder.is_dir():
                return read_model_folder(folder)
            producer = self.pending_run(path) if self.pending_run and path else None
            return self._find(producer, task=task, depth=depth + 1) if producer else None
        if source == "derived":
            parent = model.get("parent")
            found = self._find(parent, task=task, depth=depth + 1) if isinstance(parent, Mapping) else None
            if found is None or found.builtin is not None:
                return None
            child = derived_config(found.config, model.get("params") or {})
            return FoundModel(child) if child is not None else None  # built in float32, no file of its own
        if source == "builtin":
            return FoundModel(
                {},
                builtin={
                    "params": model.get("params") or {},
                    "input_dim": BUILTIN_INPUT_WIDTH,
                    "num_labels": positive_int(model.get("num_labels")),
                },
            )
        return None


# --- the estimate -------------------------------------------------------------------------------------------


def teacher_mode(config: Mapping[str, Any]) -> str:
    """How a run uses its teacher, as ``trainer.plan_run`` decides: ``none``, ``cached`` or ``online``.

    Every loss term but ``ce`` reads the teacher's outputs (``hard_labels`` keeps ``ce`` alone); ``seq_kd``
    loads the teacher for its continuations even when the recipe is ``ce`` alone (mode ``none``, but see
    :func:`teacher_configs`).
    """
    scheme = config.get("scheme", "offline")
    terms = config.get("terms") or []
    if not config.get("teacher") or scheme == "hard_labels" or not any(t.get("name") != "ce" for t in terms):
        return "none"
    return "cached" if scheme in CACHED_SCHEMES else "online"


def teacher_configs(config: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    """The teacher model configs a run loads (none for a run that never reads a teacher)."""
    teacher = config.get("teacher")
    if not teacher or (teacher_mode(config) == "none" and config.get("scheme") != "seq_kd"):
        return []
    if config.get("scheme") == "multi_teacher":
        return [teacher, *(config.get("extra_teachers") or [])]
    return [teacher]


@dataclass(frozen=True)
class RankPlan:
    """How a run spreads over its ranks, as the estimate reads ``train``: ``ranks`` (GPUs, or CPU processes on
    a CPU), the resolved strategy, each rank's rows of a step, and the activations' factor for precision and
    checkpointing."""

    ranks: int
    strategy: str
    batch: int
    precision: str
    checkpointing: bool

    @property
    def shards(self) -> int:
        """Over how many ranks the student's weights, gradients and optimizer states are split."""
        return self.ranks if self.strategy == "fsdp" else 1

    @property
    def activation_factor(self) -> int:
        return 2 if self.precision == "fp32" else 1


def rank_plan(train: Mapping[str, Any], *, on_cpu: bool) -> RankPlan:
    """The ranks of a run with these training settings, on a GPU or (``on_cpu``) on a CPU."""
    ranks = positive_int(train.get("processes" if on_cpu else "gpus")) or 1
    strategy = str(train.get("strategy") or "auto")
    if ranks == 1:
        strategy = "single"  # ddp or fsdp over one rank trains as one process
    elif strategy not in ("ddp", "fsdp"):
        strategy = "fsdp"  # auto
    batch = positive_int(train.get("batch_size")) or 64
    return RankPlan(
        ranks=ranks,
        strategy=strategy,
        batch=max(1, -(-batch // ranks)),
        # auto: bf16 autocast on a GPU, float32 on a CPU (the engine's Ranks.precision)
        precision=_resolved_precision(str(train.get("precision") or "auto"), on_cpu=on_cpu),
        checkpointing=bool(train.get("activation_checkpointing")),
    )


def _resolved_precision(precision: str, *, on_cpu: bool) -> str:
    return ("fp32" if on_cpu else "bf16") if precision == "auto" else precision


TEACHER_REPLICATE_ENV = "DISTILLWEB_REPLICATE_TEACHER"


def teacher_shards(strategy: str, ranks: int, mode: str) -> int:
    """Over how many ranks a teacher's weights are split: all of them for an ``online`` teacher (it runs on
    every batch, on every rank in lockstep) beside a sharded (``fsdp``) student, unless
    ``DISTILLWEB_REPLICATE_TEACHER`` is set (1, true, yes); else 1 (replicated on every rank). The engine
    follows the same rule (``distributed.shards_teacher``)."""
    replicate = os.environ.get(TEACHER_REPLICATE_ENV, "").strip().lower() in ("1", "true", "yes")
    return ranks if strategy == "fsdp" and ranks > 1 and mode == "online" and not replicate else 1


def _shard(n_bytes: int, shards: int) -> int:
    return -(-n_bytes // shards)


def estimate_run_memory(
    config: Mapping[str, Any], *, reader: ModelShapeReader | None = None, on_cpu: bool = False
) -> MemoryEstimate:
    """Estimate the peak memory of one rank of one run from its frozen engine config (see the module
    docstring).

    Args:
        config: a run config as ``RunConfig.to_dict`` (or the Django side's frozen ``Run.config``) has it.
        reader: reads model sizes; share one across runs to read each model once.
        on_cpu: estimate the run as it trains on a CPU (``processes`` ranks, no CUDA context), whatever its
            device; by default a run not pinned to the CPU is estimated on GPUs (``gpus`` ranks).
    Returns:
        the estimate by component, per rank; models whose size is unknown are named in ``unknown``.
    """
    reader = reader or ModelShapeReader()
    task = str(config.get("task") or "classification")
    train = config.get("train") or {}
    wanted_length = positive_int((config.get("dataset") or {}).get("max_length")) or 128
    device = "cpu" if on_cpu else str(train.get("device") or "auto")
    plan = rank_plan(train, on_cpu=device == "cpu")
    batch = plan.batch
    term_names = {str(t.get("name")) for t in config.get("terms") or []}
    mode = teacher_mode(config)
    eager = bool(term_names & ATTENTION_TERMS)
    parts = {name: 0 for name, _ in MemoryEstimate.COMPONENTS}
    unknown: list[str] = []

    student = reader.shape(config["student"], task=task) if config.get("student") else None
    # Causal LM rows are cut to the student's positions, and the teacher reads the same rows.
    length = student.sequence_length(wanted_length) if student else wanted_length
    if student is None:
        unknown.append(_describe(config.get("student") or {}))
    else:
        adapter = lora_params(student, train, task=task)
        weights = student.params // 2 if adapter and train.get("lora_4bit") else student.weight_bytes
        parts["student_weights"] = _shard(weights + adapter * 4, plan.shards)
        parts["student_grads"] = _shard(adapter * 4 if adapter else student.weight_bytes, plan.shards)
        trained = adapter or student.params
        parts["optimizer_states"] = _shard(trained * ADAMW_STATE_BYTES, plan.shards)
        parts["activations"] = plan.activation_factor * _training_activations(
            student, batch, length, eager=eager, checkpointing=plan.checkpointing
        )
        parts["logits"] = _student_logits(student, batch, length, task=task)
    for teacher_cfg in teacher_configs(config):
        teacher = reader.shape(teacher_cfg, task=task)
        if teacher is None:
            unknown.append(_describe(teacher_cfg))
            continue
        # Frozen: replicated on every rank, or sharded beside an FSDP student (weights only, no gradients).
        shards = teacher_shards(plan.strategy, plan.ranks, mode)
        parts["teacher_weights"] += _shard(teacher.weight_bytes, shards)
        if mode == "online":
            teacher_length = length if task == "causal_lm" else teacher.sequence_length(wanted_length)
            parts["teacher_forward"] += _teacher_forward(
                teacher,
                batch,
                teacher_length,
                task=task,
                hidden=bool(term_names & HIDDEN_TERMS),
                attentions=eager,
            )
    if device != "cpu":
        parts["cuda_context"] = CUDA_CONTEXT_BYTES
    return MemoryEstimate(
        **parts,
        device=device,
        teacher_mode=mode,
        unknown=tuple(unknown),
        ranks=plan.ranks,
        strategy=plan.strategy,
        precision=plan.precision,
        activation_checkpointing=plan.checkpointing,
    )


def lora_params(model: ModelShape, train: Mapping[str, Any], *, task: str) -> int:
    """The parameters a LoRA run trains (0 without LoRA): r·(d_in + d_out) per adapted linear layer and block,
    plus a classification head."""
    rank = positive_int(train.get("lora_r"))
    if not rank or model.builtin:
        return 0
    names = [n.strip() for n in str(train.get("lora_targets") or "").split(",") if n.strip()]
    hidden, inner = model.hidden_size, model.intermediate_size or 4 * model.hidden_size
    widths = [hidden + inner if n in LORA_MLP_NAMES else 2 * hidden for n in names]
    per_layer = rank * (sum(widths) if widths else LORA_DEFAULT_TARGETS * 2 * hidden)
    head = hidden * max(model.num_labels, 2) if task == "classification" else 0
    return model.num_layers * per_layer + head


def _training_activations(
    model: ModelShape, batch: int, length: int, *, eager: bool, checkpointing: bool = False
) -> int:
    """What the backward pass needs kept from the forward: per layer 34 bytes per token and hidden unit
    (bf16), plus the attention maps under eager attention; builtin nets keep each layer's output, ReLU and
    mask. With activation checkpointing: each layer's input (2 bytes per token and hidden unit) and one
    layer's full activations, recomputed one at a time."""
    kept_layers = 1 if checkpointing else model.num_layers
    if model.builtin:
        inputs = batch * model.hidden_size * model.num_layers * 4 if checkpointing else 0
        return inputs + batch * model.hidden_size * kept_layers * 12
    tokens = batch * length
    stored = tokens * model.hidden_size * kept_layers * ACTIVATION_BYTES
    if checkpointing:
        stored += tokens * model.hidden_size * model.num_layers * 2
    stored += tokens * model.hidden_size * 4  # the embeddings' output and the final hidden state
    if eager:
        stored += batch * model.num_heads * length * length * kept_layers * ATTENTION_MAP_BYTES
    return stored


def _output_width(model: ModelShape, task: str) -> int:
    if task == "causal_lm":
        return model.vocab_size
    if task == "embedding":
        return model.hidden_size
    return max(model.num_labels, 2)


def _student_logits(model: ModelShape, batch: int, length: int, *, task: str) -> int:
    """Logits and their gradient (bf16: 4 bytes per entry together) and the float32 buffers of the loss terms,
    bounded by one block of the chunked logit terms."""
    entries = batch * (length if task == "causal_lm" else 1) * _output_width(model, task)
    return entries * 4 + min(entries, 2 * LOSS_CHUNK_ELEMENTS) * 4 * LOSS_BUFFERS


def _teacher_forward(
    model: ModelShape, batch: int, length: int, *, task: str, hidden: bool, attentions: bool
) -> int:
    """An online teacher's no-grad forward: one layer's transient buffers (bf16), its logits (bf16 and the
    float32 copy the terms read), and the hidden states or attention maps of every layer when terms read
    them."""
    tokens = batch * (1 if model.builtin else length)
    total = tokens * (4 * model.hidden_size + 2 * (model.intermediate_size or model.hidden_size)) * 2
    total += batch * (length if task == "causal_lm" else 1) * _output_width(model, task) * 6
    if hidden and not model.builtin:
        total += (model.num_layers + 1) * tokens * model.hidden_size * 2
    if attentions and not model.builtin:
        total += model.num_layers * batch * model.num_heads * length * length * 2
    return total


def _describe(model: Mapping[str, Any]) -> str:
    return str(model.get("name") or model.get("path") or model.get("source") or "model")
