"""The experiment form's live run count includes the resource choices swept by ticking several boxes
(strategy, precision) or by "off and on" (activation checkpointing), and agrees with the server's count."""

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
    user = UserFactory(username="chooser")
    user.set_password(PASSWORD)
    user.save()
    team = TeamFactory(name="Vision")
    MembershipFactory(user=user, team=team)
    DatasetSpecFactory(team=team, name="digits")
    ModelSpecFactory(team=team, name="teacher-mlp", config={"hidden_sizes": [128]})
    ModelSpecFactory(team=team, name="student-mlp", config={"hidden_sizes": [16]})
    RecipeFactory(team=team, name="kd-t4")
    return user


def test_the_run_count_includes_ticked_boxes_and_off_and_on(page, live_server, records, screenshot):
    log_in(page, live_server, "chooser", PASSWORD)
    page.goto(live_server.url + "/experiments/new/")
    page.fill("input[name=name]", "resource sweep")
    page.select_option("select[name=dataset]", label="digits")
    page.select_option("select[name=teacher]", value=str(ModelSpec.objects.get(name="teacher-mlp").pk))
    page.select_option("select[name=students]", value=str(ModelSpec.objects.get(name="student-mlp").pk))
    page.select_option("select[name=recipes]", label="kd-t4 v1")
    page.fill("input[name=max_steps]", "20")
    count = page.locator("[data-sweep-count]")
    expect(count).to_contain_text("Creates 2 runs: 1 student × 1 seed × (kd-t4 v1 + baseline).")

    # auto is ticked by default; ticking ddp too sweeps two strategies.
    page.check("input[name=strategy][value=ddp]")
    expect(count).to_contain_text("Creates 4 runs")
    expect(count).to_contain_text("2 training settings (strategy ×2)")
    page.check("input[name=precision][value=bf16]")
    page.check("input[name=precision][value=fp32]")
    expect(count).to_contain_text("Creates 12 runs")
    page.select_option("select[name=activation_checkpointing]", "both")
    expect(count).to_contain_text(
        "Creates 24 runs: 1 student × 1 seed × 12 training settings "
        "(strategy ×2, precision ×3, activation_checkpointing ×2) × (kd-t4 v1 + baseline).")
    # No box ticked is the default (one value), as on the server; so is one.
    page.uncheck("input[name=strategy][value=auto]")
    page.uncheck("input[name=strategy][value=ddp]")
    expect(count).to_contain_text("Creates 12 runs")
    page.check("input[name=strategy][value=fsdp]")
    expect(count).to_contain_text("Creates 12 runs")
    page.check("input[name=strategy][value=ddp]")
    expect(count).to_contain_text("Creates 24 runs")
    screenshot("experiment-resource-sweep-form")

    # The server counts the same grid.
    page.click("button[data-check]")
    expect(page.locator("#preflight")).to_be_visible()
    expect(page.locator("[data-preflight-runs]")).to_have_attribute("data-preflight-runs", "24")
    expect(count).to_contain_text("Creates 24 runs")  # the re-rendered form keeps the ticks
    assert not Experiment.objects.exists()
