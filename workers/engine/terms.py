"""The loss-term catalogue: names, parameter specs, what each term needs, and recipe validation.

Plain data and checks, no torch: the web process reads this module to render the recipe form and to validate
recipes (forms, API, sweeps, pre-flight), and the engine validates its config with the same functions.
:mod:`.losses` binds each entry to the function computing it (``losses.LOSS_TERMS``); :mod:`.methods` feeds
those functions each step.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .config import LossTermConfig
from .errors import ConfigError
from .schedules import WEIGHT, max_weight, validate_schedule

DIVERGENCES = ("kd", "reverse_kl", "jsd", "tvd")
POOLINGS = ("mean", "cls", "last")
LAYER_MAPS = ("uniform", "last")
# The inputs a term may need beyond the student logits and labels (``methods.TermInputs.has``).
NEEDS = frozenset(
    {
        "teacher_logits",
        "teacher_topk",
        "hidden_states",
        "attentions",
        "attention_scores",
        "values",
        "embeddings",
    }
)


class TermParamError(ConfigError):
    """A loss-term parameter is invalid; ``param`` names it (the recipe form shows the error on that
    field)."""

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


# --- catalogue ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ParamSpec:
    """One parameter of a loss term, with its allowed values.

    ``type`` is ``float`` or ``int`` (numbers with an optional range, bounds inclusive unless noted),
    ``bool``, ``str`` (one of ``choices``) or ``list`` (a layer map: one of ``choices`` or a list of layer
    numbers >= 1). Only ``float`` parameters can have a schedule.
    """

    name: str
    default: Any
    description: str
    min: float | None = None
    max: float | None = None
    min_inclusive: bool = True
    max_inclusive: bool = True
    type: type = float
    choices: tuple[str, ...] = ()

    def range_text(self) -> str:
        """Human-readable allowed values, e.g. ``> 0``, ``in [0, 1)``, ``one of: kd, jsd``."""
        if self.type is bool:
            return "true or false"
        if self.type is str:
            return f"one of: {', '.join(self.choices)}"
        if self.type is list:
            return (
                f"{', '.join(self.choices)}, or a list of teacher layer numbers (1 = first layer), "
                "e.g. [2, 4]"
            )
        if self.min is not None and self.max is not None:
            left = "[" if self.min_inclusive else "("
            right = "]" if self.max_inclusive else ")"
            return f"in {left}{_fmt(self.min)}, {_fmt(self.max)}{right}"
        if self.min is not None:
            return f"{'>=' if self.min_inclusive else '>'} {_fmt(self.min)}"
        if self.max is not None:
            return f"{'<=' if self.max_inclusive else '<'} {_fmt(self.max)}"
        return "any number" if self.type is float else "any whole number"

    def default_text(self) -> str:
        """The default as a user would type it (``4``, ``uniform``, ``true``)."""
        return _value_text(self.default)

    def in_range(self, value: float) -> bool:
        if self.min is not None and (value < self.min or (value == self.min and not self.min_inclusive)):
            return False
        if self.max is not None and (value > self.max or (value == self.max and not self.max_inclusive)):
            return False
        return True

    def clean(self, value: Any, term: str) -> Any:
        """``value`` checked and normalised to a plain JSON value of this parameter's type.

        Raises:
            TermParamError: with a message naming the term and the parameter.
        """
        where = f"Parameter '{self.name}' of loss term '{term}'"
        if self.type is bool:
            if not isinstance(value, bool):
                raise TermParamError(f"{where} must be true or false, got {value!r}.", param=self.name)
            return value
        if self.type is str:
            if value not in self.choices:
                raise TermParamError(f"{where} must be {self.range_text()}; got {value!r}.", param=self.name)
            return value
        if self.type is list:
            return self._clean_layer_map(value, where)
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise TermParamError(f"{where} must be a number, got {value!r}.", param=self.name)
        if self.type is int:
            if value != int(value):
                raise TermParamError(f"{where} must be a whole number, got {_fmt(value)}.", param=self.name)
            value = int(value)
        if not self.in_range(value):
            raise TermParamError(f"{where} must be {self.range_text()}, got {_fmt(value)}.", param=self.name)
        return float(value) if self.type is float else value

    def _clean_layer_map(self, value: Any, where: str) -> str | list[int]:
        if isinstance(value, str):
            if value.strip() in self.choices:
                return value.strip()
            items: Any = [v for v in value.replace(" ", "").strip("[]").split(",") if v]
            items = [int(v) if v.isdigit() else v for v in items]
        else:
            items = value
        ok = (
            isinstance(items, list | tuple)
            and items
            and all(isinstance(i, int) and not isinstance(i, bool) and i >= 1 for i in items)
        )
        if not ok:
            raise TermParamError(f"{where} must be {self.range_text()}; got {value!r}.", param=self.name)
        return list(items)


@dataclass(frozen=True)
class TermSpec:
    """A loss term the UI can offer: what it needs and its parameters (the function computing it is bound by
    ``losses.LOSS_TERMS``).

    ``needs`` ⊆ :data:`NEEDS` names the inputs beyond the student logits and labels. ``kind`` says how
    ``methods.combine`` calls ``fn``: ``labels`` as ``fn(student_logits, labels, **params)``; ``logits`` as
    ``fn(student_logits, teacher_logits, mask, **params)``; the other kinds are documented in ``methods``.
    ``check`` validates combinations of parameters (raising :class:`TermParamError`).
    """

    name: str
    title: str
    description: str
    params: Mapping[str, ParamSpec] = field(default_factory=dict)
    needs: frozenset[str] = frozenset()
    kind: str = "logits"
    check: Callable[[Mapping[str, Any]], None] | None = None
    # The function computing the term: None here, set in ``losses.LOSS_TERMS`` (which binds them).
    fn: Callable[..., Any] | None = None

    @property
    def needs_teacher(self) -> bool:
        return bool(self.needs)

    def defaults(self) -> dict[str, Any]:
        return {
            p.name: (list(p.default) if isinstance(p.default, list) else p.default)
            for p in self.params.values()
        }


def _fmt(x: float) -> str:
    return f"{x:g}"


def _value_text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return _fmt(value)
    if isinstance(value, list | tuple):
        return ",".join(str(v) for v in value)
    return str(value)


def _temperature(default: float = 1.0) -> ParamSpec:
    return ParamSpec(
        "temperature",
        default,
        "Softmax temperature τ; higher values soften both distributions.",
        min=0.0,
        min_inclusive=False,
    )


def _layer_map(default: str) -> ParamSpec:
    return ParamSpec(
        "layer_map",
        default,
        "Which teacher layer each student layer learns from.",
        type=list,
        choices=LAYER_MAPS,
    )


def _params(*specs: ParamSpec) -> dict[str, ParamSpec]:
    return {p.name: p for p in specs}


def _check_taid(params: Mapping[str, Any]) -> None:
    if params["t_start"] > params["t_end"]:
        raise TermParamError(
            "Parameter 't_end' of loss term 'taid' must be >= t_start "
            f"({_fmt(params['t_start'])}), got {_fmt(params['t_end'])}.",
            param="t_end",
        )


def _check_topk(params: Mapping[str, Any]) -> None:
    if params["tail"] and params["temperature"] != 1:
        raise TermParamError(
            "Parameter 'temperature' of loss term 'topk' must be 1 when tail is on (the "
            "tail mass is known at temperature 1 only), got "
            f"{_fmt(params['temperature'])}.",
            param="temperature",
        )


_TEACHER_LOGITS = frozenset({"teacher_logits"})

LOSS_TERMS: dict[str, TermSpec] = {
    spec.name: spec
    for spec in (
        TermSpec(
            "ce",
            "Cross-entropy",
            "Cross-entropy with the hard labels (no teacher). Unlabelled rows are skipped.",
            kind="labels",
            params=_params(
                ParamSpec(
                    "label_smoothing",
                    0.0,
                    "Mass spread uniformly over all classes.",
                    min=0.0,
                    max=1.0,
                    max_inclusive=False,
                )
            ),
        ),
        TermSpec(
            "kd",
            "Knowledge distillation (forward KL)",
            "τ²·KL(p_T^τ ‖ p_S^τ) between temperature-softened distributions (Hinton et al. 2015).",
            needs=_TEACHER_LOGITS,
            params=_params(_temperature(4.0)),
        ),
        TermSpec(
            "reverse_kl",
            "Reverse KL",
            "τ²·KL(p_S^τ ‖ p_T^τ), mode-seeking (MiniLLM).",
            needs=_TEACHER_LOGITS,
            params=_params(_temperature()),
        ),
        TermSpec(
            "jsd",
            "Generalized JSD",
            "β·KL(p_T‖M) + (1−β)·KL(p_S‖M) with M = β·p_T + (1−β)·p_S; β=0 is forward KL, β=1 reverse KL "
            "(GKD). Not scaled by τ², like TRL.",
            needs=_TEACHER_LOGITS,
            params=_params(
                ParamSpec("beta", 0.5, "Teacher weight β in the mixture M.", min=0.0, max=1.0),
                _temperature(),
            ),
        ),
        TermSpec(
            "skew_kl",
            "Skew KL",
            "KL(p_T ‖ α·p_T + (1−α)·p_S) (DistiLLM).",
            needs=_TEACHER_LOGITS,
            params=_params(
                ParamSpec(
                    "alpha",
                    0.1,
                    "Skew α: how much teacher is mixed into the student side.",
                    min=0.0,
                    max=1.0,
                    max_inclusive=False,
                )
            ),
        ),
        TermSpec(
            "skew_reverse_kl",
            "Skew reverse KL",
            "KL(p_S ‖ (1−α)·p_T + α·p_S) (DistiLLM).",
            needs=_TEACHER_LOGITS,
            params=_params(
                ParamSpec(
                    "alpha",
                    0.1,
                    "Skew α: how much student is mixed into the teacher side.",
                    min=0.0,
                    max=1.0,
                    max_inclusive=False,
                )
            ),
        ),
        TermSpec(
            "tvd",
            "Total variation distance",
            "½·Σ|p_T^τ − p_S^τ| (DistiLLM / DistillKit).",
            needs=_TEACHER_LOGITS,
            params=_params(_temperature()),
        ),
        TermSpec(
            "taid",
            "TAID (interpolated teacher)",
            "KL(p_t ‖ p_S) with p_t = softmax((1−t)·stopgrad(z_S) + t·z_T); t rises from t_start to t_end, "
            "adaptively or linearly (Shing et al., ICLR 2025).",
            needs=_TEACHER_LOGITS,
            kind="taid",
            check=_check_taid,
            params=_params(
                ParamSpec(
                    "t_start",
                    0.4,
                    "Interpolation t at the start (0 = student, 1 = teacher).",
                    min=0.0,
                    max=1.0,
                    max_inclusive=False,
                ),
                ParamSpec(
                    "t_end", 1.0, "Interpolation t reached at the end.", min=0.0, max=1.0, min_inclusive=False
                ),
                ParamSpec("alpha", 5e-4, "Adaptive step size α for t.", min=0.0, max=1.0),
                ParamSpec("beta", 0.99, "Momentum β of the loss's relative change.", min=0.0, max=1.0),
                ParamSpec(
                    "adaptive",
                    True,
                    "Move t adaptively (on) or linearly with training progress (off).",
                    type=bool,
                ),
            ),
        ),
        TermSpec(
            "topk",
            "Top-k divergence",
            "A divergence restricted to the teacher's top-k tokens, optionally with a bucket for the "
            "remaining mass; works from a sparse teacher cache (Sparse Logit Sampling / DistillKit).",
            needs=frozenset({"teacher_topk"}),
            kind="topk",
            check=_check_topk,
            params=_params(
                ParamSpec("k", 64, "Teacher tokens kept per position.", min=1, type=int),
                ParamSpec(
                    "divergence",
                    "kd",
                    "Divergence on the restricted distributions.",
                    type=str,
                    choices=DIVERGENCES,
                ),
                ParamSpec("tail", True, "Add one bucket holding the mass outside the top k.", type=bool),
                _temperature(),
                ParamSpec("beta", 0.5, "Teacher weight β (jsd only).", min=0.0, max=1.0),
            ),
        ),
        TermSpec(
            "uld",
            "Universal logit distillation",
            "Σ|p_T(i) − p_S(i)| over probabilities sorted in decreasing order (shorter vocab zero-padded): "
            "works across tokenizers (Boizard et al. 2024). From a top-k cache, the teacher's tail enters as "
            "one total.",
            needs=frozenset({"teacher_topk"}),
            kind="uld",
        ),
        TermSpec(
            "hidden_mse",
            "Hidden-state MSE",
            "Σ_l MSE(W_l·h_S^l, h_T^map(l)); W_l is learned when widths differ (FitNets, TinyBERT).",
            needs=frozenset({"hidden_states"}),
            kind="hidden",
            params=_params(_layer_map("uniform")),
        ),
        TermSpec(
            "hidden_cosine",
            "Hidden-state cosine",
            "1 − cos(h_S, h_T) per token on mapped layers (DistilBERT).",
            needs=frozenset({"hidden_states"}),
            kind="hidden",
            params=_params(_layer_map("last")),
        ),
        TermSpec(
            "attention_mse",
            "Attention-score MSE",
            "MSE between the pre-softmax attention scores Q·Kᵀ/√d of mapped layers, over real token pairs; "
            "same number of heads (TinyBERT, Jiao et al. 2020). Transformers models only (read through an "
            "eager attention path).",
            needs=frozenset({"attention_scores"}),
            kind="attention_scores",
            params=_params(_layer_map("uniform")),
        ),
        TermSpec(
            "attention_prob_mse",
            "Attention-probability MSE",
            "MSE between the post-softmax attention probabilities of mapped layers, over real token pairs; "
            "same number of heads (a variant of TinyBERT's loss; recipes saved with attention_mse before it "
            "fitted the scores were moved to this term).",
            needs=frozenset({"attentions"}),
            kind="attentions",
            params=_params(_layer_map("uniform")),
        ),
        TermSpec(
            "attention_kl",
            "Attention and value-relation KL",
            "KL between last-layer self-attention distributions plus KL between value relations "
            "softmax(V·Vᵀ/√d) (MiniLM).",
            needs=frozenset({"attentions", "values"}),
            kind="attention_relations",
        ),
        TermSpec(
            "embedding_mse",
            "Embedding MSE",
            "MSE between the (pooled, projected) student sentence embedding and the teacher's "
            "(Reimers & Gurevych 2020).",
            needs=frozenset({"embeddings"}),
            kind="embeddings",
            params=_params(
                ParamSpec(
                    "pooling",
                    "mean",
                    "How token states become one embedding, when the model does not pool itself.",
                    type=str,
                    choices=POOLINGS,
                )
            ),
        ),
    )
}


# --- validation ---------------------------------------------------------------------------------------------


def validate_term_params(name: str, params: Mapping[str, Any] | None) -> dict[str, Any]:
    """Check a term's parameters against its schema and fill in defaults.

    Args:
        name: a key of ``LOSS_TERMS``.
        params: user-given values, e.g. ``{"temperature": 4}``.
    Returns:
        a complete dict of plain JSON values, e.g. ``{"temperature": 4.0}`` (floats for float parameters).
    Raises:
        ConfigError: unknown term; TermParamError (a ConfigError): unknown parameter, wrong type, out of
        range, not one of the choices, inconsistent combination.
    """
    spec = LOSS_TERMS.get(name)
    if spec is None:
        raise ConfigError(f"Unknown loss term '{name}'. Available terms: {', '.join(LOSS_TERMS)}.")
    cleaned = spec.defaults()
    for key, value in (params or {}).items():
        param = spec.params.get(key)
        if param is None:
            known = ", ".join(spec.params) or "none"
            raise TermParamError(
                f"Loss term '{name}' has no parameter '{key}'. Its parameters: {known}.", param=key
            )
        cleaned[key] = param.clean(value, name)
    if spec.check is not None:
        spec.check(cleaned)
    return cleaned


def validate_term(term: LossTermConfig) -> LossTermConfig:
    """One term: known, finite weight >= 0, valid parameters and schedules (a scheduled parameter must pass
    the term's combination checks at both ends of its schedule).

    Returns:
        the term with complete parameters (floats for float parameters) and normalised schedules.
    """
    weight = term.weight
    if (
        isinstance(weight, bool)
        or not isinstance(weight, int | float)
        or not math.isfinite(weight)
        or weight < 0
    ):
        raise ConfigError(f"The weight of loss term '{term.name}' must be a number >= 0, got {weight!r}.")
    params = validate_term_params(term.name, term.params)
    spec = LOSS_TERMS[term.name]
    schedule = validate_schedule(term.name, term.schedule, spec.params)
    if spec.check is not None:
        for target, sched in schedule.items():
            if target != WEIGHT:
                for end in ("start", "end"):
                    spec.check({**params, target: sched[end]})
    return LossTermConfig(term.name, float(weight), params, schedule)


@dataclass(frozen=True)
class ModelDims:
    """Sizes of the teacher and the student that the cross-checks and learned projections need.

    None means unknown: the checks that need it are skipped. ``sparse_teacher`` says the teacher's outputs
    come from a top-k cache (no dense teacher logits).
    """

    student_vocab_size: int | None = None
    teacher_vocab_size: int | None = None
    student_num_layers: int | None = None
    teacher_num_layers: int | None = None
    student_hidden_size: int | None = None
    teacher_hidden_size: int | None = None
    student_num_heads: int | None = None
    teacher_num_heads: int | None = None
    student_embedding_size: int | None = None  # None: the hidden size
    teacher_embedding_size: int | None = None
    sparse_teacher: bool = False


def validate_terms(terms: Sequence[LossTermConfig], *, dims: ModelDims | None = None) -> list[LossTermConfig]:
    """Validate a whole recipe: at least one term, each known and unique (:func:`validate_term`), and at least
    one weight that is positive at some point of training; given ``dims``, check it fits the models.

    Args:
        terms: the recipe's terms.
        dims: teacher and student sizes; None skips the cross-checks.
    Returns:
        the terms with complete, validated parameters and schedules (see ``schedules.validate_schedule``).
    Raises:
        ConfigError: with a message naming the term and what to change.
    """
    if not terms:
        raise ConfigError("The recipe has no loss terms. Add at least one (e.g. ce).")
    names = [t.name for t in terms]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ConfigError(f"Each loss term may appear once; repeated: {', '.join(duplicates)}.")
    cleaned = [validate_term(term) for term in terms]
    if not any(max_weight(t.weight, t.schedule) > 0 for t in cleaned):
        raise ConfigError("At least one loss term needs a positive weight.")
    if dims is not None:
        for term in cleaned:
            _check_dims(term, LOSS_TERMS[term.name], dims)
    return cleaned


def _check_dims(term: LossTermConfig, spec: TermSpec, dims: ModelDims) -> None:
    name, params = term.name, term.params
    s_vocab, t_vocab = dims.student_vocab_size, dims.teacher_vocab_size
    # topk and uld read a sparse teacher (uld with its tail as one total, see sparse_losses.uld); the others
    # need every teacher probability.
    if spec.kind in ("logits", "taid") and dims.sparse_teacher:
        raise ConfigError(
            f"Loss term '{name}' needs dense teacher logits, but the teacher's outputs come from a top-k "
            "cache. Use the topk or uld term, or the online scheme."
        )
    if spec.kind in ("logits", "taid") or (spec.kind == "topk" and not dims.sparse_teacher):
        if s_vocab is not None and t_vocab is not None and s_vocab != t_vocab:
            raise ConfigError(
                f"Loss term '{name}' compares distributions over the same vocabulary, but the student has "
                f"{s_vocab} and the teacher {t_vocab} entries: tokenizer or label-space mismatch without a "
                "cross-tokenizer method. Use uld (universal logit distillation) instead."
            )
    if spec.kind == "topk":
        known = [v for v in (s_vocab, None if dims.sparse_teacher else t_vocab) if v is not None]
        if known and params["k"] > min(known):
            raise ConfigError(
                f"Loss term 'topk' keeps k={params['k']} tokens, but the vocabulary has only "
                f"{min(known)}. Lower k."
            )
    layer_map = params.get("layer_map")
    if spec.kind in ("hidden", "attentions", "attention_scores") and isinstance(layer_map, list):
        if dims.student_num_layers is not None and len(layer_map) != dims.student_num_layers:
            raise ConfigError(
                f"The layer map of loss term '{name}' has {len(layer_map)} entries but the "
                f"student has {dims.student_num_layers} layers: give one teacher layer per "
                "student layer."
            )
        if dims.teacher_num_layers is not None and max(layer_map) > dims.teacher_num_layers:
            raise ConfigError(
                f"The layer map of loss term '{name}' names teacher layer {max(layer_map)}, "
                f"but the teacher has {dims.teacher_num_layers} layers."
            )
    if spec.kind in ("attentions", "attention_scores", "attention_relations"):
        s_heads, t_heads = dims.student_num_heads, dims.teacher_num_heads
        if s_heads is not None and t_heads is not None and s_heads != t_heads:
            raise ConfigError(
                f"Loss term '{name}' compares attention heads one to one, but the student has "
                f"{s_heads} heads and the teacher {t_heads}. Use hidden_mse instead."
            )
