"""Compare view: server-side downsampling, config diff, Pareto frontier, sweep heatmap, scoping and
queries."""

import base64
import itertools
import json
import math
import random
import re

import numpy as np
import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.urls import reverse
from django.utils import timezone

from experiments import plots
from experiments.domain import compare, leaderboard
from experiments.models import Evaluation, MetricPoint, Run
from experiments.selectors import curves as curves_reads
from tests.factories import (
    DatasetSpecFactory,
    ExperimentFactory,
    ModelSpecFactory,
    RecipeFactory,
    RunFactory,
)

pytestmark = pytest.mark.django_db

# --- helpers --------------------------------------------------------------------------------------
_names = itertools.count()


def _student(team):
    """A student with a name of its own (the factory's mlp-<n> names can collide with digits_setup's)."""
    return ModelSpecFactory(team=team, name=f"cmp-student-{next(_names)}")


def _run(experiment, **kwargs):
    return RunFactory(experiment=experiment, student=_student(experiment.team), **kwargs)


def _config(*, temperature=4.0, lr=1e-3, seed=0, hidden=(16,)):
    return {
        "student": {
            "source": "builtin",
            "name": "mlp",
            "params": {"hidden_sizes": list(hidden)},
            "num_labels": 10,
        },
        "teacher": {"source": "builtin", "name": "mlp", "params": {"hidden_sizes": [64]}, "num_labels": 10},
        "dataset": {"source": "builtin", "name": "digits", "eval_fraction": 0.2},
        "terms": [
            {"name": "ce", "weight": 0.1, "params": {}},
            {"name": "kd", "weight": 0.9, "params": {"temperature": temperature}},
        ],
        "scheme": "offline",
        "task": "classification",
        "train": {"max_steps": 100, "lr": lr, "batch_size": 32, "seed": seed},
    }


def _points(run, name, steps, values):
    now = timezone.now()
    MetricPoint.objects.bulk_create(
        [
            MetricPoint(run=run, name=name, step=s, value=v, wall_time=now)
            for s, v in zip(steps, values, strict=True)
        ],
        batch_size=5000,
    )


def _finished(experiment, *, config=None, accuracy=0.8, params=1000, latency=0.5, seed=0, student=None,
              recipe=None, baseline=False, teacher=None):
    run = RunFactory(
        experiment=experiment,
        seed=seed,
        config=config or _config(seed=seed),
        is_baseline=baseline,
        status=Run.Status.SUCCEEDED,
        step=100,
        total_steps=100,
        finished_at=timezone.now(),
        teacher=teacher,
        student=student or _student(experiment.team),
        **({"recipe": recipe} if recipe else {}),
    )
    Evaluation.objects.create(
        team=experiment.team,
        role=Evaluation.Role.STUDENT,
        run=run,
        model=run.student,
        dataset=experiment.dataset,
        split_key="k",
        accuracy=accuracy,
        param_count=params,
        latency_ms=latency,
        metrics={"accuracy": accuracy, "macro_f1": accuracy - 0.05},
    )
    return run


def _compare(client, run_ids, **params):
    return client.get(reverse("experiments:compare"), {"runs": ",".join(str(i) for i in run_ids), **params})


def _json_script(html, element_id):
    match = re.search(rf'<script id="{element_id}" type="application/json">(.*?)</script>', html, re.S)
    assert match, f"no json_script {element_id}"
    return json.loads(match.group(1))


def _array(value):
    """A plotly trace array: a list, or a typed array ``{"dtype", "bdata"}`` (base64)."""
    if isinstance(value, dict):
        return np.frombuffer(base64.b64decode(value["bdata"]), dtype=np.dtype(value["dtype"])).tolist()
    return list(value)


@pytest.fixture
def experiment(team, digits_setup):
    experiment = ExperimentFactory(
        team=team, dataset=digits_setup["dataset"], teacher=digits_setup["teacher"]
    )
    return experiment


