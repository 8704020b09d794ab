"""The experiment form in a real browser: model pickers (search, the filter to models that fit the dataset,
removable chips), the pre-flight panel marked out of date on an edit, Create disabled over the run limit;
and the models list's task and parameter columns."""

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
TINY_BERT = {"model_type": "bert", "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
             "intermediate_size": 64, "vocab_size": 500, "max_position_embeddings": 64}


@pytest.fixture
def records():
    user = UserFactory(username="picker")
    user.set_password(PASSWORD)
    user.save()
    team = TeamFactory(name="Vision")
    MembershipFactory(user=user, team=team)
    DatasetSpecFactory(team=team, name="digits")
    DatasetSpecFactory(team=team, name="news", builtin_name="bbc-news", num_labels=5,
                       label_names=["business", "entertainment", "politics", "sport", "tech"])
    ModelSpecFactory(team=team, name="teacher-mlp", config={"hidden_sizes": [128]})
    ModelSpecFactory(team=team, name="mlp-16", config={"hidden_sizes": [16]})
    ModelSpecFactory(team=team, name="mlp-32", config={"hidden_sizes": [32]})
    ModelSpecFactory(team=team, name="iris-mlp", config={"hidden_sizes": [8]}, num_labels=3)
    ModelSpecFactory(team=team, name="tiny-bert", source=ModelSpec.Source.CONFIG, builtin_arch="",
                     config=TINY_BERT, num_labels=5, tokenizer_id="google-bert/bert-base-uncased")
    RecipeFactory(team=team, name="kd-t4")
    return user


@pytest.fixture
def js_errors(page) -> list[str]:
    seen: list[str] = []
    page.on("pageerror", lambda exc: seen.append(str(exc)))
    page.on("console", lambda msg: seen.append(msg.text) if msg.type == "error" else None)
    return seen


def _listed(page, select: str) -> list[str]:
    """The names of the options a picker shows (not hidden by its search or filter)."""
    return page.eval_on_selector_all(f"select[name={select}] option:not([hidden])[data-name]",
                                     "options => options.map(o => o.dataset.name)")


def _pk(name: str) -> str:
    return str(ModelSpec.objects.get(name=name).pk)


def _field(page, name: str):
    return page.locator(f"#field-{name}")


def test_pickers_search_filter_by_the_dataset_and_show_chips(page, live_server, records, js_errors,
                                                             screenshot):
    log_in(page, live_server, "picker", PASSWORD)
    page.goto(live_server.url + "/experiments/new/")
    students = _field(page, "students")
    assert sorted(_listed(page, "students")) == ["iris-mlp", "mlp-16", "mlp-32", "teacher-mlp", "tiny-bert"]

    # Digits: 10-class tabular data; the 3-class net and the text model do not fit.
    page.select_option("select[name=dataset]", label="digits")
    assert sorted(_listed(page, "students")) == ["mlp-16", "mlp-32", "teacher-mlp"]
    expect(students.locator(".picker-status")).to_have_text("3 of 5 models fit digits.")
    expect(students.locator("select option[data-name=mlp-16]")).to_contain_text(
        "mlp-16 — classification, 10 labels, 1.21k params")
    # "show models that do not fit" lists them again.
    students.locator(".picker-all input").check()
    assert len(_listed(page, "students")) == 5
    students.locator(".picker-all input").uncheck()

    # The search narrows the list on every keystroke, on every word.
    students.locator(".picker-search").fill("mlp 32")
    assert _listed(page, "students") == ["mlp-32"]
    expect(students.locator(".picker-status")).to_have_text("3 of 5 models fit digits; 1 shown.")
    students.locator(".picker-search").fill("")

    # Chosen models are chips; a chip's × removes the model from the select the form posts.
    page.select_option("select[name=students]", value=[_pk("mlp-16"), _pk("mlp-32")])
    page.select_option("select[name=teacher]", value=_pk("teacher-mlp"))
    page.select_option("select[name=recipes]", label="kd-t4 v1")
    expect(students.locator(".chip")).to_have_text(["mlp-16×", "mlp-32×"])
    expect(_field(page, "teacher").locator(".chip")).to_have_text(["teacher-mlp×"])
    expect(page.locator("[data-sweep-count]")).to_contain_text("Creates 4 runs")
    screenshot("setup-pickers-chips")
    students.get_by_role("button", name="Remove mlp-16").click()
    expect(students.locator(".chip")).to_have_text(["mlp-32×"])
    assert page.eval_on_selector("select[name=students]", "s => [...s.selectedOptions].map(o => o.value)") \
        == [_pk("mlp-32")]
    expect(page.locator("[data-sweep-count]")).to_contain_text("Creates 2 runs")

    # Another dataset: the text classifier with its 5 classes fits; the chosen net stays, flagged.
    page.select_option("select[name=dataset]", label="news")
    assert sorted(_listed(page, "students")) == ["mlp-32", "tiny-bert"]
    expect(students.locator(".chip-misfit")).to_have_text(["mlp-32×"])
    screenshot("setup-pickers-other-dataset")
    page.select_option("select[name=dataset]", label="digits")
    expect(students.locator(".chip-misfit")).to_have_count(0)

    # The selects still post the form.
    with mock.patch("experiments.services.dispatch._dispatch"):
        page.fill("input[name=name]", "picked")
        page.fill("input[name=max_steps]", "20")
        page.click("button[data-launch]")
        expect(page).to_have_url(re.compile(r"/experiments/\d+/$"))
    experiment = Experiment.objects.get(name="picked")
    assert [s.name for s in experiment.students.all()] == ["mlp-32"]
    assert experiment.teacher.name == "teacher-mlp"
    assert js_errors == []


