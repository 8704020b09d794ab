"""A running run's page in a real browser follows the run through its phases as the worker's reporter writes
them: loading, the teacher-output cache fill, the training steps, the student's and then the teacher's
evaluation, saving; each with its rows done / total and the time left, updated live without a reload."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta

import pytest
from django.urls import reverse
from playwright.sync_api import expect

from experiments.models import Run
from tests.browser.session import log_in
from tests.waiting import scaled_ms
from tests.workers import test_faults
from tests.workers.test_faults import FakeTime
from workers.reporting import RunReporter

pytestmark = pytest.mark.django_db(transaction=True)

PASSWORD = "browser-pass-123"
claimed_run = test_faults.claimed_run  # a run of 40 steps claimed by task "t" on worker "w"


@pytest.fixture
def researcher(user):
    user.set_password(PASSWORD)
    user.save()
    return user


class Worker:
    """The worker's side: the run's reporter, its writes driven by a fake clock as the writer thread would."""

    def __init__(self, run: Run) -> None:
        self.run = run
        self.fake = FakeTime()
        self.reporter = RunReporter(run_id=run.id, task_id="t", clock=self.fake.clock, sleep=self.fake.sleep)

    def write(self) -> None:
        self.fake.now += 5
        self.reporter._routine_work()  # the writer thread's beat

    def phase(self, name: str, done: int, total: int, *, started_ago_s: float | None = None) -> None:
        self.reporter.on_phase(name, 0, total)
        if done:
            self.reporter.on_phase(name, done, total)
        self.write()
        if started_ago_s is not None:  # a phase that has been going for a while, so its time left is known
            Run.objects.filter(id=self.run.id).update(
                phase_started_at=datetime.now(UTC) - timedelta(seconds=started_ago_s)
            )

    def steps(self, step: int, total: int) -> None:
        self.reporter.on_progress(step, total)
        self.write()


def test_the_run_page_follows_every_phase_live_with_rows_and_time_left(
    page, live_server, researcher, claimed_run, screenshot
):
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
    worker = Worker(claimed_run)
    worker.phase("loading", 0, 1)
    log_in(page, live_server, researcher.username, PASSWORD)
    run_url = live_server.url + reverse("experiments:run_detail", args=[claimed_run.id])
    page.goto(run_url)
    live = page.locator("#run-live")
    phase = live.locator(".run-phase")
    # The page polls every 2 s; a bound of a few polls, scaled for a loaded machine.
    poll_bound = scaled_ms(10)

    expect(phase).to_have_attribute("data-phase", "loading")
    expect(phase).to_contain_text("Loading the data and models…")
    expect(phase).not_to_contain_text("rows")
    screenshot("run-phase-1-loading")

    worker.phase("teacher_cache", 300, 900, started_ago_s=600)  # 600 s for 300 rows: 1,200 s left
    expect(phase).to_have_attribute("data-phase", "teacher_cache", timeout=poll_bound)
    expect(phase).to_contain_text("Filling the teacher-output cache: 300 / 900 rows (33%)")
    expect(phase).to_contain_text(re.compile(r"about 2\d min left"))
    screenshot("run-phase-2-teacher-cache")

    worker.steps(10, 40)  # training: the steps say the rest, no phase line
    expect(live).to_contain_text("step 10 / 40 (25%)", timeout=poll_bound)
    expect(phase).to_have_count(0)
    screenshot("run-phase-3-training")

    worker.steps(40, 40)
    worker.phase("evaluation", 300, 400, started_ago_s=1200)  # 1,200 s for 300 rows: 400 s left
    expect(phase).to_have_attribute("data-phase", "evaluation", timeout=poll_bound)
    expect(phase).to_contain_text("Evaluating the student: 300 / 400 rows (75%)")
    expect(phase).to_contain_text(re.compile(r"about [6-9] min left"))  # more on a loaded machine
    expect(live).to_contain_text("step 40 / 40 (100%)")
    # Every step is done: the only time left shown is the evaluation's, not "<1 s" for the steps.
    expect(live.locator(".run-status-line").first).not_to_contain_text("left")
    screenshot("run-phase-4-evaluating-student")

    worker.phase("teacher_evaluation", 100, 400, started_ago_s=20)  # 20 s for 100 rows: 60 s left
    expect(phase).to_have_attribute("data-phase", "teacher_evaluation", timeout=poll_bound)
    expect(phase).to_contain_text("Evaluating the teacher: 100 / 400 rows (25%)")
    expect(phase).to_contain_text(re.compile(r"about \d+ (s|min) left"))
    expect(phase).not_to_contain_text("Evaluating the student")
    screenshot("run-phase-5-evaluating-teacher")

    worker.phase("saving", 0, 1)
    expect(phase).to_have_attribute("data-phase", "saving", timeout=poll_bound)
    expect(phase).to_contain_text("Saving…")
    expect(phase).not_to_contain_text("left")
    screenshot("run-phase-6-saving")

    assert page.url == run_url, "the page updated in place, without navigating"
    assert errors == []
