"""Plotly figure builders: plain data in, plotly figure dict (``{"data": [...], "layout": {...}}``) out.

Templates hand the dicts to the locally served plotly.js through ``json_script``. Every trace is downsampled
on the server so a page never ships more than ``MAX_POINTS`` points per curve, however long the run.

The dicts are written directly in plotly's figure schema rather than through ``plotly.graph_objects``, whose
per-property validation costs more than the whole rest of a page for a leaderboard of a thousand rows; the
tests pass every builder's output through ``go.Figure`` so the schema still holds.
"""

from __future__ import annotations

import base64
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np

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


def _figure(traces: list[dict[str, Any]], layout: dict[str, Any]) -> dict[str, Any]:
    return {"data": traces, "layout": layout}


def _scatter(**props: Any) -> dict[str, Any]:
    return {"type": "scatter", **props}


_INT_DTYPES = (("i1", np.int8), ("i2", np.int16), ("i4", np.int32))


def _typed(values: np.ndarray) -> dict[str, str]:
    """An array as a plotly.js typed array (``{"dtype", "bdata"}``, little-endian bytes in base64): a tenth of
    the bytes of a JSON list and no per-number parsing in the browser. Integers take the narrowest type that
    holds them (plotly.js has no 64-bit integers); anything else goes as float64, NaN for a gap."""
    if values.dtype.kind in "iu" and values.size:
        low, high = int(values.min()), int(values.max())
        for name, dtype in _INT_DTYPES:
            info = np.iinfo(dtype)
            if info.min <= low and high <= info.max:
                return {
                    "dtype": name,
                    "bdata": base64.b64encode(values.astype(f"<{name}").tobytes()).decode(),
                }
    return {"dtype": "f8", "bdata": base64.b64encode(values.astype("<f8").tobytes()).decode()}


