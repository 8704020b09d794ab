"""The recipe form in a real browser: one row per term with only its parameters, "+ add term", an error
beside its field, saving the next version, and the recipe page's diff between versions."""

import re

import pytest
from playwright.sync_api import expect

from experiments.models import Recipe
from experiments.services import records
from tests.browser.session import log_in
from tests.factories import MembershipFactory, TeamFactory, UserFactory

pytestmark = pytest.mark.django_db(transaction=True)

PASSWORD = "browser-pass-123"


@pytest.fixture
def researcher():
    user = UserFactory(username="recipe-writer")
    user.set_password(PASSWORD)
    user.save()
    team = TeamFactory(name="NLP")
    MembershipFactory(user=user, team=team)
    records.recipe_create(team=team, created_by=user, name="jsd-hidden", scheme="online",
                          terms=[{"name": "ce", "weight": 0.5}, {"name": "jsd", "weight": 0.5}])
    return user


# A refused form comes back as a 400 page, which chromium reports on the console; anything else is an error.
REFUSED_FORM = "the server responded with a status of 400"


@pytest.fixture
def errors(page):
    seen: list[str] = []
    page.on("pageerror", lambda exc: seen.append(str(exc)))
    page.on(
        "console",
        lambda msg: seen.append(msg.text) if msg.type == "error" and REFUSED_FORM not in msg.text else None,
    )
    return seen


def _visible_params(row) -> list[str]:
    return sorted(row.locator("[data-param]:visible label").all_inner_texts())


def test_write_the_next_version_one_term_per_row_and_read_its_diff(page, live_server, researcher, errors,
                                                                   screenshot):
    log_in(page, live_server, "recipe-writer", PASSWORD)
    page.goto(live_server.url + "/recipes/")
    page.get_by_role("link", name="jsd-hidden v1").click()
    expect(page.locator("h1")).to_contain_text("jsd-hidden v1")
    page.get_by_role("link", name="New version from this").click()

    # The version's two rows, each with only its own term's parameters; no spare rows with script on.
    rows = page.locator("[data-term-row]:visible")
    expect(rows).to_have_count(2)
    assert _visible_params(rows.nth(0)) == ["label_smoothing"]
    assert _visible_params(rows.nth(1)) == ["beta", "temperature"]
    expect(rows.nth(1).locator("input[name$='-beta']")).to_have_attribute("placeholder", "0.5")
    screenshot("recipe-form-rows")

    # The scheme shows only its own parameters, with its defaults as placeholders.
    scheme_params = page.locator("[data-scheme-param]:visible")
    expect(scheme_params).to_have_count(0)
    page.select_option("select[name=scheme]", "self_distillation")
    expect(scheme_params).to_have_count(1)
    expect(scheme_params.locator("input")).to_have_attribute("name", "scheme_generations")
    expect(scheme_params.locator("input")).to_have_attribute("placeholder", "2")
    page.select_option("select[name=scheme]", "online")
    expect(scheme_params).to_have_count(0)

    # Switch the second row to kd: its parameters follow, with kd's default as the placeholder.
    rows.nth(1).locator("select[name$='-name']").select_option("kd")
    assert _visible_params(rows.nth(1)) == ["temperature"]
    expect(rows.nth(1).locator("input[name$='-temperature']")).to_have_attribute("placeholder", "4")
    expect(rows.nth(1).locator("input[name$='-temperature']")).to_have_value("")  # kd's default, not jsd's

    # "+ add term" adds an empty row; choosing topk shows topk's parameters only.
    page.get_by_role("button", name="+ add term").click()
    expect(rows).to_have_count(3)
    expect(rows.nth(2).locator("[data-param]:visible")).to_have_count(0)
    rows.nth(2).locator("select[name$='-name']").select_option("topk")
    assert _visible_params(rows.nth(2)) == ["beta", "divergence", "k", "tail", "temperature"]
    rows.nth(2).locator("input[name$='-k']").fill("0")
    rows.nth(2).locator("input[name$='-weight']").fill("0.1")
    screenshot("recipe-form-added-term")

    # A row added by mistake is removed again: it is not saved.
    page.get_by_role("button", name="+ add term").click()
    expect(rows).to_have_count(4)
    rows.nth(3).locator("select[name$='-name']").select_option("tvd")
    rows.nth(3).get_by_role("button", name="Remove").click()
    expect(rows).to_have_count(3)

    # An out-of-range value comes back as an error beside its own field, in the row it belongs to.
    page.get_by_role("button", name="Save recipe").click()
    k_box = page.locator("[data-term-row]:visible").nth(2).locator("[data-param]:has(input[name$='-k'])")
    expect(k_box.locator(".errorlist")).to_be_visible()
    expect(k_box).to_have_class(re.compile(r"has-error"))
    assert Recipe.objects.filter(name="jsd-hidden").count() == 1
    screenshot("recipe-form-error-beside-field")

    # Fix it and save: version 2, and its page says what changed from version 1.
    page.locator("[data-term-row]:visible").nth(2).locator("input[name$='-k']").fill("8")
    page.get_by_role("button", name="Save recipe").click()
    expect(page.locator("h1")).to_contain_text("jsd-hidden v2")
    latest = Recipe.objects.get(name="jsd-hidden", version=2)
    assert [t["name"] for t in latest.terms] == ["ce", "kd", "topk"]
    changes = page.locator("article[data-version='2'] .changes")
    expect(changes).to_contain_text("term jsd")
    expect(changes).to_contain_text("term kd")
    expect(changes).to_contain_text("topk")
    expect(page.locator("article[data-version='1']")).to_contain_text("First version")
    screenshot("recipe-page-versions-diff")
    assert errors == []


