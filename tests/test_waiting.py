"""The tests' one way to wait for a worker (tests/waiting.py): follow the state, with a bound that scales."""

import pytest

from tests import waiting

pytestmark = pytest.mark.django_db


def test_the_scale_comes_from_the_environment_and_is_generous_by_default(monkeypatch):
    monkeypatch.delenv(waiting.SCALE_VARIABLE, raising=False)
    assert waiting.wait_scale() == waiting.DEFAULT_SCALE >= 3
    monkeypatch.setenv(waiting.SCALE_VARIABLE, "10")
    assert waiting.scaled(120) == 1200 and waiting.scaled_ms(15) == 150_000
    for bad in ("fast", "0", "-2"):
        monkeypatch.setenv(waiting.SCALE_VARIABLE, bad)
        with pytest.raises(ValueError, match=waiting.SCALE_VARIABLE):
            waiting.wait_scale()


def test_wait_until_returns_the_first_truthy_value():
    answers = iter([None, [], {"done": 1}])
    assert waiting.wait_until(lambda: next(answers), timeout=5, what="x", every=0) == {"done": 1}


def test_wait_until_gives_up_after_the_scaled_bound_and_says_what_it_saw(monkeypatch):
    monkeypatch.setenv(waiting.SCALE_VARIABLE, "0.01")
    with pytest.raises(AssertionError, match=r"gave up waiting for the thing after 0 s .*=0.01\)\nstate: 3"):
        waiting.wait_until(
            lambda: False, timeout=5, what="the thing", every=0.01, describe=lambda: "state: 3"
        )


def test_wait_until_stops_at_once_when_its_check_fails():
    calls = []

    def dead():
        calls.append(1)
        raise AssertionError("worker exited")

    with pytest.raises(AssertionError, match="worker exited"):
        waiting.wait_until(lambda: False, timeout=600, what="x", every=0, check=dead)
    assert calls == [1]


def test_wait_for_runs_follows_the_runs_until_all_have_finished(digits_setup, team, user):
    from django.utils import timezone

    from experiments.models import Run
    from tests.factories import ExperimentFactory, RunFactory

    experiment = ExperimentFactory(
        team=team, dataset=digits_setup["dataset"], teacher=digits_setup["teacher"]
    )
    done = RunFactory(experiment=experiment, status=Run.Status.SUCCEEDED, finished_at=timezone.now())
    running = RunFactory(experiment=experiment, status=Run.Status.QUEUED)
    polls = []

    def finish_on_second_poll():
        polls.append(1)
        if len(polls) == 2:
            Run.objects.filter(pk=running.pk).update(status=Run.Status.FAILED, error="boom",
                                                     finished_at=timezone.now())

    finished = waiting.wait_for_runs([running, done.pk], timeout=60, check=finish_on_second_poll)
    assert [(r.pk, r.status) for r in finished] == sorted([(done.pk, "succeeded"), (running.pk, "failed")])


def test_the_per_test_guard_scales_like_the_waits(request, pytestconfig):
    marker = request.node.get_closest_marker("timeout")
    if pytestconfig.getoption("timeout", None) is not None:
        pytest.skip("a --timeout on the command line replaces the scaled guard")
    assert marker is not None
    assert marker.args[0] == float(pytestconfig.getini("timeout")) * max(1.0, waiting.wait_scale())
