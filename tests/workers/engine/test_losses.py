"""Loss terms, tested by their properties and by hand-computed values."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from workers.engine import losses
from workers.engine.config import LossTermConfig
from workers.engine.errors import ConfigError
from workers.engine.losses import LOSS_TERMS, combine_terms, validate_term_params

TEACHER_TERMS = [name for name, spec in LOSS_TERMS.items() if spec.needs_teacher]


def _call(name: str, student, teacher, mask=None, **params):
    return LOSS_TERMS[name].fn(student, teacher, mask, **(LOSS_TERMS[name].defaults() | params))


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def _kl(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    return np.sum(p * (np.log(p) - np.log(q)), axis=-1)


S3 = np.array([1.0, 2.0, 3.0])
T3 = np.array([3.0, 1.0, 0.5])


def _t(x: np.ndarray) -> torch.Tensor:
    return torch.tensor(x, dtype=torch.float32).reshape(1, -1)


# --- properties ------------------------------------------------------------------------------------------------


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
    assert losses.ce(logits, torch.tensor([0, -100])).item() == pytest.approx(
        losses.ce(logits[:1], torch.tensor([0])).item())


@pytest.mark.parametrize("name", [*TEACHER_TERMS, "ce"])
def test_all_masked_gives_zero_and_a_finite_gradient(name):
    student = torch.randn(2, 3, 5).requires_grad_()
    if name == "ce":
        loss = losses.ce(student, torch.full((2, 3), -100))
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
    loss = losses.ce(student, torch.arange(8) % 6) if name == "ce" else _call(name, student, teacher)
    loss.backward()
    assert loss.dim() == 0 and torch.isfinite(loss)
    assert torch.isfinite(student.grad).all() and student.grad.abs().sum() > 0


@pytest.mark.parametrize("name", [*TEACHER_TERMS, "ce"])
def test_bf16_inputs_give_float32_results(name):
    student = torch.randn(4, 5).to(torch.bfloat16)
    teacher = torch.randn(4, 5).to(torch.bfloat16)
    loss = losses.ce(student, torch.tensor([0, 1, 2, 3])) if name == "ce" else _call(name, student, teacher)
    assert loss.dtype == torch.float32


# --- hand-computed values --------------------------------------------------------------------------------------


def test_kd_is_tau_squared_times_kl_of_softened_distributions():
    tau = 2.0
    expected = tau**2 * _kl(_softmax(T3 / tau), _softmax(S3 / tau))   # ≈ 4 × 0.34
    assert losses.kd(_t(S3), _t(T3), temperature=tau).item() == pytest.approx(expected, rel=1e-5)
    plain = losses.kd(_t(S3 / tau), _t(T3 / tau), temperature=1.0).item()
    assert losses.kd(_t(S3), _t(T3), temperature=tau).item() == pytest.approx(tau**2 * plain, rel=1e-5)


def test_kd_hand_value_at_temperature_one():
    # p_T = softmax([3, 1, 0.5]) = [0.82140, 0.11117, 0.06743]; p_S = softmax([1, 2, 3]) = [0.09003, 0.24473, 0.66524]
    # KL = 0.82140·ln(9.1236) + 0.11117·ln(0.45425) + 0.06743·ln(0.10136) = 1.81604 − 0.08773 − 0.15435
    by_hand = 1.57396
    assert losses.kd(_t(S3), _t(T3), temperature=1.0).item() == pytest.approx(by_hand, abs=2e-5)


def test_reverse_kl_hand_value():
    tau = 3.0
    expected = tau**2 * _kl(_softmax(S3 / tau), _softmax(T3 / tau))
    assert losses.reverse_kl(_t(S3), _t(T3), temperature=tau).item() == pytest.approx(expected, rel=1e-5)


def test_ce_hand_value_with_and_without_label_smoothing():
    logits = torch.tensor([[2.0, 1.0, 0.0]])
    log_p = np.log(_softmax(np.array([2.0, 1.0, 0.0])))
    assert losses.ce(logits, torch.tensor([0])).item() == pytest.approx(-log_p[0], rel=1e-6)   # 0.4076
    eps = 0.3
    smoothed = -((1 - eps) * log_p[0] + eps * log_p.mean())
    assert losses.ce(logits, torch.tensor([0]), label_smoothing=eps).item() == pytest.approx(smoothed, rel=1e-6)


def test_jsd_endpoints_are_forward_and_reverse_kl():
    g = torch.Generator().manual_seed(4)
    s, t = torch.randn(3, 4, 9, generator=g), torch.randn(3, 4, 9, generator=g)
    mask = torch.rand(3, 4, generator=g) > 0.3
    assert losses.jsd(s, t, mask, beta=0.0).item() == losses.kd(s, t, mask, temperature=1.0).item()
    assert losses.jsd(s, t, mask, beta=1.0).item() == losses.reverse_kl(s, t, mask, temperature=1.0).item()


def test_jsd_divides_by_temperature_but_is_not_scaled_by_tau_squared():
    s, t, tau = _t(S3), _t(T3), 2.0
    assert losses.jsd(s, t, beta=0.0, temperature=tau).item() == pytest.approx(
        losses.kd(s, t, temperature=tau).item() / tau**2, rel=1e-6)


@pytest.mark.parametrize("beta", [0.5, 0.1, 0.9])
def test_jsd_matches_a_direct_numpy_computation(beta):
    rng = np.random.default_rng(5)
    s, t, tau = rng.normal(size=(2, 3, 6)) * 2, rng.normal(size=(2, 3, 6)) * 2, 1.5
    mask = np.array([[True, False, True], [True, True, False]])
    p_s, p_t = _softmax(s / tau), _softmax(t / tau)
    m = beta * p_t + (1 - beta) * p_s
    per_token = beta * _kl(p_t, m) + (1 - beta) * _kl(p_s, m)     # (2, 3)
    expected = per_token[mask].mean()                              # TRL: sum over valid tokens / their count
    got = losses.jsd(torch.tensor(s), torch.tensor(t), torch.tensor(mask), beta=beta, temperature=tau)
    assert got.item() == pytest.approx(expected, rel=1e-5)


def test_skew_kl_and_tvd_hand_values():
    p_s, p_t, alpha = _softmax(S3), _softmax(T3), 0.1
    assert losses.skew_kl(_t(S3), _t(T3), alpha=alpha).item() == pytest.approx(
        _kl(p_t, alpha * p_t + (1 - alpha) * p_s), rel=1e-5)
    assert losses.skew_reverse_kl(_t(S3), _t(T3), alpha=alpha).item() == pytest.approx(
        _kl(p_s, (1 - alpha) * p_t + alpha * p_s), rel=1e-5)
    assert losses.tvd(_t(S3), _t(T3)).item() == pytest.approx(0.5 * np.abs(p_t - p_s).sum(), rel=1e-5)


# --- combining terms -------------------------------------------------------------------------------------------


def test_combine_terms_weights_terms_and_reports_each_unweighted_and_detached():
    g = torch.Generator().manual_seed(6)
    student = torch.randn(4, 5, generator=g).requires_grad_()
    teacher = torch.randn(4, 5, generator=g)
    labels = torch.tensor([0, 1, -100, 3])
    terms = [LossTermConfig("ce", 0.1, {"label_smoothing": 0.0}), LossTermConfig("kd", 0.9, {"temperature": 4.0})]

    out = combine_terms(terms, student, teacher, labels)

    ce, kd = losses.ce(student, labels), losses.kd(student, teacher, temperature=4.0)
    assert set(out.parts) == {"ce", "kd"}
    assert out.parts["ce"].item() == pytest.approx(ce.item()) and out.parts["kd"].item() == pytest.approx(kd.item())
    assert out.total.item() == pytest.approx(0.1 * ce.item() + 0.9 * kd.item(), rel=1e-6)
    assert out.total.requires_grad and not any(p.requires_grad for p in out.parts.values())


def test_combine_terms_lets_teacher_terms_use_unlabelled_classification_rows():
    student, teacher = torch.randn(3, 4), torch.randn(3, 4)
    unlabelled = torch.full((3,), -100)
    out = combine_terms([LossTermConfig("kd", 1.0, {"temperature": 1.0})], student, teacher, unlabelled)
    assert out.total.item() == pytest.approx(losses.kd(student, teacher).item())


def test_combine_terms_masks_sequence_positions_by_label():
    student, teacher = torch.randn(2, 3, 4), torch.randn(2, 3, 4)
    labels = torch.tensor([[1, -100, 2], [-100, -100, 0]])
    out = combine_terms([LossTermConfig("kd", 1.0, {"temperature": 1.0})], student, teacher, labels)
    assert out.total.item() == pytest.approx(losses.kd(student, teacher, labels != -100).item())


def test_combine_terms_without_teacher_logits_rejects_teacher_terms():
    with pytest.raises(ConfigError, match="needs a teacher"):
        combine_terms([LossTermConfig("kd", 1.0, {})], torch.randn(2, 3), None, torch.tensor([0, 1]))


# --- parameter validation --------------------------------------------------------------------------------------


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
        for param in spec.params.values():
            assert param.type is float and param.description and param.range_text()
    assert not LOSS_TERMS["ce"].needs_teacher and LOSS_TERMS["kd"].needs_teacher


def test_validate_terms_rejects_duplicates_and_all_zero_weights():
    with pytest.raises(ConfigError, match="appear once"):
        losses.validate_terms([LossTermConfig("kd"), LossTermConfig("kd")])
    with pytest.raises(ConfigError, match="positive weight"):
        losses.validate_terms([LossTermConfig("ce", 0.0)])
    with pytest.raises(ConfigError, match="no loss terms"):
        losses.validate_terms([])


def _trl_style_generalized_jsd(student_logits, teacher_logits, labels, beta, temperature):
    """The steps of TRL's ``GKDTrainer.generalized_jsd_loss`` (reduction="batchmean", with labels), for comparison."""
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
            m, s, reduction="none", log_target=True)
    mask = labels != -100
    return per_vocab[mask].sum() / mask.sum()


@pytest.mark.parametrize("beta", [0.0, 0.3, 0.5, 1.0])
def test_jsd_agrees_with_trl_generalized_jsd_loss(beta):
    g = torch.Generator().manual_seed(7)
    s, t = torch.randn(2, 6, 11, generator=g) * 3, torch.randn(2, 6, 11, generator=g) * 3
    labels = torch.randint(0, 11, (2, 6), generator=g)
    labels[0, :2] = -100
    ours = combine_terms([LossTermConfig("jsd", 1.0, {"beta": beta, "temperature": 2.0})], s, t, labels).total
    assert ours.item() == pytest.approx(_trl_style_generalized_jsd(s, t, labels, beta, 2.0).item(), rel=1e-5)
