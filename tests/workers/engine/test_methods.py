"""The method layer: combine() over TermInputs, needs, schedules, state, modules and the dims cross-checks."""

from __future__ import annotations

import json
import math
from re import escape as re_escape

import pytest
import torch
from torch import nn

from workers.engine import feature_losses, logit_losses, losses, methods, sparse_losses
from workers.engine.config import LossTermConfig
from workers.engine.errors import ConfigError
from workers.engine.methods import TermInputs, TermState, build_term_modules, combine
from workers.engine.terms import NEEDS, ModelDims, validate_term_params
from workers.engine.terms import validate_terms as validate


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _combine(terms, inputs, state=None, dims=None, **kwargs):
    terms = validate(terms)
    return combine(
        terms, inputs, modules=build_term_modules(terms, dims), state=state or TermState(), **kwargs
    )


def _lm_inputs(seed=0, *, vocab=7, teacher_vocab=None, **extra):
    g = _gen(seed)
    student = torch.randn(2, 4, vocab, generator=g).requires_grad_()
    teacher = torch.randn(2, 4, teacher_vocab or vocab, generator=g)
    labels = torch.tensor([[1, 2, -100, 3], [-100, 0, 1, 2]])
    return TermInputs(student, labels, teacher_logits=teacher, **extra)


def test_methods_computes_the_catalogue_that_losses_binds():
    assert methods.LOSS_TERMS is losses.LOSS_TERMS
    assert validate_term_params("kd", {}) == {"temperature": 4.0}
    assert all(spec.needs <= NEEDS for spec in methods.LOSS_TERMS.values())


def test_combine_weights_terms_and_keeps_unweighted_detached_parts():
    g = _gen(1)
    student = torch.randn(4, 5, generator=g).requires_grad_()
    teacher = torch.randn(4, 5, generator=g)
    labels = torch.tensor([0, 1, -100, 3])
    terms = [LossTermConfig("ce", 0.1), LossTermConfig("kd", 0.9, {"temperature": 4.0})]

    out = _combine(terms, TermInputs(student, labels, teacher_logits=teacher))

    ce, kd = logit_losses.ce(student, labels), logit_losses.kd(student, teacher, temperature=4.0)
    assert out.parts["ce"].item() == pytest.approx(ce.item()) and out.parts["kd"].item() == pytest.approx(
        kd.item()
    )
    assert out.total.item() == pytest.approx(0.1 * ce.item() + 0.9 * kd.item(), rel=1e-6)
    assert out.weights == {"ce": 0.1, "kd": 0.9}
    assert out.total.requires_grad and not any(p.requires_grad for p in out.parts.values())


def test_combine_masks_sequence_positions_by_label():
    inputs = _lm_inputs(2)
    out = _combine([LossTermConfig("jsd", 1.0)], inputs)
    mask = inputs.labels != -100
    assert out.total.item() == pytest.approx(
        logit_losses.jsd(inputs.student_logits, inputs.teacher_logits, mask).item()
    )


@pytest.mark.parametrize(
    ("term", "message"),
    [
        ("kd", "Loss term 'kd' needs dense teacher logits"),
        ("topk", "needs the teacher's top-k distribution (from the cache) or dense teacher logits"),
        ("hidden_mse", "needs student and teacher hidden states"),
        (
            "attention_kl",
            "needs student and teacher attention maps and student and teacher last-layer value vectors",
        ),
        ("embedding_mse", "needs student and teacher sentence embeddings"),
    ],
)
def test_combine_names_the_missing_need(term, message):
    with pytest.raises(ConfigError, match=re_escape(message)):
        _combine([LossTermConfig(term)], TermInputs(torch.randn(2, 3), torch.tensor([0, 1])))


