"""attention_mse fits TinyBERT's pre-softmax attention scores; attention_prob_mse keeps the post-softmax
maps."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from workers.engine import feature_losses, losses, methods
from workers.engine.attention import capture_scores, use_scores_attention
from workers.engine.config import LossTermConfig, RunConfig
from workers.engine.errors import ConfigError
from workers.engine.evaluate import forward_outputs
from workers.engine.methods import TermInputs, TermState
from workers.engine.terms import validate_terms
from workers.engine.trainer import Callbacks, train

from .conftest import TINY_BERT

MASK = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])


def _models():
    from transformers import (
        BertConfig,
        BertForSequenceClassification,
        DistilBertConfig,
        DistilBertForSequenceClassification,
        GPT2Config,
        GPT2LMHeadModel,
        LlamaConfig,
        LlamaForCausalLM,
    )

    return {
        "bert": lambda: BertForSequenceClassification(
            BertConfig(
                hidden_size=32,
                num_hidden_layers=2,
                num_attention_heads=2,
                intermediate_size=64,
                vocab_size=100,
            )
        ),
        "distilbert": lambda: DistilBertForSequenceClassification(
            DistilBertConfig(dim=32, n_layers=2, n_heads=2, hidden_dim=64, vocab_size=100)
        ),
        "gpt2": lambda: GPT2LMHeadModel(
            GPT2Config(
                n_embd=32, n_layer=2, n_head=2, vocab_size=100, n_positions=32, bos_token_id=0, eos_token_id=0
            )
        ),
        "llama": lambda: LlamaForCausalLM(
            LlamaConfig(
                hidden_size=32,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=2,
                intermediate_size=64,
                vocab_size=100,
            )
        ),
    }


def test_attention_mse_matches_a_float64_reference_over_real_pairs():
    g = torch.Generator().manual_seed(3)
    s = tuple(torch.randn(2, 2, 5, 5, generator=g) * 4 for _ in range(2))
    t = tuple(torch.randn(2, 2, 5, 5, generator=g) * 4 for _ in range(4))
    m = MASK.bool().numpy()
    pairs = np.broadcast_to(m[:, None, :, None] & m[:, None, None, :], (2, 2, 5, 5))
    # uniform map of 2 student layers onto 4 teacher layers: 1→2, 2→4.
    expected = sum(
        ((s[a].double().numpy() - t[b].double().numpy()) ** 2)[pairs].mean() for a, b in ((0, 1), (1, 3))
    )
    assert feature_losses.attention_mse(s, t, MASK.bool()).item() == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("arch", ["bert", "distilbert", "gpt2", "llama"])
def test_the_scores_path_changes_no_output_and_records_q_k_scores(arch):
    torch.manual_seed(0)
    model = _models()[arch]().eval()
    eager = _models()[arch]().eval()
    eager.load_state_dict(model.state_dict())
    eager.set_attn_implementation("eager")
    use_scores_attention(model)
    ids = torch.randint(1, 100, (2, 5))
    inputs = {"input_ids": ids, "attention_mask": MASK}
    with torch.no_grad():
        out = forward_outputs(model, inputs, attentions=True, scores=True)
        ref = eager(**inputs, output_attentions=True)
    assert torch.allclose(out.logits, ref.logits, atol=1e-5)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(out.attentions, ref.attentions, strict=True))
    assert len(out.scores) == 2 and out.scores[0].shape[-2:] == (5, 5)
    # Each map is the softmax of its scores over the keys the model may read (real and, for causal models,
    # earlier tokens).
    for scores, probs in zip(out.scores, out.attentions, strict=True):
        visible = probs > 0
        again = torch.softmax(scores.masked_fill(~visible, -math.inf), -1).nan_to_num()
        assert torch.allclose(again, probs, atol=1e-6)


def test_bert_scores_are_q_k_over_sqrt_d_in_float64():
    torch.manual_seed(1)
    model = _models()["bert"]().double().eval()
    use_scores_attention(model)
    ids = torch.randint(1, 100, (2, 5))
    with torch.no_grad():
        out = forward_outputs(model, {"input_ids": ids, "attention_mask": MASK}, hidden=True, scores=True)
        attention = model.bert.encoder.layer[0].attention.self
        h = out.hidden[0]  # (B, T, H)
        heads, d = 2, 16
        q = attention.query(h).view(2, 5, heads, d).transpose(1, 2)
        k = attention.key(h).view(2, 5, heads, d).transpose(1, 2)
        expected = q @ k.transpose(-1, -2) / math.sqrt(d)  # (B, h, T, T)
    assert out.scores[0].dtype == torch.float64
    assert torch.allclose(out.scores[0], expected, atol=1e-6, rtol=0)


def test_combine_feeds_scores_to_attention_mse_and_maps_to_attention_prob_mse():
    g = torch.Generator().manual_seed(5)
    scores = [tuple(torch.randn(2, 2, 5, 5, generator=g) for _ in range(2)) for _ in range(2)]
    maps = [tuple(x.softmax(-1) for x in s) for s in scores]
    inputs = TermInputs(
        torch.randn(2, 3),
        torch.zeros(2, dtype=torch.long),
        student_attentions=maps[0],
        teacher_attentions=maps[1],
        student_attention_scores=scores[0],
        teacher_attention_scores=scores[1],
        attention_mask=MASK,
    )
    terms = validate_terms([LossTermConfig("attention_mse"), LossTermConfig("attention_prob_mse")])
    parts = methods.combine(terms, inputs, modules=nn.ModuleDict(), state=TermState()).parts
    assert parts["attention_mse"].item() == pytest.approx(
        feature_losses.attention_mse(scores[0], scores[1], MASK.bool()).item()
    )
    assert parts["attention_prob_mse"].item() == pytest.approx(
        feature_losses.attention_prob_mse(maps[0], maps[1], MASK.bool()).item()
    )
    assert parts["attention_mse"].item() != pytest.approx(parts["attention_prob_mse"].item())
    without = TermInputs(
        torch.randn(2, 3),
        torch.zeros(2, dtype=torch.long),
        student_attentions=maps[0],
        teacher_attentions=maps[1],
        attention_mask=MASK,
    )
    with pytest.raises(ConfigError, match="pre-softmax attention scores"):
        methods.combine(terms[:1], without, modules=nn.ModuleDict(), state=TermState())


def test_the_catalogue_says_which_term_fits_what():
    assert "pre-softmax" in losses.LOSS_TERMS["attention_mse"].description
    assert "post-softmax" in losses.LOSS_TERMS["attention_prob_mse"].description
    assert losses.LOSS_TERMS["attention_mse"].needs == {"attention_scores"}


def test_an_online_bert_run_trains_with_both_attention_terms(tmp_path, topics_csv):
    cfg = RunConfig.from_dict(
        {
            "student": {"source": "config", "params": {**TINY_BERT, "num_hidden_layers": 1}},
            "teacher": {"source": "config", "params": TINY_BERT},
            "dataset": {
                "source": "hf",
                "path": str(topics_csv),
                "text_column": "body",
                "label_column": "topic",
                "max_length": 16,
            },
            "terms": [
                {"name": "ce", "weight": 0.5},
                {"name": "attention_mse", "weight": 0.1},
                {"name": "attention_prob_mse", "weight": 0.1},
            ],
            "scheme": "online",
            "evaluate_teacher": False,
            "train": {"max_steps": 3, "batch_size": 4, "log_every": 1, "eval_every": 100, "device": "cpu"},
            "output_dir": str(tmp_path),
        }
    )
    logged: list[dict[str, float]] = []
    train(cfg, Callbacks(on_metrics=lambda _s, m: logged.append(m)))
    first = logged[0]
    assert all(math.isfinite(m[k]) for m in logged for k in ("attention_mse", "attention_prob_mse") if k in m)
    assert first["attention_mse"] > 0 and first["attention_prob_mse"] > 0
    assert first["attention_mse"] != pytest.approx(first["attention_prob_mse"])


def test_capture_collects_nothing_outside_its_block():
    model = _models()["bert"]().eval()
    use_scores_attention(model)
    with capture_scores() as inside:
        model(input_ids=torch.ones(1, 3, dtype=torch.long))
    model(input_ids=torch.ones(1, 3, dtype=torch.long))
    assert len(inside) == 2
