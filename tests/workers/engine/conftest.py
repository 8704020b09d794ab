"""Fixtures for engine tests: tiny models and real packaged data, CPU only, no network, no database."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import pytest

from workers.engine.config import DatasetConfig, RunConfig
from workers.engine.data import LoadedDataset, load_dataset

TINY_BERT = {
    "model_type": "bert",
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "intermediate_size": 64,
    "vocab_size": 500,
    "max_position_embeddings": 64,
}

_TOPICS = {
    "sport": [
        "the team won the match",
        "a late goal in the final",
        "the striker scored twice",
        "fans cheered",
    ],
    "tech": [
        "the new phone has a faster chip",
        "software update fixes bugs",
        "a robot learns",
        "cloud servers",
    ],
    "money": ["shares fell on the market", "the bank raised rates", "profits rose this quarter", "tax cuts"],
}


@pytest.fixture(scope="session")
def digits() -> LoadedDataset:
    return load_dataset(DatasetConfig(source="builtin", name="digits"))


@pytest.fixture(scope="session")
def topics_csv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 60-row, 3-topic text classification CSV with string labels."""
    path = tmp_path_factory.mktemp("data") / "topics.csv"
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["id", "body", "topic"])
        row = 0
        for repeat in range(5):
            for topic, sentences in _TOPICS.items():
                for sentence in sentences:
                    writer.writerow([row, f"{sentence} (story {repeat})", topic])
                    row += 1
    return path


@pytest.fixture(scope="session")
def topics(topics_csv: Path) -> LoadedDataset:
    return load_dataset(
        DatasetConfig(
            source="hf", path=str(topics_csv), text_column="body", label_column="topic", max_length=32
        )
    )


def _digits_run(output_dir: Path, **overrides: Any) -> RunConfig:
    """A small digits run: MLP [32] student, hard labels, 30 steps; ``overrides`` replace top-level keys and
    ``train`` entries (``train={...}`` is merged)."""
    data: dict[str, Any] = {
        "student": {"source": "builtin", "name": "mlp", "params": {"hidden_sizes": [32]}},
        "dataset": {"source": "builtin", "name": "digits"},
        "terms": [{"name": "ce"}],
        "scheme": "hard_labels",
        "train": {
            "max_steps": 30,
            "batch_size": 32,
            "lr": 1e-2,
            "log_every": 5,
            "eval_every": 1000,
            "save_every": 1000,
            "seed": 0,
            "device": "cpu",
        },
        "output_dir": str(output_dir),
    }
    data["train"] |= overrides.pop("train", {})
    data |= overrides
    return RunConfig.from_dict(data)


@pytest.fixture
def digits_run():
    """Builder for small digits run configs (see ``_digits_run``)."""
    return _digits_run


@pytest.fixture(scope="session")
def digits_teacher(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The ``final`` folder of a briefly trained MLP [64] teacher on digits."""
    from workers.engine.trainer import train

    out = tmp_path_factory.mktemp("teacher")
    cfg = _digits_run(
        out,
        student={"source": "builtin", "name": "mlp", "params": {"hidden_sizes": [64]}},
        train={"max_steps": 150, "batch_size": 64},
    )
    return Path(train(cfg).final_dir)
