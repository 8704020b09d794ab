"""Derived students (DistilBERT recipe): layer subsets and narrower widths initialised from the parent."""

from __future__ import annotations

import pytest
import torch

from workers.engine.batching import Batcher
from workers.engine.config import ModelConfig, RunConfig
from workers.engine.derive import derive_from_loaded, resolve_layers, validate_derive_params
from workers.engine.errors import ConfigError, ModelLoadError
from workers.engine.models import count_parameters, forward_logits, load_model, save_model

from .conftest import TINY_BERT

BERT4 = {**TINY_BERT, "num_hidden_layers": 4, "num_attention_heads": 4}
TINY_LLAMA = {
    "model_type": "llama",
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 6,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 500,
    "max_position_embeddings": 64,
}


@pytest.fixture(scope="module")
def bert_parent(topics):
    torch.manual_seed(0)
    return load_model(ModelConfig(source="config", params=BERT4), dataset=topics, role="teacher")


@pytest.fixture(scope="module")
def llama_parent(topics):
    torch.manual_seed(0)
    return load_model(
        ModelConfig(source="config", params=TINY_LLAMA), dataset=topics, role="teacher", task="causal_lm"
    )


def _inputs(topics, tokenizer, rows=range(6)):
    return Batcher(topics.eval, tokenizer=tokenizer, max_length=24).batch(list(rows)).inputs


def _eval_logits(model, inputs):
    model.eval()
    with torch.no_grad():
        return forward_logits(model, inputs)


def test_keeping_every_layer_reproduces_the_parent_exactly(bert_parent, llama_parent, topics):
    for parent in (bert_parent, llama_parent):
        child = derive_from_loaded(parent, {"layers": "all"})
        inputs = _inputs(topics, parent.tokenizer)
        assert torch.equal(_eval_logits(child.model, inputs), _eval_logits(parent.model, inputs))
        assert child.tokenizer is parent.tokenizer
        assert child.spec["derived"]["init"]["fresh"] == 0


def test_every_other_bert_layer_keeps_the_parents_weights_under_new_indices(bert_parent):
    child = derive_from_loaded(bert_parent, {"layers": "every_other"})
    assert child.model.config.num_hidden_layers == 2
    assert child.spec["derived"]["kept_layers"] == [0, 2]
    assert child.label_names == bert_parent.label_names and child.model.config.num_labels == 3
    parent_state, child_state = bert_parent.model.state_dict(), child.model.state_dict()
    for new, old in enumerate([0, 2]):
        for key in ("attention.self.query.weight", "intermediate.dense.weight", "output.LayerNorm.bias"):
            assert torch.equal(
                child_state[f"bert.encoder.layer.{new}.{key}"],
                parent_state[f"bert.encoder.layer.{old}.{key}"],
            )
    for key in ("bert.embeddings.word_embeddings.weight", "bert.pooler.dense.weight", "classifier.weight"):
        assert torch.equal(child_state[key], parent_state[key])
    assert count_parameters(child.model) < count_parameters(bert_parent.model)


def test_narrower_bert_copies_leading_slices_and_whole_heads(bert_parent, topics):
    # Parent: width 32, 4 heads of 8. Child: width 16 → 2 heads of 8 (the head size is kept).
    child = derive_from_loaded(bert_parent, {"layers": [1, 3], "hidden_size": 16, "intermediate_size": 40})
    config = child.model.config
    assert (config.hidden_size, config.num_attention_heads, config.intermediate_size) == (16, 2, 40)
    p, c = bert_parent.model.state_dict(), child.model.state_dict()
    words = "bert.embeddings.word_embeddings.weight"
    assert torch.equal(c[words], p[words][:, :16])
    assert torch.equal(
        c["bert.encoder.layer.0.attention.self.query.weight"],
        p["bert.encoder.layer.1.attention.self.query.weight"][:16, :16],
    )
    assert torch.equal(
        c["bert.encoder.layer.1.intermediate.dense.weight"],
        p["bert.encoder.layer.3.intermediate.dense.weight"][:40, :16],
    )
    assert torch.equal(
        c["bert.encoder.layer.1.output.dense.weight"], p["bert.encoder.layer.3.output.dense.weight"][:16, :40]
    )
    assert torch.equal(
        c["bert.encoder.layer.0.output.LayerNorm.weight"],
        p["bert.encoder.layer.1.output.LayerNorm.weight"][:16],
    )
    assert torch.equal(c["classifier.weight"], p["classifier.weight"][:, :16])
    assert _eval_logits(child.model, _inputs(topics, child.tokenizer)).shape == (6, 3)


def test_narrower_heads_are_sliced_per_head_not_as_one_block(bert_parent):
    # Same 4 heads, head size 8 → 4: each child head takes the first 4 features of the parent's head.
    child = derive_from_loaded(bert_parent, {"layers": "all", "hidden_size": 16, "num_attention_heads": 4})
    p = bert_parent.model.state_dict()["bert.encoder.layer.0.attention.self.key.weight"]  # (32, 32)
    c = child.model.state_dict()["bert.encoder.layer.0.attention.self.key.weight"]  # (16, 16)
    expected = p.view(4, 8, 32)[:, :4, :16].reshape(16, 16)
    assert torch.equal(c, expected)
    po = bert_parent.model.state_dict()["bert.encoder.layer.0.attention.output.dense.weight"]
    co = child.model.state_dict()["bert.encoder.layer.0.attention.output.dense.weight"]
    assert torch.equal(co, po.view(32, 4, 8)[:16, :, :4].reshape(16, 16))


