"""Tokenizer rules of the pre-flight checks (DESIGN.md §4): the tokenizer a model's record names, whether two
records name the same one, what a mismatch means for a recipe, and the (teacher, student) pairs a recipe
compares. ``preflight.check_tokenizers`` turns them into a check.

Pure apart from the few records a tokenizer identity walks through (a derived model's parent, a run's
student).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from experiments.models import ModelSpec, Recipe

# Term kinds (workers.engine.terms.TermSpec.kind) that compare positions of the token sequences themselves.
TOKEN_ALIGNED_KINDS = frozenset({"hidden", "attentions", "attention_scores", "attention_relations"})


@dataclass(frozen=True)
class TokenizerIdentity:
    """What a model's record says about its tokenizer. ``key`` None: unknown; ``recorded``: named explicitly
    (a tokenizer id, a config's tokenizer), not guessed from the model's own name."""

    key: str | None
    recorded: bool = False
    why_unknown: str = ""

    @property
    def label(self) -> str:
        """The identity as messages show it: a local folder by its name, never by its absolute path."""
        key = self.key or ""
        return key.rstrip("/").rsplit("/", 1)[-1] if key.startswith("/") else key


def tokenizer_identity(model: ModelSpec, *, _depth: int = 0) -> TokenizerIdentity:
    """The tokenizer a model uses, as far as its record tells."""
    if model.tokenizer_id.strip():
        return TokenizerIdentity(model.tokenizer_id.strip(), recorded=True)
    if _depth > 8:
        return TokenizerIdentity(None, why_unknown=f"{model} derives from too many generations of models")
    match model.source:
        case ModelSpec.Source.HF:
            return TokenizerIdentity(model.hub_id or model.local_path)  # the model's own tokenizer
        case ModelSpec.Source.CONFIG:
            named = (model.config or {}).get("tokenizer")
            if isinstance(named, str) and named:
                return TokenizerIdentity(named, recorded=True)
            return TokenizerIdentity(None, why_unknown=f"{model} fits its tokenizer on the training texts")
        case ModelSpec.Source.DERIVED if model.parent is not None:
            return tokenizer_identity(model.parent, _depth=_depth + 1)
        case ModelSpec.Source.RUN if model.source_run_id is not None:
            return tokenizer_identity(model.source_run.student, _depth=_depth + 1)
    return TokenizerIdentity(None, why_unknown=f"{model}'s record names no tokenizer")


def same_tokenizer(a: TokenizerIdentity, b: TokenizerIdentity) -> bool | None:
    """True / False when the records tell, None when they cannot (an unknown or unrecorded identity)."""
    if a.key is None or b.key is None:
        return None
    if a.key == b.key:
        return True
    return False if a.recorded and b.recorded else None


def tokenizer_rule(*, task: str, scheme: str, term_names: Sequence[str]) -> str:
    """What a tokenizer mismatch means for a recipe (the engine's rules, ``workers.engine.trainer``):

    ``free``: each model reads the text with its own tokenizer and nothing compares tokens (classification
    logits, sentence embeddings); ``cross``: a cross-tokenizer method carries a mismatch (``uld``, alone or
    with ``ce``, in a causal-LM run of any scheme but ``seq_kd``; ``seq_kd`` scored by ``ce``); ``aligned``:
    tokens must line up, a mismatch fails the run.
    """
    from workers.engine.terms import LOSS_TERMS

    kinds = {LOSS_TERMS[n].kind for n in term_names if n in LOSS_TERMS}
    if kinds & TOKEN_ALIGNED_KINDS:
        return "aligned"
    if task != "causal_lm":
        return "free"
    if scheme == Recipe.Scheme.SEQ_KD:
        return "cross" if kinds <= {"labels"} else "aligned"
    if "uld" in kinds and kinds <= {"labels", "uld"}:
        return "cross"
    return "aligned"


def distilling_pairs(recipe: Recipe, *, teacher: ModelSpec | None, students: Sequence[ModelSpec],
                     assistant: ModelSpec | None, extra_teachers: Sequence[ModelSpec]
                     ) -> list[tuple[ModelSpec, ModelSpec]]:
    """(teacher, student) pairs whose outputs a recipe compares (chained recipes included)."""
    if recipe.scheme == Recipe.Scheme.HARD_LABELS or not (recipe.needs_teacher
                                                          or recipe.scheme == Recipe.Scheme.SEQ_KD):
        return []
    if recipe.scheme == Recipe.Scheme.TEACHER_ASSISTANT:
        if assistant is None:
            return []
        return ([(teacher, assistant)] if teacher is not None else []) + [(assistant, s) for s in students]
    teachers = [teacher] if teacher is not None else []
    if recipe.scheme == Recipe.Scheme.MULTI_TEACHER:
        teachers += list(extra_teachers)
    return [(t, s) for t in teachers for s in students]
