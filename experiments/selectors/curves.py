"""Reads of training curves: a run's live telemetry, metric series downsampled on the server, and the curves
of many runs for comparison plots."""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from typing import Any

from django.db import connections
from django.db.models import (
    Count,
    Max,
    Min,
    OuterRef,
    Subquery,
)
from django.db.models.expressions import RawSQL

from experiments import rollups
from experiments.models import (
    Experiment,
    MetricPoint,
    MetricRollup,
    Run,
)

LIVE_METRICS = ("tokens_per_s", "gpu_memory_bytes")


def run_live_telemetry(*, run: Run) -> dict[str, float]:
    """The newest value of each of ``LIVE_METRICS`` the run has logged (tokens/s for causal LMs, peak GPU
    memory on CUDA), in one query."""
    latest = {
        name: Subquery(MetricPoint.objects.filter(run_id=OuterRef("pk"), name=name).order_by("-step")
                       .values("value")[:1])
        for name in LIVE_METRICS
    }
    row = Run.objects.filter(pk=run.pk).annotate(**{f"latest_{n}": q for n, q in latest.items()}).values(
        *(f"latest_{n}" for n in LIVE_METRICS)).first() or {}
    return {name: row[f"latest_{name}"] for name in LIVE_METRICS if row.get(f"latest_{name}") is not None}


def run_metric_series(*, run: Run, max_points: int = 2000) -> dict[str, tuple[list[int], list[float | None]]]:
    """All metric curves of a run: name → (steps, values), ordered by step, each at most ``max_points`` long.

    On Postgres a curve with more steps is downsampled on the database as :func:`metric_curves` does (min/max
    buckets over the curve's steps, first and last point kept; non-finite values become None), in two queries
    whatever the number of points: a run page never reads a 100,000-point curve into Python. Other databases
    return every point (the plots downsample them).
    """
    connection = connections[MetricPoint.objects.db]
    if connection.vendor == "postgresql":
        return _run_metric_series_downsampled(run_id=run.pk, max_points=max_points)
    series: dict[str, tuple[list[int], list[float | None]]] = defaultdict(lambda: ([], []))
    rows = MetricPoint.objects.filter(run=run).order_by("name", "step").values_list("name", "step", "value")
    for name, step, value in rows.iterator(chunk_size=5000):
        steps, values = series[name]
        steps.append(step)
        values.append(value)
    return dict(series)


# A point of a run's full-resolution history: (name, step, value, wall time: a datetime, or its ISO text).
HistoryPoint = tuple[str, int, float, datetime | str]


def _iso_utc(text: str) -> str:
    """Postgres' text of a UTC timestamp (``2026-01-02 03:04:05.12``) as JSON writes a UTC datetime
    (``2026-01-02T03:04:05.120000Z``: microseconds only when there are some)."""
    stamp, _, fraction = text.partition(".")
    return f"{stamp[:10]}T{stamp[11:]}{'.' + fraction.ljust(6, '0') if fraction else ''}Z"


def run_metric_history(
    *,
    run_id: int,
    name: str | None = None,
    after: tuple[str, int] | None = None,
    limit: int,
    iso_times: bool = False,
) -> list[HistoryPoint]:
    """Up to ``limit`` points of the run at full resolution, in (name, step) order, after the point ``after``
    ((name, step), exclusive); only metric ``name`` when given. With ``iso_times`` each wall time comes (on
    Postgres) as the text a JSON answer shows (``2026-01-02T03:04:05.123456Z``) instead of a datetime.

    Keyset reads on the (run, name, step) unique index: a page costs the same at the first and the millionth
    point, and the key names one point (steps tie across names, never within one), so a walk from page to
    page meets every point exactly once, even while a live run appends steps.
    """
    points = MetricPoint.objects.filter(run_id=run_id)
    fields = ("name", "step", "value", "wall_time")
    if not (iso_times and connections[MetricPoint.objects.db].vendor == "postgresql"):
        return _history_rows(points, fields, name=name, after=after, limit=limit)
    # The wall times as Postgres' text, made ISO here: parsing 10,000 timestamps into datetimes and formatting
    # them again cost more than the page's query.
    quote = connections[MetricPoint.objects.db].ops.quote_name
    column = quote(MetricPoint._meta.get_field("wall_time").column)
    points = points.annotate(wall_time_text=RawSQL(f"({column} AT TIME ZONE 'UTC')::text", []))
    rows = _history_rows(points, (*fields[:3], "wall_time_text"), name=name, after=after, limit=limit)
    return [(n, step, value, _iso_utc(text)) for n, step, value, text in rows]


