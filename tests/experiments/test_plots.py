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


def test_loss_figure_leaves_out_throughput():
    fig = plots.loss_figure({"loss": ([1], [1.0]), "samples_per_s": ([1], [50_000.0])})

    assert [t["name"] for t in fig["data"]] == ["loss"]


def test_eval_figure_puts_divergences_on_the_loss_axis():
    series = {
        f"eval/{n}": ([1], [0.5]) for n in ("accuracy", "ece", "agreement", "kl_to_teacher", "nll", "loss")
    }

    fig = plots.eval_figure(series)

    right = {t["name"] for t in fig["data"] if t.get("yaxis") == "y2"}
    assert right == {"kl_to_teacher", "nll", "loss"}


def test_runs_figure_dashes_marked_curves():
    fig = plots.runs_figure(
        [plots.Curve("#1 kd", [1], [0.5]), plots.Curve("#2 baseline", [1], [0.4], dashed=True)]
    )

    assert [t["line"]["dash"] for t in fig["data"]] == ["solid", "dash"]


def _every_figure():
    """One output of each builder, with gaps, a second axis, typed arrays, faded points and empty cells."""
    series = {"loss": ([1, 2, 3], [1.0, float("nan"), 0.5]), "kd": ([1, 2, 3], [0.4, 0.3, 0.2]),
              "lr": ([1, 2, 3], [1e-3, 5e-4, 1e-4]), "eval/accuracy": ([3], [0.9]), "eval/nll": ([3], [0.3])}
    curves = [
        plots.Curve("#1", [1, 2, 3], [0.3, float("inf"), 0.1]),
        plots.Curve("#2", [1, 70_000], [0.5, 0.4], True),
    ]
    pareto = [plots.ParetoPoint("a", 1e3, 0.9, "kd", optimal=True), plots.ParetoPoint("b", 2e3, 0.8, "kd"),
              plots.ParetoPoint("t", 1e5, 0.95, teacher=True)]
    return {
        "loss": plots.loss_figure(series),
        "eval": plots.eval_figure(series),
        "runs": plots.runs_figure(curves),
        "pareto-with-spread": plots.pareto_figure(
            [plots.ParetoPoint("a", 10, 0.5, "kd", optimal=True, color=plots.method_color(3), spread=0.1)],
            cost_label="parameters", metric_label="Accuracy", higher_is_better=True, percent=True,
        ),
        "grouped": plots.compare_figure(
            [plots.Curve(f"#{i}", [1, 2], [0.1 * i, 0.2], group="g", color="#2563eb") for i in range(6)],
            metric="loss",
        ),
        "compare": plots.compare_figure(curves, metric="loss"),
        "pareto": plots.pareto_figure(
            pareto, cost_label="parameters", metric_label="Accuracy", higher_is_better=True, percent=True
        ),
        "heatmap": plots.heatmap_figure(
            x_label="lr",
            y_label="τ",
            x_levels=["1e-4", "1e-3"],
            y_levels=["2", "4"],
            z=[[0.8, None], [0.9, 0.85]],
            metric_label="Accuracy",
            higher_is_better=True,
            percent=True,
        ),
    }


@pytest.mark.parametrize("name", list(_every_figure()))
def test_every_figure_is_valid_plotly_and_strict_json(name):
    """The builders write plotly's schema by hand: plotly's own validation must accept every property, and the
    page's JSON must parse in a browser (no NaN or Infinity literals)."""
    import plotly.graph_objects as go

    fig = _every_figure()[name]

    go.Figure(fig)  # raises ValueError on an unknown or ill-typed property
    json.loads(json.dumps(fig, allow_nan=False))


def test_compare_figure_sends_typed_arrays_that_decode_to_the_curve():
    import base64

    import numpy as np

    fig = plots.compare_figure([plots.Curve("#1", [1, 2, 70_000], [0.3, float("nan"), 0.1])], metric="loss")

    x, y = fig["data"][0]["x"], fig["data"][0]["y"]
    assert x["dtype"] == "i4" and np.frombuffer(base64.b64decode(x["bdata"]), "<i4").tolist() == [
        1,
        2,
        70_000,
    ]
    values = np.frombuffer(base64.b64decode(y["bdata"]), "<f8")
    assert y["dtype"] == "f8" and values[0] == 0.3 and math.isnan(values[1]) and values[2] == 0.1
