"""Schedules of term weights and parameters over training progress."""

from __future__ import annotations

import math

import pytest

from workers.engine import schedules
from workers.engine.errors import ConfigError
from workers.engine.terms import LOSS_TERMS


def _at(kind, step, total=100, start=4.0, end=1.0):
    return schedules.value_at({"kind": kind, "start": start, "end": end}, step, total)


@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_schedules_start_at_start_and_end_at_end(kind):
    assert _at(kind, 0) == 4.0
    assert _at(kind, 100) == pytest.approx(1.0)
    assert _at(kind, 150) == pytest.approx(1.0)  # past the end: stays at end
    assert _at(kind, 50) == pytest.approx(2.5)  # both pass through the midpoint


def test_constant_linear_and_cosine_values_in_between():
    assert schedules.value_at({"kind": "constant", "start": 2.0}, 37, 100) == 2.0
    assert _at("linear", 25) == pytest.approx(4.0 - 3.0 * 0.25)
    assert _at("cosine", 25) == pytest.approx(1.0 + 3.0 * 0.5 * (1 + math.cos(math.pi * 0.25)))
    assert _at("cosine", 25) > _at("linear", 25)  # cosine starts flat


def test_progress_is_clamped_and_safe_with_no_steps():
    assert schedules.progress(5, 0) == 0.0
    assert schedules.progress(-1, 10) == 0.0
    assert schedules.progress(20, 10) == 1.0


def test_validate_schedule_normalises_to_floats_with_an_explicit_end():
    params = LOSS_TERMS["kd"].params
    assert schedules.validate_schedule(
        "kd", {"temperature": {"kind": "linear", "start": 4, "end": 1}}, params
    ) == {"temperature": {"kind": "linear", "start": 4.0, "end": 1.0}}
    assert schedules.validate_schedule("kd", {"weight": {"kind": "constant", "start": 1}}, params) == {
        "weight": {"kind": "constant", "start": 1.0, "end": 1.0}
    }
    assert schedules.validate_schedule("kd", None, params) == {}


@pytest.mark.parametrize(
    ("schedule", "message"),
    [
        (
            {"beta": {"kind": "linear", "start": 0, "end": 1}},
            "cannot schedule 'beta'. Schedulable: weight, temperature",
        ),
        (
            {"weight": {"kind": "step", "start": 0, "end": 1}},
            "has kind 'step'; use one of: constant, linear, cosine",
        ),
        ({"weight": {"kind": "linear", "end": 1}}, "needs a start value"),
        ({"weight": {"kind": "linear", "start": 0, "end": "1"}}, "end must be a number, got '1'"),
        ({"weight": {"kind": "linear", "start": -1, "end": 1}}, "start must be in [0, 1e+06], got -1"),
        ({"weight": {"kind": "linear", "start": 0, "stop": 1}}, "unknown keys: stop"),
        ({"weight": {"kind": "constant", "start": 0, "end": 1}}, "is constant, so end must equal start"),
        ({"temperature": {"kind": "cosine", "start": 4, "end": 0}}, "end must be > 0, got 0"),
        ({"temperature": 4}, "must be a mapping with kind, start and end"),
        ([1, 2], "must be a mapping"),
    ],
)
def test_validate_schedule_rejects_bad_schedules(schedule, message):
    with pytest.raises(ConfigError) as exc:
        schedules.validate_schedule("kd", schedule, LOSS_TERMS["kd"].params)
    assert message in str(exc.value)


def test_max_weight_is_the_larger_end_of_a_weight_schedule():
    assert schedules.max_weight(0.5, {}) == 0.5
    assert schedules.max_weight(0.0, {"weight": {"kind": "linear", "start": 0.0, "end": 0.3}}) == 0.3
