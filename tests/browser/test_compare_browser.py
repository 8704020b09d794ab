"""Comparing runs in a real browser: tick runs in an experiment's runs table (and rows of a leaderboard), open
the comparison, and see the curves and the Pareto plot drawn by the locally served plotly.js."""

import re

import pytest
from django.utils import timezone
from playwright.sync_api import expect

from experiments.models import Evaluation, MetricPoint, Recipe, Run
from tests.browser.session import log_in
from tests.factories import (
    DatasetSpecFactory,
    ExperimentFactory,
    MembershipFactory,
    ModelSpecFactory,
    RecipeFactory,
    RunFactory,
    TeamFactory,
    UserFactory,
)
from tests.waiting import scaled_ms

pytestmark = pytest.mark.django_db(transaction=True)

PASSWORD = "browser-pass-123"


@pytest.fixture
def finished_sweep():
    """A finished experiment: two students × (kd, hard-label baseline), with curves and evaluations."""
    user = UserFactory(username="comparer")
    user.set_password(PASSWORD)
    user.save()
    team = TeamFactory(name="Vision")
    MembershipFactory(user=user, team=team)
    dataset = DatasetSpecFactory(team=team, name="digits")
    teacher = ModelSpecFactory(team=team, name="teacher-mlp", config={"hidden_sizes": [256]})
    kd = RecipeFactory(team=team, name="kd-t4")
    baseline = RecipeFactory(team=team, name="hard_labels", scheme=Recipe.Scheme.HARD_LABELS,
                             terms=[{"name": "ce", "weight": 1.0, "params": {}}])
    experiment = ExperimentFactory(team=team, dataset=dataset, teacher=teacher, name="kd sweep")
    Evaluation.objects.create(team=team, role=Evaluation.Role.TEACHER, model=teacher, dataset=dataset,
                              split_key="k", accuracy=0.97, param_count=84_000, latency_ms=0.9)
    now = timezone.now()
    runs = []
    for width, size in ((16, 1_200), (64, 4_800)):
        student = ModelSpecFactory(team=team, name=f"student-{width}", config={"hidden_sizes": [width]})
        for recipe, is_baseline, gain in ((kd, False, 0.03), (baseline, True, 0.0)):
            config = {"student": {"source": "builtin", "name": "mlp", "params": {"hidden_sizes": [width]}},
                      "terms": recipe.terms, "scheme": recipe.scheme, "train": {"max_steps": 500, "seed": 0}}
            run = RunFactory(experiment=experiment, student=student, recipe=recipe, teacher=teacher,
                             is_baseline=is_baseline, config=config, status=Run.Status.SUCCEEDED, step=500,
                             total_steps=500, finished_at=now)
            accuracy = 0.85 + width / 1000 + gain
            Evaluation.objects.create(team=team, role=Evaluation.Role.STUDENT, run=run, model=student,
                                      dataset=dataset, split_key="k", accuracy=accuracy, param_count=size,
                                      latency_ms=0.1 + width / 400)
            MetricPoint.objects.bulk_create(
                [MetricPoint(run=run, name="loss", step=s, value=2.0 / (1 + s / (50 + width)), wall_time=now)
                 for s in range(0, 500, 5)]
                + [MetricPoint(run=run, name="eval/accuracy", step=s, value=accuracy * s / 500, wall_time=now)
                   for s in (100, 200, 300, 400, 500)]
            )
            runs.append(run)
    return user, experiment, runs


def _trace_count(page, element_id):
    return page.evaluate(f"document.getElementById('{element_id}').data.length")


def test_select_runs_compare_them_and_see_the_pareto_plot(page, live_server, finished_sweep, screenshot):
    user, experiment, runs = finished_sweep
    log_in(page, live_server, user.username, PASSWORD)

    page.goto(live_server.url + f"/experiments/{experiment.pk}/")
    for run in runs[:3]:
        page.check(f"input[data-compare-run][value='{run.pk}']")
    expect(page.locator("[data-compare-count]")).to_have_text("3 runs selected")
    page.click("text=Compare selected")

    ids = ",".join(str(r.pk) for r in runs[:3])
    expect(page).to_have_url(re.compile(rf"/compare/\?runs={ids}$"))
    pareto = page.locator("#pareto-figure.js-plotly-plot")
    expect(pareto).to_be_visible(timeout=scaled_ms(15))
    expect(pareto.locator(".scatterlayer .trace").first).to_be_attached()
    names = page.evaluate("document.getElementById('pareto-figure').data.map(t => t.name)")
    assert {"Pareto frontier", "teacher", "kd-t4 v1", "hard-label baseline"} <= set(names)
    expect(page.locator("#curves-figure.js-plotly-plot")).to_be_visible()
    assert _trace_count(page, "curves-figure") == 3
    expect(page.locator("#config-diff")).to_contain_text("student.params.hidden_sizes")
    screenshot("compare")

    # Another curve from the select: the page reloads with that metric overlaid.
    page.select_option("#id_metric", "loss")
    page.click("#compare-controls button[type=submit]")
    expect(page).to_have_url(re.compile(r"metric=loss"))
    expect(page.locator("#curves-figure .gtitle")).to_have_text("loss", timeout=scaled_ms(15))


def test_compare_rows_of_a_leaderboard(page, live_server, finished_sweep, screenshot):
    user, experiment, runs = finished_sweep
    log_in(page, live_server, user.username, PASSWORD)

    page.goto(live_server.url + f"/leaderboard/{experiment.dataset_id}/")
    boxes = page.locator("input[form=compare-rows]")
    expect(boxes).to_have_count(4)
    boxes.nth(0).check()
    boxes.nth(3).check()
    expect(page.locator("text=★ Pareto").first).to_be_visible()
    screenshot("leaderboard-filters")
    page.click("#compare-rows button[type=submit]")

    expect(page).to_have_url(re.compile(r"/compare/\?runs="))
    expect(page.locator("h1")).to_contain_text("Compare 2 runs")
    expect(page.locator("#pareto-figure.js-plotly-plot")).to_be_visible(timeout=scaled_ms(15))
    assert _trace_count(page, "pareto-figure") >= 2


def test_ticked_runs_stay_ticked_when_the_live_refresh_swaps_the_table(page, live_server, finished_sweep):
    user, experiment, runs = finished_sweep
    waiting = RunFactory(
        experiment=experiment, student=runs[0].student, recipe=runs[0].recipe, seed=1
    )  # polls
    log_in(page, live_server, user.username, PASSWORD)
    page.goto(live_server.url + f"/experiments/{experiment.pk}/")
    page.check(f"input[data-compare-run][value='{runs[1].pk}']")
    page.check(f"input[data-compare-run][value='{waiting.pk}']")
    page.evaluate(
        "document.querySelectorAll('input[data-compare-run]').forEach(b => { b.dataset.old = '1'; })"
    )

    # The live refresh (every 2 s while a run is queued) replaces every checkbox with a fresh, unticked one.
    page.wait_for_function(
        "() => !document.querySelector('input[data-compare-run]').dataset.old", timeout=scaled_ms(15)
    )

    ticked = page.evaluate(
        "Array.from(document.querySelectorAll('input[data-compare-run]:checked')).map(b => Number(b.value))")
    assert sorted(ticked) == sorted([runs[1].pk, waiting.pk])
    page.click("text=Compare selected")
    expect(page).to_have_url(re.compile(rf"/compare/\?runs={runs[1].pk},{waiting.pk}$"))
    expect(page.locator("h1")).to_contain_text("Compare 2 runs")
