"""The header's team switcher and a long, paged, sortable experiments list in a real browser."""

import re

import pytest
from playwright.sync_api import expect

from experiments.models import Membership
from tests.browser.session import log_in
from tests.factories import ExperimentFactory, MembershipFactory, TeamFactory, UserFactory

pytestmark = pytest.mark.django_db(transaction=True)

PASSWORD = "browser-pass-123"


@pytest.fixture
def researcher():
    """A lead of Vision (30 experiments) who is also a member of Speech (2 experiments)."""
    user = UserFactory(username="researcher")
    user.set_password(PASSWORD)
    user.save()
    vision, speech = TeamFactory(name="Vision"), TeamFactory(name="Speech")
    MembershipFactory(user=user, team=vision, role=Membership.Role.LEAD)
    MembershipFactory(user=user, team=speech)
    for i in range(30):
        ExperimentFactory(team=vision, name=f"vision sweep {i:02d}")
    for i in range(2):
        ExperimentFactory(team=speech, name=f"speech sweep {i}")
    return user


def _switch_team(page, label: str) -> None:
    page.select_option("#team-switch", label=label)
    page.click("form.team-switch button[type=submit]")


def test_switch_team_then_page_and_sort_the_experiments(page, live_server, researcher, screenshot):
    log_in(page, live_server, "researcher", PASSWORD)

    # One team: the list shows its experiments only, and the switch keeps the user on the page they were on.
    page.get_by_role("navigation", name="Main").get_by_role("link", name="Experiments").click()
    _switch_team(page, "Speech")
    expect(page).to_have_url(live_server.url + "/experiments/")
    expect(page.locator("#team-switch")).to_have_value(re.compile(r"\d+"))
    rows = page.locator("table.data tbody tr")
    expect(rows).to_have_count(2)
    expect(page.locator("table.data")).not_to_contain_text("vision")
    screenshot("experiments-one-team")

    # The other team's 30 experiments: 25 on the first page, the other 5 on page 2.
    _switch_team(page, "Vision")
    expect(rows).to_have_count(25)
    expect(page.locator("table.data")).not_to_contain_text("speech")
    page.get_by_role("link", name="Next →").click()
    expect(page).to_have_url(re.compile(r"[?&]page=2"))
    expect(rows).to_have_count(5)
    expect(page.locator(".pager")).to_contain_text("Page 2 of 2")
    screenshot("experiments-page-2")

    # Sorting by name (a header link, reachable by keyboard) starts again from page 1, A → Z.
    page.get_by_role("link", name="Experiment", exact=True).focus()
    page.keyboard.press("Enter")
    expect(page).to_have_url(re.compile(r"\?sort=name$"))
    expect(rows.first).to_contain_text("vision sweep 00")
    expect(page.locator("th[aria-sort=ascending]")).to_contain_text("Experiment")

    # The team's page: the lead sees the members and the form to add one.
    page.get_by_role("link", name="Teams", exact=True).click()
    page.get_by_role("link", name="Vision").click()
    expect(page.locator("h1")).to_have_text("Vision")
    expect(page.locator("input[name=username]")).to_be_focused()
    screenshot("team-page")