def _history_rows(points, fields: tuple[str, ...], *, name: str | None, after: tuple[str, int] | None,
                  limit: int) -> list[tuple]:
    """:func:`run_metric_history`'s keyset read of ``fields``."""
    if name is not None:
        points = points.filter(name=name)
        if after is not None:
            points = points.filter(step__gt=after[1])
        return list(points.order_by("step").values_list(*fields)[:limit])
    if after is None:
        return list(points.order_by("name", "step").values_list(*fields)[:limit])
    # The rest of the cursor's metric, then the metrics after it: two index range scans (an OR of both
    # would scan the run's index from its start on every page).
    rows = list(points.filter(name=after[0], step__gt=after[1]).order_by("step").values_list(*fields)[:limit])
    if len(rows) < limit:
        rest = points.filter(name__gt=after[0]).order_by("name", "step").values_list(*fields)
        rows += rest[: limit - len(rows)]
    return rows


def _run_metric_series_downsampled(
    *, run_id: int, max_points: int
) -> dict[str, tuple[list[int], list[float | None]]]:
    """:func:`run_metric_series` on Postgres, in two queries: each name's first and last point (a loose index
    scan over the names, then two index lookups per name); then one aggregate over the run's points into
    buckets, whose widths go into the query as constants (a CASE on the name)."""
    connection = connections[MetricPoint.objects.db]
    table, run_col, name_col, step_col, value_col = _curve_table()
    ends_sql = f"""
        WITH RECURSIVE walk(name) AS (
            SELECT (SELECT min(m.{name_col}) FROM {table} m WHERE m.{run_col} = %(run)s)
            UNION ALL
            SELECT (SELECT min(m.{name_col}) FROM {table} m
                     WHERE m.{run_col} = %(run)s AND m.{name_col} > w.name)
            FROM walk w WHERE w.name IS NOT NULL
        )
        SELECT w.name,
            (SELECT ARRAY[m.{step_col}::float8, m.{value_col}] FROM {table} m
              WHERE m.{run_col} = %(run)s AND m.{name_col} = w.name ORDER BY m.{step_col} LIMIT 1),
            (SELECT ARRAY[m.{step_col}::float8, m.{value_col}] FROM {table} m
              WHERE m.{run_col} = %(run)s AND m.{name_col} = w.name ORDER BY m.{step_col} DESC LIMIT 1)
        FROM walk w WHERE w.name IS NOT NULL"""
    with connection.cursor() as cursor:
        cursor.execute(ends_sql, {"run": run_id})
        ends = {
            name: ((int(first[0]), first[1]), (int(last[0]), last[1]))
            for name, first, last in cursor.fetchall() if first is not None
        }
        if not ends:
            return {}
        widths = _bucket_widths({n: (f[0], la[0]) for n, (f, la) in ends.items()}, max_points)
        long = sorted(n for n, (_, width) in widths.items() if width > 1)
        # Short curves keep every point (a bucket per step); each long one gets its own constant bucket width.
        bucket, params = f"m.{step_col}", []
        if long:
            cases = " ".join(f"WHEN %s THEN (m.{step_col} - %s::integer) / %s::integer" for _ in long)
            bucket = f"CASE m.{name_col} {cases} ELSE m.{step_col} END"
            params = [v for n in long for v in (n, *widths[n])]
        # ARRAY[value, step] compares by value first, so min/max return each extreme with its step. Each
        # extreme comes back as two plain columns (Postgres computes a repeated aggregate once): parsing
        # arrays costs more.
        low, high = (f"{agg}(ARRAY[m.{value_col}, m.{step_col}::float8])" for agg in ("min", "max"))
        source = table
        if rollups.rolled_up([run_id]):  # a long run: merge its stored bucket extremes instead of every point
            low, high = (
                "min(ARRAY[m.min_value, m.min_step::float8])",
                "max(ARRAY[m.max_value, m.max_step::float8])",
            )
            source = connection.ops.quote_name(MetricRollup._meta.db_table)
            bucket = bucket.replace(f"m.{step_col}", "(m.bucket * m.width)")
            run_col, name_col = "run_id", "name"
        cursor.execute(f"""
            SELECT m.{name_col}, ({low})[2]::integer, ({low})[1], ({high})[2]::integer, ({high})[1]
            FROM {source} m WHERE m.{run_col} = %s
            GROUP BY m.{name_col}, {bucket}""", [run_id, *params])
        extremes = cursor.fetchall()
    return dict(sorted(_assemble(ends, extremes).items()))