def test_derived_llama_keeps_layers_heads_and_lm_head(llama_parent, topics):
    child = derive_from_loaded(llama_parent, {"layers": "every_third"})
    assert child.task == "causal_lm" and child.spec["derived"]["kept_layers"] == [0, 3]
    p, c = llama_parent.model.state_dict(), child.model.state_dict()
    assert torch.equal(
        c["model.layers.1.self_attn.k_proj.weight"], p["model.layers.3.self_attn.k_proj.weight"]
    )
    assert torch.equal(c["model.layers.1.mlp.down_proj.weight"], p["model.layers.3.mlp.down_proj.weight"])
    assert torch.equal(c["model.norm.weight"], p["model.norm.weight"])
    assert torch.equal(c["lm_head.weight"], p["lm_head.weight"])
    logits = _eval_logits(child.model, _inputs(topics, child.tokenizer, range(2)))
    assert logits.shape[0] == 2 and logits.shape[-1] == child.model.config.vocab_size

    narrow = derive_from_loaded(llama_parent, {"layers": [5], "hidden_size": 16})
    config = narrow.model.config
    # Head size 8 kept: 2 query heads; the 2:1 query/key-value grouping gives 1 key/value head.
    assert (config.num_attention_heads, config.num_key_value_heads, config.head_dim) == (2, 1, 8)
    assert torch.equal(
        narrow.model.state_dict()["model.layers.0.self_attn.q_proj.weight"],
        p["model.layers.5.self_attn.q_proj.weight"][:16, :16],
    )
    assert torch.equal(
        narrow.model.state_dict()["model.layers.0.self_attn.v_proj.weight"],
        p["model.layers.5.self_attn.v_proj.weight"][:8, :16],
    )


def test_derived_source_loads_through_load_model_and_round_trips_as_a_run(bert_parent, topics, tmp_path):
    parent_dir = save_model(bert_parent, tmp_path / "parent")
    cfg = ModelConfig(
        source="derived",
        parent=ModelConfig(source="run", path=str(parent_dir)),
        params={"layers": "every_other"},
    )
    child = load_model(cfg, dataset=topics, role="student")
    assert child.model.config.num_hidden_layers == 2
    assert child.tokenizer.get_vocab() == bert_parent.tokenizer.get_vocab()
    folder = save_model(child, tmp_path / "final")
    reloaded = load_model(ModelConfig(source="run", path=str(folder)), dataset=topics, role="teacher")
    inputs = _inputs(topics, reloaded.tokenizer)
    assert torch.equal(_eval_logits(child.model, inputs), _eval_logits(reloaded.model, inputs))
    # A derived config survives the run config's JSON round trip, parent included.
    run = RunConfig.from_dict(
        {
            "student": {
                "source": "derived",
                "params": {"layers": [0, 2]},
                "parent": {"source": "run", "path": str(parent_dir)},
            },
            "dataset": {"source": "builtin", "name": "bbc-news"},
            "terms": [{"name": "ce"}],
        }
    )
    assert RunConfig.from_json(run.to_json()) == run and run.student.parent.path == str(parent_dir)


def test_derived_embedding_model_stays_a_sentence_embedder(topics):
    parent = load_model(
        ModelConfig(source="config", params=BERT4), dataset=topics, role="teacher", task="embedding"
    )
    child = derive_from_loaded(parent, {"layers": [0, 1, 2, 3]})
    inputs = _inputs(topics, parent.tokenizer)
    assert child.task == "embedding"
    assert torch.equal(_eval_logits(child.model, inputs), _eval_logits(parent.model, inputs))


def test_bad_layer_specs_and_widths_are_clear_errors(bert_parent, topics):
    with pytest.raises(ModelLoadError, match="Layer 4 is out of range: the parent model has 4 layers"):
        derive_from_loaded(bert_parent, {"layers": [0, 4]})
    with pytest.raises(ConfigError, match="hidden_size 20 is not divisible by num_attention_heads 3"):
        derive_from_loaded(bert_parent, {"hidden_size": 20, "num_attention_heads": 3})
    with pytest.raises(ConfigError, match="not a multiple of the parent's head size 8"):
        derive_from_loaded(bert_parent, {"hidden_size": 20})
    with pytest.raises(ConfigError, match="layers must be one of all, every_other, every_third"):
        validate_derive_params({"layers": "half"})
    with pytest.raises(ConfigError, match="Each layer may be kept once"):
        validate_derive_params({"layers": [1, 1]})
    with pytest.raises(ConfigError, match="Unknown derive parameter 'depth'"):
        validate_derive_params({"depth": 2})
    with pytest.raises(ConfigError, match="hidden_size must be a whole number"):
        validate_derive_params({"hidden_size": 0})
    assert resolve_layers([3, 1], 4) == [1, 3] and resolve_layers("every_other", 5) == [0, 2, 4]
    with pytest.raises(ModelLoadError, match="names no parent"):
        load_model(ModelConfig(source="derived", params={"layers": "all"}), dataset=topics, role="student")


def test_builtin_parents_cannot_be_derived_from(digits):
    cfg = ModelConfig(
        source="derived",
        parent=ModelConfig(source="builtin", name="mlp", params={"hidden_sizes": [8]}),
        params={},
    )
    with pytest.raises(ModelLoadError, match="only transformers models can be derived from"):
        load_model(cfg, dataset=digits, role="student")