def _layout(*, title: str, x_title: str = "step", y_title: str = "", **extra: Any) -> dict[str, Any]:
    return {
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


def _line(name: str, steps: Sequence[int], values: Sequence[float], *, max_points: int,
          **extra: Any) -> dict[str, Any]:
    x, y = downsample(steps, values, max_points)
    return _scatter(x=x, y=y, name=name, mode="lines+markers" if len(x) < 30 else "lines", **extra)


class Curve(NamedTuple):
    label: str
    steps: Sequence[int]
    values: Sequence[float]
    dashed: bool = False


def _loss_order(name: str) -> tuple[int, str]:
    return (0 if name == "loss" else 1, name)


def _is_evaluation(name: str) -> bool:
    """Metrics of an evaluation: ``eval/…`` on the eval split, ``val/…`` on the validation slice early
    stopping selects on."""
    return name.startswith(("eval/", "val/"))


def _is_training_loss(name: str) -> bool:
    """Loss curves share one axis: leave out eval metrics, the learning rate, throughputs (``…_per_s``) and
    memory (``gpu_memory_bytes``)."""
    return (not _is_evaluation(name) and name not in ("lr", "gpu_memory_bytes")
            and not name.endswith("_per_s"))


def _is_divergence(name: str) -> bool:
    """Eval metrics on a loss scale (unbounded) rather than a score scale (0–1)."""
    short = name.removeprefix("eval/").removeprefix("val/")
    return "loss" in short or short in ("nll", "perplexity") or short.startswith("kl") or "_kl" in short


def loss_figure(series: Series, *, max_points: int = MAX_POINTS) -> dict[str, Any]:
    """Training curves: the total ``loss`` and each loss term (``ce``, ``kd``, …) on one axis; the learning
    rate (``lr``), when logged, on a second axis. Metrics named ``eval/…`` belong to :func:`eval_figure`;
    throughputs such as ``samples_per_s`` are left out."""
    names = sorted((n for n in series if _is_training_loss(n)), key=_loss_order)
    traces = [
        _line(n, *series[n], max_points=max_points, line={"width": 2.5 if n == "loss" else 1.5})
        for n in names
    ]
    extra: dict[str, Any] = {}
    if "lr" in series:
        traces.append(
            _line("lr", *series["lr"], max_points=max_points, yaxis="y2",
                  line={"dash": "dot", "width": 1, "color": "#9ca3af"})
        )
        extra["yaxis2"] = {**_AXIS, "title": {"text": "learning rate"}, "overlaying": "y", "side": "right",
                           "showgrid": False, "tickformat": ".1e"}
    return _figure(traces, _layout(title="Training loss", y_title="loss", **extra))


def eval_figure(series: Series, *, max_points: int = MAX_POINTS) -> dict[str, Any]:
    """Eval curves (``eval/…``, named without the prefix) and, with early stopping, the validation slice's
    (``val/…``, named with it): scores such as accuracy and macro F1 on the left axis; losses and divergences
    (``loss``, ``nll``, ``kl_to_teacher``) on the right."""
    names = sorted(n for n in series if _is_evaluation(n))
    losses = [n for n in names if _is_divergence(n)]
    traces = [
        _line(n.removeprefix("eval/"), *series[n], max_points=max_points) for n in names if n not in losses
    ]
    traces += [
        _line(n.removeprefix("eval/"), *series[n], max_points=max_points, yaxis="y2", line={"dash": "dash"})
        for n in losses
    ]
    extra: dict[str, Any] = {}
    if losses:
        extra["yaxis2"] = {**_AXIS, "title": {"text": "loss"}, "overlaying": "y", "side": "right",
                           "showgrid": False}
    return _figure(traces, _layout(title="Evaluation", y_title="score", **extra))


def runs_figure(
    curves: Iterable[Curve], *, metric: str = "eval/accuracy", max_points: int = MAX_POINTS
) -> dict[str, Any]:
    """One metric across the runs of an experiment: one line per curve, dashed ones (e.g. baselines)
    dashed."""
    traces = [
        _line(
            c.label, c.steps, c.values, max_points=max_points, line={"dash": "dash" if c.dashed else "solid"}
        )
        for c in (Curve(*curve) for curve in curves)
    ]
    short = metric.removeprefix("eval/")
    layout = _layout(title=f"Eval {short.replace('_', ' ')} by run", y_title=short, hovermode="closest")
    return _figure(traces, layout)


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
        _scatter(
            x=[p["params"] for p in group],
            y=[scale * p["mean"] for p in group],
            error_y={
                "type": "data",
                "array": [scale * p["std"] for p in group],
                "visible": True,
                "thickness": 1,
            },
            text=[p["label"] for p in group],
            name=recipe,
            mode="markers",
            marker={"size": 10, "symbol": "circle"},
            hovertemplate="%{text}<br>%{y:.3g}" + ("%" if percent else "") + " at %{x:,} params"
            "<extra>%{fullData.name}</extra>",
        )
        for recipe, group in sorted(by_recipe.items())
    ]
    layout = _layout(
        title=f"{metric_label} vs size",
        x_title="parameters",
        y_title=f"{metric_label.lower()}{unit}",
        hovermode="closest",
    )
    layout["xaxis"]["type"] = "log"
    return _figure(traces, layout)


def compare_figure(curves: Iterable[Curve], *, metric: str, max_points: int = MAX_POINTS) -> dict[str, Any]:
    """One metric (a loss term, the learning rate or an eval metric) of several runs, overlaid; dashed curves
    (baselines) dashed. Curves longer than ``max_points`` are downsampled here too, so the cap always holds.

    The points go out as typed arrays (``{"dtype", "bdata"}``, base64) that plotly.js decodes: up to 50 runs ×
    2,000 points stay cheap to build and to send. Gaps (non-finite values) are NaN there.
    """
    traces = []
    for curve in (Curve(*c) for c in curves):
        steps, values = downsample(curve.steps, curve.values, max_points)
        traces.append(_scatter(
            x=_typed(np.asarray(steps, dtype=np.int64)),
            y=_typed(np.array([np.nan if v is None else v for v in values], dtype=np.float64)),
            name=curve.label, mode="lines+markers" if len(steps) < 30 else "lines",
            line={"dash": "dash" if curve.dashed else "solid", "width": 1.5},
        ))
    layout = _layout(title=metric, y_title=metric.removeprefix("eval/"), hovermode="closest")
    return _figure(traces, layout)


class ParetoPoint(NamedTuple):
    """A model on the quality/cost plane. ``optimal``: on the Pareto frontier (see
    ``domain.leaderboard.pareto_flags``); ``teacher`` points are drawn apart and never on the frontier."""

    label: str
    cost: float | None
    quality: float | None
    group: str = ""
    teacher: bool = False
    optimal: bool = False


