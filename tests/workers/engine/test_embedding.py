"""Embedding runs: students learn a teacher's mean-pooled sentence embeddings; cosine similarity on eval."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from workers.engine.config import RunConfig
from workers.engine.errors import ConfigError
from workers.engine.evaluate import embedding_metrics
from workers.engine.trainer import Callbacks, train

from .conftest import TINY_BERT

STUDENT = {"source": "config", "params": {**TINY_BERT, "hidden_size": 16, "num_hidden_layers": 1}}
TEACHER = {"source": "config", "params": TINY_BERT}


def _embedding_run(output_dir: Path, topics_csv: Path, **overrides: Any) -> RunConfig:
    data: dict[str, Any] = {
        "student": STUDENT,
        "teacher": TEACHER,
        "task": "embedding",
        "dataset": {"source": "hf", "path": str(topics_csv), "text_column": "body", "max_length": 16},
        "terms": [{"name": "embedding_mse"}],
        "scheme": "offline",
        "train": {
            "max_steps": 12,
            "batch_size": 8,
            "lr": 1e-2,
            "log_every": 4,
            "eval_every": 100,
            "save_every": 100,
            "device": "cpu",
        },
        "output_dir": str(output_dir),
        "cache_dir": str(output_dir.parent / "cache"),
    }
    data |= overrides
    return RunConfig.from_dict(data)


def test_embedding_student_gets_closer_to_the_teacher(tmp_path, topics_csv):
    metrics: list[dict[str, float]] = []
    result = train(
        _embedding_run(tmp_path / "offline", topics_csv),
        Callbacks(on_metrics=lambda _s, m: metrics.append(m)),
    )
    losses = [m["embedding_mse"] for m in metrics if "embedding_mse" in m]
    assert losses[-1] < losses[0]
    assert result.task == "embedding"
    assert -1 <= result.student["cosine_to_teacher"] <= 1
    assert metrics[-1] == {"eval/cosine_to_teacher": result.student["cosine_to_teacher"]}
    assert {"params", "latency_ms_p50", "throughput_per_s", "peak_memory_bytes"} <= set(result.student)
    assert {"params", "latency_ms_p50"} <= set(result.teacher)
    assert [(c["split"], c["stored"]["kind"]) for c in result.teacher_cache] == [
        ("train", "embeddings"),
        ("eval", "embeddings"),
    ]
    # The 16 → 32 projection the embedding term learned is saved beside the student.
    projection = load_file(Path(result.final_dir) / "term_modules.safetensors")
    assert projection["embedding_mse.weight"].shape == (32, 16)

    online = train(_embedding_run(tmp_path / "online", topics_csv, scheme="online"))
    assert online.student["cosine_to_teacher"] == pytest.approx(result.student["cosine_to_teacher"], abs=1e-5)


def test_embedding_runs_have_no_labels(tmp_path, topics_csv):
    with pytest.raises(ConfigError, match="Loss term 'ce' needs labels, but an embedding run has none"):
        train(_embedding_run(tmp_path, topics_csv, terms=[{"name": "ce"}, {"name": "embedding_mse"}]))


def test_cosine_to_teacher_on_a_hand_case():
    student = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    teacher = torch.tensor([[2.0, 0.0], [1.0, 0.0]])
    assert embedding_metrics(student, teacher) == {"cosine_to_teacher": pytest.approx(0.5)}
    assert embedding_metrics(student, None) == {}
