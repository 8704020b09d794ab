"""A researcher's path through the site in a real browser, with a real worker training the runs."""

import re

import pytest
from playwright.sync_api import expect

from experiments.models import Experiment, ModelSpec, Run
from experiments.services import records
from tests.browser.session import log_in
from tests.factories import MembershipFactory, TeamFactory, UserFactory
from tests.waiting import scaled_ms, wait_for_runs

pytestmark = [pytest.mark.integration, pytest.mark.django_db(transaction=True)]

PASSWORD = "browser-pass-123"


@pytest.fixture
def researcher():
    user = UserFactory(username="researcher")
    user.set_password(PASSWORD)
    user.save()
    team = TeamFactory(name="Vision")
    MembershipFactory(user=user, team=team)
    return user, team


def test_login_is_required_and_bad_passwords_are_refused(page, live_server, researcher, screenshot):
    page.goto(live_server.url + "/experiments/")
    expect(page).to_have_url(re.compile(r"/login/\?next=/experiments/"))
    page.fill("input[name=username]", "researcher")
    page.fill("input[name=password]", "wrong")
    page.click("button[type=submit]")
    expect(page.locator("body")).to_contain_text("enter a correct username and password")
    screenshot("login-error")


def test_create_records_launch_an_experiment_and_watch_it_finish(
    page, live_server, researcher, celery_worker_process, screenshot
):
    user, team = researcher
    worker = celery_worker_process
    log_in(page, live_server, "researcher", PASSWORD)
    screenshot("home-empty")

    # Records through the browser: a dataset and two models.
    page.goto(live_server.url + "/datasets/new/")
    page.fill("input[name=name]", "digits")
    page.check("input[name=source][value=builtin]")
    page.select_option("select[name=builtin_name]", "digits")
    page.click("main form button[type=submit]")
    expect(page.locator("body")).to_contain_text("digits")
    for name, hidden in (("teacher-mlp", "128"), ("student-mlp", "16")):
        page.goto(live_server.url + "/models/new/")
        page.fill("input[name=name]", name)
        page.check("input[name=source][value=builtin]")
        page.fill("input[name=hidden_sizes]", hidden)
        page.fill("input[name=num_labels]", "10")
        page.click("main form button[type=submit]")
        expect(page.locator("body")).to_contain_text(name)
    page.goto(live_server.url + "/models/")
    screenshot("models")

    # The teacher is trained here first: an experiment with the hard-labels recipe only.
    hard_labels = records.hard_labels_recipe(team=team)
    page.goto(live_server.url + "/experiments/new/")
    page.fill("input[name=name]", "train teacher")
    page.select_option("select[name=dataset]", label="digits")
    page.select_option("select[name=students]", value=str(ModelSpec.objects.get(name="teacher-mlp").pk))
    page.select_option("select[name=recipes]", value=str(hard_labels.pk))
    page.fill("input[name=max_steps]", "300")
    page.fill("input[name=lr]", "0.01")
    page.click("main form button[type=submit]")
    expect(page).to_have_url(re.compile(r"/experiments/\d+/$"))
    # Follow the run in the database until it has finished, however busy the machine; the page then shows it.
    (teacher_run,) = wait_for_runs(Run.objects.filter(experiment__name="train teacher"), timeout=90,
                                   check=worker.check_alive, describe=worker.tail)
    assert teacher_run.status == Run.Status.SUCCEEDED, teacher_run.error
    expect(page.locator("body")).to_contain_text("succeeded", timeout=scaled_ms(15))
    page.goto(live_server.url + f"/runs/{teacher_run.pk}/")
    page.fill("input[name=name]", "digits-teacher")
    page.click("text=Register model")
    expect(page.locator("body")).to_contain_text("digits-teacher")

    # A KD recipe without a teacher is refused with a field error, and nothing is created.
    kd = records.recipe_create(team=team, created_by=user, name="kd-t4", scheme="offline",
                                terms=[{"name": "ce", "weight": 0.1}, {"name": "kd", "weight": 0.9,
                                                                         "params": {"temperature": 4}}])
    page.goto(live_server.url + "/experiments/new/")
    page.fill("input[name=name]", "kd without teacher")
    page.select_option("select[name=dataset]", label="digits")
    page.select_option("select[name=students]", value=str(ModelSpec.objects.get(name="student-mlp").pk))
    page.select_option("select[name=recipes]", value=str(kd.pk))
    page.click("main form button[type=submit]")
    expect(page.locator("body")).to_contain_text("distills from a teacher")
    screenshot("experiment-form-error")
    assert not Experiment.objects.filter(name="kd without teacher").exists()

    # Now with the teacher: the runs table updates live while the worker trains.
    page.select_option("select[name=teacher]", value=str(ModelSpec.objects.get(name="digits-teacher").pk))
    page.fill("input[name=name]", "kd student")
    page.fill("input[name=max_steps]", "3000")
    page.fill("input[name=lr]", "0.01")
    page.fill("input[name=eval_every]", "500")
    page.click("main form button[type=submit]")
    expect(page).to_have_url(re.compile(r"/experiments/\d+/$"))
    page.evaluate("window.__sameDocument = true")
    # One run done while the other is still going, seen without a reload.
    page.wait_for_function(
        "() => window.__sameDocument === true && "
        "document.querySelectorAll('[data-live-url] .status-succeeded').length >= 1",
        timeout=scaled_ms(120),
    )
    screenshot("experiment-live")
    experiment = Experiment.objects.get(name="kd student")
    finished = wait_for_runs(
        experiment.runs.all(), timeout=120, check=worker.check_alive, describe=worker.tail
    )
    assert {r.status for r in finished} == {Run.Status.SUCCEEDED}, [r.error for r in finished]
    # Once everything has finished the page shows the final table by itself.
    live = "[data-live-url]"
    expect(page.locator(f"{live} .status-queued, {live} .status-running")).to_have_count(
        0, timeout=scaled_ms(15)
    )
    expect(page.locator(f"{live} tbody .status-succeeded")).to_have_count(2)

    # The run page draws its curves with the locally served plotly.js.
    distilled = experiment.runs.get(is_baseline=False)
    page.goto(live_server.url + f"/runs/{distilled.pk}/")
    expect(page.locator(".js-plotly-plot").first).to_be_visible(timeout=scaled_ms(15))
    expect(page.locator("body")).to_contain_text("kd")
    screenshot("run-detail")

    # The leaderboard ranks both students and shows the KD gain over the baseline.
    page.goto(live_server.url + f"/leaderboard/{experiment.dataset_id}/")
    expect(page.locator("table")).to_contain_text("kd-t4")
    expect(page.locator("table")).to_contain_text("baseline")
    expect(page.locator("table")).to_contain_text(" pp")
    screenshot("leaderboard")
