"""Feature terms (hidden states, attentions, embeddings), tested by their properties and by numpy values."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from workers.engine import feature_losses, losses
from workers.engine.errors import ConfigError
from workers.engine.feature_losses import layer_pairs

B, T, H, HEADS, D = 2, 5, 6, 2, 3
MASK = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _hidden(layers, width=H, seed=0):
    g = _gen(seed)
    return tuple(torch.randn(B, T, width, generator=g) for _ in range(layers + 1))


def _attentions(layers, heads=HEADS, seed=0, mask=MASK):
    g = _gen(seed)
    maps = []
    for _ in range(layers):
        scores = torch.randn(B, heads, T, T, generator=g) * 2
        scores = scores.masked_fill(~mask[:, None, None, :], float("-inf"))  # as HF masks padded keys
        maps.append(scores.softmax(dim=-1))
    return tuple(maps)


def _values(heads=HEADS, d=D, seed=0):
    return torch.randn(B, heads, T, d, generator=_gen(seed))


def _features(name, seed, *, layers=2):
    """(student, teacher) inputs of one feature term, same sizes."""
    if name in ("hidden_mse", "hidden_cosine"):
        return _hidden(layers, seed=seed), _hidden(layers, seed=seed + 100)
    if name == "attention_mse":
        return _attentions(layers, seed=seed), _attentions(layers, seed=seed + 100)
    if name == "attention_kl":
        return (
            (_attentions(1, seed=seed)[0], _values(seed=seed)),
            (_attentions(1, seed=seed + 100)[0], _values(seed=seed + 100)),
        )
    return torch.randn(B, T, H, generator=_gen(seed)), torch.randn(B, T, H, generator=_gen(seed + 100))


def _call(name, student, teacher, mask=MASK):
    fn = losses.LOSS_TERMS[name].fn
    if name == "attention_kl":
        return fn(student[0], teacher[0], student[1], teacher[1], mask)
    return fn(student, teacher, mask, **losses.LOSS_TERMS[name].defaults())


def _leaves(x):
    return [t for t in (x if isinstance(x, tuple) else (x,))]


def _requires_grad(x):
    return (
        tuple(t.clone().requires_grad_() for t in x) if isinstance(x, tuple) else x.clone().requires_grad_()
    )


FEATURE_TERMS = ["hidden_mse", "hidden_cosine", "attention_mse", "attention_kl", "embedding_mse"]


@pytest.mark.parametrize("name", FEATURE_TERMS)
def test_feature_term_is_zero_for_identical_features_and_positive_otherwise(name):
    student, teacher = _features(name, 1)
    same = tuple(t.clone() for t in student) if isinstance(student, tuple) else student.clone()
    assert _call(name, student, same).item() == pytest.approx(0.0, abs=1e-6)
    assert _call(name, student, teacher).item() > 1e-4


@pytest.mark.parametrize("name", FEATURE_TERMS)
def test_feature_term_gives_a_float32_scalar_with_finite_gradients(name):
    student, teacher = _features(name, 2)
    student = _requires_grad(student)
    loss = _call(name, student, teacher)
    loss.backward()
    assert loss.dtype == torch.float32 and loss.dim() == 0 and torch.isfinite(loss)
    grads = [t.grad for t in _leaves(student) if t.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads) and sum(g.abs().sum() for g in grads) > 0


@pytest.mark.parametrize("name", FEATURE_TERMS)
def test_feature_term_of_bf16_inputs_is_float32(name):
    student, teacher = _features(name, 3)
    to_bf16 = lambda x: tuple(t.bfloat16() for t in x) if isinstance(x, tuple) else x.bfloat16()  # noqa: E731
    loss = _call(name, to_bf16(student), to_bf16(teacher))
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(_call(name, student, teacher).item(), rel=5e-2)


def _scramble_padding(x, seed):
    """Replace everything that touches a padded token (as query, key or position) with noise."""
    g = _gen(seed)
    pad = ~MASK

    def noisy(t):
        t = t.clone()
        if t.dim() == 3:  # (B, T, H)
            t[pad] = torch.randn(int(pad.sum()), t.shape[-1], generator=g) * 50
        else:  # (B, heads, T, T) or (B, heads, T, d)
            rows = pad[:, None, :, None].expand_as(t)
            t[rows] = torch.rand(int(rows.sum()), generator=g)
            if t.shape[-1] == T:
                cols = pad[:, None, None, :].expand_as(t)
                t[cols] = torch.rand(int(cols.sum()), generator=g)
        return t

    return tuple(noisy(t) for t in x) if isinstance(x, tuple) else noisy(x)


@pytest.mark.parametrize("name", FEATURE_TERMS)
def test_padded_tokens_change_nothing(name):
    student, teacher = _features(name, 4)
    a, b = _requires_grad(student), _requires_grad(_scramble_padding(student, 5))
    loss_a = _call(name, a, teacher)
    loss_b = _call(name, b, _scramble_padding(teacher, 6))
    loss_a.backward()
    loss_b.backward()
    assert loss_a.item() == pytest.approx(loss_b.item(), rel=1e-5)
    for ga, gb in zip(_leaves(a), _leaves(b), strict=True):
        if ga.grad is None:
            continue
        if ga.dim() == 3:
            assert torch.allclose(ga.grad[MASK], gb.grad[MASK], atol=1e-6) and torch.all(gb.grad[~MASK] == 0)


@pytest.mark.parametrize("name", FEATURE_TERMS)
def test_all_padded_gives_zero_and_a_finite_zero_gradient(name):
    student, teacher = _features(name, 7)
    nothing = torch.zeros(B, T, dtype=torch.bool)
    student = _requires_grad(student)
    loss = _call(name, student, teacher, mask=nothing)
    loss.backward()
    assert loss.item() == 0.0
    assert all(
        t.grad is None or (torch.isfinite(t.grad).all() and torch.all(t.grad == 0)) for t in _leaves(student)
    )


# --- hand-computed values -----------------------------------------------------------------------------------


def test_hidden_mse_hand_value_sums_layers_of_masked_token_means():
    s, t = _hidden(2, seed=8), _hidden(2, seed=9)
    m = MASK.numpy()
    expected = sum(((s[i].numpy() - t[i].numpy()) ** 2).mean(-1)[m].mean() for i in (1, 2))
    assert feature_losses.hidden_mse(s, t, MASK, layer_map="uniform").item() == pytest.approx(
        expected, rel=1e-5
    )


def test_hidden_mse_applies_the_projection_per_layer():
    s, t = _hidden(2, width=4, seed=10), _hidden(2, width=6, seed=11)
    projections = nn.ModuleList(nn.Linear(4, 6) for _ in range(2))
    m = MASK.numpy()
    expected = 0.0
    for i, layer in enumerate((1, 2)):
        w, b = projections[i].weight.detach().numpy(), projections[i].bias.detach().numpy()
        expected += ((s[layer].numpy() @ w.T + b - t[layer].numpy()) ** 2).mean(-1)[m].mean()
    got = feature_losses.hidden_mse(s, t, MASK, projections=projections)
    assert got.item() == pytest.approx(expected, rel=1e-5)
    got.backward()
    assert projections[0].weight.grad is not None
    with pytest.raises(ConfigError, match="needs a learned projection"):
        feature_losses.hidden_mse(s, t, MASK)


def test_hidden_cosine_hand_value():
    s, t = _hidden(1, seed=12), _hidden(1, seed=13)
    a, b = s[1].numpy(), t[1].numpy()
    cos = (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))
    assert feature_losses.hidden_cosine(s, t, MASK).item() == pytest.approx(
        (1 - cos)[MASK.numpy()].mean(), rel=1e-5
    )


def test_attention_mse_hand_value_over_real_query_key_pairs():
    s, t = _attentions(1, seed=14), _attentions(1, seed=15)
    m = MASK.numpy()
    pairs = m[:, None, :, None] & m[:, None, None, :]
    pairs = np.broadcast_to(pairs, s[0].shape)
    expected = ((s[0].numpy() - t[0].numpy()) ** 2)[pairs].mean()
    assert feature_losses.attention_mse(s, t, MASK).item() == pytest.approx(expected, rel=1e-5)


def _np_softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _np_kl(p, q):
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(p > 0, p * (np.log(p) - np.log(q)), 0.0).sum(-1)


def test_attention_kl_hand_value_is_attention_kl_plus_value_relation_kl():
    a_s, a_t = _attentions(1, seed=16)[0].numpy(), _attentions(1, seed=17)[0].numpy()
    v_s, v_t = _values(d=3, seed=18).numpy(), _values(d=5, seed=19).numpy()  # head widths may differ
    m = MASK.numpy()
    keys = m[:, None, None, :]

    def relation(v):
        scores = v @ np.swapaxes(v, -1, -2) / np.sqrt(v.shape[-1])
        return _np_softmax(np.where(keys, scores, -1e30))

    per_row = _np_kl(a_t, a_s) + _np_kl(relation(v_t), relation(v_s))  # (B, heads, T)
    rows = np.broadcast_to(m[:, None, :], per_row.shape)
    got = feature_losses.attention_kl(
        torch.tensor(a_s), torch.tensor(a_t), torch.tensor(v_s), torch.tensor(v_t), MASK
    )
    assert got.item() == pytest.approx(per_row[rows].mean(), rel=1e-5)


def test_attention_kl_needs_the_same_head_count():
    with pytest.raises(ConfigError, match="same number of heads"):
        feature_losses.attention_kl(
            _attentions(1, heads=2)[0], _attentions(1, heads=3)[0], _values(2), _values(3)
        )


@pytest.mark.parametrize("pooling", ["mean", "cls", "last"])
def test_embedding_mse_hand_value_with_pooling(pooling):
    s, t = torch.randn(B, T, H, generator=_gen(20)), torch.randn(B, T, H, generator=_gen(21))
    m = MASK.numpy()

    def pooled(x):
        x = x.numpy()
        if pooling == "mean":
            return (x * m[..., None]).sum(1) / m.sum(1, keepdims=True)
        if pooling == "cls":
            return x[:, 0]
        return x[np.arange(B), m.sum(1) - 1]

    expected = ((pooled(s) - pooled(t)) ** 2).mean()
    assert feature_losses.embedding_mse(s, t, MASK, pooling=pooling).item() == pytest.approx(
        expected, rel=1e-5
    )


def test_embedding_mse_on_pooled_embeddings_with_a_projection():
    e_s, e_t = torch.randn(4, 3, generator=_gen(22)), torch.randn(4, 5, generator=_gen(23))
    projection = nn.Linear(3, 5)
    expected = (projection(e_s) - e_t).pow(2).mean()
    assert feature_losses.embedding_mse(e_s, e_t, projection=projection).item() == pytest.approx(
        expected.item(), rel=1e-6
    )
    assert feature_losses.embedding_mse(e_t, e_t.clone()).item() == 0.0
    with pytest.raises(ConfigError, match="needs a learned projection"):
        feature_losses.embedding_mse(e_s, e_t)


# --- layer maps ---------------------------------------------------------------------------------------------


def test_layer_pairs_uniform_last_and_explicit():
    assert layer_pairs("uniform", 4, 12) == [(1, 3), (2, 6), (3, 9), (4, 12)]
    assert layer_pairs("uniform", 2, 3) == [(1, 2), (2, 3)]
    assert layer_pairs("uniform", 3, 3) == [(1, 1), (2, 2), (3, 3)]
    assert layer_pairs("last", 4, 12) == [(4, 12)]
    assert layer_pairs([2, 5], 2, 6) == [(1, 2), (2, 5)]


@pytest.mark.parametrize(
    ("layer_map", "message"), [([1, 2, 3], "has 3 entries but the student has 2"), ([1, 7], "outside 1..6")]
)
def test_layer_pairs_reject_maps_that_do_not_fit(layer_map, message):
    with pytest.raises(ConfigError, match=message):
        layer_pairs(layer_map, 2, 6)


def test_hidden_mse_with_an_explicit_map_uses_those_teacher_layers():
    s, t = _hidden(2, seed=24), _hidden(4, seed=25)
    expected = feature_losses.hidden_mse(
        (s[0], s[1]), (t[0], t[3]), MASK, layer_map="uniform"
    ) + feature_losses.hidden_mse((s[0], s[2]), (t[0], t[1]), MASK, layer_map="uniform")
    got = feature_losses.hidden_mse(s, t, MASK, layer_map=[3, 1])
    assert got.item() == pytest.approx(expected.item(), rel=1e-6)