def test_without_script_the_form_still_saves_from_its_spare_rows(
    browser, live_server, researcher, screenshot
):
    context = browser.new_context(java_script_enabled=False, viewport={"width": 1400, "height": 1000})
    page = context.new_page()
    try:
        log_in(page, live_server, "recipe-writer", PASSWORD)
        page.goto(live_server.url + "/recipes/new/")
        rows = page.locator("[data-term-row]")
        expect(rows).to_have_count(6)  # the two first terms and four spare rows
        expect(page.get_by_role("button", name="+ add term")).to_be_hidden()
        page.fill("input[name=name]", "plain-kd")
        rows.nth(2).locator("select[name$='-name']").select_option("tvd")
        rows.nth(2).locator("input[name$='-weight']").fill("0.2")
        screenshot("recipe-form-no-script")
        page.get_by_role("button", name="Save recipe").click()
        expect(page.locator("h1")).to_contain_text("plain-kd v1")
        assert [t["name"] for t in Recipe.objects.get(name="plain-kd").terms] == ["ce", "kd", "tvd"]
    finally:
        context.close()


def test_the_recipe_page_and_form_fit_a_phone(page, live_server, researcher, errors, screenshot):
    recipe = Recipe.objects.get(name="jsd-hidden")
    records.recipe_create(team=recipe.team, created_by=researcher, name="jsd-hidden", scheme="online",
                          terms=[{"name": "ce", "weight": 0.2},
                                 {"name": "topk", "weight": 0.8, "params": {"k": 16, "tail": False}}])
    page.set_viewport_size({"width": 390, "height": 844})
    log_in(page, live_server, "recipe-writer", PASSWORD)
    for name, path in (("recipe-page", f"/recipes/{recipe.pk}/"), ("recipe-form", "/recipes/new/")):
        page.goto(live_server.url + path)
        expect(page.locator("h1")).to_be_visible()
        width = page.evaluate("document.documentElement.scrollWidth")
        screenshot(f"{name}-390")
        assert width <= 390, f"{name} scrolls sideways ({width} px)"
    assert errors == []
