"""multi_teacher: the target is the weighted average of the teachers' distributions softened at the term's
τ."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from workers.engine import methods, planning, teachers, trainer
from workers.engine.config import LossTermConfig
from workers.engine.errors import ConfigError
from workers.engine.loss_primitives import mix_teachers
from workers.engine.methods import TermInputs, TermState
from workers.engine.terms import validate_terms

TAU = 2.0


def _teachers(
    seed: int = 0, *, k: int = 3, rows: int = 64, classes: int = 10
) -> tuple[torch.Tensor, list[float]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(k, rows, classes, generator=g) * 3, [0.5, 0.3, 0.2][:k]


def _reference(z: torch.Tensor, weights: list[float], tau: float) -> torch.Tensor:
    """float64 Σ_i w_i softmax(z_i/τ), (N, V)."""
    w = torch.tensor(weights, dtype=torch.float64) / sum(weights)
    return (w[:, None, None] * torch.softmax(z.double() / tau, dim=-1)).sum(0)


def _target_of(teacher_logits: torch.Tensor, tau: float) -> torch.Tensor:
    """The distribution a temperature-τ term compares the student with."""
    return torch.softmax(teacher_logits.double() / tau, dim=-1)


def test_the_mixture_softened_at_tau_is_the_average_of_the_softened_teachers():
    z, weights = _teachers()
    reference = _reference(z, weights, TAU)
    mixed = mix_teachers(z, weights, temperature=TAU)
    tv = 0.5 * (_target_of(mixed, TAU) - reference).abs().sum(-1).max().item()
    assert tv < 1e-6
    # Mixing at τ = 1 and softening afterwards (the old target) is measurably another distribution.
    old = 0.5 * (_target_of(mix_teachers(z, weights), TAU) - reference).abs().sum(-1).mean().item()
    assert old > 0.03


@pytest.mark.parametrize("name", ["kd", "reverse_kl", "jsd", "tvd"])
def test_each_term_compares_the_student_with_the_average_at_its_own_temperature(name):
    z, weights = _teachers(1)
    student = torch.randn(z.shape[1:], generator=torch.Generator().manual_seed(7))
    inputs = TermInputs(
        student_logits=student,
        labels=torch.zeros(z.shape[1], dtype=torch.long),
        teacher_logits=teachers.mix_teacher_logits(list(z), weights),
        teacher_mixture=z,
        teacher_weights=tuple(weights),
    )
    term = validate_terms([LossTermConfig(name, 1.0, {"temperature": TAU})])
    got = methods.combine(term, inputs, modules=torch.nn.ModuleDict(), state=TermState()).parts[name].item()

    p_t = _reference(z, weights, TAU)
    log_s = torch.log_softmax(student.double() / TAU, -1)
    p_s = log_s.exp()
    kl = lambda p, log_p, log_q: (p * (log_p - log_q)).sum(-1)  # noqa: E731
    if name == "kd":
        expected = TAU**2 * kl(p_t, p_t.log(), log_s)
    elif name == "reverse_kl":
        expected = TAU**2 * kl(p_s, log_s, p_t.log())
    elif name == "jsd":
        m = 0.5 * p_t + 0.5 * p_s
        expected = 0.5 * kl(p_t, p_t.log(), m.log()) + 0.5 * kl(p_s, log_s, m.log())
    else:
        expected = 0.5 * (p_t - p_s).abs().sum(-1)
    assert got == pytest.approx(expected.mean().item(), abs=1e-6)


def test_a_temperature_schedule_mixes_at_the_scheduled_temperature():
    z, weights = _teachers(2)
    student = torch.zeros(z.shape[1:])
    term = validate_terms(
        [
            LossTermConfig(
                "kd",
                1.0,
                {"temperature": 1.0},
                schedule={"temperature": {"kind": "linear", "start": 1.0, "end": 5.0}},
            )
        ]
    )
    inputs = TermInputs(
        student_logits=student,
        labels=torch.zeros(z.shape[1], dtype=torch.long),
        teacher_logits=teachers.mix_teacher_logits(list(z), weights),
        teacher_mixture=z,
        teacher_weights=tuple(weights),
        step=100,
        total_steps=100,
    )
    got = methods.combine(term, inputs, modules=torch.nn.ModuleDict(), state=TermState()).parts["kd"].item()
    tau = 5.0
    p_t = _reference(z, weights, tau)
    log_s = torch.log_softmax(student.double(), -1)
    expected = tau**2 * (p_t * (p_t.log() - log_s)).sum(-1).mean().item()
    assert got == pytest.approx(expected, abs=1e-5)


def test_a_multi_teacher_run_caches_each_teacher_and_trains_on_the_softened_average(
    tmp_path, digits_run, digits_teacher
):
    extra = {"source": "builtin", "name": "mlp", "params": {"hidden_sizes": [16]}}
    cfg = digits_run(
        tmp_path,
        teacher={"source": "run", "path": str(digits_teacher)},
        extra_teachers=[extra],
        teacher_weights=[3, 1],
        terms=[{"name": "kd", "params": {"temperature": TAU}}],
        scheme="multi_teacher",
        train={"max_steps": 2},
    )
    result = trainer.train(cfg)
    assert result.steps == 2
    stored = load_file(f"{result.teacher_cache[0]['path']}/outputs.safetensors")
    per_teacher = stored["teacher_logits"]  # (2, N, 10)
    assert per_teacher.shape[0] == 2
    assert torch.allclose(stored["logits"], teachers.mix_teacher_logits(list(per_teacher), [3, 1]), atol=1e-6)


def test_a_causal_lm_multi_teacher_run_refuses_a_temperature_it_cannot_apply(tmp_path):
    from workers.engine.config import RunConfig

    tiny = {
        "model_type": "gpt2",
        "n_embd": 16,
        "n_layer": 1,
        "n_head": 2,
        "vocab_size": 64,
        "n_positions": 32,
    }
    cfg = RunConfig.from_dict(
        {
            "student": {"source": "config", "params": tiny},
            "teacher": {"source": "config", "params": tiny},
            "extra_teachers": [{"source": "config", "params": tiny}],
            "dataset": {"source": "builtin", "name": "fortunes"},
            "task": "causal_lm",
            "scheme": "multi_teacher",
            "terms": [{"name": "topk", "params": {"k": 8, "tail": False, "temperature": 2.0}}],
            "output_dir": str(tmp_path),
        }
    )
    with pytest.raises(ConfigError, match="temperature other than 1"):
        planning.plan_run(cfg)
