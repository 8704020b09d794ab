"""The main pages on a 390 × 844 phone screen: nothing widens the page (no horizontal page scroll), wide
tables scroll inside their cards, the plots draw without JavaScript errors; and the log-y toggle of the loss
plots."""

import pytest
from django.utils import timezone
from playwright.sync_api import expect

from experiments.models import Artifact, Evaluation, MetricPoint, Recipe, Run, Worker
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

PASSWORD = "layout-pass-123"
PHONE = {"width": 390, "height": 844}
TABLET = {"width": 820, "height": 1180}


@pytest.fixture
def finished_experiment():
    """Two students × (kd, jsd, hard-label baseline) × two seeds, finished, with curves, evaluations, long
    artifact paths and a worker with many queues: enough to make every table wider than a phone."""
    user = UserFactory(username="phone-user", is_staff=True)  # staff see the worker fleet
    user.set_password(PASSWORD)
    user.save()
    team = TeamFactory(name="Mobile")
    MembershipFactory(user=user, team=team)
    dataset = DatasetSpecFactory(team=team, name="digits-for-a-rather-long-dataset-name")
    teacher = ModelSpecFactory(team=team, name="teacher-mlp-256", config={"hidden_sizes": [256]})
    recipes = [RecipeFactory(team=team, name="kd-temperature-4"), RecipeFactory(team=team, name="jsd-hidden"),
               RecipeFactory(team=team, name="hard_labels", scheme=Recipe.Scheme.HARD_LABELS,
                             terms=[{"name": "ce", "weight": 1.0, "params": {}}])]
    experiment = ExperimentFactory(team=team, dataset=dataset, teacher=teacher, name="phone sweep",
                                   seeds=[0, 1])
    Evaluation.objects.create(team=team, role=Evaluation.Role.TEACHER, model=teacher, dataset=dataset,
                              split_key="k", accuracy=0.97, param_count=84_000, latency_ms=0.9)
    now = timezone.now()
    runs = []
    for width, size in ((16, 1_200), (64, 4_800)):
        student = ModelSpecFactory(team=team, name=f"student-mlp-{width}", config={"hidden_sizes": [width]})
        for recipe in recipes:
            baseline = recipe.scheme == Recipe.Scheme.HARD_LABELS
            for seed in (0, 1):
                mlp = {"source": "builtin", "name": "mlp", "params": {"hidden_sizes": [width]}}
                config = {"student": mlp, "terms": recipe.terms, "scheme": recipe.scheme,
                          "train": {"max_steps": 300, "seed": seed}}
                run = RunFactory(experiment=experiment, student=student, recipe=recipe, teacher=teacher,
                                 is_baseline=baseline, seed=seed, config=config, status=Run.Status.SUCCEEDED,
                                 step=300, total_steps=300, started_at=now, finished_at=now)
                accuracy = 0.8 + width / 1000 + (0 if baseline else 0.02) + seed / 100
                Evaluation.objects.create(team=team, role=Evaluation.Role.STUDENT, run=run, model=student,
                                          dataset=dataset, split_key="k", accuracy=accuracy, param_count=size,
                                          latency_ms=0.1 + width / 400)
                MetricPoint.objects.bulk_create(
                    [MetricPoint(run=run, name="loss", step=s, value=2.0 / (1 + s / 20), wall_time=now)
                     for s in range(0, 300, 5)]
                    + [MetricPoint(run=run, name="eval/accuracy", step=s, value=accuracy * s / 300,
                                   wall_time=now) for s in (100, 200, 300)]
                )
                Artifact.objects.create(
                    run=run, kind=Artifact.Kind.CHECKPOINT, step=300, size_bytes=123_456, sha256="ab" * 32,
                    path=f"runs/{run.pk}/checkpoints/a-long-checkpoint-folder-name/step-000300/model.safetensors",
                )
                runs.append(run)
    Worker.objects.create(name="gpu0@a-rather-long-worker-hostname.example.org", hostname="worker-host",
                          queues=["training", "training-gpu-80g", "training-cpu", "evaluation"],
                          last_heartbeat=now, started_at=now)
    return user, experiment, runs


# scrollWidth of the page, of each card and of each table's scroll container, measured in the page.
_MEASURE = """() => {
  const doc = document.documentElement;
  const cards = Array.from(document.querySelectorAll('.card')).map(c => c.getBoundingClientRect().right);
  const scrollers = Array.from(document.querySelectorAll('table.data')).map(t => {
    let box = t;
    while (box && getComputedStyle(box).overflowX !== 'auto') box = box.parentElement;
    return box ? {wide: box.scrollWidth > box.clientWidth, right: box.getBoundingClientRect().right} : null;
  });
  return {page: doc.scrollWidth, viewport: window.innerWidth, cards, scrollers};
}"""


