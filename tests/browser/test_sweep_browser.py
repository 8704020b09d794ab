"""Setting up a sweep in a real browser: the live run count, the pre-flight checks, launch, and a run's
clone."""

import re
from unittest import mock

import pytest
from playwright.sync_api import expect

from experiments.models import Experiment, ModelSpec
from tests.browser.session import log_in
from tests.factories import (
    DatasetSpecFactory,
    MembershipFactory,
    ModelSpecFactory,
    RecipeFactory,
    TeamFactory,
    UserFactory,
)

pytestmark = [pytest.mark.integration, pytest.mark.django_db(transaction=True)]

PASSWORD = "browser-pass-123"


@pytest.fixture
def records():
    user = UserFactory(username="sweeper")
    user.set_password(PASSWORD)
    user.save()
    team = TeamFactory(name="Vision")
    MembershipFactory(user=user, team=team)
    DatasetSpecFactory(team=team, name="digits")
    ModelSpecFactory(team=team, name="teacher-mlp", config={"hidden_sizes": [128]})
    ModelSpecFactory(team=team, name="student-mlp", config={"hidden_sizes": [16]})
    RecipeFactory(team=team, name="kd-t4")
    return user


@pytest.fixture
def no_broker():
    """The runs stay queued: nothing is sent to a broker (no worker is part of this test)."""
    with mock.patch("experiments.services.dispatch._dispatch") as dispatch:
        yield dispatch


def test_set_up_a_sweep_check_it_and_launch_it(page, live_server, records, no_broker, screenshot):
    log_in(page, live_server, "sweeper", PASSWORD)
    page.goto(live_server.url + "/experiments/new/")
    page.fill("input[name=name]", "lr × temperature")
    page.select_option("select[name=dataset]", label="digits")
    page.select_option("select[name=teacher]", value=str(ModelSpec.objects.get(name="teacher-mlp").pk))
    page.select_option("select[name=students]", value=str(ModelSpec.objects.get(name="student-mlp").pk))
    page.select_option("select[name=recipes]", label="kd-t4 v1")
    page.fill("input[name=max_steps]", "50")
    count = page.locator("[data-sweep-count]")
    expect(count).to_contain_text("Creates 2 runs")

    # The count follows every keystroke: 3 learning rates × (2 temperatures + the baseline).
    page.fill("input[name=lr]", "1e-3:1e-2:log3")
    expect(count).to_contain_text("Creates 6 runs")
    page.fill("textarea[name=term_sweeps]", "kd.temperature = 2, 8")
    expect(count).to_contain_text("Creates 9 runs: 1 student × 1 seed × 3 training settings (lr ×3) × "
                                  "(kd-t4 v1 × 2 term values + baseline).")
    # A huge range is counted, not expanded, and flagged at once; a typo is named.
    page.fill("input[name=weight_decay]", "0:1:step1e-9")
    expect(count).to_contain_text("over the limit of 200 runs")
    expect(count).to_have_class(re.compile("text-bad"))
    page.fill("input[name=weight_decay]", "0.01:0.1:sqrt3")
    expect(count).to_contain_text("weight_decay")
    page.fill("input[name=weight_decay]", "0.01")
    expect(count).to_contain_text("Creates 9 runs")
    screenshot("experiment-sweep-form")

    # The server recounts and runs the pre-flight checks; nothing is created yet.
    page.click("button[data-check]")
    preflight = page.locator("#preflight")
    expect(preflight).to_be_visible()
    expect(page.locator("[data-preflight-runs]")).to_have_attribute("data-preflight-runs", "9")
    for key in ("runs", "labels", "tokenizers", "memory", "time"):
        expect(page.locator(f"#check-{key}")).to_be_visible()
    expect(page.locator("#check-labels")).to_contain_text("predicts the 10 classes of digits")
    expect(page.locator("#check-time")).to_contain_text("No similar runs yet")
    expect(page.locator("#check-runs")).to_have_attribute("data-level", "ok")
    expect(page.locator("input[name=lr]")).to_have_value("1e-3:1e-2:log3")  # the form keeps what was typed
    screenshot("experiment-sweep-preflight")
    assert not Experiment.objects.exists()

    # Launch: the experiment page lists one run per point of the grid.
    page.click("button[data-launch]")
    expect(page).to_have_url(re.compile(r"/experiments/\d+/$"))
    expect(page.locator("body")).to_contain_text("created with 9 runs")
    expect(page.locator("table.runs tbody tr")).to_have_count(9)
    screenshot("experiment-sweep-launched")
    experiment = Experiment.objects.get()
    assert experiment.train["lr"] == [1e-3, 0.00316228, 1e-2]
    assert no_broker.call_count == 9

    # A run's page shows its point of the sweep, and its clone starts from those values.
    run = next(r for r in experiment.runs.all() if not r.is_baseline and r.config["train"]["lr"] == 1e-2
               and r.config["terms"][1]["params"]["temperature"] == 8.0)
    page.goto(live_server.url + f"/runs/{run.pk}/")
    expect(page.locator("#sweep-point")).to_have_text("lr=0.01 τ=8")
    page.click("a[data-clone]")
    expect(page).to_have_url(re.compile(rf"/runs/{run.pk}/clone/$"))
    expect(page.locator("input[name=lr]")).to_have_value("0.01")
    expect(page.locator("textarea[name=term_sweeps]")).to_have_value("kd.temperature = 8")
    expect(count).to_contain_text("Creates 2 runs")
    screenshot("run-clone-form")
