"""In a real browser: the experiment page's runs table drops "waits for run #N" as soon as run #N finishes and
shows each queued run's place in its queue, live, without a reload; a baseline that reused an identical run's
results says so on its page."""

from __future__ import annotations

from unittest import mock

import pytest
from django.urls import reverse
from playwright.sync_api import expect

from experiments.models import Run
from experiments.services import launch, lifecycle, records
from tests.browser.session import log_in

pytestmark = pytest.mark.django_db(transaction=True)

PASSWORD = "browser-pass-123"
DISPATCH = "workers.tasks.run_distillation.apply_async"
TRAIN = {"max_steps": 40, "eval_every": 20, "save_every": 20, "log_every": 10}


@pytest.fixture
def researcher(user):
    user.set_password(PASSWORD)
    user.save()
    return user


def _finish(run: Run, task_id: str) -> None:
    lifecycle.run_claim(run_id=run.id, task_id=task_id, worker_name="w")
    lifecycle.run_finish(run_id=run.id, task_id=task_id,
                         result={"steps": 40, "student": {"accuracy": 0.9, "params": 100}})


def test_waits_clear_and_places_show_live_and_a_reused_baseline_says_so(
    page, live_server, researcher, team, digits_setup, screenshot
):
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
    with mock.patch(DISPATCH):
        training = launch.experiment_create(
            team=team, created_by=researcher, name="teacher", dataset=digits_setup["dataset"],
            students=[digits_setup["teacher"]], recipes=[records.hard_labels_recipe(team=team)], seeds=[0],
            train=TRAIN,
        )
        teacher_run = training.runs.get()
        teacher = records.model_register_from_run(run=teacher_run, name="trained-teacher",
                                                  created_by=researcher, allow_pending=True)
        experiment = launch.experiment_create(
            team=team, created_by=researcher, name="kd", dataset=digits_setup["dataset"], teacher=teacher,
            students=digits_setup["students"][:1], recipes=[digits_setup["recipe"]], seeds=[0], train=TRAIN,
        )
    distilled = experiment.runs.get(is_baseline=False)
    baseline = experiment.runs.get(is_baseline=True)

    log_in(page, live_server, researcher.username, PASSWORD)
    page.goto(live_server.url + reverse("experiments:experiment_detail", args=[experiment.id]))
    row = page.locator(f"#run-{distilled.id}")
    expect(row.locator(".note")).to_contain_text(f"waits for run #{teacher_run.id}")
    # The baseline was sent at launch, behind the teacher's run.
    expect(page.locator(f"#run-{baseline.id} [data-queue-place]")).to_have_text(
        f"queued · 2nd in {baseline.queue} queue")
    screenshot("queue-place-waiting")

    with mock.patch(DISPATCH):
        _finish(teacher_run, "t-teacher")
    # The live refresh (every 2 s) redraws the table: no stale wait, the distilled run is served first.
    expect(row.locator("[data-queue-place]")).to_have_text(f"queued · 1st in {distilled.queue} queue")
    expect(row.locator(".note")).not_to_contain_text("waits for")
    expect(page.locator(f"#run-{baseline.id} [data-queue-place]")).to_have_text(
        f"queued · 2nd in {baseline.queue} queue")
    screenshot("queue-place-released")

    with mock.patch(DISPATCH):
        _finish(baseline, "t-baseline")
        again = launch.experiment_create(
            team=team, created_by=researcher, name="kd again", dataset=digits_setup["dataset"],
            teacher=teacher, students=digits_setup["students"][:1], recipes=[digits_setup["recipe"]],
            seeds=[0], train=TRAIN,
        )
    reused = again.runs.get(is_baseline=True)
    assert reused.is_reused
    page.goto(live_server.url + reverse("experiments:experiment_detail", args=[again.id]))
    expect(page.locator(f"#run-{reused.id} [data-reused]")).to_have_text(f"reused from run #{baseline.id}")
    page.goto(live_server.url + reverse("experiments:run_detail", args=[reused.id]))
    notice = page.locator(".run-status [data-reused]")
    expect(notice).to_contain_text(f"Reused from run #{baseline.id}")
    notice.get_by_role("link", name=f"run #{baseline.id}").click()
    expect(page).to_have_url(live_server.url + reverse("experiments:run_detail", args=[baseline.id]))
    page.go_back()
    screenshot("queue-place-reused-baseline")
    assert errors == []
