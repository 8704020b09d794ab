"""The Content-Security-Policy in a real browser: every page still draws its plotly figures, Swagger UI still
loads, and chromium reports no violation (neither as a `securitypolicyviolation` event nor on the console)."""

import pytest
from playwright.sync_api import expect

from tests.browser import test_compare_browser as compare_pages
from tests.browser.session import log_in
from tests.waiting import scaled_ms

PASSWORD = compare_pages.PASSWORD
finished_sweep = compare_pages.finished_sweep  # the fixture: a finished sweep with curves and a leaderboard

pytestmark = pytest.mark.django_db(transaction=True)

# Runs before any page script (through the DevTools protocol, so the policy does not apply to it) and reports
# each violation to the test through an exposed function, so reports survive navigations.
REPORT_VIOLATIONS = """
document.addEventListener("securitypolicyviolation", function (e) {
  window.reportCspViolation(e.violatedDirective + " blocked " + (e.blockedURI || "inline") + " at " +
                            e.sourceFile + ":" + e.lineNumber);
});
"""


@pytest.fixture
def violations(page) -> list[str]:
    """Every CSP violation the page reports, as an event or on the console, on any page it goes to."""
    seen: list[str] = []
    page.on("console", lambda msg: seen.append(msg.text) if "Content Security Policy" in msg.text else None)
    page.expose_function("reportCspViolation", lambda text: seen.append(text))
    page.add_init_script(REPORT_VIOLATIONS)
    return seen


def _drawn(page, *figure_ids: str) -> None:
    for figure_id in figure_ids:
        plot = page.locator(f"#{figure_id}.js-plotly-plot")
        expect(plot).to_be_visible(timeout=scaled_ms(15))
        expect(plot.locator(".main-svg").first).to_be_attached()
        assert page.evaluate(f"document.getElementById('{figure_id}').data.length") > 0, figure_id


def test_every_page_draws_its_figures_under_the_policy(page, violations, live_server, finished_sweep):
    user, experiment, runs = finished_sweep
    log_in(page, live_server, user.username, PASSWORD)

    response = page.goto(live_server.url + f"/runs/{runs[0].pk}/")
    policy = response.headers["content-security-policy"]
    assert (
        "script-src 'self'" in policy and "unsafe-inline" not in policy.split("script-src")[1].split(";")[0]
    )
    assert "unsafe-eval" not in policy
    _drawn(page, "loss-figure", "eval-figure")

    page.goto(live_server.url + f"/experiments/{experiment.pk}/")
    _drawn(page, "curves-figure")

    ids = ",".join(str(r.pk) for r in runs[:3])
    page.goto(live_server.url + f"/compare/?runs={ids}")
    _drawn(page, "curves-figure", "pareto-figure")

    page.goto(live_server.url + f"/leaderboard/{experiment.dataset_id}/")
    _drawn(page, "leaderboard-figure")
    # The styles moved out of the page into app.css still apply (the Pareto rows' left rule).
    shadow = page.evaluate("getComputedStyle(document.querySelector('tr.pareto td.rank')).boxShadow")
    assert "inset" in shadow

    page.goto(live_server.url + "/api/token/")
    page.fill("input[name=name]", "csp check")
    page.click("form.form button[type=submit]")
    token_field = page.locator("input[aria-label='New API token']")
    token_field.focus()  # app.js selects the whole token (it used to be an inline onfocus= handler)
    assert page.evaluate(
        "document.activeElement.selectionEnd - document.activeElement.selectionStart"
    ) == len(token_field.input_value())

    assert violations == [], "\n".join(violations)


def test_swagger_ui_loads_under_the_policy(page, violations, live_server):
    page.goto(live_server.url + "/api/docs/")
    expect(page.locator(".swagger-ui .information-container")).to_contain_text(
        "distillweb API", timeout=scaled_ms(15)
    )
    expect(page.locator(".opblock").first).to_be_visible()
    assert violations == [], "\n".join(violations)
