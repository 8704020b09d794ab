import json
import math

import pytest

from experiments import plots


def _trace(fig, name):
    return next(t for t in fig["data"] if t["name"] == name)


def test_downsample_returns_short_curves_unchanged():
    steps, values = plots.downsample([1, 2, 3], [0.5, 0.4, 0.3])

    assert steps == [1, 2, 3]
    assert values == [0.5, 0.4, 0.3]


def test_downsample_caps_points_and_keeps_first_last_and_extremes():
    n = 100_000
    steps = list(range(n))
    values = [math.sin(i / 500) for i in range(n)]
    values[31_337] = 50.0  # a spike
    values[77_777] = -50.0  # a dip

    out_steps, out_values = plots.downsample(steps, values, max_points=2000)

    assert len(out_steps) == len(out_values) <= 2000
    assert (out_steps[0], out_values[0]) == (0, values[0])
    assert (out_steps[-1], out_values[-1]) == (n - 1, values[-1])
    assert 31_337 in out_steps and max(out_values) == 50.0
    assert 77_777 in out_steps and min(out_values) == -50.0
    assert out_steps == sorted(out_steps) and len(set(out_steps)) == len(out_steps)
    assert all(values[s] == v for s, v in zip(out_steps, out_values, strict=True))


def test_downsample_just_over_the_limit_still_fits():
    steps = list(range(2001))

    out_steps, _ = plots.downsample(steps, [float(s % 7) for s in steps], max_points=2000)

    assert len(out_steps) <= 2000
    assert out_steps[0] == 0 and out_steps[-1] == 2000


def test_downsample_turns_non_finite_values_into_gaps():
    steps, values = plots.downsample([0, 1, 2, 3], [1.0, float("nan"), float("inf"), 2.0])

    assert steps == [0, 1, 2, 3]
    assert values == [1.0, None, None, 2.0]


def test_downsample_bucket_of_only_nan_keeps_a_gap():
    n = 10_000
    values = [float("nan")] * n
    values[0] = values[-1] = 1.0

    out_steps, out_values = plots.downsample(list(range(n)), values, max_points=100)

    assert len(out_steps) <= 100
    assert out_values[0] == 1.0 and out_values[-1] == 1.0
    assert all(v is None for v in out_values[1:-1])


def test_downsample_rejects_mismatched_lengths():
    with pytest.raises(ValueError, match="differ in length"):
        plots.downsample([1, 2], [1.0])


def test_loss_figure_has_total_loss_each_term_and_lr_on_a_second_axis():
    series = {
        "loss": ([10, 20], [2.0, 1.5]),
        "kd": ([10, 20], [1.8, 1.2]),
        "ce": ([10, 20], [2.2, 1.9]),
        "lr": ([10, 20], [1e-3, 9e-4]),
        "eval/accuracy": ([20], [0.5]),
    }

    fig = plots.loss_figure(series)

    assert [t["name"] for t in fig["data"]] == ["loss", "ce", "kd", "lr"]
    assert _trace(fig, "kd")["y"] == [1.8, 1.2]
    assert _trace(fig, "lr")["yaxis"] == "y2"
    assert fig["layout"]["yaxis2"]["overlaying"] == "y"
    json.dumps(fig)  # plain JSON, ready for json_script


def test_eval_figure_puts_scores_left_and_losses_right():
    series = {
        "eval/accuracy": ([100, 200], [0.6, 0.8]),
        "eval/loss": ([100, 200], [1.1, 0.7]),
        "loss": ([10], [3.0]),
    }

    fig = plots.eval_figure(series)

    assert sorted(t["name"] for t in fig["data"]) == ["accuracy", "loss"]
    assert _trace(fig, "accuracy").get("yaxis", "y") == "y"
    assert _trace(fig, "loss")["yaxis"] == "y2"


def test_figures_downsample_long_curves():
    n = 50_000
    series = {"loss": (list(range(n)), [1 / (i + 1) for i in range(n)])}

    fig = plots.loss_figure(series)

    trace = _trace(fig, "loss")
    assert len(trace["x"]) <= plots.MAX_POINTS
    assert trace["x"][0] == 0 and trace["x"][-1] == n - 1
    assert isinstance(trace["x"], list)  # plain lists, not plotly's binary arrays


def test_empty_series_give_figures_without_traces():
    assert plots.loss_figure({})["data"] == []
    assert plots.eval_figure({})["data"] == []
    assert plots.runs_figure([])["data"] == []


def test_runs_figure_has_one_line_per_run():
    fig = plots.runs_figure([("#1 mlp · kd", [1, 2], [0.5, 0.6]), ("#2 mlp · ce", [1, 2], [0.4, 0.5])])

    assert [t["name"] for t in fig["data"]] == ["#1 mlp · kd", "#2 mlp · ce"]


def test_leaderboard_figure_groups_by_recipe_and_skips_rows_without_size():
    points = [
        {"label": "a", "recipe": "kd", "params": 1000, "mean": 0.9, "std": 0.01},
        {"label": "b", "recipe": "kd", "params": 5000, "mean": 0.95, "std": 0.0},
        {"label": "c", "recipe": "baseline", "params": 1000, "mean": 0.8, "std": 0.02},
        {"label": "d", "recipe": "jsd", "params": None, "mean": 0.99, "std": 0.0},
    ]

    fig = plots.leaderboard_figure(points)

    kd = _trace(fig, "kd")
    assert kd["x"] == [1000, 5000]
    assert kd["y"] == pytest.approx([90.0, 95.0])
    assert {t["name"] for t in fig["data"]} == {"kd", "baseline"}
    assert fig["layout"]["xaxis"]["type"] == "log"


def test_loss_figure_leaves_out_throughput():
    fig = plots.loss_figure({"loss": ([1], [1.0]), "samples_per_s": ([1], [50_000.0])})

    assert [t["name"] for t in fig["data"]] == ["loss"]


def test_eval_figure_puts_divergences_on_the_loss_axis():
    series = {f"eval/{n}": ([1], [0.5]) for n in ("accuracy", "ece", "agreement", "kl_to_teacher", "nll", "loss")}

    fig = plots.eval_figure(series)

    right = {t["name"] for t in fig["data"] if t.get("yaxis") == "y2"}
    assert right == {"kl_to_teacher", "nll", "loss"}


def test_runs_figure_dashes_marked_curves():
    fig = plots.runs_figure([plots.Curve("#1 kd", [1], [0.5]), plots.Curve("#2 baseline", [1], [0.4], dashed=True)])

    assert [t["line"]["dash"] for t in fig["data"]] == ["solid", "dash"]
