"""Styled 403, 404 and 500 pages with navigation (DEBUG off, as in production), and the site's favicon."""

import pytest
from django.template.loader import get_template
from django.urls import include, path

pytestmark = pytest.mark.django_db

NAV_LINKS = ('href="/experiments/"', 'href="/models/"', 'href="/datasets/"', 'href="/leaderboard/"')


def _boom(request):
    raise RuntimeError("a bug in a view")


# A URLconf for the 500 test: the site's own, plus a view that raises.
urlpatterns = [path("boom/", _boom), path("", include("distillweb.urls"))]


@pytest.fixture(autouse=True)
def _production_errors(settings):
    settings.DEBUG = False


def _assert_styled(html: str) -> None:
    assert 'href="/static/css/app.css"' in html  # the site's layout, not Django's bare page
    assert 'class="brand"' in html
    for link in NAV_LINKS:
        assert link in html


def test_a_missing_page_is_the_styled_404_with_navigation(client_logged_in):
    response = client_logged_in.get("/no-such-page/")
    assert response.status_code == 404
    html = response.content.decode()
    _assert_styled(html)
    assert "Page not found" in html and "/no-such-page/" in html
    assert 'aria-label="Main"' in html  # a signed-in user also gets the header's navigation


def test_a_missing_page_offers_an_anonymous_visitor_the_login(client):
    response = client.get("/no-such-page/")
    assert response.status_code == 404
    html = response.content.decode()
    _assert_styled(html)
    assert 'href="/login/"' in html


def test_a_forbidden_page_is_the_styled_403_with_its_reason(client_logged_in):
    response = client_logged_in.get("/workers/")  # staff only
    assert response.status_code == 403
    html = response.content.decode()
    _assert_styled(html)
    assert "not allowed" in html and "visible to staff only" in html


@pytest.mark.urls(__name__)
def test_a_view_that_raises_gets_the_styled_500(client_logged_in):
    client_logged_in.raise_request_exception = False
    response = client_logged_in.get("/boom/")
    assert response.status_code == 500
    html = response.content.decode()
    _assert_styled(html)
    assert "Something went wrong" in html
    assert "a bug in a view" not in html  # nothing of the error reaches the page


@pytest.mark.django_db(False)
def test_the_500_page_renders_without_a_request_or_the_database():
    """Django renders 500.html with no request and no context processors; the page needs neither (this test
    has no database access: any query would fail it)."""
    html = get_template("500.html").render()
    _assert_styled(html)
    assert 'href="/login/"' in html


def test_the_favicon_is_linked_and_served(client):
    html = client.get("/login/").content.decode()
    assert '<link rel="icon" href="/static/favicon.svg" type="image/svg+xml">' in html
    icon = client.get("/static/favicon.svg")
    assert icon.status_code == 200
    assert icon["Content-Type"].startswith("image/svg+xml")
    assert b"<svg" in b"".join(icon.streaming_content)
    legacy = client.get("/favicon.ico")  # browsers that ask before reading the page; no login needed
    assert legacy.status_code == 301 and legacy["Location"] == "/static/favicon.svg"
