"""The scheme × term × task rules (``recipe_rules``): the engine refuses each before any data is read, with
the message the web shows when a recipe is saved and in pre-flight."""

from __future__ import annotations

from typing import Any

import pytest

from workers.engine import planning, run_setup
from workers.engine.config import LossTermConfig, RunConfig
from workers.engine.errors import ConfigError
from workers.engine.recipe_rules import cross_tokenizer_problem, recipe_errors, recipe_problems, run_scheme
from workers.engine.terms import validate_terms

TINY_GPT = {
    "model_type": "gpt2",
    "n_embd": 16,
    "n_layer": 1,
    "n_head": 2,
    "vocab_size": 64,
    "n_positions": 32,
}
TINY_BERT = {
    "model_type": "bert",
    "vocab_size": 64,
    "hidden_size": 16,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "intermediate_size": 32,
}
MLP = {"source": "builtin", "name": "mlp"}
GPT = {"source": "config", "params": TINY_GPT}
BERT = {"source": "config", "params": TINY_BERT}
DATASETS = {
    "classification": {"source": "builtin", "name": "digits"},
    "causal_lm": {"source": "builtin", "name": "fortunes"},
    "embedding": {"source": "hf", "text_column": "body"},  # the path: a CSV in the test's folder
}
MODELS = {"classification": MLP, "causal_lm": GPT, "embedding": BERT}

# (scheme, terms, task, a part of the message): every refusal recipe_rules owns.
REFUSED = [
    ("offline", [{"name": "hidden_mse"}], "classification", "needs the teacher's hidden_states on every"),
    ("multi_teacher", [{"name": "attention_mse"}], "classification", "multi_teacher scheme does not keep"),
    ("offline", [{"name": "embedding_mse"}], "classification", "'embedding_mse' needs the teacher's"),
    ("offline", [{"name": "ce"}, {"name": "kd"}], "causal_lm", "needs dense teacher logits"),
    ("offline", [{"name": "taid"}], "causal_lm", "'taid' needs dense teacher logits"),
    ("seq_kd", [{"name": "ce"}], "classification", "Scheme 'seq_kd' works for causal_lm runs"),
    ("on_policy", [{"name": "kd"}], "embedding", "Scheme 'on_policy' works for causal_lm runs"),
    ("on_policy", [{"name": "ce"}, {"name": "kd"}], "causal_lm", "no ground truth for ce"),
    ("offline", [{"name": "ce"}, {"name": "embedding_mse"}], "embedding", "'ce' needs labels"),
    ("hard_labels", [{"name": "ce"}], "embedding", "'ce' needs labels"),
    ("online", [{"name": "kd"}], "embedding", "'kd' compares output distributions"),
    ("multi_teacher", [{"name": "embedding_mse"}], "embedding", "embedding runs have none"),
    (
        "multi_teacher",
        [{"name": "topk", "params": {"k": 8, "tail": False, "temperature": 2.0}}],
        "causal_lm",
        "temperature other than 1",
    ),
]

ALLOWED = [
    ("offline", [{"name": "ce"}, {"name": "kd"}], "classification"),
    ("online", [{"name": "hidden_mse"}, {"name": "attention_mse"}], "classification"),
    ("offline", [{"name": "topk", "params": {"k": 8}}], "causal_lm"),
    ("online", [{"name": "kd"}], "causal_lm"),
    ("offline", [{"name": "embedding_mse"}], "embedding"),
    ("online", [{"name": "embedding_mse"}], "classification"),
    ("seq_kd", [{"name": "ce"}], "causal_lm"),
    ("hard_labels", [{"name": "ce"}], "classification"),
    ("self_distillation", [{"name": "kd"}], "classification"),
]


def _terms(raw: list[dict[str, Any]]) -> list[LossTermConfig]:
    return validate_terms([LossTermConfig(t["name"], 1.0, t.get("params", {})) for t in raw])


