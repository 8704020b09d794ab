"""Plotly figure builders: plain data in, figure dict out (``json.loads(fig.to_json())``).

Templates hand the dicts to the locally served plotly.js through ``json_script``. Every trace is downsampled
on the server so a page never ships more than ``MAX_POINTS`` points per curve, however long the run.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, NamedTuple

import plotly.graph_objects as go

MAX_POINTS = 2000
Series = Mapping[str, tuple[Sequence[int], Sequence[float]]]

COLORS = ["#2563eb", "#dc2626", "#16a34a", "#9333ea", "#ea580c", "#0891b2", "#ca8a04", "#db2777", "#4b5563"]
_AXIS = {"gridcolor": "#e5e7eb", "zerolinecolor": "#d1d5db", "linecolor": "#9ca3af", "automargin": True}


def _finite(value: Any) -> float | None:
    """A plottable number, or None (a gap in the curve) for NaN, ±inf and missing values."""
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def downsample(
    steps: Sequence[int], values: Sequence[float], max_points: int = MAX_POINTS
) -> tuple[list[int], list[float | None]]:
    """Reduce a curve to at most ``max_points`` points with min/max buckets.

    The first and last points are always kept; the rest is cut into equal buckets and each bucket keeps its
    lowest and highest value (in step order), so spikes and the global extremes survive. Non-finite values
    become None (plotly draws a gap); a bucket with only such values keeps its first point.
    """
    if len(steps) != len(values):
        raise ValueError(f"steps and values differ in length ({len(steps)} != {len(values)})")
    if max_points < 4:
        raise ValueError("max_points must be at least 4")
    clean = [_finite(v) for v in values]
    n = len(steps)
    if n <= max_points:
        return list(steps), clean
    buckets = (max_points - 2) // 2
    interior = n - 2
    keep = [0]
    for b in range(buckets):
        lo = 1 + b * interior // buckets
        hi = 1 + (b + 1) * interior // buckets
        finite = [i for i in range(lo, hi) if clean[i] is not None]
        if not finite:
            keep.append(lo)
            continue
        i_min = min(finite, key=lambda i: clean[i])
        i_max = max(finite, key=lambda i: clean[i])
        keep.extend(sorted({i_min, i_max}))
    keep.append(n - 1)
    return [steps[i] for i in keep], [clean[i] for i in keep]


def _figure_dict(fig: go.Figure) -> dict[str, Any]:
    return json.loads(fig.to_json())


def _layout(*, title: str, x_title: str = "step", y_title: str = "", **extra: Any) -> dict[str, Any]:
    return {
        "template": "none",
        "title": {"text": title, "x": 0, "xanchor": "left", "font": {"size": 15}},
        "font": {"family": "system-ui, -apple-system, Segoe UI, sans-serif", "size": 12, "color": "#1f2937"},
        "colorway": COLORS,
        "height": 360,
        "margin": {"l": 56, "r": 64, "t": 44, "b": 40},
        "hovermode": "x unified",
        "legend": {"orientation": "h", "x": 0, "y": -0.2, "yanchor": "top"},
        "paper_bgcolor": "#ffffff",
        "plot_bgcolor": "#ffffff",
        "xaxis": {**_AXIS, "title": {"text": x_title, "standoff": 4}},
        "yaxis": {**_AXIS, "title": {"text": y_title}},
        **extra,
    }


def _line(name: str, steps: Sequence[int], values: Sequence[float], *, max_points: int, **extra: Any) -> go.Scatter:
    x, y = downsample(steps, values, max_points)
    return go.Scatter(x=x, y=y, name=name, mode="lines+markers" if len(x) < 30 else "lines", **extra)


class Curve(NamedTuple):
    label: str
    steps: Sequence[int]
    values: Sequence[float]
    dashed: bool = False


def _loss_order(name: str) -> tuple[int, str]:
    return (0 if name == "loss" else 1, name)


def _is_training_loss(name: str) -> bool:
    """Loss curves share one axis: leave out eval metrics, the learning rate and throughputs (``…_per_s``)."""
    return not name.startswith("eval/") and name != "lr" and not name.endswith("_per_s")


def _is_divergence(name: str) -> bool:
    """Eval metrics on a loss scale (unbounded) rather than a score scale (0–1)."""
    short = name.removeprefix("eval/")
    return "loss" in short or short in ("nll", "perplexity") or short.startswith("kl") or "_kl" in short


def loss_figure(series: Series, *, max_points: int = MAX_POINTS) -> dict[str, Any]:
    """Training curves: the total ``loss`` and each loss term (``ce``, ``kd``, …) on one axis; the learning rate
    (``lr``), when logged, on a second axis. Metrics named ``eval/…`` belong to :func:`eval_figure`;
    throughputs such as ``samples_per_s`` are left out."""
    names = sorted((n for n in series if _is_training_loss(n)), key=_loss_order)
    traces = [
        _line(n, *series[n], max_points=max_points, line={"width": 2.5 if n == "loss" else 1.5}) for n in names
    ]
    extra: dict[str, Any] = {}
    if "lr" in series:
        traces.append(
            _line("lr", *series["lr"], max_points=max_points, yaxis="y2",
                  line={"dash": "dot", "width": 1, "color": "#9ca3af"})
        )
        extra["yaxis2"] = {**_AXIS, "title": {"text": "learning rate"}, "overlaying": "y", "side": "right",
                           "showgrid": False, "tickformat": ".1e"}
    return _figure_dict(go.Figure(traces, layout=_layout(title="Training loss", y_title="loss", **extra)))


def eval_figure(series: Series, *, max_points: int = MAX_POINTS) -> dict[str, Any]:
    """Eval curves (``eval/…``): scores such as accuracy and macro F1 on the left axis; losses and divergences
    (``loss``, ``nll``, ``kl_to_teacher``) on the right."""
    names = sorted(n for n in series if n.startswith("eval/"))
    losses = [n for n in names if _is_divergence(n)]
    traces = [_line(n.removeprefix("eval/"), *series[n], max_points=max_points) for n in names if n not in losses]
    traces += [
        _line(n.removeprefix("eval/"), *series[n], max_points=max_points, yaxis="y2", line={"dash": "dash"})
        for n in losses
    ]
    extra: dict[str, Any] = {}
    if losses:
        extra["yaxis2"] = {**_AXIS, "title": {"text": "loss"}, "overlaying": "y", "side": "right",
                           "showgrid": False}
    return _figure_dict(go.Figure(traces, layout=_layout(title="Evaluation", y_title="score", **extra)))


def runs_figure(curves: Iterable[Curve], *, metric: str = "eval/accuracy", max_points: int = MAX_POINTS) -> dict[str, Any]:
    """One metric across the runs of an experiment: one line per curve, dashed ones (e.g. baselines) dashed."""
    traces = [
        _line(c.label, c.steps, c.values, max_points=max_points, line={"dash": "dash" if c.dashed else "solid"})
        for c in (Curve(*curve) for curve in curves)
    ]
    short = metric.removeprefix("eval/")
    layout = _layout(title=f"Eval {short.replace('_', ' ')} by run", y_title=short, hovermode="closest")
    return _figure_dict(go.Figure(traces, layout=layout))


def leaderboard_figure(points: Iterable[Mapping[str, Any]], *, metric_label: str = "Accuracy",
                       percent: bool = True) -> dict[str, Any]:
    """The leaderboard's metric against parameter count, one marker per row, grouped by recipe.

    Each point: ``label``, ``recipe``, ``params`` (may be None: such rows are left out), ``mean`` and ``std``
    (a fraction when ``percent``).
    """
    scale = 100 if percent else 1
    unit = " (%)" if percent else ""
    by_recipe: dict[str, list[Mapping[str, Any]]] = {}
    for point in points:
        if point.get("params"):
            by_recipe.setdefault(point["recipe"], []).append(point)
    traces = [
        go.Scatter(
            x=[p["params"] for p in group],
            y=[scale * p["mean"] for p in group],
            error_y={"type": "data", "array": [scale * p["std"] for p in group], "visible": True, "thickness": 1},
            text=[p["label"] for p in group],
            name=recipe,
            mode="markers",
            marker={"size": 10, "symbol": "circle"},
            hovertemplate="%{text}<br>%{y:.3g}" + ("%" if percent else "") + " at %{x:,} params"
                          "<extra>%{fullData.name}</extra>",
        )
        for recipe, group in sorted(by_recipe.items())
    ]
    layout = _layout(title=f"{metric_label} vs size", x_title="parameters", y_title=f"{metric_label.lower()}{unit}",
                     hovermode="closest")
    layout["xaxis"]["type"] = "log"
    return _figure_dict(go.Figure(traces, layout=layout))