# --- server-side downsampling ---------------------------------------------------------------------
def test_metric_curves_keep_first_last_and_extremes_within_the_cap(experiment):
    long_run, short_run = _run(experiment), _run(experiment)
    n = 20_000
    steps = list(range(5, 5 + n))
    values = [math.sin(i / 300) for i in range(n)]
    values[7_777] = 40.0  # a spike
    values[12_345] = -40.0  # a dip
    _points(long_run, "loss", steps, values)
    _points(short_run, "loss", [10, 20, 30], [3.0, 2.0, 1.0])

    curves = curves_reads.metric_curves(run_ids=[long_run.pk, short_run.pk], name="loss", max_points=200)

    out_steps, out_values = curves[long_run.pk]
    assert len(out_steps) == len(out_values) <= 200
    assert (out_steps[0], out_values[0]) == (steps[0], values[0])
    assert (out_steps[-1], out_values[-1]) == (steps[-1], values[-1])
    assert steps[7_777] in out_steps and max(out_values) == 40.0
    assert steps[12_345] in out_steps and min(out_values) == -40.0
    assert out_steps == sorted(set(out_steps))
    by_step = dict(zip(steps, values, strict=True))
    assert all(by_step[s] == v for s, v in zip(out_steps, out_values, strict=True))
    # Every bucket keeps its own extremes: the curve's envelope survives, not just the global ones.
    assert max(v for s, v in zip(out_steps, out_values, strict=True) if s < 5000) == pytest.approx(
        1.0, abs=1e-4
    )
    assert curves[short_run.pk] == ([10, 20, 30], [3.0, 2.0, 1.0])


