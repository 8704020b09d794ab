"""A run of the web app whose teacher is served by a real vLLM server (issue 14): registered by server name,
checked in pre-flight, launched, run by the worker's task (``apply``: the task, the engine, the server; no
broker), its teacher-output cache filled from the server and its teacher's metrics recorded."""

from __future__ import annotations

from pathlib import Path
from unittest import mock

import pytest

from experiments.domain import engine_config, preflight
from experiments.models import Recipe, Run
from experiments.services import launch, records
from tests.factories import DatasetSpecFactory, ModelSpecFactory, RecipeFactory
from tests.vllm_server import vllm_python, vllm_server
from tests.workers.engine.test_lm import _SENTENCES
from workers.engine.config import RunConfig
from workers.engine.trainer import train
from workers.tasks import run_distillation

pytestmark = pytest.mark.django_db

DISPATCH = "workers.tasks.run_distillation.apply_async"
# head_dim 64 (vLLM's CPU attention has no kernel for 16); the student is smaller, with the same tokenizer
# (fitted on the same train texts, whatever the model's size).
TEACHER_LLAMA = {"model_type": "llama", "hidden_size": 128, "num_hidden_layers": 2, "num_attention_heads": 2,
                 "num_key_value_heads": 2, "intermediate_size": 128, "vocab_size": 160,
                 "max_position_embeddings": 128}
STUDENT_LLAMA = {**TEACHER_LLAMA, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1}


@pytest.fixture(scope="module")
def served_teacher(tmp_path_factory: pytest.TempPathFactory):
    """A corpus file, and a Llama trained on it by the engine (the dataset config a run of the web app gives
    the engine) served by vLLM; yields (corpus, base URL)."""
    vllm_python()
    root = tmp_path_factory.mktemp("served-run")
    corpus = root / "data" / "corpus.txt"
    corpus.parent.mkdir()
    corpus.write_text("\n".join(f"{s} {i % 9}" for i in range(12) for s in _SENTENCES) + "\n")
    dataset = {"source": "hf", "path": str(corpus), "max_length": 24, "eval_fraction": 0.2, "split_seed": 0}
    result = train(RunConfig.from_dict({
        "student": {"source": "config", "params": TEACHER_LLAMA}, "task": "causal_lm", "dataset": dataset,
        "terms": [{"name": "ce"}], "scheme": "hard_labels", "output_dir": str(root / "teacher"),
        "train": {"max_steps": 30, "batch_size": 8, "lr": 1e-2, "device": "cpu", "eval_every": 100,
                  "save_every": 100},
    }))
    with vllm_server(Path(result.final_dir), root / "vllm.log", max_model_len=128) as url:
        yield corpus, url


def test_a_run_with_a_served_teacher_fills_its_cache_from_the_server(team, user, settings, served_teacher):
    corpus, url = served_teacher
    settings.TEACHER_SERVERS = {"vllm": url}
    settings.DATASET_ROOTS = [corpus.parent]
    dataset = DatasetSpecFactory(team=team, name="sentences", source="hf", builtin_name="",
                                 local_path=str(corpus), task="causal_lm", num_labels=0, label_names=[],
                                 max_length=24, splits={})
    assert engine_config.dataset_config(dataset)["path"] == str(corpus)
    teacher = records.model_spec_create(team=team, created_by=user, name="served", source="server",
                                        task="causal_lm", hub_id="teacher", config={"server": "vllm"})
    student = ModelSpecFactory(team=team, name="student", source="config", builtin_arch="", task="causal_lm",
                               num_labels=0, config=STUDENT_LLAMA)
    recipe = RecipeFactory(team=team, name="topk", scheme=Recipe.Scheme.OFFLINE,
                           terms=[{"name": "topk", "weight": 1.0, "params": {"k": 16}}])
    check = preflight.check_served_teachers(dataset=dataset, teacher=teacher, students=[student])
    assert check.level == "ok" and "serves 'teacher'" in check.summary

    with mock.patch(DISPATCH):
        experiment = launch.experiment_create(
            team=team, created_by=user, name="served", dataset=dataset, teacher=teacher, students=[student],
            recipes=[recipe], seeds=[0], train={"max_steps": 8, "batch_size": 8, "eval_every": 100,
                                                 "save_every": 100, "log_every": 2},
        )
    run = experiment.runs.get(is_baseline=False)
    assert run.config["teacher"] == {**run.config["teacher"], "source": "server", "name": "teacher",
                                     "params": {"server": "vllm"}}
    assert url not in str(run.config)
    run_distillation.apply(args=(run.id,))
    run.refresh_from_db()

    assert run.status == Run.Status.SUCCEEDED, run.error
    assert run.metric_points.filter(name="loss").exists()
    assert run.result["teacher"]["perplexity"] > 1
    assert {u["split"] for u in run.result["teacher_cache"]} >= {"train", "eval"}
    assert url not in str(run.result) and url not in run.error
