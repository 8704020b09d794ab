"""Which recipes can run: the scheme × term × task rules, checked without data or models.

One source of truth for the engine and the web. :func:`planning.plan_run` raises the first problem this module
finds before a run reads any data; the web refuses a recipe that breaks a rule when it is saved (the form and
the API) and reports a recipe × dataset combination that breaks one in pre-flight, with the same messages.
Rules that depend on the models (sizes, tokenizers) stay in :func:`planning.check_with_models`.

Plain data and checks, no torch: the web process imports this module.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from .config import LossTermConfig
from .errors import ConfigError
from .schemes import SCHEMES
from .terms import LOSS_TERMS, ModelDims, validate_terms

# Chained schemes are orchestrated as several runs; each of them trains with the offline scheme.
CHAINED_RUN_SCHEME = "offline"
# Schemes whose teacher outputs come from the teacher-output cache (outputs only: no features).
CACHED_SCHEMES = ("offline", "multi_teacher")
FEATURE_NEEDS = frozenset({"hidden_states", "attentions", "attention_scores", "values"})
# Term kinds that compare output distributions (logits or the top-k cache); embedding models have none.
DISTRIBUTION_KINDS = ("logits", "taid", "topk", "uld")


@dataclass(frozen=True)
class Problem:
    """A rule a recipe breaks. ``field``: the recipe field to fix (``scheme`` or ``terms``)."""

    field: str
    message: str


def run_scheme(scheme: str) -> str:
    """The scheme each run of a recipe trains with: a chained scheme's runs are offline runs."""
    spec = SCHEMES.get(scheme)
    return CHAINED_RUN_SCHEME if spec is not None and spec.chained else scheme


def recipe_problems(
    scheme: str,
    terms: Sequence[LossTermConfig],
    task: str | None = None,
    *,
    several_teachers: bool = True,
) -> list[Problem]:
    """Every scheme × term × task rule ``scheme`` with ``terms`` breaks, in the order the engine checks them.

    Args:
        scheme: the recipe's scheme (a chained scheme is checked as the offline runs it is made of).
        terms: validated terms (``terms.validate_terms``: parameters complete); unknown names are skipped.
        task: the dataset's task; None checks only the rules that hold whatever the task.
        several_teachers: a multi_teacher run has more than one teacher (the web always gives it one more).
    Returns:
        the problems, each with the message the engine raises (empty: the recipe can run on ``task``).
    """
    problems: list[Problem] = []
    spec = SCHEMES.get(scheme)
    if spec is None:
        return problems  # unknown schemes are refused by the scheme's own validation
    if task is not None and task not in spec.tasks:
        problems.append(
            Problem("scheme", f"Scheme '{scheme}' works for {' and '.join(spec.tasks)} runs, not {task}.")
        )
    scheme = run_scheme(scheme)
    known = [t for t in terms if t.name in LOSS_TERMS]
    if scheme == "hard_labels":  # the baseline trains with ce alone (planning.recipe_terms)
        known = [t for t in known if t.name == "ce"] or [LossTermConfig("ce", 1.0, {})]
    kinds = {t.name: LOSS_TERMS[t.name].kind for t in known}
    if task == "embedding":
        label_terms = [t.name for t in known if kinds[t.name] == "labels"]
        if label_terms:
            problems.append(
                Problem(
                    "terms",
                    f"Loss term '{label_terms[0]}' needs labels, but an embedding run has none. Use "
                    "embedding_mse (and an offline, online or multi_teacher scheme).",
                )
            )
        output_terms = [t.name for t in known if kinds[t.name] in DISTRIBUTION_KINDS]
        if output_terms:
            problems.append(
                Problem(
                    "terms",
                    f"Loss term '{output_terms[0]}' compares output distributions, but the models of an "
                    "embedding run output sentence embeddings, not logits. Use embedding_mse.",
                )
            )
    if scheme == "on_policy" and any(t.name == "ce" and t.weight > 0 for t in known):
        problems.append(
            Problem(
                "terms",
                "The on_policy scheme scores student samples with the teacher; they have no ground "
                "truth for ce. Remove ce, or use the online scheme.",
            )
        )
    problems += _cached_scheme_problems(scheme, known, task)
    if scheme == "multi_teacher" and task == "embedding":
        problems.append(
            Problem(
                "scheme",
                "multi_teacher averages the teachers' output distributions; embedding runs have none.",
            )
        )
    if scheme == "multi_teacher" and task == "causal_lm" and several_teachers:
        # The LM cache keeps the top-k of the τ = 1 mixture only; softening it afterwards is not the average
        # of the softened teachers.
        softened = [
            t.name for t in known if t.params.get("temperature", 1.0) != 1 or "temperature" in t.schedule
        ]
        if softened:
            problems.append(
                Problem(
                    "terms",
                    f"Loss term '{softened[0]}' softens the teachers with a temperature other than 1, but "
                    "a causal-LM multi_teacher run caches the top-k of the teachers' average at "
                    "temperature 1 only. Set its temperature to 1 (without a schedule).",
                )
            )
    return problems


