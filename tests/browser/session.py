"""Signing in through the login page, as a user does; shared by the browser tests."""

from playwright.sync_api import expect


def log_in(page, live_server, username: str, password: str) -> None:
    """Sign ``username`` in through the login form and wait for the home page."""
    page.goto(live_server.url + "/login/")
    page.fill("input[name=username]", username)
    page.fill("input[name=password]", password)
    page.click("main button[type=submit]")
    expect(page).to_have_url(live_server.url + "/")