def experiment_metric_series(
    *, experiment: Experiment, name: str
) -> dict[int, tuple[list[int], list[float]]]:
    """One metric's curve for every run of an experiment: run id → (steps, values), in one query."""
    series: dict[int, tuple[list[int], list[float]]] = defaultdict(lambda: ([], []))
    rows = (
        MetricPoint.objects.filter(run__experiment=experiment, name=name)
        .order_by("run_id", "step")
        .values_list("run_id", "step", "value")
    )
    for run_id, step, value in rows.iterator(chunk_size=5000):
        steps, values = series[run_id]
        steps.append(step)
        values.append(value)
    return dict(series)


def _curve_table() -> tuple[str, str, str, str, str]:
    opts, quote = MetricPoint._meta, connections[MetricPoint.objects.db].ops.quote_name
    return (
        quote(opts.db_table),
        *(quote(opts.get_field(f).column) for f in ("run", "name", "step", "value")),
    )


def metric_names(*, run_ids: Sequence[int]) -> list[str]:
    """The metric names logged by any of the runs, sorted, in one query.

    On Postgres a recursive query walks the (run, name, step) index from one name to the next (a "loose index
    scan"), so the cost grows with runs × names, not with the number of points.
    """
    run_ids = list(run_ids)
    if not run_ids:
        return []
    connection = connections[MetricPoint.objects.db]
    if connection.vendor != "postgresql":
        return metric_names_portable(run_ids=run_ids)
    table, run_col, name_col, _, _ = _curve_table()
    sql = f"""
        WITH RECURSIVE walk(run_id, name) AS (
            SELECT r.id, (SELECT min(m.{name_col}) FROM {table} m WHERE m.{run_col} = r.id)
            FROM unnest(%s::bigint[]) AS r(id)
            UNION ALL
            SELECT w.run_id, (SELECT min(m.{name_col}) FROM {table} m WHERE m.{run_col} = w.run_id
                                                                   AND m.{name_col} > w.name)
            FROM walk w WHERE w.name IS NOT NULL
        )
        SELECT DISTINCT name FROM walk WHERE name IS NOT NULL ORDER BY name"""
    with connection.cursor() as cursor:
        cursor.execute(sql, [run_ids])
        return [name for (name,) in cursor.fetchall()]


def metric_names_portable(*, run_ids: Sequence[int]) -> list[str]:
    """:func:`metric_names` on any database (a DISTINCT over every point of the runs)."""
    names = MetricPoint.objects.filter(run_id__in=list(run_ids)).values_list("name", flat=True)
    return sorted(set(names.order_by().distinct()))


Curves = dict[int, tuple[list[int], list[float | None]]]