def _cached_scheme_problems(scheme: str, terms: Sequence[LossTermConfig], task: str | None) -> list[Problem]:
    """What the teacher-output cache cannot give: features (any task), dense logits of a causal LM."""
    if scheme not in CACHED_SCHEMES:
        return []
    problems: list[Problem] = []
    needs = frozenset().union(*(LOSS_TERMS[t.name].needs for t in terms))
    # Outside embedding runs a sentence embedding is pooled from the last hidden state, on every batch; with
    # the task unknown only the features every task needs are named.
    pooled = task is not None and task != "embedding"
    if pooled and "embeddings" in needs:
        needs |= {"hidden_states"}
    features = needs & FEATURE_NEEDS
    if features:
        term = next(
            t.name
            for t in terms
            if LOSS_TERMS[t.name].needs & features or ("embeddings" in LOSS_TERMS[t.name].needs and pooled)
        )
        problems.append(
            Problem(
                "scheme",
                f"Loss term '{term}' needs the teacher's {', '.join(sorted(features))} on every batch, "
                f"which the {scheme} scheme does not keep (it caches outputs only). Use the online "
                "scheme.",
            )
        )
    if task == "causal_lm" and any(LOSS_TERMS[t.name].needs for t in terms):
        # The LM cache holds the teacher's top-k: the terms' own check against a sparse teacher (the model
        # sizes unknown, so only that one applies) gives the engine's message.
        try:
            validate_terms(terms, dims=ModelDims(sparse_teacher=True))
        except ConfigError as exc:
            problems.append(Problem("terms", str(exc)))
    return problems


def recipe_errors(
    scheme: str, terms: Sequence[LossTermConfig], task: str | None = None, *, several_teachers: bool = True
) -> dict[str, list[str]]:
    """:func:`recipe_problems` by field, as a form or an API body shows them."""
    errors: dict[str, list[str]] = {}
    for problem in recipe_problems(scheme, terms, task, several_teachers=several_teachers):
        errors.setdefault(problem.field, []).append(problem.message)
    return errors


def cross_tokenizer_problem(scheme: str, terms: Sequence[LossTermConfig]) -> str | None:
    """Why a causal-LM recipe cannot run with a teacher that reads the text with another tokenizer, or None.

    Across tokenizers only ``uld`` compares the two models (on the positions where both have read the same
    text) and ``ce`` trains on the data alone; ``seq_kd`` re-tokenises the teacher's text, which only ``ce``
    can score. The checks that need the loaded tokenizers (fast or slow) stay in ``planning``.
    """
    scheme = run_scheme(scheme)
    kinds = [LOSS_TERMS[t.name].kind for t in terms if t.name in LOSS_TERMS]
    if scheme == "hard_labels":
        return None
    if scheme == "seq_kd":
        if any(kind != "labels" for kind in kinds):
            return (
                "seq_kd across tokenizers trains the student on the teacher's text, re-tokenised "
                "with its own tokenizer; only ce can score it. Remove the other terms."
            )
        return None
    if "uld" not in kinds:
        return (
            "The teacher and the student use different tokenizers, so their token positions "
            "do not line up. Give them the same tokenizer, use the uld (cross-tokenizer) term, or "
            "use seq_kd (trains on the teacher's text)."
        )
    others = [
        t.name for t in terms if t.name in LOSS_TERMS and LOSS_TERMS[t.name].kind not in ("uld", "labels")
    ]
    if others:
        return (
            f"The teacher and the student use different tokenizers, so only the uld term can compare "
            "them (on the positions where both have read the same text); "
            f"{', '.join(others)} compare{'s' if len(others) == 1 else ''} token positions one to "
            f"one. Remove {'it' if len(others) == 1 else 'them'}, or give both models the same "
            "tokenizer."
        )
    return None
