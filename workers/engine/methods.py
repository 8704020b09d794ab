"""The method layer between the trainer and the loss functions.

The trainer gathers what a recipe's terms need into one :class:`TermInputs`, builds the terms' learned modules
once (:func:`build_term_modules`: add their parameters to the optimizer and save them with the student) and
their mutable state (:class:`TermState`: save ``state_dict()`` in checkpoints), and calls :func:`combine`
every step. Everything here is plain PyTorch; the term catalogue and recipe validation live in :mod:`.terms`
(which the Django side reads without importing torch).

How :func:`combine` feeds each term kind (``TermSpec.kind``); ``mask`` is ``labels != -100`` for sequences and
None (every row) for classification, where -100 means "unlabelled" and the teacher is still a target:

- ``labels`` (ce): ``fn(student_logits, labels, **params)``.
- ``logits`` (kd, reverse_kl, jsd, skew_kl, skew_reverse_kl, tvd): ``fn(student_logits, teacher_logits,
  mask)``; the teacher's logits must have the student's shape. With several teachers (``teacher_mixture``) the
  logit, taid, topk and uld kinds read ``loss_primitives.mix_teachers`` at the term's own τ (1 for terms
  without one): the weighted average of the teachers' softened distributions.
- ``taid``: as ``logits`` with ``interpolation=t``; t is linear in ``step / total_steps`` or adaptive (kept in
  ``state``, updated once per optimizer step while gradients are on).
- ``topk``: ``fn(student_logits, teacher_topk or teacher_logits, mask)`` (the sparse cache wins when both
  exist).
- ``uld``: ``fn(student_logits, teacher_topk or teacher_logits, mask)`` (the sparse cache wins when both
  exist); the vocabularies may differ; across tokenizers ``mask`` also drops the positions without a teacher
  partner (``teacher_paired``).
- ``hidden`` (hidden_mse, hidden_cosine): ``fn(student_hidden, teacher_hidden, attention_mask,
  projections=…)``.
- ``attentions`` (attention_prob_mse): ``fn(student_attentions, teacher_attentions, attention_mask)``: the
  post-softmax probabilities (``output_attentions``).
- ``attention_scores`` (attention_mse): ``fn(student_attention_scores, teacher_attention_scores,
  attention_mask)``: the pre-softmax scores Q·Kᵀ/√d, recorded by the eager attention path of
  :mod:`.attention`.
- ``attention_relations`` (attention_kl): last-layer attentions and values, ``attention_mask``.
- ``embeddings`` (embedding_mse): pooled embeddings, or the last hidden states pooled with the term's
  ``pooling`` and ``attention_mask`` when the inputs carry no embedding.

Token-level kinds (labels, logits, taid, topk, uld) on large (B, T, V) logits are computed in blocks of
positions (``loss_primitives.chunked_token_loss``), so the float32 softmaxes of the whole batch never exist at
once.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor, nn

from . import schedules
from .config import LossTermConfig
from .errors import ConfigError
from .logit_losses import taid_update
from .loss_primitives import IGNORE_INDEX, TopK, mix_teachers
from .losses import LOSS_TERMS, LossParts
from .sparse_losses import ce_topk
from .terms import ModelDims, TermSpec

__all__ = ["TermInputs", "TermState", "build_term_modules", "combine"]

# What a missing need means to the person who configured the run.
_NEED_TEXT = {
    "teacher_logits": "dense teacher logits",
    "teacher_topk": "the teacher's top-k distribution (from the cache) or dense teacher logits",
    "hidden_states": "student and teacher hidden states",
    "attentions": "student and teacher attention maps",
    "attention_scores": "student and teacher pre-softmax attention scores (transformers models)",
    "values": "student and teacher last-layer value vectors",
    "embeddings": "student and teacher sentence embeddings",
}


@dataclass
class TermInputs:
    """Everything a step's loss terms may read; fields a recipe does not need stay None.

    Shapes: ``student_logits`` (B, C) classification or (B, T, V) causal LM (already shifted); ``labels``
    (B,) or (B, T) with -100 = no label / padding / prompt; ``teacher_logits`` same leading shape (its V may
    differ for uld); hidden states (B, T, H) per layer with [0] = embeddings (Hugging Face ``hidden_states``);
    attentions (B, heads, T, T) per layer; values (B, heads, T, d) per layer (the last one is used);
    ``attention_mask`` (B, T) with 1 = real token; embeddings (B, D); ``teacher_paired`` (B, T) bool, for
    cross-tokenizer causal LMs: positions whose teacher logits (or cached top-k) come from a position that
    read the same text; ``teacher_topk`` the cached sparse teacher, laid out like ``teacher_logits``.
    """

    student_logits: Tensor
    labels: Tensor
    teacher_logits: Tensor | None = None
    teacher_topk: TopK | None = None
    student_hidden: tuple[Tensor, ...] | None = None
    teacher_hidden: tuple[Tensor, ...] | None = None
    student_attentions: tuple[Tensor, ...] | None = None
    teacher_attentions: tuple[Tensor, ...] | None = None
    # Pre-softmax attention scores Q·Kᵀ/√d, (B, heads, T, T) per layer (workers.engine.attention).
    student_attention_scores: tuple[Tensor, ...] | None = None
    teacher_attention_scores: tuple[Tensor, ...] | None = None
    student_values: tuple[Tensor, ...] | None = None
    teacher_values: tuple[Tensor, ...] | None = None
    attention_mask: Tensor | None = None
    student_embedding: Tensor | None = None
    teacher_embedding: Tensor | None = None
    teacher_paired: Tensor | None = None
    # multi_teacher: each teacher's logits (K, ...) laid out like ``teacher_logits`` (which then holds their
    # τ = 1 mixture), and the K weights; every logit term mixes them at its own temperature.
    teacher_mixture: Tensor | None = None
    teacher_weights: tuple[float, ...] = ()
    step: int = 0
    total_steps: int = 1

    def has(self, need: str) -> bool:
        """Whether the inputs satisfy one entry of ``terms.NEEDS``."""
        if need == "teacher_logits":
            return self.teacher_logits is not None
        if need == "teacher_topk":
            return self.teacher_topk is not None or self.teacher_logits is not None
        if need == "hidden_states":
            return self.student_hidden is not None and self.teacher_hidden is not None
        if need == "attentions":
            return self.student_attentions is not None and self.teacher_attentions is not None
        if need == "attention_scores":
            return self.student_attention_scores is not None and self.teacher_attention_scores is not None
        if need == "values":
            return self.student_values is not None and self.teacher_values is not None
        if need == "embeddings":
            return (self.student_embedding is not None or self.student_hidden is not None) and (
                self.teacher_embedding is not None or self.teacher_hidden is not None
            )
        raise ValueError(f"unknown need {need!r}")


class TermState:
    """Per-run mutable state of the terms (e.g. taid's adaptive interpolation ``t``), by term name.

    Values may be 0-d tensors on the training device while running (updating them needs no CPU-GPU sync);
    ``state_dict()`` turns them into Python floats, so it is JSON-serialisable and goes into checkpoints.
    """

    def __init__(self) -> None:
        self.terms: dict[str, dict[str, float | Tensor]] = {}

    def get(self, term: str) -> dict[str, float | Tensor]:
        """The mutable state dict of one term (created empty)."""
        return self.terms.setdefault(term, {})

    def state_dict(self) -> dict[str, dict[str, float]]:
        """Plain floats (one sync per tensor value: call it at checkpoint time, not every step)."""
        return {name: {k: float(v) for k, v in values.items()} for name, values in self.terms.items()}

    def load_state_dict(self, state: Mapping[str, Mapping[str, float]]) -> None:
        self.terms = {name: {k: float(v) for k, v in values.items()} for name, values in state.items()}


# --- learned modules ----------------------------------------------------------------------------------------


def build_term_modules(terms: Sequence[LossTermConfig], dims: ModelDims | None = None) -> nn.ModuleDict:
    """Learned parts of the terms, keyed by term name; train them with the student and save them with it.

    ``hidden_mse`` / ``hidden_cosine``: an ``nn.ModuleList`` of ``nn.Linear(H_S, H_T)``, one per mapped layer,
    when the hidden sizes differ. ``embedding_mse``: an ``nn.Linear(D_S, D_T)`` when the embedding sizes
    differ. Equal or unknown sizes need no module (unknown sizes that turn out to differ make :func:`combine`
    raise ConfigError).

    Args:
        terms: validated terms.
        dims: the models' sizes.
    Returns:
        nn.ModuleDict (float32 parameters on the CPU; move it with the student).
    """
    modules = nn.ModuleDict()
    if dims is None:
        return modules
    for term in terms:
        kind = LOSS_TERMS[term.name].kind
        if kind == "hidden":
            width_s, width_t = dims.student_hidden_size, dims.teacher_hidden_size
            if width_s is None or width_t is None or width_s == width_t:
                continue
            layer_map = term.params.get("layer_map", "uniform")
            if layer_map == "last":
                count = 1
            elif isinstance(layer_map, list):
                count = len(layer_map)
            elif dims.student_num_layers is None:
                raise ConfigError(
                    f"Loss term '{term.name}' needs the student's layer count to build its projections."
                )
            else:
                count = dims.student_num_layers
            modules[term.name] = nn.ModuleList(nn.Linear(width_s, width_t) for _ in range(count))
        elif kind == "embeddings":
            width_s = dims.student_embedding_size or dims.student_hidden_size
            width_t = dims.teacher_embedding_size or dims.teacher_hidden_size
            if width_s is not None and width_t is not None and width_s != width_t:
                modules[term.name] = nn.Linear(width_s, width_t)
    return modules


# --- combining ----------------------------------------------------------------------------------------------

# Logit terms over more positions × vocabulary entries than this are computed in blocks of about this many
# elements (see loss_primitives.chunked_token_loss): 2**22 float32 values are 16 MiB per intermediate.
CHUNK_ELEMENTS = 2**22
_TOKEN_KINDS = ("labels", "logits", "taid", "topk", "uld")


def auto_chunk_size(student_logits: Tensor) -> int | None:
    """Positions per block for sequence logits too large to softmax at once; None = no chunking."""
    if student_logits.dim() != 3 or student_logits.numel() <= 2 * CHUNK_ELEMENTS:
        return None
    return max(1, CHUNK_ELEMENTS // student_logits.shape[-1])


def sequence_mask(inputs: TermInputs) -> Tensor | None:
    """Positions logit terms average over: labelled tokens for sequences, every row for classification."""
    if inputs.student_logits.dim() > 2:
        return inputs.labels != IGNORE_INDEX
    return None


def current_params(term: LossTermConfig, step: int, total_steps: int) -> tuple[float, dict[str, Any]]:
    """A term's weight and parameters at ``step`` with its schedules applied."""
    weight, params = term.weight, dict(term.params)
    for target, schedule in term.schedule.items():
        value = schedules.value_at(schedule, step, total_steps)
        if target == schedules.WEIGHT:
            weight = value
        else:
            params[target] = value
    return weight, params


def combine(
    terms: Sequence[LossTermConfig],
    inputs: TermInputs,
    *,
    modules: nn.ModuleDict,
    state: TermState,
    chunk_size: int | None = None,
) -> LossParts:
    """Weighted sum of a recipe's terms at ``inputs.step``, schedules applied.

    Args:
        terms: validated terms (``terms.validate_terms``).
        inputs: this batch's tensors and the step counters.
        modules: from :func:`build_term_modules`.
        state: the run's :class:`TermState`; stateful terms (adaptive taid) update it once per optimizer step,
            and only while gradients are enabled (evaluation under ``torch.no_grad()`` leaves it alone).
        chunk_size: positions per block for the token-level logit terms; None = automatic
            (:func:`auto_chunk_size`), 0 = never chunk.
    Returns:
        LossParts: ``total`` (float32 scalar with the gradient), ``parts`` (each term's detached, unweighted
        value), ``weights`` (each term's weight at this step, Python floats).
    Raises:
        ConfigError: a term's inputs are missing (the message names them) or do not fit together.
    """
    if chunk_size is None:
        chunk_size = auto_chunk_size(inputs.student_logits)
    total = inputs.student_logits.new_zeros((), dtype=torch.float32)
    parts: dict[str, Tensor] = {}
    weights: dict[str, float] = {}
    current: dict[str, tuple[TermSpec, float, dict[str, Any]]] = {}
    for term in terms:
        spec = LOSS_TERMS.get(term.name)
        if spec is None:
            raise ConfigError(f"Unknown loss term '{term.name}'. Available terms: {', '.join(LOSS_TERMS)}.")
        missing = [need for need in sorted(spec.needs) if not inputs.has(need)]
        if missing:
            raise ConfigError(
                f"Loss term '{term.name}' needs {' and '.join(_NEED_TEXT[n] for n in missing)}, "
                "but this step has none."
            )
        weight, params = current_params(term, inputs.step, inputs.total_steps)
        current[term.name] = (spec, weight, params)
    shared = _shared_ce_topk(current, inputs)
    if shared is not None:
        total, parts["ce"], parts["topk"] = shared(chunk_size or None)
    for name, (spec, weight, params) in current.items():
        weights[name] = weight
        if name in parts:  # computed above, with the term it shares the student's softmax with
            continue
        extra = {"chunk_size": chunk_size} if chunk_size and spec.kind in _TOKEN_KINDS else {}
        value = _compute(spec, params, inputs, modules=modules, state=state, extra=extra)
        total = total + weight * value
        parts[name] = value.detach()
    return LossParts(total=total, parts={name: parts[name] for name in current}, weights=weights)


def _topk_teacher(params: Mapping[str, Any], inputs: TermInputs) -> Tensor | TopK:
    """What a topk term reads: the cached top-k, else the dense teacher (mixed at the term's τ with several
    teachers)."""
    if inputs.teacher_topk is not None:
        return inputs.teacher_topk
    if inputs.teacher_mixture is not None:
        return mix_teachers(
            inputs.teacher_mixture, inputs.teacher_weights, temperature=params.get("temperature", 1.0)
        )
    return inputs.teacher_logits


def _shared_ce_topk(
    current: Mapping[str, tuple[TermSpec, float, dict[str, Any]]], inputs: TermInputs
) -> Callable[[int | None], tuple[Tensor, Tensor, Tensor]] | None:
    """When a recipe has both ``ce`` and ``topk`` over the same student distribution (topk at τ = 1, ce
    without label smoothing), a function computing ``w_ce·ce + w_topk·topk`` and each value from one student
    softmax (:func:`.sparse_losses.ce_topk`: equal values and gradient); None otherwise."""
    if "ce" not in current or "topk" not in current:
        return None
    (_, w_ce, ce_params), (_, w_topk, topk_params) = current["ce"], current["topk"]
    if set(ce_params) - {"label_smoothing"} or ce_params.get("label_smoothing", 0.0) != 0:
        return None
    if set(topk_params) - {"k", "divergence", "tail", "temperature", "beta"}:
        return None
    if topk_params.get("temperature", 1.0) != 1:
        return None
    teacher = _topk_teacher(topk_params, inputs)
    k = topk_params.get("k", 64)
    if isinstance(teacher, TopK) and k == inputs.student_logits.shape[-1] == teacher.logprobs.shape[-1]:
        return None  # the cache holds the whole vocabulary: topk computes the dense divergence
    options = {name: value for name, value in topk_params.items() if name != "temperature"}

    def shared(chunk_size: int | None) -> tuple[Tensor, Tensor, Tensor]:
        return ce_topk(
            inputs.student_logits,
            inputs.labels,
            teacher,
            sequence_mask(inputs),
            ce_weight=w_ce,
            topk_weight=w_topk,
            chunk_size=chunk_size,
            **options,
        )

    return shared


def _compute(
    spec: TermSpec,
    params: dict[str, Any],
    inputs: TermInputs,
    *,
    modules: nn.ModuleDict,
    state: TermState,
    extra: dict[str, Any],
) -> Tensor:
    kind, name = spec.kind, spec.name
    if inputs.teacher_mixture is not None and kind in _TOKEN_KINDS and kind != "labels":
        # Average the teachers' distributions softened at this term's τ (its schedule applied), not at τ = 1.
        mixed = mix_teachers(
            inputs.teacher_mixture, inputs.teacher_weights, temperature=params.get("temperature", 1.0)
        )
        inputs = replace(inputs, teacher_logits=mixed)
    student, teacher = inputs.student_logits, inputs.teacher_logits
    if kind == "labels":
        return spec.fn(student, inputs.labels, **params, **extra)
    if kind in ("logits", "taid") and teacher.shape != student.shape:
        raise ConfigError(
            f"Loss term '{name}' needs teacher logits shaped like the student's {tuple(student.shape)}, got "
            f"{tuple(teacher.shape)}: tokenizer or label-space mismatch without a cross-tokenizer method. "
            "Use uld instead."
        )
    if kind == "logits":
        return spec.fn(student, teacher, sequence_mask(inputs), **params, **extra)
    if kind == "taid":
        return _taid(spec, params, inputs, state, extra)
    if kind == "topk":
        source = inputs.teacher_topk if inputs.teacher_topk is not None else teacher
        return spec.fn(student, source, sequence_mask(inputs), **params, **extra)
    if kind == "uld":
        mask = sequence_mask(inputs)
        if inputs.teacher_paired is not None:  # cross-tokenizer: only positions that read the same text
            mask = inputs.teacher_paired if mask is None else mask & inputs.teacher_paired
        source = inputs.teacher_topk if inputs.teacher_topk is not None else teacher
        return spec.fn(student, source, mask, **params, **extra)
    mask = None if inputs.attention_mask is None else inputs.attention_mask.bool()
    if kind == "hidden":
        projections = modules[name] if name in modules else None
        return spec.fn(inputs.student_hidden, inputs.teacher_hidden, mask, projections=projections, **params)
    if kind == "attentions":
        return spec.fn(inputs.student_attentions, inputs.teacher_attentions, mask, **params)
    if kind == "attention_scores":
        return spec.fn(inputs.student_attention_scores, inputs.teacher_attention_scores, mask, **params)
    if kind == "attention_relations":
        return spec.fn(
            inputs.student_attentions[-1],
            inputs.teacher_attentions[-1],
            inputs.student_values[-1],
            inputs.teacher_values[-1],
            mask,
            **params,
        )
    if kind == "embeddings":
        e_s = inputs.student_embedding if inputs.student_embedding is not None else inputs.student_hidden[-1]
        e_t = inputs.teacher_embedding if inputs.teacher_embedding is not None else inputs.teacher_hidden[-1]
        projection = modules[name] if name in modules else None
        return spec.fn(e_s, e_t, mask, projection=projection, **params)
    raise ConfigError(f"Loss term '{name}' has an unknown kind '{kind}'.")


def taid_interpolation(
    params: Mapping[str, Any], step: int, total_steps: int, term_state: Mapping[str, Any]
) -> float | Tensor:
    """TAID's t at ``step``: linear from t_start to t_end, or the adaptive value kept in the term's state."""
    linear = params["t_start"] + (params["t_end"] - params["t_start"]) * schedules.progress(step, total_steps)
    if not params["adaptive"]:
        return linear
    return term_state.get("t", params["t_start"])


def _taid(
    spec: TermSpec, params: dict[str, Any], inputs: TermInputs, state: TermState, extra: dict[str, Any]
) -> Tensor:
    term_state = state.get(spec.name)
    t = taid_interpolation(params, inputs.step, inputs.total_steps, term_state)
    value = spec.fn(
        inputs.student_logits, inputs.teacher_logits, sequence_mask(inputs), interpolation=t, **extra
    )
    # One update per optimizer step (the first micro-batch of it), and never during evaluation.
    if params["adaptive"] and torch.is_grad_enabled() and inputs.step > term_state.get("step", -1):

        def tensor(key: str, default: float) -> Tensor:
            return torch.as_tensor(term_state.get(key, default), dtype=torch.float32, device=value.device)

        linear = taid_interpolation(
            {**params, "adaptive": False}, inputs.step, inputs.total_steps, term_state
        )
        new_t, momentum, prev_loss = taid_update(
            tensor("t", params["t_start"]),
            tensor("momentum", 0.0),
            tensor("prev_loss", math.inf),
            value.detach(),
            t_target=linear,
            t_end=params["t_end"],
            alpha=params["alpha"],
            beta=params["beta"],
        )
        term_state.update(t=new_t, momentum=momentum, prev_loss=prev_loss, step=inputs.step)
    return value