def _pages(experiment, runs):
    run_ids = ",".join(str(r.pk) for r in runs)
    return {
        "home": "/",
        "experiments": "/experiments/",
        "experiment": f"/experiments/{experiment.pk}/",
        "run": f"/runs/{runs[0].pk}/",
        "compare": f"/compare/?runs={run_ids}",
        "leaderboards": "/leaderboard/",
        "leaderboard": f"/leaderboard/{experiment.dataset_id}/",
        "models": "/models/",
        "datasets": "/datasets/",
        "recipes": "/recipes/",
        "workers": "/workers/",
        "teams": "/teams/",
    }


@pytest.mark.parametrize("screen", [PHONE, TABLET], ids=["phone", "tablet"])
def test_main_pages_fit_the_screen_and_tables_scroll_inside_their_cards(
    page, live_server, finished_experiment, screenshot, screen
):
    user, experiment, runs = finished_experiment
    errors = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.set_viewport_size(screen)
    log_in(page, live_server, user.username, PASSWORD)
    wide_tables = {}
    for name, path in _pages(experiment, runs).items():
        page.goto(live_server.url + path)
        for plot in page.locator(".plot[data-figure]").all():
            expect(plot.locator(".main-svg").first.or_(plot.locator(".empty"))).to_be_visible()
        measured = page.evaluate(_MEASURE)
        screenshot(f"layout-{screen['width']}-{name}")
        assert measured["viewport"] == screen["width"]
        assert measured["page"] <= measured["viewport"], f"{name} scrolls sideways ({measured['page']} px)"
        assert all(right <= measured["viewport"] + 0.5 for right in measured["cards"]), name
        scrollers = [s for s in measured["scrollers"] if s is not None]
        if screen == PHONE:  # wider screens may leave a narrow table as it is
            assert len(scrollers) == len(measured["scrollers"]), f"{name}: a table outside any scroll box"
        assert all(s["right"] <= measured["viewport"] + 0.5 for s in scrollers), name
        wide_tables[name] = any(s["wide"] for s in scrollers)
    # On the phone the wide tables really are wider than the screen: they scroll inside their cards.
    for name in ("experiment", "run", "compare", "leaderboard", "workers"):
        assert wide_tables[name] or screen != PHONE, f"the {name} page has no table wider than its card"
    assert errors == []


def test_log_y_toggle_switches_the_loss_and_compare_plots(page, live_server, finished_experiment,
                                                                   screenshot):
    user, experiment, runs = finished_experiment
    errors = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    log_in(page, live_server, user.username, PASSWORD)
    page.goto(f"{live_server.url}/runs/{runs[0].pk}/")
    toggle = page.locator("#loss-log-y")
    expect(toggle).to_be_visible()
    expect(page.locator("#loss-figure .main-svg").first).to_be_visible()
    axis_type = "document.getElementById('loss-figure')._fullLayout.yaxis.type"
    assert page.evaluate(axis_type) == "linear"

    toggle.check()
    page.wait_for_function(f"() => {axis_type} === 'log'")
    screenshot("run-loss-log-y")
    toggle.uncheck()
    page.wait_for_function(f"() => {axis_type} === 'linear'")

    page.goto(f"{live_server.url}/compare/?runs={','.join(str(r.pk) for r in runs)}&metric=loss")
    page.locator("#curves-log-y").check()
    page.wait_for_function("() => document.getElementById('curves-figure')._fullLayout.yaxis.type === 'log'")
    # Twelve runs: drawn as six seed groups, each a mean line with its ± std band.
    legend = page.evaluate("document.getElementById('curves-figure').data.filter(t => t.showlegend !== false)"
                           ".map(t => t.name)")
    assert len(legend) == 6 and all("mean ± std of 2" in name for name in legend)
    screenshot("compare-grouped-log-y")
    assert errors == []


def test_log_y_survives_the_live_refresh_of_a_running_run(page, live_server, finished_experiment):
    user, experiment, runs = finished_experiment
    run = runs[0]
    now = timezone.now()
    Run.objects.filter(pk=run.pk).update(status=Run.Status.RUNNING, finished_at=None, started_at=now,
                                         heartbeat_at=now, step=150)
    logged = MetricPoint.objects.filter(run=run, name="loss").count()
    errors = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    log_in(page, live_server, user.username, PASSWORD)
    page.goto(f"{live_server.url}/runs/{run.pk}/")
    expect(page.locator("#loss-figure .main-svg").first).to_be_visible()
    page.locator("#loss-log-y").check()
    page.wait_for_function("() => document.getElementById('loss-figure')._fullLayout.yaxis.type === 'log'")

    MetricPoint.objects.create(run=run, name="loss", step=400, value=0.05, wall_time=timezone.now())
    # The live refresh redraws the curves from the server's figure (every few seconds): the new point arrives
    # and the axis stays logarithmic.
    page.wait_for_function(
        f"() => document.getElementById('loss-figure').data[0].x.length === {logged + 1}",
        timeout=scaled_ms(30),
    )
    assert page.evaluate("document.getElementById('loss-figure')._fullLayout.yaxis.type") == "log"
    assert errors == []
