"""A large leaderboard in a real browser: the second page of a 60-row board ranks from 51, the plot is
drawn (that page and the Pareto frontier), no script error, and the run that fine-tuned the teacher is not
ranked."""

import pytest
from django.utils import timezone
from playwright.sync_api import expect

from experiments.models import Evaluation, Run
from experiments.services import records
from tests.browser.session import log_in
from tests.browser.test_compare_browser import PASSWORD
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


def _succeeded(experiment, student, recipe, accuracy, params):
    run = RunFactory(experiment=experiment, student=student, recipe=recipe, status=Run.Status.SUCCEEDED,
                     step=10, total_steps=10, finished_at=timezone.now())
    Evaluation.objects.create(team=experiment.team, role=Evaluation.Role.STUDENT, run=run, model=student,
                              dataset=experiment.dataset, split_key="k", accuracy=accuracy,
                              param_count=params)
    return run


@pytest.fixture
def big_board():
    user = UserFactory(username="ranker")
    user.set_password(PASSWORD)
    user.save()
    team = TeamFactory(name="Ranking")
    MembershipFactory(user=user, team=team)
    dataset = DatasetSpecFactory(team=team, name="digits")
    kd = RecipeFactory(team=team, name="kd-t4")
    base = ModelSpecFactory(team=team, name="big-base", config={"hidden_sizes": [512]})
    fine_tune = ExperimentFactory(team=team, dataset=dataset, teacher=None, name="fine-tune the teacher")
    trained = _succeeded(fine_tune, base, kd, 0.99, 400_000)
    teacher = records.model_register_from_run(run=trained, name="tuned-teacher", created_by=user)
    distil = ExperimentFactory(team=team, dataset=dataset, teacher=teacher, name="distil")
    for i in range(60):
        student = ModelSpecFactory(team=team, name=f"student-{i:02d}", config={"hidden_sizes": [8 + i]})
        _succeeded(distil, student, kd, 0.6 + i / 200, 1_000 + 100 * i)
    return user, dataset


def test_the_second_page_of_a_large_board(page, live_server, big_board, screenshot):
    user, dataset = big_board
    errors = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    log_in(page, live_server, user.username, PASSWORD)

    page.goto(live_server.url + f"/leaderboard/{dataset.pk}/?page=2")

    rows = page.locator("table.leaderboard tbody tr")
    expect(rows).to_have_count(10)
    expect(rows.first).to_contain_text("51")
    # The 51st best of 60 rising scores: were the teacher's fine-tuning run (0.99) ranked, it would be 10.
    expect(rows.first).to_contain_text("student-09")
    expect(page.locator("#leaderboard-figure.js-plotly-plot")).to_be_visible(timeout=scaled_ms(15))
    expect(page.locator("table.leaderboard")).not_to_contain_text("big-base")
    screenshot("leaderboard-large-board-page-2")
    assert not errors