def test_metric_curves_on_postgres_match_the_portable_path_and_turn_non_finite_into_gaps(experiment):
    rng = random.Random(7)
    runs = [_run(experiment) for _ in range(3)]
    for i, run in enumerate(runs):
        n = 3000 + 1000 * i
        values = [rng.gauss(0, 1) for _ in range(n)]
        values[n // 2] = float("nan")
        _points(run, "kd", list(range(0, 2 * n, 2)), values)
    _points(runs[0], "other", [1, 2], [1.0, 2.0])
    ids = [r.pk for r in runs]

    fast = curves_reads.metric_curves(run_ids=ids, name="kd", max_points=300)
    portable = curves_reads.metric_curves_portable(run_ids=ids, name="kd", max_points=300)

    assert fast == portable
    assert set(fast) == set(ids)
    assert all(len(s) <= 300 for s, _ in fast.values())
    assert any(v is None for v in fast[runs[0].pk][1])
    assert curves_reads.metric_curves(run_ids=ids, name="missing") == {}
    assert curves_reads.metric_curves(run_ids=[], name="kd") == {}


def test_metric_names_walk_the_index_and_match_a_plain_distinct(experiment):
    a, b, c = (_run(experiment) for _ in range(3))
    _points(a, "loss", [1, 2], [1.0, 0.5])
    _points(a, "eval/accuracy", [2], [0.5])
    _points(b, "kd", [1], [0.1])
    _points(c, "ce", [1], [0.1])

    names = curves_reads.metric_names(run_ids=[a.pk, b.pk])

    assert names == ["eval/accuracy", "kd", "loss"]
    assert names == curves_reads.metric_names_portable(run_ids=[a.pk, b.pk])


def test_compare_figure_caps_every_trace_and_keeps_gaps():
    steps = list(range(10_000))
    values = [float(i % 100) for i in steps]
    values[5_000] = float("nan")

    fig = plots.compare_figure([plots.Curve("a", steps, values), plots.Curve("b", [0, 1], [1.0, None], True)],
                               metric="loss", max_points=500)

    first, second = fig["data"]
    assert len(_array(first["x"])) <= 500 and len(_array(first["x"])) == len(_array(first["y"]))
    assert _array(first["x"])[0] == 0 and _array(first["x"])[-1] == 9_999
    assert max(_array(first["y"])) == 99.0
    assert math.isnan(_array(second["y"])[1]) and second["line"]["dash"] == "dash"


# --- config diff and sweep grid --------------------------------------------------------------------
def test_flatten_config_keys_terms_by_name_and_keeps_value_lists_whole():
    flat = compare.flatten_config(_config(hidden=(16, 8)))

    assert flat["terms.kd.params.temperature"] == "4.0"
    assert flat["terms.ce.weight"] == "0.1"
    assert flat["student.params.hidden_sizes"] == "[16, 8]"
    assert flat["train.lr"] == "0.001"
    assert flat["terms.ce.params"] == "{}"


def test_sweep_grid_averages_seeds_over_a_full_two_parameter_grid():
    configs, values = [], []
    for t in (1.0, 4.0):
        for lr in (1e-3, 1e-2):
            for seed, bump in ((0, 0.0), (1, 0.02)):
                configs.append(_config(temperature=t, lr=lr, seed=seed))
                values.append(0.5 + t / 10 + (lr * 10) + bump)

    grid = compare.sweep_grid(configs, values)

    assert grid is not None
    assert (grid.x_key, grid.y_key) == ("train.lr", "terms.kd.params.temperature")
    assert grid.x_levels == ["0.001", "0.01"] and grid.y_levels == ["1.0", "4.0"]
    assert grid.z[0][0] == pytest.approx(0.5 + 0.1 + 0.01 + 0.01)  # mean of the two seeds
    assert grid.z[1][1] == pytest.approx(0.5 + 0.4 + 0.1 + 0.01)


def test_sweep_grid_needs_every_combination_and_exactly_two_parameters():
    incomplete = [_config(temperature=1.0, lr=1e-3), _config(temperature=4.0, lr=1e-3),
                  _config(temperature=1.0, lr=1e-2)]
    three = [_config(temperature=t, lr=lr, hidden=h) for t in (1.0, 4.0) for lr in (1e-3, 1e-2)
             for h in ((8,), (16,))]
    one = [_config(temperature=t) for t in (1.0, 2.0, 4.0)]

    assert compare.sweep_grid(incomplete, [0.5] * 3) is None
    assert compare.sweep_grid(three, [0.5] * 8) is None
    assert compare.sweep_grid(one, [0.5] * 3) is None
    assert compare.sweep_grid([_config(seed=0), _config(seed=1)], [0.5, 0.6]) is None  # seeds only


def test_sweep_grid_counts_keys_that_change_together_as_one_parameter():
    configs = []
    for hidden in ((8,), (32,)):
        for t in (1.0, 4.0):
            config = _config(temperature=t, hidden=hidden)
            config["student"]["num_labels"] = 10 + hidden[0]  # changes with the student
            configs.append(config)

    grid = compare.sweep_grid(configs, [0.1, 0.2, 0.3, 0.4])

    assert grid is not None
    assert set(grid.y_keys) == {"student.num_labels", "student.params.hidden_sizes"}
    assert grid.x_key == "terms.kd.params.temperature"
    assert grid.z == [[0.1, 0.2], [0.3, 0.4]]


# --- Pareto frontier ------------------------------------------------------------------------------
def test_pareto_flags_higher_is_better():
    points = [
        (100, 0.80),  # optimal: the smallest
        (200, 0.85),  # optimal
        (200, 0.83),  # dominated by the same size, better score
        (300, 0.84),  # dominated by (200, 0.85)
        (400, 0.90),  # optimal
        (400, 0.90),  # equal points are optimal together
        (None, 0.99),  # unknown size: never optimal
        (500, None),
        (50, float("nan")),
    ]

    assert leaderboard.pareto_flags(points, higher_is_better=True) == [
        True, True, False, False, True, True, False, False, False]


def test_pareto_flags_lower_is_better_metric():
    points = [(100, 30.0), (200, 20.0), (250, 25.0), (300, 20.0), (400, 12.0)]  # perplexity

    assert leaderboard.pareto_flags(points, higher_is_better=False) == [True, True, False, False, True]
    assert leaderboard.pareto_flags([], higher_is_better=False) == []


def test_pareto_figure_draws_the_frontier_as_a_step_line_fades_dominated_runs_and_stars_the_teacher():
    points = [plots.ParetoPoint("a", 100, 0.8, "kd", optimal=True), plots.ParetoPoint("b", 300, 0.7, "kd"),
              plots.ParetoPoint("c", 200, 0.85, "kd", optimal=True),
              plots.ParetoPoint("teacher", 1000, 0.95, teacher=True), plots.ParetoPoint("no size", None, 0.9)]

    fig = plots.pareto_figure(points, cost_label="parameters", metric_label="Accuracy", higher_is_better=True,
                              percent=True)

    traces = {t["name"]: t for t in fig["data"]}
    assert traces["Pareto frontier"]["line"]["shape"] == "hv"
    assert _array(traces["Pareto frontier"]["x"]) == [100, 200]
    assert _array(traces["Pareto frontier"]["y"]) == pytest.approx([80.0, 85.0])
    assert _array(traces["kd"]["marker"]["opacity"]) == [1.0, 0.3, 1.0]
    assert traces["teacher"]["marker"]["symbol"] == "star"
    assert fig["layout"]["xaxis"]["type"] == "log"


# --- the page -------------------------------------------------------------------------------------
@pytest.fixture
def sweep(team, experiment, digits_setup):
    """A 2 × 2 sweep (temperature × lr) over two seeds, with curves, and the teacher's evaluation."""
    Evaluation.objects.create(team=team, role=Evaluation.Role.TEACHER, model=digits_setup["teacher"],
                              dataset=experiment.dataset, split_key="k", accuracy=0.95, param_count=20_000,
                              latency_ms=2.0, metrics={"accuracy": 0.95})
    runs = []
    for i, (t, lr) in enumerate([(1.0, 1e-3), (1.0, 1e-2), (4.0, 1e-3), (4.0, 1e-2)]):
        for seed in (0, 1):
            run = _finished(
                experiment,
                config=_config(temperature=t, lr=lr, seed=seed),
                seed=seed,
                accuracy=0.7 + 0.05 * i + 0.01 * seed,
                params=1000 * (i + 1),
                latency=0.1 * (i + 1),
                student=digits_setup["students"][0],
                recipe=digits_setup["recipe"],
                teacher=digits_setup["teacher"],
            )
            _points(run, "loss", range(0, 3000, 1), [1.0 / (s + 1) for s in range(3000)])
            _points(run, "kd", range(0, 3000, 10), [0.5] * 300)
            _points(run, "eval/accuracy", [1000, 2000, 3000], [0.5, 0.6, 0.7 + 0.05 * i])
            runs.append(run)
    return runs


def test_compare_page_shows_curves_config_diff_metrics_pareto_and_heatmap(client_logged_in, sweep):
    response = _compare(client_logged_in, [r.pk for r in sweep], metric="loss")

    assert response.status_code == 200
    html = response.content.decode()
    ctx = response.context
    assert ctx["metric_names"] == ["eval/accuracy", "kd", "loss"]
    curves = _json_script(html, "curves-figure-data")
    assert len(curves["data"]) == 8
    assert all(len(_array(t["x"])) <= plots.MAX_POINTS for t in curves["data"])
    # The config diff highlights what differs and hides what every run shares behind a toggle.
    differing = [k.key for k in ctx["comparison"].differing]
    assert differing == ["terms.kd.params.temperature", "train.lr", "train.seed"]
    assert re.search(r'<tr class="differs"><td class="key mono small">terms\.kd\.params\.temperature', html)
    assert '<details class="same-keys"' in html and "train.max_steps" in html
    # The metrics table and the Pareto plot: best-per-size runs on the frontier, the teacher as a star.
    assert "95.00%" in html and "★ frontier" in html
    pareto = _json_script(html, "pareto-figure-data")
    names = [t["name"] for t in pareto["data"]]
    assert "Pareto frontier" in names and "teacher" in names
    frontier = next(t for t in pareto["data"] if t["name"] == "Pareto frontier")
    assert _array(frontier["x"]) == [1000, 2000, 3000, 4000]  # seed 1 beats seed 0 at each size
    assert ctx["optimal"] == {r.pk for r in sweep if r.seed == 1}
    heatmap = _json_script(html, "heatmap-figure-data")
    assert heatmap["data"][0]["type"] == "heatmap"
    assert heatmap["data"][0]["z"][0][0] == pytest.approx(100 * 0.705)  # mean over the two seeds, in %


def test_compare_defaults_to_the_eval_curve_of_the_ranking_metric_and_switches_cost_axis(
    client_logged_in, sweep
):
    response = _compare(client_logged_in, [r.pk for r in sweep[:2]], cost="latency", metric="no-such-metric")

    assert response.context["curve"] == "eval/accuracy"
    pareto = _json_script(response.content.decode(), "pareto-figure-data")
    assert pareto["layout"]["xaxis"]["title"]["text"].startswith("latency")
    assert response.context["comparison"].grid is None
    assert "heatmap-figure-data" not in response.content.decode()


def test_compare_without_runs_says_how_to_select_them(client_logged_in):
    response = client_logged_in.get(reverse("experiments:compare"))

    assert response.status_code == 200
    assert "Compare selected" in response.content.decode()


def test_compare_accepts_repeated_and_comma_separated_ids(client_logged_in, sweep):
    a, b, c = sweep[:3]
    response = client_logged_in.get(
        reverse("experiments:compare") + f"?runs={a.pk},{b.pk}&runs={c.pk}&runs={a.pk}"
    )

    assert [r.pk for r in response.context["runs"]] == [a.pk, b.pk, c.pk]


def test_compare_refuses_more_runs_than_the_cap_with_a_message(client_logged_in):
    response = _compare(client_logged_in, range(1, 52))

    assert response.status_code == 400
    assert "Compare at most 50 runs at a time (51 were selected)" in response.content.decode()


@pytest.mark.parametrize("value", ["abc", "1,-2", "1;2", "9" * 40, "<script>", "1,²", "0"])
def test_compare_refuses_malformed_ids(client_logged_in, value):
    response = client_logged_in.get(reverse("experiments:compare"), {"runs": value})

    assert response.status_code == 400
    assert "is not a run id" in response.content.decode()
    assert "<script>" not in response.content.decode()


def test_compare_is_404_when_any_run_belongs_to_another_team(client_logged_in, sweep, other_team):
    foreign = RunFactory(experiment=ExperimentFactory(team=other_team))

    assert _compare(client_logged_in, [sweep[0].pk, foreign.pk]).status_code == 404
    assert _compare(client_logged_in, [foreign.pk]).status_code == 404
    assert _compare(client_logged_in, [sweep[0].pk, 10**9]).status_code == 404


def test_staff_may_compare_any_teams_runs(client, staff_user, sweep, other_team):
    foreign = _finished(ExperimentFactory(team=other_team))
    client.force_login(staff_user)

    response = _compare(client, [sweep[0].pk, foreign.pk])

    assert response.status_code == 200 and len(response.context["runs"]) == 2


def test_compare_requires_login(client, sweep):
    response = _compare(client, [sweep[0].pk])

    assert response.status_code == 302 and response.url.startswith(reverse("login"))


def test_compare_mixes_tasks_by_ranking_with_the_most_common_tasks_metric(client_logged_in, team, sweep):
    corpus = DatasetSpecFactory(team=team, task="causal_lm", num_labels=0, builtin_name="fortunes")
    lm_run = _finished(ExperimentFactory(team=team, dataset=corpus))

    response = _compare(client_logged_in, [sweep[0].pk, sweep[1].pk, lm_run.pk])

    assert response.status_code == 200
    assert response.context["comparison"].metric.name == "accuracy"


def test_compare_uses_a_constant_number_of_queries(client_logged_in, team, experiment, digits_setup,
                                                   django_assert_max_num_queries):
    def make(n):
        runs = []
        for i in range(n):
            run = _finished(experiment, config=_config(temperature=1.0 + i), student=_student(team),
                            recipe=RecipeFactory(team=team), teacher=digits_setup["teacher"], params=100 + i)
            _points(run, "loss", range(50), [1.0] * 50)
            _points(run, "eval/accuracy", [10, 20], [0.5, 0.6])
            runs.append(run)
        return [r.pk for r in runs]

    few = make(3)
    with CaptureQueriesContext(connection) as ctx:
        assert _compare(client_logged_in, few).status_code == 200
    many = few + make(27)

    with django_assert_max_num_queries(len(ctx.captured_queries)):
        response = _compare(client_logged_in, many)
    assert len(response.context["runs"]) == 30
