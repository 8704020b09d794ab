"""Evaluation metrics on hand-made cases, and the evaluate() entry point."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import f1_score

from workers.engine.batching import Batcher
from workers.engine.config import ModelConfig
from workers.engine.evaluate import classification_metrics, evaluate, expected_calibration_error, macro_f1
from workers.engine.models import count_parameters, load_model


def _logits_for(predictions: list[int], num_classes: int = 3, confidence: float = 4.0) -> torch.Tensor:
    logits = torch.zeros(len(predictions), num_classes)
    logits[torch.arange(len(predictions)), torch.tensor(predictions)] = confidence
    return logits


def test_metrics_on_a_hand_made_case():
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    student = _logits_for([0, 0, 1, 2, 2, 2])  # one class-1 example predicted as 2
    teacher = _logits_for([0, 1, 1, 2, 2, 2])  # disagrees with the student on example 1 only

    m = classification_metrics(student, labels, teacher_logits=teacher)

    assert m["accuracy"] == pytest.approx(5 / 6)
    # per class F1: class 0: 2/2 → 1; class 1: tp=1, fn=1 → 2/3; class 2: tp=2, fp=1 → 4/5
    assert m["macro_f1"] == pytest.approx((1 + 2 / 3 + 4 / 5) / 3)
    assert m["agreement"] == pytest.approx(5 / 6)
    p_correct = np.exp(4) / (np.exp(4) + 2)
    assert m["nll"] == pytest.approx((5 * -np.log(p_correct) + -np.log(1 / (np.exp(4) + 2))) / 6, rel=1e-5)
    assert m["kl_to_teacher"] > 0


def test_kl_to_teacher_is_zero_and_agreement_one_for_the_teacher_itself():
    logits = torch.randn(20, 4)
    m = classification_metrics(logits, torch.randint(0, 4, (20,)), teacher_logits=logits.clone())
    assert m["agreement"] == 1.0 and m["kl_to_teacher"] == pytest.approx(0.0, abs=1e-6)


def test_macro_f1_agrees_with_scikit_learn():
    rng = np.random.default_rng(0)
    true, pred = rng.integers(0, 5, 200), rng.integers(0, 5, 200)
    pred[pred == 4] = 3  # class 4 is never predicted
    assert macro_f1(pred, true) == pytest.approx(f1_score(true, pred, average="macro"))


def test_ece_of_an_overconfident_model():
    # Always 0.9 confident, right half the time: every example sits in one bin, ECE = |0.5 - 0.9|.
    probs = torch.tensor([[0.9, 0.1], [0.9, 0.1], [0.1, 0.9], [0.1, 0.9]])
    assert expected_calibration_error(probs, torch.tensor([0, 1, 1, 0])) == pytest.approx(0.4)
    assert expected_calibration_error(probs, torch.tensor([0, 0, 1, 1])) == pytest.approx(0.1)


def test_evaluate_restores_the_training_mode_and_measures_efficiency(digits):
    loaded = load_model(
        ModelConfig(source="builtin", name="mlp", params={"hidden_sizes": [16]}),
        dataset=digits,
        role="student",
    )
    loaded.model.train()
    batcher = Batcher(digits.eval)
    m = evaluate(loaded.model, batcher, device="cpu")

    assert loaded.model.training
    assert m["params"] == m["params_non_embedding"] == count_parameters(loaded.model)
    assert m["size_bytes"] == 4 * m["params"]
    assert 0 < m["latency_ms_p50"] <= m["latency_ms_p95"]
    assert m["throughput_per_s"] > 0
    assert 0 <= m["accuracy"] <= 1 and "agreement" not in m

    loaded.model.eval()
    evaluate(loaded.model, batcher, device="cpu", efficiency=False)
    assert not loaded.model.training


def test_lm_fidelity_from_a_teachers_top_k():
    from workers.engine.cache import topk_of
    from workers.engine.evaluate import lm_topk_fidelity

    torch.manual_seed(0)
    student, teacher = torch.randn(2, 4, 12), torch.randn(2, 4, 12) * 2
    mask = torch.tensor([[True, True, True, False], [True, True, False, False]])
    agree, kl = lm_topk_fidelity(student, topk_of(student, 3), mask)
    assert agree.item() == 5 and kl.item() == pytest.approx(0.0, abs=1e-5)  # the student is its own teacher

    full = (
        torch.nn.functional.kl_div(
            torch.log_softmax(student, -1), torch.log_softmax(teacher, -1), log_target=True, reduction="none"
        )
        .sum(-1)[mask]
        .sum()
    )
    _, kl_all = lm_topk_fidelity(student, topk_of(teacher, 12), mask)
    _, kl_top = lm_topk_fidelity(student, topk_of(teacher, 3), mask)
    assert kl_all.item() == pytest.approx(full.item(), rel=1e-4)  # k = V: the exact KL
    assert 0 < kl_top.item() <= full.item() + 1e-5  # top-k + tail: a lower bound
    expected_agree = (student.argmax(-1) == teacher.argmax(-1))[mask].sum().item()
    assert lm_topk_fidelity(student, topk_of(teacher, 3), mask)[0].item() == expected_agree


def test_builtin_nets_expose_hidden_activations_for_feature_terms(digits):
    from workers.engine.evaluate import forward_outputs

    loaded = load_model(
        ModelConfig(source="builtin", name="mlp", params={"hidden_sizes": [16, 8]}),
        dataset=digits,
        role="student",
    )
    inputs = Batcher(digits.eval).batch([0, 1, 2]).inputs
    out = forward_outputs(loaded.model, inputs, hidden=True)
    assert [tuple(h.shape) for h in out.hidden] == [(3, 1, 64), (3, 1, 16), (3, 1, 8)]
    assert torch.allclose(out.logits, loaded.model(**inputs))
    assert evaluate(loaded.model, Batcher(digits.eval), device="cpu")["peak_memory_bytes"] > 0