def test_combine_feeds_topk_from_the_sparse_cache_or_the_dense_teacher():
    inputs = _lm_inputs(3)
    mask = inputs.labels != -100
    log_p = torch.log_softmax(inputs.teacher_logits, -1)
    values, indices = log_p.topk(5, dim=-1)
    tail = torch.log1p(-values.exp().sum(-1))
    terms = [LossTermConfig("topk", 1.0, {"k": 3})]
    dense = _combine(terms, inputs)
    inputs.teacher_topk, inputs.teacher_logits = methods.TopK(values, indices, tail), None
    sparse = _combine(terms, inputs)
    assert dense.total.item() == pytest.approx(sparse.total.item(), rel=1e-5)
    assert sparse.total.item() == pytest.approx(
        sparse_losses.topk(inputs.student_logits, inputs.teacher_topk, mask, k=3).item(), rel=1e-6
    )


def test_combine_runs_uld_across_vocabulary_sizes_but_dense_terms_refuse():
    inputs = _lm_inputs(4, vocab=7, teacher_vocab=9)
    out = _combine([LossTermConfig("uld")], inputs)
    assert out.total.item() == pytest.approx(
        sparse_losses.uld(inputs.student_logits, inputs.teacher_logits, inputs.labels != -100).item()
    )
    with pytest.raises(ConfigError, match="tokenizer or label-space mismatch.*uld"):
        _combine([LossTermConfig("kd")], inputs)


def test_combine_feature_terms_with_learned_projections():
    g = _gen(5)
    s_hidden = tuple(torch.randn(2, 3, 4, generator=g) for _ in range(3))  # 2 layers, width 4
    t_hidden = tuple(torch.randn(2, 3, 6, generator=g) for _ in range(5))  # 4 layers, width 6
    attention_mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    inputs = TermInputs(
        torch.randn(2, 3, 5),
        torch.zeros(2, 3, dtype=torch.long),
        student_hidden=s_hidden,
        teacher_hidden=t_hidden,
        attention_mask=attention_mask,
    )
    dims = ModelDims(student_hidden_size=4, teacher_hidden_size=6, student_num_layers=2, teacher_num_layers=4)
    terms = validate(
        [
            LossTermConfig("hidden_mse", 1.0),
            LossTermConfig("hidden_cosine", 0.5),
            LossTermConfig("embedding_mse", 2.0),
        ],
        dims=dims,
    )
    modules = build_term_modules(terms, dims)

    assert [type(m) for m in modules["hidden_mse"]] == [nn.Linear, nn.Linear]
    assert len(modules["hidden_cosine"]) == 1 and modules["embedding_mse"].weight.shape == (6, 4)

    out = combine(terms, inputs, modules=modules, state=TermState())
    mask = attention_mask.bool()
    expected = (
        feature_losses.hidden_mse(s_hidden, t_hidden, mask, projections=modules["hidden_mse"])
        + 0.5 * feature_losses.hidden_cosine(s_hidden, t_hidden, mask, projections=modules["hidden_cosine"])
        + 2.0
        * feature_losses.embedding_mse(s_hidden[-1], t_hidden[-1], mask, projection=modules["embedding_mse"])
    )
    assert out.total.item() == pytest.approx(expected.item(), rel=1e-6)
    out.total.backward()
    assert all(p.grad is not None for p in modules.parameters())
    with pytest.raises(ConfigError, match="needs a learned projection"):
        combine(terms, inputs, modules=nn.ModuleDict(), state=TermState())