def pareto_figure(
    points: Iterable[ParetoPoint],
    *,
    cost_label: str,
    metric_label: str,
    higher_is_better: bool,
    percent: bool,
) -> dict[str, Any]:
    """Quality against cost (parameters or latency) on a log axis: students grouped by recipe, dominated ones
    faded; the frontier as a step line (from each optimal model, the best quality reachable for that cost
    until the next one); teachers as stars. Points without a positive cost or a quality are left out."""
    scale = 100 if percent else 1
    shown = [p for p in points if p.cost is not None and p.cost > 0 and _finite(p.quality) is not None]
    students = [p for p in shown if not p.teacher]
    groups: dict[str, list[ParetoPoint]] = {}
    for p in students:
        groups.setdefault(p.group or "runs", []).append(p)
    hover = "%{text}<br>%{y:.4g}" + ("%" if percent else "") + " at %{x:,.4g}<extra>%{fullData.name}</extra>"
    traces = []
    frontier = sorted(
        (p for p in students if p.optimal),
        key=lambda p: (p.cost, -p.quality if higher_is_better else p.quality),
    )
    if frontier:
        traces.append(
            _scatter(
                x=[p.cost for p in frontier],
                y=[scale * p.quality for p in frontier],
                name="Pareto frontier",
                mode="lines",
                line={"shape": "hv", "color": "#6b7280", "width": 1.5, "dash": "dot"},
                hoverinfo="skip",
            )
        )
    for group, members in sorted(groups.items()):
        traces.append(
            _scatter(
                x=[p.cost for p in members],
                y=[scale * p.quality for p in members],
                text=[p.label for p in members],
                name=group,
                mode="markers",
                hovertemplate=hover,
                marker={
                    "size": 11,
                    "opacity": [1.0 if p.optimal else 0.3 for p in members],
                    "line": {"width": [1.5 if p.optimal else 0 for p in members], "color": "#111827"},
                },
            )
        )
    teachers = [p for p in shown if p.teacher]
    if teachers:
        traces.append(
            _scatter(
                x=[p.cost for p in teachers],
                y=[scale * p.quality for p in teachers],
                text=[p.label for p in teachers],
                name="teacher",
                mode="markers",
                hovertemplate=hover,
                marker={
                    "symbol": "star",
                    "size": 17,
                    "color": "#111827",
                    "line": {"width": 1, "color": "#facc15"},
                },
            )
        )
    direction = "" if higher_is_better else " — lower is better"
    layout = _layout(
        title=f"{metric_label} vs {cost_label}",
        x_title=f"{cost_label} (log scale)",
        y_title=f"{metric_label.lower()}{' (%)' if percent else ''}{direction}",
        hovermode="closest",
    )
    layout["xaxis"]["type"] = "log"
    return _figure(traces, layout)


def heatmap_figure(*, x_label: str, y_label: str, x_levels: Sequence[str], y_levels: Sequence[str],
                   z: Sequence[Sequence[float | None]], metric_label: str, higher_is_better: bool,
                   percent: bool) -> dict[str, Any]:
    """A two-parameter sweep: the mean metric (over seeds) of each combination, written in its cell; the
    colour scale runs from worst to best whatever the metric's direction. Missing cells stay empty."""
    scale = 100 if percent else 1
    values = [[None if _finite(v) is None else scale * v for v in row] for row in z]
    trace = dict(
        type="heatmap",
        z=values,
        x=list(x_levels),
        y=list(y_levels),
        colorscale="Viridis",
        reversescale=not higher_is_better,
        texttemplate="%{z:.4g}",
        hovertemplate=f"{x_label}=%{{x}}<br>{y_label}=%{{y}}<br>%{{z:.4g}}<extra></extra>",
        colorbar={"title": {"text": metric_label + (" (%)" if percent else "")}},
    )
    layout = _layout(title=f"Sweep: mean {metric_label.lower()} over seeds", x_title=x_label, y_title=y_label,
                     hovermode="closest")
    layout["xaxis"]["type"] = layout["yaxis"]["type"] = "category"
    return _figure([trace], layout)
