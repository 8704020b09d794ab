"""The Results card of a finished experiment: the best student of each size, its KD gain ± std over seeds
against the hard-label baseline, and a link to the leaderboard; nothing while runs are still going."""

import re

import pytest
from django.urls import reverse
from django.utils import timezone

from experiments.models import Evaluation, Recipe, Run
from experiments.selectors.results import experiment_results
from tests.factories import ExperimentFactory, ModelSpecFactory, RecipeFactory, RunFactory

pytestmark = pytest.mark.django_db

# (student width, params): accuracy per (recipe, seed); kd beats the baseline by 2 and 4 points on mlp-16,
# jsd is best on mlp-64.
ACCURACY = {
    ("kd", 16): (0.80, 0.84), ("jsd", 16): (0.79, 0.80), ("baseline", 16): (0.78, 0.80),
    ("kd", 64): (0.90, 0.90), ("jsd", 64): (0.93, 0.95), ("baseline", 64): (0.88, 0.89),
}
PARAMS = {16: 1_200, 64: 4_800}


@pytest.fixture
def finished(team, digits_setup):
    dataset, teacher = digits_setup["dataset"], digits_setup["teacher"]
    experiment = ExperimentFactory(team=team, dataset=dataset, teacher=teacher, seeds=[0, 1])
    recipes = {
        "kd": RecipeFactory(team=team, name="kd"),
        "jsd": RecipeFactory(team=team, name="jsd"),
        "baseline": RecipeFactory(team=team, name="hard_labels", scheme=Recipe.Scheme.HARD_LABELS,
                                  terms=[{"name": "ce", "weight": 1.0, "params": {}}]),
    }
    students = {
        w: ModelSpecFactory(team=team, name=f"student-{w}", config={"hidden_sizes": [w]}) for w in PARAMS
    }
    Evaluation.objects.create(team=team, role=Evaluation.Role.TEACHER, model=teacher, dataset=dataset,
                              split_key="k", accuracy=0.97, param_count=84_000)
    for (name, width), accuracies in ACCURACY.items():
        for seed, accuracy in enumerate(accuracies):
            run = RunFactory(experiment=experiment, student=students[width], recipe=recipes[name],
                             teacher=teacher, is_baseline=name == "baseline", seed=seed,
                             status=Run.Status.SUCCEEDED, finished_at=timezone.now(),
                             config={"train": {"seed": seed}})
            Evaluation.objects.create(team=team, role=Evaluation.Role.STUDENT, run=run, model=students[width],
                                      dataset=dataset, split_key="k", accuracy=accuracy,
                                      param_count=PARAMS[width])
    return experiment


def test_results_name_the_best_student_of_each_size_with_its_kd_gain(finished):
    results = experiment_results(experiment=finished)

    assert [s.params for s in results.sizes] == [1_200, 4_800]
    small, large = results.sizes
    assert (small.best.recipe.name, large.best.recipe.name) == ("kd", "jsd")
    assert small.best.mean == pytest.approx(0.82)
    # Gains per seed: +0.02 and +0.04 on mlp-16; +0.05 and +0.06 on mlp-64.
    assert small.best.kd_gain == pytest.approx(0.03)
    assert small.best.kd_gain_std == pytest.approx(0.0141421, rel=1e-4)
    assert large.best.kd_gain == pytest.approx(0.055)
    assert small.baseline.mean == pytest.approx(0.79) and large.baseline.mean == pytest.approx(0.885)
    assert results.teacher == pytest.approx(0.97)


def test_experiment_page_shows_the_results_card_with_a_leaderboard_link(client_logged_in, finished):
    html = client_logged_in.get(reverse("experiments:experiment_detail", args=[finished.pk])).content.decode()

    card = html[html.index('id="results"'):html.index("</section>", html.index('id="results"'))]
    assert reverse("experiments:leaderboard", args=[finished.dataset_id]) in card
    rows = re.findall(r'<tr data-size="(\d+)">(.*?)</tr>', card, re.S)
    assert [int(size) for size, _ in rows] == [1_200, 4_800]
    small, large = experiment_results(experiment=finished).sizes
    assert "student-16" in rows[0][1] and f"<td>{small.best.recipe}</td>" in rows[0][1]
    assert "+3.00 pp" in rows[0][1] and "± 1.41 pp" in rows[0][1]
    assert f"<td>{large.best.recipe}</td>" in rows[1][1] and "+5.50 pp" in rows[1][1]


def test_no_results_card_while_runs_are_still_going(client_logged_in, finished):
    run = finished.runs.first()
    Run.objects.filter(pk=run.pk).update(status=Run.Status.RUNNING, finished_at=None,
                                               started_at=timezone.now())

    html = client_logged_in.get(reverse("experiments:experiment_detail", args=[finished.pk])).content.decode()

    assert experiment_results(experiment=finished) is None
    assert 'id="results"' not in html


def test_a_baseline_best_at_its_size_shows_no_gain(team, digits_setup, client_logged_in):
    dataset = digits_setup["dataset"]
    experiment = ExperimentFactory(team=team, dataset=dataset, seeds=[0])
    student = digits_setup["students"][0]
    for recipe, baseline, accuracy in ((digits_setup["recipe"], False, 0.7),
                                       (RecipeFactory(team=team, name="ce-only"), True, 0.75)):
        run = RunFactory(experiment=experiment, student=student, recipe=recipe, is_baseline=baseline,
                         status=Run.Status.SUCCEEDED, finished_at=timezone.now(),
                         config={"train": {"seed": 0}})
        Evaluation.objects.create(team=team, role=Evaluation.Role.STUDENT, run=run, model=student,
                                  dataset=dataset, split_key="k", accuracy=accuracy, param_count=500)

    (size,) = experiment_results(experiment=experiment).sizes

    assert size.best.is_baseline and size.baseline is None and size.best.kd_gain is None