def test_combine_attention_terms_use_the_attention_mask():
    g = _gen(6)
    attn = tuple(torch.softmax(torch.randn(1, 2, 3, 3, generator=g), -1) for _ in range(2))
    values = tuple(torch.randn(1, 2, 3, 4, generator=g) for _ in range(2))
    other = tuple(torch.softmax(torch.randn(1, 2, 3, 3, generator=g), -1) for _ in range(2))
    mask = torch.tensor([[1, 1, 0]])
    inputs = TermInputs(
        torch.randn(1, 3, 5),
        torch.zeros(1, 3, dtype=torch.long),
        student_attentions=attn,
        teacher_attentions=other,
        student_values=values,
        teacher_values=values,
        attention_mask=mask,
    )
    out = _combine([LossTermConfig("attention_prob_mse"), LossTermConfig("attention_kl")], inputs)
    assert out.parts["attention_prob_mse"].item() == pytest.approx(
        feature_losses.attention_prob_mse(attn, other, mask.bool()).item()
    )
    assert out.parts["attention_kl"].item() == pytest.approx(
        feature_losses.attention_kl(attn[-1], other[-1], values[-1], values[-1], mask.bool()).item()
    )


# --- schedules in combine -----------------------------------------------------------------------------------


def test_combine_applies_weight_and_temperature_schedules_and_reports_the_weight():
    inputs = _lm_inputs(7)
    mask = inputs.labels != -100
    term = LossTermConfig(
        "kd",
        1.0,
        {"temperature": 4.0},
        schedule={
            "weight": {"kind": "linear", "start": 0.0, "end": 1.0},
            "temperature": {"kind": "cosine", "start": 4.0, "end": 1.0},
        },
    )
    for step, weight, tau in [(0, 0.0, 4.0), (5, 0.5, 2.5), (10, 1.0, 1.0), (12, 1.0, 1.0)]:
        inputs.step, inputs.total_steps = step, 10
        out = _combine([term, LossTermConfig("ce", 0.1)], inputs)
        kd = logit_losses.kd(inputs.student_logits, inputs.teacher_logits, mask, temperature=tau)
        assert out.weights["kd"] == pytest.approx(weight)
        assert out.parts["kd"].item() == pytest.approx(kd.item(), rel=1e-5)  # unweighted
        assert out.total.item() == pytest.approx(weight * kd.item() + 0.1 * out.parts["ce"].item(), rel=1e-5)


# --- taid ---------------------------------------------------------------------------------------------------


def test_taid_linear_schedule_moves_t_from_t_start_to_t_end():
    inputs = _lm_inputs(8)
    mask = inputs.labels != -100
    term = LossTermConfig("taid", 1.0, {"adaptive": False, "t_start": 0.2, "t_end": 0.8})
    for step, t in [(0, 0.2), (50, 0.5), (100, 0.8)]:
        inputs.step, inputs.total_steps = step, 100
        state = TermState()
        out = _combine([term], inputs, state=state)
        expected = logit_losses.taid(inputs.student_logits, inputs.teacher_logits, mask, interpolation=t)
        assert out.total.item() == pytest.approx(expected.item(), rel=1e-6)
        assert state.state_dict() == {"taid": {}}  # linear t keeps no state


def _taid_run(state, steps, start=0, seed=9):
    """Run adaptive taid for ``steps`` optimizer steps on fixed logits that drift towards the teacher."""
    term = LossTermConfig("taid", 1.0, {"alpha": 0.05, "beta": 0.5})
    inputs = _lm_inputs(seed)
    teacher = inputs.teacher_logits
    history = []
    for step in range(start, start + steps):
        student = (inputs.student_logits.detach() * (1 - step / 20) + teacher * step / 20).requires_grad_()
        out = _combine(
            [term],
            TermInputs(student, inputs.labels, teacher_logits=teacher, step=step, total_steps=100),
            state=state,
        )
        out.total.backward()
        history.append(float(state.get("taid")["t"]))
    return history


def test_taid_adaptive_t_rises_faster_than_linear_while_the_loss_falls_and_resumes_from_state_dict():
    state = TermState()
    history = _taid_run(state, 6)
    assert history[0] == pytest.approx(0.4)  # the first step only records the loss
    assert all(b > a for a, b in zip(history[1:], history[2:], strict=False))
    assert history[-1] > 0.4 + 0.6 * 5 / 100  # ahead of the linear schedule

    saved = json.loads(json.dumps(state.state_dict()))
    assert set(saved["taid"]) == {"t", "momentum", "prev_loss", "step"}
    resumed = TermState()
    resumed.load_state_dict(saved)
    assert _taid_run(resumed, 3, start=6) == pytest.approx(_taid_run(state, 3, start=6), rel=1e-6)


