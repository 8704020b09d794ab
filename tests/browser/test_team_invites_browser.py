"""Teams without the Django admin, in a real browser: staff create a team with its lead, the lead makes an
invite link, and a newcomer opens it in a fresh browser (a phone-sized one), makes an account and lands in the
team. No page logs a JavaScript error."""

import re

import pytest
from playwright.sync_api import expect

from experiments.models import Membership, TeamInvite
from tests.browser.conftest import SCREENSHOTS
from tests.browser.session import log_in
from tests.factories import UserFactory

pytestmark = pytest.mark.django_db(transaction=True)

PASSWORD = "browser-pass-123"
NEW_PASSWORD = "a-long-fresh-passphrase-42"


def _account(username: str, **extra):
    user = UserFactory(username=username, **extra)
    user.set_password(PASSWORD)
    user.save()
    return user


def _watch_errors(page, errors: list[str]) -> None:
    """Collect uncaught script errors and console errors, except the browser's note that a page answered with
    an error status (the refused sign-up's 400 and the used link's 410 are meant)."""
    page.on("pageerror", lambda exc: errors.append(f"{page.url}: {exc}"))
    page.on("console", lambda msg: errors.append(f"{page.url}: {msg.text}")
            if msg.type == "error" and "Failed to load resource" not in msg.text else None)


def _shot(page, name: str) -> None:
    """A screenshot of a page other than the ``screenshot`` fixture's own (another browser context)."""
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOTS / f"{name}.png"), full_page=True)


def test_staff_create_a_team_the_lead_invites_and_a_newcomer_joins(browser, page, live_server, screenshot):
    _account("root", is_staff=True, is_superuser=True)
    lead = _account("lena")
    errors: list[str] = []
    _watch_errors(page, errors)

    # Staff: the Teams page creates a team with its first lead.
    log_in(page, live_server, "root", PASSWORD)
    page.get_by_role("navigation", name="Main").get_by_role("link", name="Teams", exact=True).click()
    page.fill("input[name=name]", "Speech")
    page.fill("input[name=lead_username]", "lena")
    screenshot("team-list-create-form")
    page.get_by_role("button", name="Create team").click()
    expect(page.locator("h1")).to_have_text("Speech")
    expect(page.locator(".messages")).to_contain_text("Team Speech created")
    expect(page.locator("table.data").first).to_contain_text("lena")
    screenshot("team-created-by-staff")
    page.get_by_role("button", name="Log out").click()

    # The lead makes a lead invite for one week and copies the link, which is shown this once.
    log_in(page, live_server, "lena", PASSWORD)
    page.context.grant_permissions(["clipboard-read", "clipboard-write"], origin=live_server.url)
    page.goto(live_server.url + "/teams/")
    page.get_by_role("link", name="Speech").click()
    page.select_option("#invite_role", "lead")
    page.fill("#invite_note", "Noor from the speech lab")
    page.get_by_role("button", name="Create invite link").click()
    link_field = page.locator("#invite-url")
    expect(link_field).to_have_value(re.compile(rf"^{re.escape(live_server.url)}/invites/[\w-]{{40,}}/$"))
    link = link_field.input_value()
    page.get_by_role("button", name="Copy link").click()
    expect(page.get_by_role("button", name="Copied")).to_be_visible()
    assert page.evaluate("navigator.clipboard.readText()") == link
    expect(page.locator("#pending-invites")).to_contain_text("Noor from the speech lab")
    screenshot("team-invite-link")

    # A fresh browser (no session, phone width) opens the link, makes an account and lands in the team.
    newcomer_context = browser.new_context(viewport={"width": 390, "height": 844})
    newcomer = newcomer_context.new_page()
    _watch_errors(newcomer, errors)
    newcomer.goto(link)
    expect(newcomer).to_have_url(live_server.url + "/invites/accept/")  # the token left the address bar
    expect(newcomer.locator("h1")).to_have_text("Join Speech")
    expect(newcomer.locator("main")).to_contain_text("lena invited you")
    assert newcomer.evaluate("document.documentElement.scrollWidth") <= 390
    _shot(newcomer, "team-invite-accept-390")
    newcomer.fill("input[name=username]", "noor")
    newcomer.fill("input[name=password1]", "short")
    newcomer.fill("input[name=password2]", "short")
    newcomer.get_by_role("button", name="Create account and join").click()
    expect(newcomer.locator("#field-password2 .errorlist")).to_contain_text("too short")
    newcomer.fill("input[name=password1]", NEW_PASSWORD)
    newcomer.fill("input[name=password2]", NEW_PASSWORD)
    newcomer.get_by_role("button", name="Create account and join").click()
    expect(newcomer.locator("h1")).to_have_text("Speech")
    expect(newcomer.locator(".messages")).to_contain_text("Welcome, noor. You joined Speech as lead.")
    expect(newcomer.locator(".account")).to_contain_text("noor")
    _shot(newcomer, "team-invite-joined-390")
    newcomer_context.close()
    assert Membership.objects.get(user__username="noor").role == Membership.Role.LEAD

    # The link worked once: the lead's page lists no pending invite, and a second visitor is told why.
    page.get_by_role("navigation", name="Main").get_by_role("link", name="Teams", exact=True).click()
    page.get_by_role("main").get_by_role("link", name="Speech").click()
    expect(page.locator("#pending-invites")).to_have_count(0)
    expect(page.locator("table.data").first).to_contain_text("noor")
    late_context = browser.new_context()
    late = late_context.new_page()
    _watch_errors(late, errors)
    response = late.goto(link)
    assert response.status == 410
    expect(late.locator("[role=alert]")).to_contain_text("already used")
    _shot(late, "team-invite-used")
    late_context.close()
    invite = TeamInvite.objects.get()
    assert invite.accepted_by.username == "noor" and invite.created_by == lead

    assert not errors, errors

