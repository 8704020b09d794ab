"""Loss terms, tested by their properties and by hand-computed values."""

from __future__ import annotations

import functools
import json
import tempfile

import numpy as np
import pytest
import torch

from workers.engine import logit_losses, loss_primitives, sparse_losses
from workers.engine.config import LossTermConfig
from workers.engine.errors import ConfigError
from workers.engine.losses import LOSS_TERMS
from workers.engine.methods import TermInputs, TermState, build_term_modules, combine
from workers.engine.terms import TermParamError, validate_term_params, validate_terms

# Every token-level term that compares the student's logits with a dense teacher's.
TEACHER_TERMS = [name for name, spec in LOSS_TERMS.items() if spec.kind in ("logits", "taid", "topk", "uld")]
# Parameters that make each term non-trivial on the tiny vocabularies used here.
TEST_PARAMS = {"taid": {"interpolation": 0.6}, "topk": {"k": 3}}


def _call(name: str, student, teacher, mask=None, **params):
    spec = LOSS_TERMS[name]
    defaults = {} if spec.kind == "taid" else spec.defaults()
    return spec.fn(student, teacher, mask, **(defaults | TEST_PARAMS.get(name, {}) | params))


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def _kl(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    return np.sum(p * (np.log(p) - np.log(q)), axis=-1)


S3 = np.array([1.0, 2.0, 3.0])
T3 = np.array([3.0, 1.0, 0.5])


def _t(x: np.ndarray) -> torch.Tensor:
    return torch.tensor(x, dtype=torch.float32).reshape(1, -1)


# --- properties ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", TEACHER_TERMS)
@pytest.mark.parametrize("shape", [(4, 7), (2, 3, 7)])
def test_teacher_term_is_zero_when_student_equals_teacher(name, shape):
    logits = torch.randn(shape, generator=torch.Generator().manual_seed(0)) * 3
    assert _call(name, logits, logits.clone()).item() == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("name", TEACHER_TERMS)
def test_teacher_term_is_positive_when_distributions_differ(name):
    g = torch.Generator().manual_seed(1)
    assert _call(name, torch.randn(4, 5, generator=g), torch.randn(4, 5, generator=g)).item() > 1e-4


@pytest.mark.parametrize("name", TEACHER_TERMS)
def test_masked_positions_change_nothing(name):
    g = torch.Generator().manual_seed(2)
    student, teacher = torch.randn(2, 5, 7, generator=g), torch.randn(2, 5, 7, generator=g)
    mask = torch.tensor([[1, 1, 0, 1, 0], [0, 1, 1, 0, 0]], dtype=torch.bool)
    noisy_student, noisy_teacher = student.clone(), teacher.clone()
    noisy_student[~mask] = torch.randn(int((~mask).sum()), 7, generator=g) * 100
    noisy_teacher[~mask] = torch.randn(int((~mask).sum()), 7, generator=g) * 100

    a = student.clone().requires_grad_()
    b = noisy_student.clone().requires_grad_()
    loss_a, loss_b = _call(name, a, teacher, mask), _call(name, b, noisy_teacher, mask)
    loss_a.backward()
    loss_b.backward()

    assert loss_a.item() == pytest.approx(loss_b.item(), rel=1e-6)
    assert torch.allclose(a.grad[mask], b.grad[mask], atol=1e-7)
    assert torch.all(b.grad[~mask] == 0)
    # and the masked mean equals the mean over the valid rows alone
    assert loss_a.item() == pytest.approx(_call(name, student[mask], teacher[mask]).item(), rel=1e-5)


def test_ce_ignores_rows_labelled_minus_100():
    logits = torch.tensor([[2.0, 1.0, 0.0], [9.0, -9.0, 0.0]])
    assert logit_losses.ce(logits, torch.tensor([0, -100])).item() == pytest.approx(
        logit_losses.ce(logits[:1], torch.tensor([0])).item()
    )


@pytest.mark.parametrize("name", [*TEACHER_TERMS, "ce"])
def test_all_masked_gives_zero_and_a_finite_gradient(name):
    student = torch.randn(2, 3, 5).requires_grad_()
    if name == "ce":
        loss = logit_losses.ce(student, torch.full((2, 3), -100))
    else:
        loss = _call(name, student, torch.randn(2, 3, 5), torch.zeros(2, 3, dtype=torch.bool))
    loss.backward()
    assert loss.item() == 0.0
    assert torch.all(student.grad == 0)


@pytest.mark.parametrize("name", [*TEACHER_TERMS, "ce"])
def test_gradients_are_finite_for_extreme_logits(name):
    g = torch.Generator().manual_seed(3)
    student = (torch.randn(8, 6, generator=g) * 80).requires_grad_()
    teacher = torch.randn(8, 6, generator=g) * 80
    loss = logit_losses.ce(student, torch.arange(8) % 6) if name == "ce" else _call(name, student, teacher)
    loss.backward()
    assert loss.dim() == 0 and torch.isfinite(loss)
    assert torch.isfinite(student.grad).all() and student.grad.abs().sum() > 0


@pytest.mark.parametrize("name", [*TEACHER_TERMS, "ce"])
def test_bf16_inputs_give_float32_results(name):
    student = torch.randn(4, 5).to(torch.bfloat16)
    teacher = torch.randn(4, 5).to(torch.bfloat16)
    loss = (
        logit_losses.ce(student, torch.tensor([0, 1, 2, 3]))
        if name == "ce"
        else _call(name, student, teacher)
    )
    assert loss.dtype == torch.float32


# --- hand-computed values -----------------------------------------------------------------------------------


def test_kd_is_tau_squared_times_kl_of_softened_distributions():
    tau = 2.0
    expected = tau**2 * _kl(_softmax(T3 / tau), _softmax(S3 / tau))  # ≈ 4 × 0.34
    assert logit_losses.kd(_t(S3), _t(T3), temperature=tau).item() == pytest.approx(expected, rel=1e-5)
    plain = logit_losses.kd(_t(S3 / tau), _t(T3 / tau), temperature=1.0).item()
    assert logit_losses.kd(_t(S3), _t(T3), temperature=tau).item() == pytest.approx(tau**2 * plain, rel=1e-5)


def test_kd_hand_value_at_temperature_one():
    # p_T = softmax([3, 1, 0.5]) = [0.82140, 0.11117, 0.06743]; p_S = softmax([1, 2, 3]) = [0.09003, 0.24473,
    # 0.66524] KL = 0.82140·ln(9.1236) + 0.11117·ln(0.45425) + 0.06743·ln(0.10136) = 1.81604 − 0.08773 −
    # 0.15435
    by_hand = 1.57396
    assert logit_losses.kd(_t(S3), _t(T3), temperature=1.0).item() == pytest.approx(by_hand, abs=2e-5)


def test_reverse_kl_hand_value():
    tau = 3.0
    expected = tau**2 * _kl(_softmax(S3 / tau), _softmax(T3 / tau))
    assert logit_losses.reverse_kl(_t(S3), _t(T3), temperature=tau).item() == pytest.approx(
        expected, rel=1e-5
    )


def test_ce_hand_value_with_and_without_label_smoothing():
    logits = torch.tensor([[2.0, 1.0, 0.0]])
    log_p = np.log(_softmax(np.array([2.0, 1.0, 0.0])))
    assert logit_losses.ce(logits, torch.tensor([0])).item() == pytest.approx(-log_p[0], rel=1e-6)  # 0.4076
    eps = 0.3
    smoothed = -((1 - eps) * log_p[0] + eps * log_p.mean())
    assert logit_losses.ce(logits, torch.tensor([0]), label_smoothing=eps).item() == pytest.approx(
        smoothed, rel=1e-6
    )


def test_jsd_endpoints_are_forward_and_reverse_kl():
    g = torch.Generator().manual_seed(4)
    s, t = torch.randn(3, 4, 9, generator=g), torch.randn(3, 4, 9, generator=g)
    mask = torch.rand(3, 4, generator=g) > 0.3
    assert (
        logit_losses.jsd(s, t, mask, beta=0.0).item() == logit_losses.kd(s, t, mask, temperature=1.0).item()
    )
    assert (
        logit_losses.jsd(s, t, mask, beta=1.0).item()
        == logit_losses.reverse_kl(s, t, mask, temperature=1.0).item()
    )


def test_jsd_divides_by_temperature_but_is_not_scaled_by_tau_squared():
    s, t, tau = _t(S3), _t(T3), 2.0
    assert logit_losses.jsd(s, t, beta=0.0, temperature=tau).item() == pytest.approx(
        logit_losses.kd(s, t, temperature=tau).item() / tau**2, rel=1e-6
    )


@pytest.mark.parametrize("beta", [0.5, 0.1, 0.9])
def test_jsd_matches_a_direct_numpy_computation(beta):
    rng = np.random.default_rng(5)
    s, t, tau = rng.normal(size=(2, 3, 6)) * 2, rng.normal(size=(2, 3, 6)) * 2, 1.5
    mask = np.array([[True, False, True], [True, True, False]])
    p_s, p_t = _softmax(s / tau), _softmax(t / tau)
    m = beta * p_t + (1 - beta) * p_s
    per_token = beta * _kl(p_t, m) + (1 - beta) * _kl(p_s, m)  # (2, 3)
    expected = per_token[mask].mean()  # TRL: sum over valid tokens / their count
    got = logit_losses.jsd(torch.tensor(s), torch.tensor(t), torch.tensor(mask), beta=beta, temperature=tau)
    assert got.item() == pytest.approx(expected, rel=1e-5)


def test_skew_kl_and_tvd_hand_values():
    p_s, p_t, alpha = _softmax(S3), _softmax(T3), 0.1
    assert logit_losses.skew_kl(_t(S3), _t(T3), alpha=alpha).item() == pytest.approx(
        _kl(p_t, alpha * p_t + (1 - alpha) * p_s), rel=1e-5
    )
    assert logit_losses.skew_reverse_kl(_t(S3), _t(T3), alpha=alpha).item() == pytest.approx(
        _kl(p_s, (1 - alpha) * p_t + alpha * p_s), rel=1e-5
    )
    assert logit_losses.tvd(_t(S3), _t(T3)).item() == pytest.approx(0.5 * np.abs(p_t - p_s).sum(), rel=1e-5)


# --- combining terms ----------------------------------------------------------------------------------------


def _combine(terms: list[LossTermConfig], student, teacher, labels):
    """The recipe's weighted sum as a training step computes it (``methods.combine``)."""
    terms = validate_terms(terms)
    inputs = TermInputs(student, labels, teacher_logits=teacher)
    return combine(terms, inputs, modules=build_term_modules(terms), state=TermState())


def test_combine_weights_terms_and_reports_each_unweighted_and_detached():
    g = torch.Generator().manual_seed(6)
    student = torch.randn(4, 5, generator=g).requires_grad_()
    teacher = torch.randn(4, 5, generator=g)
    labels = torch.tensor([0, 1, -100, 3])
    terms = [
        LossTermConfig("ce", 0.1, {"label_smoothing": 0.0}),
        LossTermConfig("kd", 0.9, {"temperature": 4.0}),
    ]

    out = _combine(terms, student, teacher, labels)

    ce, kd = logit_losses.ce(student, labels), logit_losses.kd(student, teacher, temperature=4.0)
    assert set(out.parts) == {"ce", "kd"}
    assert out.parts["ce"].item() == pytest.approx(ce.item()) and out.parts["kd"].item() == pytest.approx(
        kd.item()
    )
    assert out.total.item() == pytest.approx(0.1 * ce.item() + 0.9 * kd.item(), rel=1e-6)
    assert out.total.requires_grad and not any(p.requires_grad for p in out.parts.values())


def test_combine_lets_teacher_terms_use_unlabelled_classification_rows():
    student, teacher = torch.randn(3, 4), torch.randn(3, 4)
    unlabelled = torch.full((3,), -100)
    out = _combine([LossTermConfig("kd", 1.0, {"temperature": 1.0})], student, teacher, unlabelled)
    assert out.total.item() == pytest.approx(logit_losses.kd(student, teacher).item())


def test_combine_masks_sequence_positions_by_label():
    student, teacher = torch.randn(2, 3, 4), torch.randn(2, 3, 4)
    labels = torch.tensor([[1, -100, 2], [-100, -100, 0]])
    out = _combine([LossTermConfig("kd", 1.0, {"temperature": 1.0})], student, teacher, labels)
    assert out.total.item() == pytest.approx(logit_losses.kd(student, teacher, labels != -100).item())


def test_combine_without_teacher_logits_rejects_teacher_terms():
    with pytest.raises(ConfigError, match="needs dense teacher logits"):
        _combine([LossTermConfig("kd", 1.0, {})], torch.randn(2, 3), None, torch.tensor([0, 1]))


# --- parameter validation -----------------------------------------------------------------------------------


def test_validate_term_params_fills_defaults_and_coerces_to_float():
    assert validate_term_params("kd", {}) == {"temperature": 4.0}
    assert validate_term_params("jsd", {"beta": 1}) == {"beta": 1.0, "temperature": 1.0}
    assert isinstance(validate_term_params("jsd", {"beta": 1})["beta"], float)


@pytest.mark.parametrize(
    ("name", "params", "message"),
    [
        ("kd", {"temperature": 0}, "Parameter 'temperature' of loss term 'kd' must be > 0, got 0."),
        ("kd", {"temperature": -1.5}, "must be > 0, got -1.5"),
        ("jsd", {"beta": 1.2}, "Parameter 'beta' of loss term 'jsd' must be in [0, 1], got 1.2."),
        ("ce", {"label_smoothing": 1.0}, "must be in [0, 1), got 1."),
        ("kd", {"beta": 0.5}, "Loss term 'kd' has no parameter 'beta'. Its parameters: temperature."),
        ("kd", {"temperature": "hot"}, "must be a number, got 'hot'"),
        ("kd", {"temperature": True}, "must be a number, got True"),
        ("kd", {"temperature": float("nan")}, "must be a number"),
        ("distill_magic", {}, "Unknown loss term 'distill_magic'. Available terms: ce, kd, reverse_kl, jsd"),
    ],
)
def test_validate_term_params_rejects_bad_input_with_a_clear_message(name, params, message):
    with pytest.raises(ConfigError) as exc:
        validate_term_params(name, params)
    assert message in str(exc.value)


def test_every_registered_term_is_introspectable_and_its_defaults_are_valid():
    for name, spec in LOSS_TERMS.items():
        assert spec.name == name and spec.title and spec.description
        assert validate_term_params(name, spec.defaults()) == spec.defaults()
        assert json.loads(json.dumps(spec.defaults())) == spec.defaults()
        for param in spec.params.values():
            assert param.type in (float, int, bool, str, list) and param.description and param.range_text()
            assert param.default_text()
            if param.type is str:
                assert param.default in param.choices
    assert not LOSS_TERMS["ce"].needs_teacher and LOSS_TERMS["kd"].needs_teacher


def test_validate_term_params_accepts_choices_bools_ints_and_layer_maps_as_plain_json():
    assert validate_term_params("topk", {"k": 8.0, "divergence": "jsd", "tail": False, "temperature": 2}) == {
        "k": 8,
        "divergence": "jsd",
        "tail": False,
        "temperature": 2.0,
        "beta": 0.5,
    }
    assert isinstance(validate_term_params("topk", {"k": 8.0})["k"], int)
    assert validate_term_params("hidden_mse", {"layer_map": [2, 4]}) == {"layer_map": [2, 4]}
    assert validate_term_params("hidden_mse", {"layer_map": "2, 4"}) == {"layer_map": [2, 4]}
    assert validate_term_params("hidden_cosine", {}) == {"layer_map": "last"}
    assert validate_term_params("taid", {"adaptive": False})["adaptive"] is False
    assert validate_term_params("uld", {}) == {} and validate_term_params("attention_kl", None) == {}


@pytest.mark.parametrize(
    ("name", "params", "message"),
    [
        ("topk", {"k": 0}, "Parameter 'k' of loss term 'topk' must be >= 1, got 0."),
        ("topk", {"k": 2.5}, "Parameter 'k' of loss term 'topk' must be a whole number, got 2.5."),
        (
            "topk",
            {"divergence": "hellinger"},
            "Parameter 'divergence' of loss term 'topk' must be one of: kd, reverse_kl, jsd, tvd; "
            "got 'hellinger'.",
        ),
        ("topk", {"tail": "yes"}, "Parameter 'tail' of loss term 'topk' must be true or false, got 'yes'."),
        ("topk", {"tail": True, "temperature": 2.0}, "must be 1 when tail is on"),
        (
            "taid",
            {"t_start": 0.8, "t_end": 0.5},
            "Parameter 't_end' of loss term 'taid' must be >= t_start (0.8)",
        ),
        ("taid", {"beta": 1.5}, "Parameter 'beta' of loss term 'taid' must be in [0, 1], got 1.5."),
        ("hidden_mse", {"layer_map": "middle"}, "must be uniform, last, or a list of teacher layer numbers"),
        ("hidden_mse", {"layer_map": [0, 2]}, "list of teacher layer numbers (1 = first layer)"),
        ("hidden_mse", {"layer_map": [True]}, "list of teacher layer numbers"),
        ("embedding_mse", {"pooling": "max"}, "must be one of: mean, cls, last; got 'max'."),
    ],
)
def test_validate_term_params_rejects_bad_new_params_and_names_the_field(name, params, message):
    with pytest.raises(TermParamError) as exc:
        validate_term_params(name, params)
    assert message in str(exc.value)
    assert exc.value.param in params


# --- taid ---------------------------------------------------------------------------------------------------


def test_taid_hand_value_against_numpy():
    t = 0.3
    p_target = _softmax((1 - t) * S3 + t * T3)
    expected = _kl(p_target, _softmax(S3))
    assert logit_losses.taid(_t(S3), _t(T3), interpolation=t).item() == pytest.approx(expected, rel=1e-5)


def test_taid_at_t_one_is_forward_kl_and_its_target_carries_no_student_gradient():
    g = torch.Generator().manual_seed(10)
    s, t = torch.randn(3, 6, generator=g), torch.randn(3, 6, generator=g)
    assert logit_losses.taid(s, t, interpolation=1.0).item() == pytest.approx(
        logit_losses.kd(s, t).item(), rel=1e-6
    )
    # d/dz_S KL(p_t‖p_S) with p_t fixed is p_S − p_t (per row, before averaging)
    student = s.clone().requires_grad_()
    logit_losses.taid(student, t, interpolation=0.5).backward()
    p_t = torch.softmax(0.5 * s + 0.5 * t, dim=-1)
    assert torch.allclose(student.grad, (torch.softmax(s, -1) - p_t) / 3, atol=1e-6)


def _update(t, m, prev, loss, **kw):
    args = {"t_target": 0.4, "t_end": 1.0, "alpha": 0.1, "beta": 0.5} | kw
    out = logit_losses.taid_update(
        torch.tensor(t), torch.tensor(m), torch.tensor(prev), torch.tensor(loss), **args
    )
    return [x.item() for x in out]


def test_taid_update_first_call_only_records_the_loss():
    assert _update(0.4, 0.0, float("inf"), 2.0) == [pytest.approx(0.4), 0.0, 2.0]


def test_taid_update_moves_t_by_alpha_sigmoid_momentum_and_respects_the_linear_floor_and_t_end():
    t, m, prev = _update(0.4, 0.0, 2.0, 1.0)  # relative change 0.5 → m = 0.25
    assert m == pytest.approx(0.25) and prev == 1.0
    assert t == pytest.approx(0.4 + 0.1 * (1 / (1 + np.exp(-0.25))) * 0.6, rel=1e-6)
    assert _update(0.4, 0.0, 2.0, 1.0, t_target=0.7)[0] == pytest.approx(
        0.7
    )  # never below the linear schedule
    assert _update(0.99, 5.0, 2.0, 1.0, alpha=1.0, t_end=0.995)[0] == pytest.approx(0.995)


# --- topk ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("divergence", ["kd", "reverse_kl", "jsd", "tvd"])
def test_topk_with_k_equal_to_vocab_and_no_tail_equals_the_dense_divergence(divergence):
    g = torch.Generator().manual_seed(11)
    s, t = torch.randn(2, 4, 9, generator=g) * 2, torch.randn(2, 4, 9, generator=g) * 2
    mask = torch.rand(2, 4, generator=g) > 0.3
    dense = {
        "kd": logit_losses.kd,
        "reverse_kl": logit_losses.reverse_kl,
        "jsd": logit_losses.jsd,
        "tvd": logit_losses.tvd,
    }[divergence]
    extra = {"beta": 0.3} if divergence == "jsd" else {}
    got = sparse_losses.topk(s, t, mask, k=9, divergence=divergence, tail=False, temperature=2.0, **extra)
    assert got.item() == pytest.approx(dense(s, t, mask, temperature=2.0, **extra).item(), rel=1e-5, abs=1e-7)
    with_tail = sparse_losses.topk(s, t, mask, k=9, divergence=divergence, tail=True, **extra)
    assert with_tail.item() == pytest.approx(dense(s, t, mask, temperature=1.0, **extra).item(), rel=1e-5)


def test_topk_kd_keeps_the_tau_squared_factor():
    g = torch.Generator().manual_seed(12)
    s, t, tau = torch.randn(4, 7, generator=g), torch.randn(4, 7, generator=g), 3.0
    scaled = sparse_losses.topk(s, t, k=3, tail=False, temperature=tau).item()
    plain = sparse_losses.topk(s / tau, t / tau, k=3, tail=False, temperature=1.0).item()
    assert scaled == pytest.approx(tau**2 * plain, rel=1e-5)


def test_topk_hand_values_with_and_without_tail():
    s, t = np.array([1.0, 2.0, 3.0, 0.0]), np.array([3.0, 1.0, 0.5, 2.5])
    p_s, p_t = _softmax(s), _softmax(t)
    top = [0, 3]  # the teacher's two largest logits
    no_tail = _kl(p_t[top] / p_t[top].sum(), p_s[top] / p_s[top].sum())
    tail_t = np.append(p_t[top], 1 - p_t[top].sum())
    tail_s = np.append(p_s[top], 1 - p_s[top].sum())
    assert sparse_losses.topk(_t(s), _t(t), k=2, tail=False).item() == pytest.approx(no_tail, rel=1e-5)
    assert sparse_losses.topk(_t(s), _t(t), k=2, tail=True).item() == pytest.approx(
        _kl(tail_t, tail_s), rel=1e-5
    )


def test_topk_distributions_with_the_tail_bucket_sum_to_one():
    g = torch.Generator().manual_seed(13)
    s, t = torch.randn(5, 11, generator=g) * 3, torch.randn(5, 11, generator=g) * 3
    for teacher in (t, _sparse(t, 6, tail=True), _sparse(t, 6, tail=False)):
        log_s, log_t = sparse_losses.topk_log_probs(s, teacher, k=4, tail=True)
        assert log_s.shape == log_t.shape == (5, 5)
        assert torch.allclose(log_s.exp().sum(-1), torch.ones(5)) and torch.allclose(
            log_t.exp().sum(-1), torch.ones(5)
        )
        # the student's bucket is the mass on every other token
        kept = t.topk(4, dim=-1).indices
        other = 1 - torch.softmax(s, -1).gather(-1, kept).sum(-1)
        assert torch.allclose(log_s[:, -1].exp(), other, atol=1e-6)


def _sparse(teacher_logits, k, *, tail):
    log_p = torch.log_softmax(teacher_logits.float(), dim=-1)
    values, indices = log_p.topk(k, dim=-1)
    rest = torch.log1p(-values.exp().sum(-1).clamp(max=1 - 1e-7)) if tail else None
    return loss_primitives.TopK(values, indices, rest)


@pytest.mark.parametrize("tail", [True, False])
@pytest.mark.parametrize("cached_k", [4, 7])
def test_topk_from_a_sparse_cache_matches_the_dense_teacher(tail, cached_k):
    g = torch.Generator().manual_seed(14)
    s, t = torch.randn(2, 3, 10, generator=g) * 2, torch.randn(2, 3, 10, generator=g) * 2
    mask = torch.tensor([[True, False, True], [True, True, True]])
    for stored_tail in (True, False):
        sparse = _sparse(t, cached_k, tail=stored_tail)
        for divergence in ("kd", "jsd"):
            dense = sparse_losses.topk(s, t, mask, k=4, tail=tail, divergence=divergence)
            got = sparse_losses.topk(s, sparse, mask, k=4, tail=tail, divergence=divergence)
            assert got.item() == pytest.approx(dense.item(), rel=1e-4, abs=1e-6)


@pytest.mark.parametrize("divergence", ["kd", "reverse_kl", "jsd", "tvd"])
def test_a_cache_holding_the_whole_vocabulary_gives_the_dense_divergence(divergence):
    g = torch.Generator().manual_seed(15)
    s = (torch.randn(2, 3, 10, generator=g) * 2).requires_grad_()
    t = torch.randn(2, 3, 10, generator=g) * 2
    mask = torch.tensor([[True, False, True], [True, True, True]])
    full = _sparse(t, 10, tail=True)
    full = loss_primitives.TopK(
        full.logprobs.half(), full.indices, full.tail_logmass
    )  # as the cache stores it
    dense = (
        {
            "kd": logit_losses.kd,
            "reverse_kl": logit_losses.reverse_kl,
            "tvd": logit_losses.tvd,
            "jsd": functools.partial(logit_losses.jsd, beta=0.5),
        }[divergence](s, t, mask, temperature=2.0)
        if divergence != "tvd"
        else logit_losses.tvd(s, t, mask)
    )
    got = sparse_losses.topk(
        s,
        full,
        mask,
        k=10,
        tail=False,
        divergence=divergence,
        temperature=1.0 if divergence == "tvd" else 2.0,
    )
    assert got.item() == pytest.approx(dense.item(), rel=2e-3, abs=1e-5)  # half-precision cache
    (grad,) = torch.autograd.grad(got, s)
    assert torch.isfinite(grad).all() and grad[0, 1].abs().sum() == 0  # masked position: no gradient


def test_topk_rejects_k_larger_than_the_teacher_offers():
    with pytest.raises(ConfigError, match="holds only the top 4"):
        sparse_losses.topk(torch.randn(2, 10), _sparse(torch.randn(2, 10), 4, tail=True), k=5)
    with pytest.raises(ConfigError, match="only 10 classes"):
        sparse_losses.topk(torch.randn(2, 10), torch.randn(2, 10), k=11)


# --- uld ----------------------------------------------------------------------------------------------------


def test_uld_matches_numpy_with_different_vocab_sizes():
    rng = np.random.default_rng(15)
    s, t = rng.normal(size=(2, 3, 5)) * 2, rng.normal(size=(2, 3, 8)) * 2
    mask = np.array([[True, True, False], [False, True, True]])
    p_s = -np.sort(-_softmax(s), axis=-1)
    p_t = -np.sort(-_softmax(t), axis=-1)
    p_s = np.concatenate([p_s, np.zeros((2, 3, 3))], axis=-1)
    expected = np.abs(p_t - p_s).sum(-1)[mask].mean()
    got = sparse_losses.uld(torch.tensor(s), torch.tensor(t), torch.tensor(mask))
    assert got.item() == pytest.approx(expected, rel=1e-5)
    # and the student side may be the larger vocabulary
    flipped = sparse_losses.uld(torch.tensor(t), torch.tensor(s), torch.tensor(mask))
    assert flipped.item() == pytest.approx(expected, rel=1e-5)


def test_uld_is_zero_for_the_same_distribution_in_another_token_order_and_padding():
    student = torch.tensor([[3.0, 1.0, 0.0]])
    teacher = torch.tensor([[0.0, -1e4, 3.0, 1.0]])  # same probabilities, permuted, plus a ~0 entry
    assert sparse_losses.uld(student, teacher).item() == pytest.approx(0.0, abs=1e-6)


def test_uld_rejects_unaligned_positions():
    with pytest.raises(ConfigError, match="aligned positions"):
        sparse_losses.uld(torch.randn(1, 4, 5), torch.randn(1, 3, 6))


# --- memory-aware (chunked) token losses --------------------------------------------------------------------


def _chunked_pair(name, shape, dtype, chunk):
    g = torch.Generator().manual_seed(16)
    student = (torch.randn(shape, generator=g) * 3).to(dtype)
    teacher = (torch.randn(shape, generator=g) * 3).to(dtype)
    mask = torch.rand(shape[:-1], generator=g) > 0.3
    results = []
    for chunk_size in (None, chunk):
        x = student.clone().requires_grad_()
        if name == "ce":
            labels = torch.randint(0, shape[-1], shape[:-1], generator=torch.Generator().manual_seed(17))
            labels[~mask] = -100
            loss = logit_losses.ce(x, labels, chunk_size=chunk_size)
        else:
            loss = _call(name, x, teacher, mask, chunk_size=chunk_size)
        loss.backward()
        results.append((loss, x.grad))
    return results


@pytest.mark.parametrize("name", [*TEACHER_TERMS, "ce"])
@pytest.mark.parametrize(("shape", "chunk"), [((3, 7, 13), 3), ((10, 13), 4)])
def test_chunked_loss_equals_the_unchunked_loss_and_gradients(name, shape, chunk):
    (plain, plain_grad), (chunked, chunked_grad) = _chunked_pair(name, shape, torch.float32, chunk)
    assert chunked.dtype == torch.float32 and chunked.dim() == 0
    assert chunked.item() == pytest.approx(plain.item(), rel=1e-5, abs=1e-7)
    assert torch.allclose(chunked_grad, plain_grad, rtol=1e-4, atol=1e-7)


def test_chunked_loss_in_bf16_keeps_a_bf16_gradient_close_to_the_unchunked_one():
    (plain, plain_grad), (chunked, chunked_grad) = _chunked_pair("kd", (2, 9, 17), torch.bfloat16, 4)
    assert chunked.dtype == torch.float32 and chunked_grad.dtype == torch.bfloat16
    assert chunked.item() == pytest.approx(plain.item(), rel=1e-5)
    assert torch.allclose(chunked_grad.float(), plain_grad.float(), rtol=2e-2, atol=1e-4)


def test_chunked_loss_reads_shifted_non_contiguous_logits_and_scales_by_the_upstream_gradient():
    g = torch.Generator().manual_seed(18)
    full, teacher = torch.randn(2, 6, 11, generator=g), torch.randn(2, 5, 11, generator=g)
    a, b = full.clone().requires_grad_(), full.clone().requires_grad_()
    (0.25 * logit_losses.jsd(a[:, :-1], teacher, beta=0.2)).backward()
    (0.25 * logit_losses.jsd(b[:, :-1], teacher, beta=0.2, chunk_size=2)).backward()
    assert torch.allclose(a.grad, b.grad, atol=1e-7)


def test_chunked_loss_all_masked_is_zero_with_a_zero_gradient_and_runs_without_grad():
    x = torch.randn(2, 5, 7).requires_grad_()
    loss = logit_losses.kd(x, torch.randn(2, 5, 7), torch.zeros(2, 5, dtype=torch.bool), chunk_size=2)
    loss.backward()
    assert loss.item() == 0.0 and torch.all(x.grad == 0)
    with torch.no_grad():
        s, t = torch.randn(2, 5, 7), torch.randn(2, 5, 7)
        assert logit_losses.kd(s, t, chunk_size=3).item() == pytest.approx(
            logit_losses.kd(s, t).item(), rel=1e-6
        )


def _peak_allocated_bytes(fn) -> int:
    """Peak bytes the CPU allocator holds while ``fn`` runs, from the profiler's allocation events."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    with tempfile.TemporaryDirectory() as folder:
        path = f"{folder}/trace.json"
        prof.export_chrome_trace(path)
        with open(path) as f:
            events = [e["args"] for e in json.load(f)["traceEvents"] if e.get("name") == "[memory]"]
    baseline = events[0]["Total Allocated"] - events[0]["Bytes"]
    return max(e["Total Allocated"] for e in events) - baseline


def test_chunked_loss_allocates_much_less_memory_than_the_full_softmax():
    g = torch.Generator().manual_seed(19)
    student, teacher = torch.randn(2, 64, 2048, generator=g), torch.randn(2, 64, 2048, generator=g)

    def run(chunk_size):
        def step():
            x = student.clone().requires_grad_()
            logit_losses.kd(x, teacher, temperature=2.0, chunk_size=chunk_size).backward()

        return step

    logits_bytes = student.numel() * 4
    naive, chunked = _peak_allocated_bytes(run(None)), _peak_allocated_bytes(run(16))
    assert naive >= 4 * logits_bytes  # several float32 (positions × V) buffers at once
    assert chunked <= 0.6 * naive
    assert chunked <= 3 * logits_bytes  # the input's copy + one gradient buffer + one block's temporaries


def test_validate_terms_rejects_duplicates_and_all_zero_weights():
    with pytest.raises(ConfigError, match="appear once"):
        validate_terms([LossTermConfig("kd"), LossTermConfig("kd")])
    with pytest.raises(ConfigError, match="positive weight"):
        validate_terms([LossTermConfig("ce", 0.0)])
    with pytest.raises(ConfigError, match="no loss terms"):
        validate_terms([])


def _trl_style_generalized_jsd(student_logits, teacher_logits, labels, beta, temperature):
    """The steps of TRL's ``GKDTrainer.generalized_jsd_loss`` (reduction="batchmean", with labels), for
    comparison."""
    import torch.nn.functional as F

    s = F.log_softmax(student_logits / temperature, dim=-1)
    t = F.log_softmax(teacher_logits / temperature, dim=-1)
    if beta == 0:
        per_vocab = F.kl_div(s, t, reduction="none", log_target=True)
    elif beta == 1:
        per_vocab = F.kl_div(t, s, reduction="none", log_target=True)
    else:
        b = torch.tensor(beta, dtype=s.dtype)
        m = torch.logsumexp(torch.stack([s + torch.log(1 - b), t + torch.log(b)]), dim=0)
        per_vocab = b * F.kl_div(m, t, reduction="none", log_target=True) + (1 - b) * F.kl_div(
            m, s, reduction="none", log_target=True
        )
    mask = labels != -100
    return per_vocab[mask].sum() / mask.sum()


@pytest.mark.parametrize("beta", [0.0, 0.3, 0.5, 1.0])
def test_jsd_agrees_with_trl_generalized_jsd_loss(beta):
    g = torch.Generator().manual_seed(7)
    s, t = torch.randn(2, 6, 11, generator=g) * 3, torch.randn(2, 6, 11, generator=g) * 3
    labels = torch.randint(0, 11, (2, 6), generator=g)
    labels[0, :2] = -100
    ours = _combine([LossTermConfig("jsd", 1.0, {"beta": beta, "temperature": 2.0})], s, t, labels).total
    assert ours.item() == pytest.approx(_trl_style_generalized_jsd(s, t, labels, beta, 2.0).item(), rel=1e-5)