def test_taid_updates_once_per_optimizer_step_and_never_without_gradients():
    state = TermState()
    inputs = _lm_inputs(10)
    terms = [LossTermConfig("taid", 1.0, {"alpha": 0.5})]
    _combine(terms, inputs, state=state)  # step 0: records the loss
    inputs.step = 1
    _combine(terms, inputs, state=state)
    t1 = float(state.get("taid")["t"])
    _combine(terms, inputs, state=state)  # another micro-batch of step 1
    assert float(state.get("taid")["t"]) == t1
    inputs.step = 2
    with torch.no_grad():
        _combine(terms, inputs, state=state)
    assert float(state.get("taid")["t"]) == t1 and state.get("taid")["step"] == 1


# --- chunking -----------------------------------------------------------------------------------------------


def test_combine_chunks_large_sequence_logits_with_the_same_result(monkeypatch):
    monkeypatch.setattr(methods, "CHUNK_ELEMENTS", 16)
    inputs = _lm_inputs(11)
    assert methods.auto_chunk_size(inputs.student_logits) == 2
    terms = [LossTermConfig(n) for n in ("ce", "kd", "taid", "topk", "uld")]
    terms[3] = LossTermConfig("topk", 1.0, {"k": 3})
    chunked = _combine(terms, inputs)
    plain = _combine(terms, inputs, chunk_size=0)
    for name in plain.parts:
        assert chunked.parts[name].item() == pytest.approx(plain.parts[name].item(), rel=1e-5)
    assert methods.auto_chunk_size(torch.zeros(4, 7)) is None


# --- validation against the models' sizes -------------------------------------------------------------------


def test_term_state_round_trips_through_json():
    state = TermState()
    state.get("taid").update(t=torch.tensor(0.5), momentum=0.01)
    again = TermState()
    again.load_state_dict(json.loads(json.dumps(state.state_dict())))
    assert again.state_dict() == {"taid": {"t": 0.5, "momentum": 0.01}}


@pytest.mark.parametrize(
    ("terms", "dims", "message"),
    [
        (
            [LossTermConfig("kd")],
            ModelDims(student_vocab_size=100, teacher_vocab_size=120),
            "tokenizer or label-space mismatch without a cross-tokenizer method. Use uld",
        ),
        ([LossTermConfig("taid")], ModelDims(student_vocab_size=100, teacher_vocab_size=120), "Use uld"),
        ([LossTermConfig("topk")], ModelDims(student_vocab_size=100, teacher_vocab_size=120), "Use uld"),
        ([LossTermConfig("kd")], ModelDims(sparse_teacher=True), "top-k cache"),
        ([LossTermConfig("taid")], ModelDims(sparse_teacher=True), "top-k cache. Use the topk or uld term"),
        (
            [LossTermConfig("topk", params={"k": 65})],
            ModelDims(student_vocab_size=64, teacher_vocab_size=64),
            "k=65 tokens, but the vocabulary has only 64",
        ),
        (
            [LossTermConfig("topk", params={"k": 65})],
            ModelDims(student_vocab_size=64, sparse_teacher=True),
            "only 64",
        ),
        (
            [LossTermConfig("hidden_mse", params={"layer_map": [1, 2, 3]})],
            ModelDims(student_num_layers=2, teacher_num_layers=6),
            "has 3 entries but the student has 2 layers",
        ),
        (
            [LossTermConfig("attention_mse", params={"layer_map": [2, 8]})],
            ModelDims(student_num_layers=2, teacher_num_layers=6),
            "names teacher layer 8, but the teacher has 6",
        ),
        (
            [LossTermConfig("attention_mse")],
            ModelDims(student_num_heads=4, teacher_num_heads=12),
            "student has 4 heads and the teacher 12",
        ),
        ([LossTermConfig("attention_kl")], ModelDims(student_num_heads=4, teacher_num_heads=12), "4 heads"),
    ],
)
def test_validate_terms_cross_checks_against_the_model_dims(terms, dims, message):
    with pytest.raises(ConfigError, match=re_escape(message)):
        validate(terms, dims=dims)