def test_an_edit_after_the_check_marks_the_panel_out_of_date(page, live_server, records, js_errors,
                                                             screenshot):
    log_in(page, live_server, "picker", PASSWORD)
    page.goto(live_server.url + "/experiments/new/")
    page.fill("input[name=name]", "checked")
    page.select_option("select[name=dataset]", label="digits")
    page.select_option("select[name=teacher]", value=_pk("teacher-mlp"))
    page.select_option("select[name=students]", value=_pk("mlp-16"))
    page.select_option("select[name=recipes]", label="kd-t4 v1")
    page.fill("input[name=max_steps]", "20")
    page.click("button[data-check]")
    panel = page.locator("#preflight")
    expect(panel).to_be_visible()
    expect(panel.locator("h2 .badge")).to_have_text("ready")

    # Searching a picker changes nothing that is posted: the panel stays current.
    _field(page, "students").locator(".picker-search").fill("mlp")
    expect(panel).not_to_have_class(re.compile("preflight-stale"))

    page.fill("input[name=seeds]", "0,1")
    expect(panel).to_have_class(re.compile("preflight-stale"))
    expect(panel.locator("h2 .badge")).to_have_text("out of date")
    expect(panel.locator(".preflight-stale-note")).to_contain_text(
        "Out of date: the form changed after this check.")
    screenshot("setup-preflight-out-of-date")

    # "Check again" checks the form as it is now.
    panel.get_by_role("button", name="Check again").click()
    expect(page.locator("[data-preflight-runs]")).to_have_attribute("data-preflight-runs", "4")
    expect(page.locator("#preflight")).not_to_have_class(re.compile("preflight-stale"))
    assert js_errors == []


def test_create_is_disabled_over_the_run_limit_and_the_server_refuses_too(page, live_server, records,
                                                                          settings, js_errors, screenshot):
    settings.MAX_RUNS_PER_EXPERIMENT = 10
    log_in(page, live_server, "picker", PASSWORD)
    page.goto(live_server.url + "/experiments/new/")
    page.fill("input[name=name]", "too big")
    page.select_option("select[name=dataset]", label="digits")
    page.select_option("select[name=teacher]", value=_pk("teacher-mlp"))
    page.select_option("select[name=students]", value=_pk("mlp-16"))
    page.select_option("select[name=recipes]", label="kd-t4 v1")
    page.fill("input[name=max_steps]", "20")
    create = page.locator("button[data-launch]")
    expect(create).to_be_enabled()

    page.fill("input[name=lr]", "1e-4:1e-2:log6")                 # 6 × (kd + baseline) = 12 runs > 10
    expect(page.locator("[data-sweep-count]")).to_contain_text("over the limit of 10 runs")
    expect(create).to_be_disabled()
    screenshot("setup-create-disabled-over-limit")
    page.fill("input[name=lr]", "1e-4:1e-2:log5")                 # 10 runs: allowed again
    expect(create).to_be_enabled()

    # The check of a grid over the limit renders Create disabled, with the server's count error.
    page.fill("input[name=lr]", "1e-4:1e-2:log6")
    page.click("button[data-check]")
    expect(page.locator("[data-preflight-runs]")).to_have_attribute("data-preflight-runs", "12")
    expect(page.locator("button[data-launch]")).to_be_disabled()
    expect(page.locator("body")).to_contain_text("the limit is 10")

    # Forcing the post anyway (the button re-enabled by hand) is refused by the server.
    page.eval_on_selector("button[data-launch]", "b => { b.disabled = false; }")
    page.click("button[data-launch]")
    expect(page.locator("body")).to_contain_text("the limit is 10")
    assert not Experiment.objects.exists()
    assert js_errors == []


def test_the_models_list_shows_task_and_parameters(page, live_server, records, js_errors, screenshot):
    log_in(page, live_server, "picker", PASSWORD)
    page.goto(live_server.url + "/models/")

    expect(page.locator("table.data thead")).to_contain_text("Task")
    row = page.locator("tr", has=page.get_by_role("link", name="mlp-16", exact=True))
    expect(row.locator("td[data-params]")).to_have_text("1.21k")
    expect(row.locator("td[data-params]")).to_have_attribute("title", re.compile("1,210 on digits"))
    expect(row.locator("td[data-task]")).to_have_text("classification")
    iris = page.locator("tr", has=page.get_by_role("link", name="iris-mlp", exact=True))
    expect(iris.locator("td[data-params]")).to_have_text(re.compile(r"^\d+–\d+$"))
    bert = page.locator("tr", has=page.get_by_role("link", name="tiny-bert", exact=True))
    expect(bert.locator("td[data-params]")).not_to_have_text("—")
    screenshot("models-task-and-params")
    assert js_errors == []


def test_the_pickers_fit_a_phone_screen(page, live_server, records, js_errors, screenshot):
    page.set_viewport_size({"width": 390, "height": 844})
    log_in(page, live_server, "picker", PASSWORD)
    page.goto(live_server.url + "/experiments/new/")
    page.select_option("select[name=dataset]", label="digits")
    page.select_option("select[name=students]", value=[_pk("mlp-16"), _pk("mlp-32"), _pk("teacher-mlp")])

    expect(_field(page, "students").locator(".chip")).to_have_count(3)
    width = page.evaluate("() => [document.documentElement.scrollWidth, window.innerWidth]")
    assert width[0] <= width[1], f"the form scrolls sideways ({width[0]} px on a {width[1]} px screen)"
    screenshot("setup-pickers-390")
    assert js_errors == []
