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
import statistics
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np

MAX_POINTS = 2000
Series = Mapping[str, tuple[Sequence[int], Sequence[float]]]

COLORS = ["#2563eb", "#dc2626", "#16a34a", "#9333ea", "#ea580c", "#0891b2", "#ca8a04", "#db2777", "#4b5563"]
# One colour per method (recipe), the same on every page: a recipe's id picks its colour, so the recipes of a
# team, created one after another, differ until the palette wraps. Grey is kept for the hard-label baseline.
METHOD_COLORS = ["#2563eb", "#dc2626", "#16a34a", "#9333ea", "#ea580c", "#0891b2", "#ca8a04", "#db2777",
                 "#65a30d", "#7c3aed", "#0d9488", "#be123c", "#1e40af", "#a16207", "#c026d3", "#15803d"]
BASELINE_COLOR = "#6b7280"
TEACHER_COLOR = "#111827"
_AXIS = {"gridcolor": "#e5e7eb", "zerolinecolor": "#d1d5db", "linecolor": "#9ca3af", "automargin": True}


def method_color(recipe_id: int | None, *, baseline: bool = False) -> str:
    """The colour of a method (recipe) in every figure: grey for the hard-label baseline, else picked by the
    recipe's id."""
    if baseline or recipe_id is None:
        return BASELINE_COLOR
    return METHOD_COLORS[recipe_id % len(METHOD_COLORS)]


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
    """One run's curve. ``group``: what runs differing only by seed share (e.g. student and recipe), the
    unit of the mean ± std band when many runs are overlaid; ``color``: its method's (see
    :func:`method_color`)."""

    label: str
    steps: Sequence[int]
    values: Sequence[float]
    dashed: bool = False
    group: str = ""
    color: str = ""


GROUP_FROM = 10
"""From this many curves on, an overlay draws the runs of a group (two or more) as their mean ± std band."""


def _rgba(color: str, alpha: float) -> str:
    r, g, b = (int(color[i:i + 2], 16) for i in (1, 3, 5))
    return f"rgba({r}, {g}, {b}, {alpha})"


def _grouped(curves: Sequence[Curve]) -> list[tuple[str, list[Curve]]] | None:
    """The curves by group (in order of first appearance) when the overlay is crowded enough to draw groups
    as bands, else None."""
    groups: dict[str, list[Curve]] = {}
    for i, curve in enumerate(curves):
        groups.setdefault(curve.group or f"\0{i}", []).append(curve)
    if len(curves) < GROUP_FROM or all(len(members) < 2 for members in groups.values()):
        return None
    return list(groups.items())


Band = tuple[list[int], list[float | None], list[float], list[float]]


def _band(members: Sequence[Curve], max_points: int) -> Band:
    """The group's mean at every step some member logged, with the mean ± sample std (0 where one member
    has a value), reduced to at most ``max_points`` steps chosen on the mean."""
    at: dict[int, list[float]] = {}
    for curve in members:
        for step, value in zip(curve.steps, curve.values, strict=True):
            value = _finite(value)
            if value is not None:
                at.setdefault(int(step), []).append(value)
    steps = sorted(at)
    means = [statistics.fmean(at[s]) for s in steps]
    stds = [statistics.stdev(at[s]) if len(at[s]) > 1 else 0.0 for s in steps]
    kept, kept_means = downsample(steps, means, max_points)
    index = {s: i for i, s in enumerate(steps)}
    lower = [means[index[s]] - stds[index[s]] for s in kept]
    upper = [means[index[s]] + stds[index[s]] for s in kept]
    return kept, kept_means, lower, upper


def _overlay_traces(curves: Iterable[Curve], *, max_points: int, typed: bool) -> list[dict[str, Any]]:
    """Lines of an overlay: one per curve, or, when crowded (see :data:`GROUP_FROM`), one mean line and a
    mean ± std band per group of runs (groups of one stay a plain line). ``typed`` sends the points as
    plotly.js typed arrays."""
    curves = [Curve(*c) for c in curves]

    def xy(steps: Sequence[int], values: Sequence[float | None]) -> dict[str, Any]:
        if not typed:
            return {"x": list(steps), "y": list(values)}
        return {"x": _typed(np.asarray(steps, dtype=np.int64)),
                "y": _typed(np.array([np.nan if v is None else v for v in values], dtype=np.float64))}

    def line(curve: Curve, label: str) -> dict[str, Any]:
        steps, values = downsample(curve.steps, curve.values, max_points)
        style = {"dash": "dash" if curve.dashed else "solid", "width": 1.5}
        if curve.color:
            style["color"] = curve.color
        return _scatter(**xy(steps, values), name=label, mode="lines+markers" if len(steps) < 30 else "lines",
                        line=style)

    groups = _grouped(curves)
    if groups is None:
        return [line(c, c.label) for c in curves]
    traces = []
    for i, (group, members) in enumerate(groups):
        if len(members) == 1:
            traces.append(line(members[0], members[0].label))
            continue
        color = members[0].color or COLORS[i % len(COLORS)]
        steps, means, lower, upper = _band(members, max_points)
        name = f"{group} (mean ± std of {len(members)})"
        edge = {"width": 0, "color": color}
        traces += [
            _scatter(**xy(steps, lower), mode="lines", line=edge, legendgroup=group, showlegend=False,
                     hoverinfo="skip", name=f"{group} − std"),
            _scatter(**xy(steps, upper), mode="lines", line=edge, legendgroup=group, showlegend=False,
                     hoverinfo="skip", name=f"{group} + std", fill="tonexty", fillcolor=_rgba(color, 0.18)),
            _scatter(**xy(steps, means), mode="lines+markers" if len(steps) < 30 else "lines", name=name,
                     legendgroup=group,
                     line={"color": color, "width": 2, "dash": "dash" if members[0].dashed else "solid"}),
        ]
    return traces


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


