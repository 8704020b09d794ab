"""Building, loading and saving models: builtin nets, tiny BERTs from configs, hub ids, saved runs."""

from __future__ import annotations

import time

import pytest
import torch

from workers.engine.config import DatasetConfig, ModelConfig
from workers.engine.data import Batcher, load_dataset
from workers.engine.errors import ConfigError, ModelLoadError
from workers.engine.models import (
    count_non_embedding_parameters,
    count_parameters,
    forward_logits,
    load_model,
    save_model,
)

from .conftest import TINY_BERT


def _mlp(hidden_sizes, **params) -> ModelConfig:
    return ModelConfig(source="builtin", name="mlp", params={"hidden_sizes": hidden_sizes, **params})


def test_builtin_mlp_reads_features_and_outputs_one_logit_per_class(digits):
    loaded = load_model(_mlp([16, 8]), dataset=digits, role="student")
    assert loaded.kind == "builtin" and loaded.tokenizer is None
    assert count_parameters(loaded.model) == (64 * 16 + 16) + (16 * 8 + 8) + (8 * 10 + 10)
    batch = Batcher(digits.train).batch([0, 1, 2])
    assert forward_logits(loaded.model, batch.inputs).shape == (3, 10)


def test_builtin_mlp_rejects_bad_parameters_and_text_data(digits, topics):
    with pytest.raises(ConfigError, match="hidden_sizes must be a list of integers"):
        load_model(_mlp([16, "wide"]), dataset=digits, role="student")
    with pytest.raises(ConfigError, match="has no parameter 'depth'"):
        load_model(_mlp([16], depth=3), dataset=digits, role="student")
    with pytest.raises(ModelLoadError, match="needs text|is text"):
        load_model(_mlp([16]), dataset=topics, role="student")


def test_tiny_bert_from_config_gets_a_fitted_tokenizer(topics):
    loaded = load_model(ModelConfig(source="config", params=TINY_BERT), dataset=topics, role="student")
    assert loaded.kind == "transformers"
    assert loaded.model.config.num_labels == 3
    assert loaded.model.config.id2label == {0: "money", 1: "sport", 2: "tech"}
    assert len(loaded.tokenizer) <= TINY_BERT["vocab_size"]
    batch = Batcher(topics.train, tokenizer=loaded.tokenizer, max_length=16).batch([0, 1])
    assert forward_logits(loaded.model, batch.inputs).shape == (2, 3)
    assert 0 < count_non_embedding_parameters(loaded.model) < count_parameters(loaded.model)


def test_teacher_and_student_built_the_same_way_get_identical_tokenizers(topics):
    teacher = load_model(ModelConfig(source="config", params=TINY_BERT), dataset=topics, role="teacher")
    student = load_model(ModelConfig(source="config", params={**TINY_BERT, "num_hidden_layers": 1}),
                         dataset=topics, role="student")
    assert teacher.tokenizer.get_vocab() == student.tokenizer.get_vocab()


def test_config_without_model_type_is_rejected(topics):
    with pytest.raises(ModelLoadError, match="needs a 'model_type'"):
        load_model(ModelConfig(source="config", params={"hidden_size": 32}), dataset=topics, role="student")


def test_unknown_hub_id_fails_fast_with_a_model_load_error(topics):
    started = time.perf_counter()
    with pytest.raises(ModelLoadError, match="Teacher model 'no-such-org/no-such-model-xyz' could not be loaded: "):
        load_model(ModelConfig(source="hf", name="no-such-org/no-such-model-xyz"), dataset=topics, role="teacher")
    assert time.perf_counter() - started < 15


def test_invalid_hub_id_and_missing_run_folder_are_model_load_errors(topics, tmp_path):
    with pytest.raises(ModelLoadError, match="neither a local folder nor a valid hub id"):
        load_model(ModelConfig(source="hf", name="not//valid id"), dataset=topics, role="student")
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model(ModelConfig(source="run", path=str(tmp_path / "missing")), dataset=topics, role="student")


def test_saved_mlp_loads_back_as_a_run_source_with_identical_logits(digits, tmp_path):
    torch.manual_seed(0)
    original = load_model(_mlp([16], dropout=0.1), dataset=digits, role="student")
    folder = save_model(original, tmp_path / "final")
    assert {p.name for p in folder.iterdir()} == {"model.safetensors", "distillweb_model.json"}

    reloaded = load_model(ModelConfig(source="run", path=str(folder)), dataset=digits, role="teacher")
    inputs = Batcher(digits.eval).batch(range(20)).inputs
    original.model.eval()
    reloaded.model.eval()
    assert torch.equal(forward_logits(original.model, inputs), forward_logits(reloaded.model, inputs))


def test_saved_tiny_bert_loads_back_as_a_run_source_with_identical_logits(topics, tmp_path):
    original = load_model(ModelConfig(source="config", params=TINY_BERT), dataset=topics, role="student")
    folder = save_model(original, tmp_path / "final")
    reloaded = load_model(ModelConfig(source="run", path=str(folder)), dataset=topics, role="teacher")

    assert reloaded.tokenizer.get_vocab() == original.tokenizer.get_vocab()
    inputs = Batcher(topics.eval, tokenizer=reloaded.tokenizer, max_length=32).batch(range(5)).inputs
    original.model.eval()
    reloaded.model.eval()
    assert torch.equal(forward_logits(original.model, inputs), forward_logits(reloaded.model, inputs))


def test_label_count_mismatch_names_both_numbers(digits, topics, tmp_path):
    folder = save_model(load_model(_mlp([8]), dataset=digits, role="student"), tmp_path / "digits")
    iris = load_dataset(DatasetConfig(source="builtin", name="iris"))
    with pytest.raises(ModelLoadError, match="has 10 output labels but dataset 'iris' has 3"):
        load_model(ModelConfig(source="run", path=str(folder)), dataset=iris, role="teacher")

    bert = save_model(load_model(ModelConfig(source="config", params=TINY_BERT), dataset=topics, role="student"),
                      tmp_path / "bert")
    two_topics = tmp_path / "two.csv"
    two_topics.write_text("text,label\n" + "".join(f"row {i},{i % 2}\n" for i in range(20)))
    binary = load_dataset(DatasetConfig(source="hf", path=str(two_topics)))
    with pytest.raises(ModelLoadError, match="has 3 output labels but dataset 'two.csv' has 2"):
        load_model(ModelConfig(source="run", path=str(bert)), dataset=binary, role="teacher")
    with pytest.raises(ModelLoadError, match="configured for 5 labels but dataset 'digits' has 10"):
        load_model(ModelConfig(source="builtin", name="mlp", num_labels=5), dataset=digits, role="student")