def _clean(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None


def _bucket_widths(ends: Mapping[int, tuple[int, int]], max_points: int) -> dict[int, tuple[int, int]]:
    """Each run's (first step, bucket width): its steps cut into at most (max_points - 2) // 2 buckets of
    equal width, so that with its first and last point a curve keeps at most ``max_points`` points; a run with
    fewer steps than buckets keeps every point."""
    if max_points < 4:
        raise ValueError("max_points must be at least 4")
    buckets = (max_points - 2) // 2
    return {run_id: (lo, max(1, -(-(hi - lo + 1) // buckets))) for run_id, (lo, hi) in ends.items()}


def _assemble(ends: Mapping[int, tuple[tuple[int, float], tuple[int, float]]],
              extremes: Iterable[tuple[int, int, float, int, float]]) -> Curves:
    """Curves from each run's first and last points and each bucket's lowest and highest point
    (``run_id, min_step, min_value, max_step, max_value``), in step order, one value per step."""
    points: dict[int, dict[int, float]] = {run_id: {} for run_id in ends}
    for run_id, (first, last) in ends.items():
        points[run_id][first[0]] = first[1]
        points[run_id][last[0]] = last[1]
    for run_id, min_step, min_value, max_step, max_value in extremes:
        points[run_id][min_step] = min_value
        points[run_id][max_step] = max_value
    return {
        run_id: ([s for s in sorted(by_step)], [_clean(by_step[s]) for s in sorted(by_step)])
        for run_id, by_step in points.items()
    }


def metric_curves(*, run_ids: Sequence[int], name: str, max_points: int = 2000) -> Curves:
    """One metric's curve for each run that logged it: run id → (steps, values), downsampled on the database
    to at most ``max_points`` points per run, in two queries whatever the number of points.

    Each run's steps are cut into (max_points - 2) // 2 equal buckets; each bucket keeps its lowest and
    highest point (with their steps), and each run keeps its first and last point, so spikes, dips and the
    ends of every curve survive. Non-finite values become None (a gap); a bucket that holds a NaN or +inf
    shows the gap instead of its highest finite value (Postgres orders NaN above every number).
    """
    run_ids = list(run_ids)
    if not run_ids:
        return {}
    connection = connections[MetricPoint.objects.db]
    if connection.vendor != "postgresql":
        return metric_curves_portable(run_ids=run_ids, name=name, max_points=max_points)
    table, run_col, name_col, step_col, value_col = _curve_table()
    ends_sql = f"""
        SELECT r.id,
            (SELECT ARRAY[m.{step_col}::float8, m.{value_col}] FROM {table} m
              WHERE m.{run_col} = r.id AND m.{name_col} = %s ORDER BY m.{step_col} LIMIT 1),
            (SELECT ARRAY[m.{step_col}::float8, m.{value_col}] FROM {table} m
              WHERE m.{run_col} = r.id AND m.{name_col} = %s ORDER BY m.{step_col} DESC LIMIT 1)
        FROM unnest(%s::bigint[]) AS r(id)"""
    with connection.cursor() as cursor:
        cursor.execute(ends_sql, [name, name, run_ids])
        ends = {
            run_id: ((int(first[0]), first[1]), (int(last[0]), last[1]))
            for run_id, first, last in cursor.fetchall() if first is not None
        }
        if not ends:
            return {}
        widths = _bucket_widths({r: (f[0], la[0]) for r, (f, la) in ends.items()}, max_points)
        rolled = rollups.rolled_up(list(widths), name)
        extremes = []
        for ids, source in (([i for i in widths if i not in rolled], "points"), (sorted(rolled), "rollups")):
            if not ids:
                continue
            cursor.execute(
                _buckets_sql(source),
                [ids, [widths[i][0] for i in ids], [widths[i][1] for i in ids], ids, name],
            )
            extremes += [(run_id, int(low[1]), low[0], int(high[1]), high[0])
                         for run_id, low, high in cursor.fetchall()]
    return _assemble(ends, extremes)


def _buckets_sql(source: str) -> str:
    """Each run's curve cut into buckets (``b``: run id, first step, bucket width), with each bucket's lowest
    and highest point. ``points`` aggregates every point; ``rollups`` merges the stored extremes of a long run
    (:mod:`.rollups`), each stored bucket going whole into the bucket of its first step. ARRAY[value, step]
    compares by value first, so min/max return each extreme with its step."""
    table, run_col, name_col, step_col, value_col = _curve_table()
    if source == "points":
        low = high = f"ARRAY[m.{value_col}, m.{step_col}::float8]"
        frm, run, name, step = table, f"m.{run_col}", f"m.{name_col}", f"m.{step_col}"
    else:
        low, high = "ARRAY[m.min_value, m.min_step::float8]", "ARRAY[m.max_value, m.max_step::float8]"
        frm = connections[MetricRollup.objects.db].ops.quote_name(MetricRollup._meta.db_table)
        run, name, step = "m.run_id", "m.name", "m.bucket * m.width"
    return f"""
        SELECT {run}, min({low}), max({high})
        FROM {frm} m
        JOIN unnest(%s::bigint[], %s::integer[], %s::integer[]) AS b(run_id, lo, width) ON b.run_id = {run}
        WHERE {run} = ANY(%s::bigint[]) AND {name} = %s
        GROUP BY {run}, ({step} - b.lo) / b.width"""


def _order_key(value: float) -> tuple[int, float]:
    """Postgres' float order: NaN above +inf above every number."""
    return (1, 0.0) if math.isnan(value) else (0, value)


def metric_curves_portable(*, run_ids: Sequence[int], name: str, max_points: int = 2000) -> Curves:
    """:func:`metric_curves` on any database: the same buckets, computed while streaming the points."""
    bounds = {
        row["run_id"]: (row["lo"], row["hi"])
        for row in MetricPoint.objects.filter(run_id__in=list(run_ids), name=name)
        .values("run_id").annotate(lo=Min("step"), hi=Max("step")).order_by()
    }
    if not bounds:
        return {}
    widths = _bucket_widths(bounds, max_points)
    ends: dict[int, list[tuple[int, float]]] = {}
    lows: dict[tuple[int, int], tuple[int, float]] = {}
    highs: dict[tuple[int, int], tuple[int, float]] = {}
    rows = (MetricPoint.objects.filter(run_id__in=list(bounds), name=name)
            .order_by("run_id", "step").values_list("run_id", "step", "value"))
    for run_id, step, value in rows.iterator(chunk_size=10_000):
        first_last = ends.setdefault(run_id, [(step, value), (step, value)])
        first_last[1] = (step, value)
        lo, width = widths[run_id]
        key = (run_id, (step - lo) // width)
        low, high = lows.get(key), highs.get(key)
        # Ties keep the earliest step for the minimum and the latest for the maximum, as ARRAY[value, step]
        # does.
        if low is None or _order_key(value) < _order_key(low[1]):
            lows[key] = (step, value)
        if high is None or _order_key(value) >= _order_key(high[1]):
            highs[key] = (step, value)
    extremes = [(key[0], *lows[key], *highs[key]) for key in lows]
    return _assemble({r: (f, la) for r, (f, la) in ends.items()}, extremes)


def run_metric_point_counts(*, run_id: int, names: Sequence[str]) -> dict[str, int]:
    """How many points the run logged under each of ``names``, in one query (an index-only count on the
    (run, name, step) index)."""
    if not names:
        return {}
    rows = (
        MetricPoint.objects.filter(run_id=run_id, name__in=list(names))
        .order_by()
        .values_list("name")
        .annotate(n=Count("*"))
    )
    return dict(rows)


def run_metric_curves(*, run_id: int, names: Sequence[str], max_points: int) -> list[dict[str, Any]]:
    """The API's view of a run's curves: for each of ``names`` (in that order), its points downsampled to at
    most ``max_points`` with :func:`metric_curves` (min/max buckets on the database, from the rollups of a
    long run), how many points it holds in all, and whether it was downsampled. Queries: one count, two per
    name, whatever the number of points."""
    counts = run_metric_point_counts(run_id=run_id, names=names)
    series = []
    for name in names:
        curve = metric_curves(run_ids=[run_id], name=name, max_points=max_points)
        steps, values = curve.get(run_id, ([], []))
        series.append(
            {
                "name": name,
                "points": counts.get(name, 0),
                "downsampled": len(steps) < counts.get(name, 0),
                "steps": steps,
                "values": values,
            }
        )
    return series
