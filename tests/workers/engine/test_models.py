"""Building, loading and saving models: builtin nets, tiny BERTs from configs, hub ids, saved runs; causal LMs
and sentence embedders."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from workers.engine import models as models_module
from workers.engine.batching import Batcher
from workers.engine.config import DatasetConfig, ModelConfig
from workers.engine.data import load_dataset
from workers.engine.embedder import SentenceEmbedder, mean_pool
from workers.engine.errors import ConfigError, ModelLoadError
from workers.engine.models import (
    _ensure_pad_token,
    count_non_embedding_parameters,
    count_parameters,
    forward_logits,
    load_model,
    model_dims,
    pair_dims,
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
    student = load_model(
        ModelConfig(source="config", params={**TINY_BERT, "num_hidden_layers": 1}),
        dataset=topics,
        role="student",
    )
    assert teacher.tokenizer.get_vocab() == student.tokenizer.get_vocab()


def test_config_without_model_type_is_rejected(topics):
    with pytest.raises(ModelLoadError, match="needs a 'model_type'"):
        load_model(ModelConfig(source="config", params={"hidden_size": 32}), dataset=topics, role="student")


def test_unknown_hub_id_fails_fast_with_a_model_load_error(topics):
    started = time.perf_counter()
    with pytest.raises(
        ModelLoadError, match="Teacher model 'no-such-org/no-such-model-xyz' could not be loaded: "
    ):
        load_model(
            ModelConfig(source="hf", name="no-such-org/no-such-model-xyz"), dataset=topics, role="teacher"
        )
    assert time.perf_counter() - started < 15


def test_invalid_hub_id_and_missing_run_folder_are_model_load_errors(topics, tmp_path):
    with pytest.raises(ModelLoadError, match="is not a hub id"):
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

    bert = save_model(
        load_model(ModelConfig(source="config", params=TINY_BERT), dataset=topics, role="student"),
        tmp_path / "bert",
    )
    two_topics = tmp_path / "two.csv"
    two_topics.write_text("text,label\n" + "".join(f"row {i},{i % 2}\n" for i in range(20)))
    binary = load_dataset(DatasetConfig(source="hf", path=str(two_topics)))
    with pytest.raises(ModelLoadError, match="has 3 output labels but dataset 'two.csv' has 2"):
        load_model(ModelConfig(source="run", path=str(bert)), dataset=binary, role="teacher")
    with pytest.raises(ModelLoadError, match="configured for 5 labels but dataset 'digits' has 10"):
        load_model(ModelConfig(source="builtin", name="mlp", num_labels=5), dataset=digits, role="student")


# --- tasks: causal LMs and sentence embedders ---------------------------------------------------------------

TINY_LLAMA = {
    "model_type": "llama",
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 500,
    "max_position_embeddings": 64,
}
TINY_GPT2 = {
    "model_type": "gpt2",
    "n_embd": 32,
    "n_layer": 2,
    "n_head": 2,
    "vocab_size": 500,
    "n_positions": 64,
}


@pytest.fixture(scope="module")
def lm_texts(topics_csv):
    return load_dataset(
        DatasetConfig(source="hf", path=str(topics_csv), text_column="body", max_length=32), task="causal_lm"
    )


def test_causal_lm_from_config_has_an_lm_head_and_a_pad_token(lm_texts):
    for params in (TINY_LLAMA, TINY_GPT2):
        loaded = load_model(ModelConfig(source="config", params=params), dataset=lm_texts, role="student")
        assert loaded.task == "causal_lm" and loaded.label_names == []
        assert loaded.model.get_output_embeddings() is not None  # an LM head
        assert loaded.tokenizer.pad_token_id is not None
        assert loaded.model.config.eos_token_id == loaded.tokenizer.eos_token_id < params["vocab_size"]
        batch = Batcher(lm_texts.train, tokenizer=loaded.tokenizer, max_length=16).batch([0, 1])
        logits = forward_logits(loaded.model, batch.inputs)
        assert logits.shape == (*batch.inputs["input_ids"].shape, loaded.model.config.vocab_size)


def test_causal_lm_saved_as_a_run_loads_back_with_identical_logits(lm_texts, tmp_path):
    torch.manual_seed(0)
    original = load_model(
        ModelConfig(source="config", params=TINY_LLAMA), dataset=lm_texts, role="student", task="causal_lm"
    )
    folder = save_model(original, tmp_path / "final")
    reloaded = load_model(
        ModelConfig(source="run", path=str(folder)), dataset=lm_texts, role="teacher", task="causal_lm"
    )
    inputs = Batcher(lm_texts.eval, tokenizer=reloaded.tokenizer, max_length=16).batch([0, 1, 2]).inputs
    original.model.eval()
    reloaded.model.eval()
    assert torch.equal(forward_logits(original.model, inputs), forward_logits(reloaded.model, inputs))
    # The same folder loads as a local "hf" model too, but not for another task.
    assert (
        load_model(
            ModelConfig(source="hf", path=str(folder)), dataset=None, role="teacher", task="causal_lm"
        ).task
        == "causal_lm"
    )
    with pytest.raises(ModelLoadError, match="saved by a causal_lm run and cannot be loaded for a classif"):
        load_model(
            ModelConfig(source="run", path=str(folder)),
            dataset=lm_texts,
            role="teacher",
            task="classification",
        )


def test_a_pad_token_is_added_when_the_tokenizer_has_neither_pad_nor_eos(lm_texts):
    loaded = load_model(ModelConfig(source="config", params=TINY_GPT2), dataset=lm_texts, role="student")
    tokenizer, model = loaded.tokenizer, loaded.model
    tokenizer.pad_token = None
    tokenizer.eos_token = None
    model.config.pad_token_id = None
    _ensure_pad_token(model, tokenizer)
    assert tokenizer.pad_token == "<pad>"
    assert model.get_input_embeddings().num_embeddings >= len(tokenizer) > tokenizer.pad_token_id
    assert model.config.pad_token_id == tokenizer.pad_token_id


def test_embedding_model_returns_mean_pooled_vectors_that_ignore_padding(topics):
    torch.manual_seed(0)
    loaded = load_model(
        ModelConfig(source="config", params=TINY_BERT), dataset=topics, role="student", task="embedding"
    )
    assert isinstance(loaded.model, SentenceEmbedder) and loaded.task == "embedding"
    loaded.model.eval()
    batcher = Batcher(topics.eval, tokenizer=loaded.tokenizer, max_length=32)
    lengths = [len(ids) for ids in batcher.token_ids]
    short = int(np.argmin(lengths))
    long = int(np.argmax(lengths))
    assert lengths[short] < lengths[long]
    with torch.no_grad():
        alone = loaded.model(**batcher.batch([short]).inputs)  # (1, D), no padding
        padded = loaded.model(**batcher.batch([short, long]).inputs)  # (2, D), row 0 padded
        out = loaded.model(**batcher.batch([short, long]).inputs, output_hidden_states=True)
    assert alone.shape == (1, TINY_BERT["hidden_size"]) and padded.shape == (2, TINY_BERT["hidden_size"])
    torch.testing.assert_close(padded[0], alone[0], atol=1e-5, rtol=1e-5)
    assert torch.equal(out.embeddings, padded) and torch.equal(out.logits, padded)
    assert len(out.hidden_states) == TINY_BERT["num_hidden_layers"] + 1
    # By hand: the masked mean of the last hidden state.
    hidden, mask = out.last_hidden_state, batcher.batch([short, long]).inputs["attention_mask"]
    expected = (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
    torch.testing.assert_close(padded, expected)
    assert torch.equal(mean_pool(torch.ones(1, 3, 2), torch.zeros(1, 3)), torch.zeros(1, 2))


def test_embedding_model_saved_as_a_run_keeps_its_pooling(topics, tmp_path):
    loaded = load_model(
        ModelConfig(source="config", params={**TINY_BERT, "normalize": True}),
        dataset=topics,
        role="student",
        task="embedding",
    )
    assert loaded.model.normalize
    folder = save_model(loaded, tmp_path / "final")
    reloaded = load_model(
        ModelConfig(source="run", path=str(folder)), dataset=topics, role="teacher", task="embedding"
    )
    assert reloaded.model.normalize
    inputs = Batcher(topics.eval, tokenizer=reloaded.tokenizer, max_length=32).batch([0, 1]).inputs
    loaded.model.eval()
    reloaded.model.eval()
    with torch.no_grad():
        embeddings = reloaded.model(**inputs)
        assert torch.equal(loaded.model(**inputs), embeddings)
    torch.testing.assert_close(embeddings.norm(dim=-1), torch.ones(2))


def test_builtin_nets_are_classifiers_only(digits):
    with pytest.raises(ModelLoadError, match="builtin nets are classifiers only"):
        load_model(_mlp([8]), dataset=None, role="student", task="causal_lm")
    with pytest.raises(ConfigError, match="Unknown task 'translation'"):
        load_model(_mlp([8]), dataset=digits, role="student", task="translation")


def test_trust_remote_code_is_passed_only_when_the_config_asks(topics, tmp_path, monkeypatch):
    bert = load_model(ModelConfig(source="config", params=TINY_BERT), dataset=topics, role="student")
    folder = save_model(bert, tmp_path / "bert")
    calls: list[dict] = []
    real = models_module._from_pretrained

    def spy(loader, source, what, **kwargs):
        calls.append(kwargs)
        return real(loader, source, what, **kwargs)

    monkeypatch.setattr(models_module, "_from_pretrained", spy)
    load_model(ModelConfig(source="hf", path=str(folder)), dataset=topics, role="teacher")
    load_model(ModelConfig(source="hf", path=str(folder)), dataset=topics, role="teacher", task="embedding")
    assert calls and all("trust_remote_code" not in kwargs for kwargs in calls)
    calls.clear()
    load_model(
        ModelConfig(source="hf", path=str(folder), trust_remote_code=True), dataset=topics, role="teacher"
    )
    assert calls and all(kwargs.get("trust_remote_code") is True for kwargs in calls)


def test_model_dims_describe_each_model_and_pair_into_method_dims(digits, topics, lm_texts):
    bert = load_model(ModelConfig(source="config", params=TINY_BERT), dataset=topics, role="teacher")
    assert model_dims(bert) == {"vocab_size": 3, "num_layers": 2, "hidden_size": 32, "num_heads": 2}
    llama = load_model(ModelConfig(source="config", params=TINY_LLAMA), dataset=lm_texts, role="student")
    assert model_dims(llama) == {"vocab_size": 500, "num_layers": 2, "hidden_size": 32, "num_heads": 4}
    mlp = load_model(_mlp([16, 8]), dataset=digits, role="student")
    assert model_dims(mlp) == {"vocab_size": 10, "num_layers": 2, "hidden_size": 8, "num_heads": None}
    embedder = load_model(
        ModelConfig(source="config", params=TINY_BERT), dataset=topics, role="student", task="embedding"
    )
    assert model_dims(embedder)["vocab_size"] == 32
    dims = pair_dims(student=llama, teacher=llama)
    assert (dims.student_vocab_size, dims.teacher_num_layers, dims.teacher_num_heads) == (500, 2, 4)
    assert pair_dims(student=mlp).teacher_vocab_size is None
