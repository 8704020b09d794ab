"""Figures read at a glance: one colour per method everywhere, crowded overlays as mean ± std bands per group
of seeds, a single curve for a one-term recipe, and heatmap axes named by student and recipe."""

import base64
import json
import re
import statistics

import pytest
from django.urls import reverse
from django.utils import timezone

from experiments import plots
from experiments.domain.seed_groups import seed_groups
from experiments.models import Evaluation, Run
from tests.factories import ExperimentFactory, ModelSpecFactory, RecipeFactory, RunFactory


def _named(fig):
    return {t["name"]: t for t in fig["data"]}


# --- colours ----------------------------------------------------------------------------------------------
def test_a_method_keeps_its_colour_and_neighbouring_recipes_differ():
    colors = [plots.method_color(i) for i in range(100, 100 + len(plots.METHOD_COLORS))]

    assert len(set(colors)) == len(plots.METHOD_COLORS)  # consecutive recipe ids: all different
    assert plots.method_color(117) == plots.method_color(117)
    assert plots.method_color(5, baseline=True) == plots.method_color(None) == plots.BASELINE_COLOR
    assert plots.BASELINE_COLOR not in plots.METHOD_COLORS


def test_pareto_markers_take_their_methods_colour_and_error_bars():
    points = [plots.ParetoPoint("a", 100, 0.8, "kd", optimal=True, color=plots.method_color(7), spread=0.01),
              plots.ParetoPoint("b", 200, 0.7, "kd", color=plots.method_color(7), spread=0.02),
              plots.ParetoPoint("t", 9000, 0.9, teacher=True)]

    fig = plots.pareto_figure(points, cost_label="parameters", metric_label="Accuracy", higher_is_better=True,
                              percent=True)

    kd = _named(fig)["kd"]
    assert kd["marker"]["color"] == plots.method_color(7)
    assert kd["error_y"]["array"] == pytest.approx([1.0, 2.0])
    assert _named(fig)["teacher"]["marker"]["symbol"] == "star"


# --- one-term recipes -------------------------------------------------------------------------------------
def test_a_single_term_equal_to_the_total_is_drawn_once():
    series = {"loss": ([1, 2, 3], [0.9, 0.5, 0.3]), "kd": ([1, 2, 3], [0.9, 0.5, 0.3 + 1e-12]),
              "lr": ([1, 2, 3], [1e-3, 1e-3, 1e-3])}

    fig = plots.loss_figure(series)

    assert [t["name"] for t in fig["data"]] == ["loss = kd", "lr"]


def test_a_weighted_single_term_and_several_terms_keep_their_own_curves():
    weighted = {"loss": ([1, 2], [0.45, 0.25]), "kd": ([1, 2], [0.9, 0.5])}
    two = {"loss": ([1, 2], [0.9, 0.5]), "kd": ([1, 2], [0.9, 0.5]), "ce": ([1, 2], [0.0, 0.0])}

    assert [t["name"] for t in plots.loss_figure(weighted)["data"]] == ["loss", "kd"]
    assert [t["name"] for t in plots.loss_figure(two)["data"]] == ["loss", "ce", "kd"]


# --- groups of seeds --------------------------------------------------------------------------------------
def _crowd(seeds=3):
    """Four groups × ``seeds`` runs, each group's runs offset by their seed."""
    curves = []
    for g, group in enumerate(("s16 · kd", "s16 · baseline", "s64 · kd", "s64 · baseline")):
        for seed in range(seeds):
            curves.append(plots.Curve(f"#{g}{seed}", [10, 20, 30], [g + seed, g + 2 * seed, g + 3 * seed],
                                      dashed="baseline" in group, group=group, color=plots.method_color(g)))
    return curves


def test_a_crowded_overlay_draws_each_group_as_its_mean_and_std_band():
    fig = plots.runs_figure(_crowd())

    shown = [t for t in fig["data"] if t.get("showlegend", True)]
    assert [t["name"] for t in shown] == [f"{g} (mean ± std of 3)" for g in
                                          ("s16 · kd", "s16 · baseline", "s64 · kd", "s64 · baseline")]
    mean = shown[2]  # s64 · kd: group 2, values 2 + seed·k at step k
    assert mean["x"] == [10, 20, 30]
    assert mean["y"] == pytest.approx([3.0, 4.0, 5.0])
    assert mean["line"]["color"] == plots.method_color(2)
    lower, upper = (t for t in fig["data"] if t.get("legendgroup") == "s64 · kd" and t is not mean)
    spread = [statistics.stdev([2 + s * k for s in range(3)]) for k in (1, 2, 3)]
    assert lower["y"] == pytest.approx([m - d for m, d in zip(mean["y"], spread, strict=True)])
    assert upper["y"] == pytest.approx([m + d for m, d in zip(mean["y"], spread, strict=True)])
    assert upper["fill"] == "tonexty" and lower.get("fill") is None
    assert shown[1]["line"]["dash"] == "dash"


def test_few_runs_or_runs_without_repeats_stay_one_line_each():
    few = _crowd()[: plots.GROUP_FROM - 1]
    lonely = [c._replace(group=c.label) for c in _crowd()]

    assert [t["name"] for t in plots.runs_figure(few)["data"]] == [c.label for c in few]
    lines = plots.compare_figure(lonely, metric="loss")["data"]
    assert [t["name"] for t in lines] == [c.label for c in lonely]


