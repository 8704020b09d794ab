"""Metric rollups on Postgres: each long curve also kept as per-bucket extremes (:class:`MetricRollup`).

A run of more than ``ROLLUP_MIN_STEPS`` steps gets, for each metric, one row per bucket of ``width`` steps
(the power of two that cuts the run's ``total_steps`` into at most ``ROLLUP_BUCKETS`` buckets) holding the
bucket's lowest and highest point. :func:`record` keeps them current in the same statement batch as the
points; :func:`rebuild` recomputes them from the points (after a bulk import, or for runs older than the
table). Readers (``selectors.curves.metric_curves``, ``selectors.curves.run_metric_series``) take a run's
extremes from here instead of aggregating every point.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from django.db import connection

from experiments.models import ROLLUP_BUCKETS, ROLLUP_MIN_STEPS, MetricPoint, MetricRollup, Run


def _tables() -> tuple[str, str, str]:
    quote = connection.ops.quote_name
    return (quote(MetricRollup._meta.db_table), quote(MetricPoint._meta.db_table), quote(Run._meta.db_table))


# The bucket width of a run: 2^ceil(log2(total_steps / ROLLUP_BUCKETS)); only runs longer than
# ROLLUP_MIN_STEPS.
_WIDTH = f"power(2, ceil(log(2.0, r.total_steps / {float(ROLLUP_BUCKETS)})))::integer"

# A bucket's new extremes: the lower of the stored and the incoming minimum, with its step (Postgres orders
# NaN above every number, as the raw-point readers do).
_MERGE = """
    ON CONFLICT (run_id, name, width, bucket) DO UPDATE SET
        min_step = CASE WHEN EXCLUDED.min_value < {t}.min_value THEN EXCLUDED.min_step ELSE {t}.min_step END,
        min_value = LEAST({t}.min_value, EXCLUDED.min_value),
        max_step = CASE WHEN EXCLUDED.max_value > {t}.max_value THEN EXCLUDED.max_step ELSE {t}.max_step END,
        max_value = GREATEST({t}.max_value, EXCLUDED.max_value)"""

_EXTREMES = """(min(ARRAY[{v}, {s}::float8]))[2]::integer, (min(ARRAY[{v}, {s}::float8]))[1],
               (max(ARRAY[{v}, {s}::float8]))[2]::integer, (max(ARRAY[{v}, {s}::float8]))[1]"""


def _order(value: float, step: int) -> tuple[int, float, int]:
    """Postgres' order of ARRAY[value, step]: NaN above every number, then the step."""
    return (1, 0.0, step) if math.isnan(value) else (0, value, step)


def record(cursor, run_id: int, names: Sequence[str], steps: Sequence[int], values: Sequence[float]) -> None:
    """Fold a batch of points into the run's rollups (nothing for a run of ``ROLLUP_MIN_STEPS`` steps or
    fewer). The batch's bucket extremes are found here, in one pass, and merged with the stored ones in one
    statement (a few rows per bucket width of points, not one per point); call it in the points'
    transaction."""
    rollup, _, run = _tables()
    cursor.execute(f"SELECT {_WIDTH} FROM {run} r WHERE r.id = %s AND r.total_steps > %s",
                   [run_id, ROLLUP_MIN_STEPS])
    row = cursor.fetchone()
    if row is None:
        return
    width = int(row[0])
    low: dict[tuple[str, int], tuple[int, float]] = {}
    high: dict[tuple[str, int], tuple[int, float]] = {}
    for name, step, value in zip(names, steps, values, strict=True):
        key, point = (name, step // width), (step, value)
        current = low.get(key)
        if current is None or _order(value, step) < _order(current[1], current[0]):
            low[key] = point
        current = high.get(key)
        if current is None or _order(value, step) > _order(current[1], current[0]):
            high[key] = point
    keys = list(low)
    cursor.execute(f"""
        INSERT INTO {rollup} AS t (run_id, name, width, bucket, min_step, min_value, max_step, max_value)
        SELECT %s, * FROM unnest(%s::varchar[], %s::integer[], %s::integer[], %s::integer[],
                                 %s::double precision[], %s::integer[], %s::double precision[])
        {_MERGE.format(t="t")}""",
        [run_id, [k[0] for k in keys], [width] * len(keys), [k[1] for k in keys],
         [low[k][0] for k in keys], [low[k][1] for k in keys], [high[k][0] for k in keys],
         [high[k][1] for k in keys]])


def rebuild(run_ids: Sequence[int] | None = None) -> int:
    """Recompute the rollups of ``run_ids`` (None: every run longer than ``ROLLUP_MIN_STEPS``) from their
    points. Returns the number of rollup rows written."""
    rollup, point, run = _tables()
    where = "" if run_ids is None else "AND r.id = ANY(%(ids)s::bigint[])"
    params = {"ids": list(run_ids or []), "min": ROLLUP_MIN_STEPS}
    with connection.cursor() as cursor:
        cursor.execute(
            f"DELETE FROM {rollup} WHERE run_id IN (SELECT r.id FROM {run} r WHERE TRUE {where})", params
        )
        cursor.execute(f"""
            INSERT INTO {rollup} (run_id, name, width, bucket, min_step, min_value, max_step, max_value)
            SELECT m.run_id, m.name, w.width, m.step / w.width, {_EXTREMES.format(v="m.value", s="m.step")}
            FROM {point} m
            JOIN (SELECT r.id, {_WIDTH} AS width FROM {run} r WHERE r.total_steps > %(min)s {where}) AS w
              ON w.id = m.run_id
            GROUP BY m.run_id, m.name, w.width, m.step / w.width""", params)
        return cursor.rowcount


def rolled_up(run_ids: Sequence[int], name: str | None = None) -> set[int]:
    """Which of ``run_ids`` have rollups (of metric ``name``, or of any): those are read from here; the
    others, short runs or points imported without :func:`rebuild`, from their points."""
    rollup, _, _ = _tables()
    same_name = "AND m.name = %(name)s" if name is not None else ""
    with connection.cursor() as cursor:
        cursor.execute(f"""
            SELECT r.id FROM unnest(%(ids)s::bigint[]) AS r(id)
            WHERE EXISTS (SELECT 1 FROM {rollup} m WHERE m.run_id = r.id {same_name})""",
            {"ids": list(run_ids), "name": name})
        return {run_id for (run_id,) in cursor.fetchall()}