def test_validate_terms_accepts_what_fits():
    mismatch = ModelDims(student_vocab_size=100, teacher_vocab_size=120)
    assert validate([LossTermConfig("uld"), LossTermConfig("ce")], dims=mismatch)
    assert validate(
        [LossTermConfig("topk", params={"k": 8})],
        dims=ModelDims(student_vocab_size=100, teacher_vocab_size=120, sparse_teacher=True),
    )
    # uld reads the sparse cache too (its tail as one total), across vocabularies as well
    assert validate([LossTermConfig("uld")], dims=ModelDims(sparse_teacher=True))
    assert validate(
        [LossTermConfig("uld"), LossTermConfig("ce")],
        dims=ModelDims(student_vocab_size=100, teacher_vocab_size=120, sparse_teacher=True),
    )
    assert validate(
        [LossTermConfig("hidden_mse", params={"layer_map": [2, 6]})],
        dims=ModelDims(student_num_layers=2, teacher_num_layers=6),
    )
    assert validate([LossTermConfig("kd")]) and validate([LossTermConfig("kd")], dims=ModelDims())


def test_validate_terms_checks_schedules_against_the_param_schema():
    with pytest.raises(ConfigError, match=r"temperature schedule of loss term 'kd': end must be > 0, got 0"):
        validate([LossTermConfig("kd", schedule={"temperature": {"kind": "linear", "start": 4, "end": 0}})])
    with pytest.raises(ConfigError, match="must be 1 when tail is on"):
        validate([LossTermConfig("topk", schedule={"temperature": {"kind": "linear", "start": 1, "end": 2}})])
    with pytest.raises(ConfigError, match="cannot schedule 'k'"):
        validate([LossTermConfig("topk", schedule={"k": {"kind": "linear", "start": 1, "end": 2}})])
    # a weight that starts at 0 still counts as positive when its schedule rises
    cleaned = validate(
        [LossTermConfig("kd", 0.0, schedule={"weight": {"kind": "linear", "start": 0, "end": 1}})]
    )
    assert cleaned[0].schedule == {"weight": {"kind": "linear", "start": 0.0, "end": 1.0}}
    with pytest.raises(ConfigError, match="positive weight"):
        validate([LossTermConfig("kd", 1.0, schedule={"weight": {"kind": "constant", "start": 0}})])


def test_build_term_modules_needs_no_module_for_equal_or_unknown_widths():
    terms = validate([LossTermConfig("hidden_mse"), LossTermConfig("embedding_mse")])
    assert len(build_term_modules(terms, ModelDims(student_hidden_size=8, teacher_hidden_size=8))) == 0
    assert len(build_term_modules(terms, None)) == 0
    with pytest.raises(ConfigError, match="layer count"):
        build_term_modules(terms, ModelDims(student_hidden_size=4, teacher_hidden_size=8))
    explicit = validate(
        [LossTermConfig("hidden_mse", params={"layer_map": [3, 6, 9]}), LossTermConfig("embedding_mse")]
    )
    modules = build_term_modules(
        explicit,
        ModelDims(
            student_hidden_size=4, teacher_hidden_size=8, student_embedding_size=4, teacher_embedding_size=4
        ),
    )
    assert len(modules["hidden_mse"]) == 3 and "embedding_mse" not in modules
    assert not math.isnan(sum(p.sum().item() for p in modules.parameters()))