def _same_curve(a: tuple[Sequence[int], Sequence[float]], b: tuple[Sequence[int], Sequence[float]]) -> bool:
    """Whether two logged curves are the same points (within float rounding)."""
    (a_steps, a_values), (b_steps, b_values) = a, b
    if list(a_steps) != list(b_steps):
        return False
    for x, y in zip(a_values, b_values, strict=True):
        x, y = _finite(x), _finite(y)
        if (x is None) != (y is None):
            return False
        if x is not None and not math.isclose(x, y, rel_tol=1e-6, abs_tol=1e-9):
            return False
    return True


def loss_figure(series: Series, *, max_points: int = MAX_POINTS) -> dict[str, Any]:
    """Training curves: the total ``loss`` and each loss term (``ce``, ``kd``, …) on one axis; the learning
    rate (``lr``), when logged, on a second axis. Metrics named ``eval/…`` belong to :func:`eval_figure`;
    throughputs such as ``samples_per_s`` are left out. With a single term equal to the total (a one-term
    recipe at weight 1) only one curve is drawn, named ``loss = <term>``."""
    names = sorted((n for n in series if _is_training_loss(n)), key=_loss_order)
    terms = [n for n in names if n != "loss"]
    labels = {n: n for n in names}
    if "loss" in series and len(terms) == 1 and _same_curve(series["loss"], series[terms[0]]):
        names.remove(terms[0])
        labels["loss"] = f"loss = {terms[0]}"
    traces = [
        _line(labels[n], *series[n], max_points=max_points, line={"width": 2.5 if n == "loss" else 1.5})
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
    dashed; many runs are drawn as one mean ± std band per group (see :func:`_overlay_traces`)."""
    traces = _overlay_traces(curves, max_points=max_points, typed=False)
    short = metric.removeprefix("eval/")
    layout = _layout(title=f"Eval {short.replace('_', ' ')} by run", y_title=short, hovermode="closest")
    return _figure(traces, layout)


def compare_figure(curves: Iterable[Curve], *, metric: str, max_points: int = MAX_POINTS) -> dict[str, Any]:
    """One metric (a loss term, the learning rate or an eval metric) of several runs, overlaid; dashed curves
    (baselines) dashed; many runs drawn as one mean ± std band per group (see :func:`_overlay_traces`).
    Curves longer than ``max_points`` are downsampled here too, so the cap always holds.

    The points go out as typed arrays (``{"dtype", "bdata"}``, base64) that plotly.js decodes: up to 50 runs ×
    2,000 points stay cheap to build and to send. Gaps (non-finite values) are NaN there.
    """
    traces = _overlay_traces(curves, max_points=max_points, typed=True)
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
    color: str = ""
    spread: float | None = None
    """The quality's standard deviation over seeds, drawn as an error bar (None: no bar)."""


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
        bars: dict[str, Any] = {}
        if any(p.spread for p in members):
            bars["error_y"] = {"type": "data", "array": [scale * (p.spread or 0.0) for p in members],
                               "visible": True, "thickness": 1}
        traces.append(
            _scatter(
                **bars,
                x=[p.cost for p in members],
                y=[scale * p.quality for p in members],
                text=[p.label for p in members],
                name=group,
                mode="markers",
                hovertemplate=hover,
                marker={
                    "size": 11,
                    "opacity": [1.0 if p.optimal else 0.3 for p in members],
                    "line": {"width": [1.5 if p.optimal else 0 for p in members], "color": TEACHER_COLOR},
                    **({"color": members[0].color} if members[0].color else {}),
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
                    "color": TEACHER_COLOR,
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
