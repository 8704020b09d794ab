"""A running run's phase besides its steps, in words with its rows and time left
(experiments/domain/run_phase.py), as the worker's reporter writes it (workers/reporting.py) and the run page
shows it."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from django.urls import reverse

from experiments.domain.run_phase import phase_status
from experiments.models import Run
from tests.workers import test_faults
from tests.workers.test_faults import FakeTime, reload
from workers.reporting import RunReporter

claimed_run = test_faults.claimed_run  # a run claimed by task "t" on worker "w"

NOW = datetime(2026, 12, 7, 12, 0, tzinfo=UTC)


def test_a_phase_with_rows_has_its_time_left_from_its_own_pace():
    status = phase_status("evaluation", 100, 400, NOW - timedelta(seconds=10), NOW)
    assert status.label == "Evaluating the student" and status.percent == 25 and status.has_rows
    assert status.eta_seconds == pytest.approx(30.0)  # 10 s for 100 rows, 300 left


def test_the_teacher_s_evaluation_and_the_cache_fill_are_named():
    assert phase_status("teacher_evaluation", 1, 4, NOW, NOW).label == "Evaluating the teacher"
    assert phase_status("teacher_cache", 0, 9, NOW, NOW).label == "Filling the teacher-output cache"


def test_no_time_left_before_the_first_rows_or_for_a_phase_without_rows():
    assert phase_status("evaluation", 0, 400, NOW - timedelta(seconds=5), NOW).eta_seconds is None
    loading = phase_status("loading", 0, 1, NOW, NOW)
    assert loading.label == "Loading the data and models"
    assert not loading.has_rows and loading.eta_seconds is None


def test_the_steps_are_no_phase():
    assert phase_status("", 0, 0, None, NOW) is None


@pytest.mark.django_db
def test_the_reporter_writes_the_phase_and_the_steps_clear_it(claimed_run):
    fake = FakeTime()
    reporter = RunReporter(run_id=claimed_run.id, task_id="t", clock=fake.clock, sleep=fake.sleep)
    reporter.on_progress(30, 30)
    reporter.on_phase("evaluation", 0, 400)
    reporter.on_phase("evaluation", 120, 400)
    fake.now += 5
    reporter._routine_work()  # the writer thread's beat
    run = reload(claimed_run)
    assert (run.phase, run.phase_done, run.phase_total) == ("evaluation", 120, 400)
    assert run.phase_started_at is not None and run.step == 30
    reporter.on_phase("teacher_evaluation", 0, 400)  # a new phase starts its own clock
    fake.now += 5
    reporter._routine_work()
    assert reload(run).phase == "teacher_evaluation" and reload(run).phase_started_at >= run.phase_started_at
    reporter.on_progress(31, 40)  # steps again (a mid-run evaluation was over)
    fake.now += 5
    reporter._routine_work()
    assert reload(run).phase == "" and reload(run).phase_status is None


@pytest.mark.django_db
def test_the_run_page_shows_the_phase_with_its_rows_and_time_left(client, user, claimed_run):
    Run.objects.filter(id=claimed_run.id).update(
        step=30, total_steps=30, phase="evaluation", phase_done=120, phase_total=400,
        phase_started_at=datetime.now(UTC) - timedelta(seconds=60),
    )
    client.force_login(user)
    page = client.get(reverse("experiments:run_detail", args=[claimed_run.id])).content.decode()
    assert "Evaluating the student: 120 / 400 rows (30%)" in page
    assert "about 2 min left" in page  # 60 s for 120 rows: 280 rows left, 140 s
    Run.objects.filter(id=claimed_run.id).update(phase="")
    page = client.get(reverse("experiments:run_detail", args=[claimed_run.id])).content.decode()
    assert "Evaluating the student" not in page
