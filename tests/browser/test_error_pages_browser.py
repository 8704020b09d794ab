"""The styled 404 and 403 pages and the favicon in a real browser (the live server runs with DEBUG off)."""

import pytest
from playwright.sync_api import expect

from experiments.models import Membership
from tests.browser.session import log_in
from tests.factories import MembershipFactory, TeamFactory, UserFactory

pytestmark = pytest.mark.django_db(transaction=True)

PASSWORD = "browser-pass-123"


@pytest.fixture
def member():
    user = UserFactory(username="member")
    user.set_password(PASSWORD)
    user.save()
    MembershipFactory(user=user, team=TeamFactory(name="Vision"), role=Membership.Role.MEMBER)
    return user


def test_missing_and_forbidden_pages_keep_the_layout_and_lead_back(page, live_server, member, screenshot):
    log_in(page, live_server, "member", PASSWORD)

    response = page.goto(live_server.url + "/no-such-page/")
    assert response.status == 404
    expect(page.get_by_role("heading", name="Page not found")).to_be_visible()
    expect(page.locator("header.topbar nav.mainnav")).to_be_visible()
    screenshot("error-404")
    onward = page.get_by_role("navigation", name="Where to go from here")
    onward.get_by_role("link", name="Experiments").click()
    expect(page).to_have_url(live_server.url + "/experiments/")

    response = page.goto(live_server.url + "/workers/")  # staff only
    assert response.status == 403
    expect(page.get_by_role("heading", name="You are not allowed to see this page")).to_be_visible()
    expect(page.get_by_text("visible to staff only")).to_be_visible()
    screenshot("error-403")

    # The page's icon link resolves to the SVG the site serves.
    icon = page.evaluate("""async () => {
        const r = await fetch(document.querySelector('link[rel=icon]').href);
        return [r.status, r.headers.get('content-type'), (await r.text()).slice(0, 200)];
    }""")
    assert icon[0] == 200 and icon[1].startswith("image/svg+xml") and "<svg" in icon[2], icon