def test_grouped_compare_figure_keeps_typed_arrays_and_the_point_cap():
    n = 5000
    curves = [plots.Curve(f"#{i}", list(range(n)), [float(i % 3)] * n, group=f"g{i % 2}") for i in range(12)]

    fig = plots.compare_figure(curves, metric="loss", max_points=500)

    assert len(fig["data"]) == 6
    assert all(t["x"]["dtype"] in ("i1", "i2", "i4") and t["y"]["dtype"] == "f8" for t in fig["data"])
    sizes = {"i1": 1, "i2": 2, "i4": 4}
    assert all(len(base64.b64decode(t["x"]["bdata"])) // sizes[t["x"]["dtype"]] <= 500 for t in fig["data"])


def test_seed_groups_join_runs_that_differ_only_by_seed():
    base = {"terms": [{"name": "kd"}], "train": {"lr": 1e-3, "seed": 0}}
    runs = [
        (1, "s16 · kd", base),
        (2, "s16 · kd", {**base, "train": {"lr": 1e-3, "seed": 1}}),
        (3, "s16 · kd", {**base, "train": {"lr": 1e-2, "seed": 0}}),
        (4, "s16 · jsd", base),
    ]

    groups = seed_groups(runs)

    assert groups[1] == groups[2] == "s16 · kd · from #1"
    assert groups[3] == "s16 · kd · from #3"
    assert groups[4] == "s16 · jsd"


# --- heatmap axes -----------------------------------------------------------------------------------------
def _json_script(html, element_id):
    match = re.search(rf'<script id="{element_id}" type="application/json">(.*?)</script>', html, re.S)
    return json.loads(match.group(1))


@pytest.mark.django_db
def test_a_student_by_recipe_grid_names_its_axes_and_levels(client_logged_in, team, digits_setup):
    """Students × recipes (two seeds each): the heatmap says "student" and "recipe" with their names, not the
    config keys and JSON values that differ between the runs."""
    experiment = ExperimentFactory(team=team, dataset=digits_setup["dataset"], seeds=[0, 1])
    recipes = [RecipeFactory(team=team, name="kd-soft"), RecipeFactory(team=team, name="kd-sharp")]
    students = [
        ModelSpecFactory(team=team, name=f"narrow-{w}", config={"hidden_sizes": [w]}) for w in (8, 24)
    ]
    runs = []
    for student in students:
        for t, recipe in zip((8.0, 2.0), recipes, strict=True):
            for seed in (0, 1):
                config = {"student": {"source": "builtin", "name": "mlp", "params": student.config},
                          "terms": [{"name": "kd", "weight": 1.0, "params": {"temperature": t}}],
                          "train": {"seed": seed, "lr": 1e-3}}
                run = RunFactory(experiment=experiment, student=student, recipe=recipe, seed=seed,
                                 config=config, status=Run.Status.SUCCEEDED, finished_at=timezone.now())
                Evaluation.objects.create(team=team, role=Evaluation.Role.STUDENT, run=run, model=student,
                                          dataset=experiment.dataset, split_key="k", accuracy=0.5 + t / 100,
                                          param_count=100 * student.config["hidden_sizes"][0])
                runs.append(run)

    url = reverse("experiments:compare") + "?runs=" + ",".join(str(r.pk) for r in runs)
    heatmap = _json_script(client_logged_in.get(url).content.decode(), "heatmap-figure-data")

    trace, layout = heatmap["data"][0], heatmap["layout"]
    assert {layout["xaxis"]["title"]["text"], layout["yaxis"]["title"]["text"]} == {"student", "recipe"}
    levels = {layout["xaxis"]["title"]["text"]: trace["x"], layout["yaxis"]["title"]["text"]: trace["y"]}
    assert sorted(levels["student"]) == ["narrow-24", "narrow-8"]
    assert sorted(levels["recipe"]) == sorted(str(r) for r in recipes)


@pytest.mark.django_db
def test_the_leaderboard_plot_has_the_frontier_the_teacher_star_and_the_compare_pages_colours(
    client_logged_in, team, digits_setup
):
    dataset, teacher = digits_setup["dataset"], digits_setup["teacher"]
    experiment = ExperimentFactory(team=team, dataset=dataset, teacher=teacher, seeds=[0])
    Evaluation.objects.create(team=team, role=Evaluation.Role.TEACHER, model=teacher, dataset=dataset,
                              split_key="k", accuracy=0.97, param_count=50_000)
    recipe = RecipeFactory(team=team, name="kd-plot")
    runs = []
    for student, accuracy, params in zip(digits_setup["students"], (0.81, 0.86), (1_000, 3_000), strict=True):
        run = RunFactory(experiment=experiment, student=student, recipe=recipe, teacher=teacher,
                         config={"train": {"seed": 0}}, status=Run.Status.SUCCEEDED,
                         finished_at=timezone.now())
        Evaluation.objects.create(team=team, role=Evaluation.Role.STUDENT, run=run, model=student,
                                  dataset=dataset, split_key="k", accuracy=accuracy, param_count=params)
        runs.append(run)

    board = _json_script(
        client_logged_in.get(reverse("experiments:leaderboard", args=[dataset.pk])).content.decode(),
        "leaderboard-figure-data",
    )
    compare_url = reverse("experiments:compare") + f"?runs={runs[0].pk},{runs[1].pk}"
    compare = _json_script(client_logged_in.get(compare_url).content.decode(), "pareto-figure-data")

    traces = _named(board)
    assert traces["Pareto frontier"]["x"] == [1_000, 3_000]
    assert traces["teacher"]["marker"]["symbol"] == "star" and traces["teacher"]["x"] == [50_000]
    assert traces[str(recipe)]["marker"]["color"] == plots.method_color(recipe.pk)
    assert _named(compare)[str(recipe)]["marker"]["color"] == plots.method_color(recipe.pk)