def _run(tmp_path, scheme: str, terms: list[dict[str, Any]], task: str) -> RunConfig:
    model, dataset = MODELS[task], dict(DATASETS[task])
    if task == "embedding":
        csv = tmp_path / "texts.csv"
        csv.write_text("body\na text\nanother text\n")
        dataset["path"] = str(csv)
    data: dict[str, Any] = {
        "student": model,
        "teacher": model,
        "dataset": dataset,
        "task": task,
        "scheme": run_scheme(scheme),
        "terms": terms,
        "output_dir": str(tmp_path),
    }
    if scheme == "multi_teacher":
        data["extra_teachers"] = [model]
    return RunConfig.from_dict(data)


@pytest.mark.parametrize(("scheme", "terms", "task", "part"), REFUSED)
def test_the_engine_refuses_each_rule_before_any_data_with_the_shared_message(
    tmp_path, monkeypatch, scheme, terms, task, part
):
    monkeypatch.setattr(run_setup, "load_dataset", lambda *a, **k: pytest.fail("loaded data"))
    problems = recipe_problems(scheme, _terms(terms), task)
    assert problems and part in problems[0].message
    with pytest.raises(ConfigError) as refused:
        planning.plan_run(_run(tmp_path, scheme, terms, task))
    assert str(refused.value) == problems[0].message


@pytest.mark.parametrize(("scheme", "terms", "task"), ALLOWED)
def test_recipes_that_can_run_pass_the_rules_and_plan(tmp_path, scheme, terms, task):
    assert recipe_problems(scheme, _terms(terms), task) == []
    if scheme != "self_distillation":  # a chain the experiment builds, of offline runs
        planning.plan_run(_run(tmp_path, scheme, terms, task))


def test_without_a_task_only_the_rules_of_every_task_apply():
    """A recipe names no task: at save, an offline feature term is refused (no task can run it), task-bound
    rules wait for pre-flight."""
    assert recipe_errors("offline", _terms([{"name": "hidden_mse"}])) == {
        "scheme": [
            "Loss term 'hidden_mse' needs the teacher's hidden_states on every batch, which the offline "
            "scheme does not keep (it caches outputs only). Use the online scheme."
        ]
    }
    # Each run of a chained scheme is an offline run: the same rule, in the engine's words.
    assert recipe_errors("teacher_assistant", _terms([{"name": "attention_kl"}]))["scheme"][0].startswith(
        "Loss term 'attention_kl' needs the teacher's attentions, values on every batch, which the offline "
    )
    for scheme, terms in [
        ("seq_kd", [{"name": "ce"}]),
        ("offline", [{"name": "kd"}]),  # dense logits: fine for classification, refused for causal LMs
        ("offline", [{"name": "embedding_mse"}]),  # fine for embedding runs
        ("multi_teacher", [{"name": "kd", "params": {"temperature": 4.0}}]),
    ]:
        assert recipe_problems(scheme, _terms(terms)) == []


def test_a_single_teacher_multi_teacher_lm_run_may_soften():
    terms = _terms([{"name": "topk", "params": {"k": 8, "tail": False, "temperature": 2.0}}])
    assert recipe_problems("multi_teacher", terms, "causal_lm", several_teachers=False) == []


@pytest.mark.parametrize(
    ("scheme", "terms", "part"),
    [
        ("online", [{"name": "kd"}], "their token positions do not line up"),
        ("offline", [{"name": "uld"}, {"name": "topk", "params": {"k": 8}}], "topk compares token positions"),
        ("seq_kd", [{"name": "ce"}, {"name": "kd"}], "only ce can score it"),
        ("online", [{"name": "ce"}, {"name": "uld"}], None),
        ("on_policy", [{"name": "uld"}], None),
        ("seq_kd", [{"name": "ce"}], None),
    ],
)
def test_what_a_teacher_with_another_tokenizer_allows(scheme, terms, part):
    """``planning.check_with_models`` raises exactly this message (test_uld_sparse.py runs it with real
    tokenizers); pre-flight shows it."""
    problem = cross_tokenizer_problem(scheme, _terms(terms))
    assert (problem is None) if part is None else (part in problem)
