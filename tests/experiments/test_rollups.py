"""Metric rollups: long curves kept as per-bucket extremes while points are written, and read by the curve
selectors instead of every point (Postgres)."""

from __future__ import annotations

import math
import random

import pytest
from django.core.management import call_command
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from experiments import rollups
from experiments.models import MetricPoint, MetricRollup, Run
from experiments.selectors import curves as curves_reads
from experiments.services import telemetry
from tests.factories import RunFactory

pytestmark = [pytest.mark.django_db,
              pytest.mark.skipif("connection.vendor != 'postgresql'", reason="rollups are kept on Postgres")]

STEPS = 10_000          # width 16: 10,000 / 1,024 → 2^ceil(log2(9.77)) = 16 → 625 buckets


def _running(total: int) -> Run:
    now = timezone.now()
    return RunFactory(
        status=Run.Status.RUNNING, task_id="t", total_steps=total, started_at=now, heartbeat_at=now
    )


def _curve(seed: int = 0) -> dict[int, float]:
    rng = random.Random(seed)
    values = {s: 1.0 / math.sqrt(s) + rng.gauss(0, 0.01) for s in range(1, STEPS + 1)}
    values[7_777] = 25.0             # a spike and a dip that every reader must keep
    values[3_333] = -4.0
    return values


def _write(run: Run, values: dict[int, float], batch: int = 700) -> None:
    now, items = timezone.now(), sorted(values.items())
    for i in range(0, len(items), batch):
        chunk = items[i : i + batch]
        assert telemetry.run_record_metrics(
            run_id=run.id,
            task_id="t",
            points=[(name, s, v, now) for s, v in chunk for name in ("loss", "ce")],
        )


def _stored(run: Run) -> list[tuple]:
    return list(MetricRollup.objects.filter(run=run).order_by("name", "bucket").values_list(
        "name", "width", "bucket", "min_step", "min_value", "max_step", "max_value"))


def test_each_bucket_holds_the_extremes_of_its_points():
    run = _running(STEPS)
    values = _curve()
    _write(run, values)
    rows = [r for r in _stored(run) if r[0] == "loss"]
    assert {r[1] for r in rows} == {16} and len(rows) == len({s // 16 for s in values})
    for _name, width, bucket, min_step, min_value, max_step, max_value in rows:
        inside = {s: v for s, v in values.items() if s // width == bucket}
        assert (min_step, min_value) == min(inside.items(), key=lambda kv: kv[1])
        assert (max_step, max_value) == max(inside.items(), key=lambda kv: kv[1])


def test_rewritten_steps_and_a_rebuild_give_the_same_rollups():
    run = _running(STEPS)
    values = _curve()
    _write(run, values)
    _write(run, {s: v for s, v in values.items() if 5_000 <= s < 5_600})   # a resumed run logs steps again
    incremental = _stored(run)
    rollups.rebuild([run.id])
    assert _stored(run) == incremental
    MetricRollup.objects.filter(run=run).delete()
    call_command("rebuild_metric_rollups")
    assert _stored(run) == incremental


def test_short_runs_keep_no_rollups():
    run = _running(4_000)
    _write(run, {s: 1.0 for s in range(1, 4_001)})
    assert not MetricRollup.objects.filter(run=run).exists()
    assert MetricPoint.objects.filter(run=run).count() == 8_000


def _check_curve(
    steps: list[int], values: list[float | None], truth: dict[int, float], max_points: int
) -> None:
    assert len(steps) <= max_points and steps == sorted(set(steps))
    assert steps[0] == 1 and steps[-1] == STEPS                                   # both ends
    assert all(truth[s] == v for s, v in zip(steps, values, strict=True))        # only real points
    kept = dict(zip(steps, values, strict=True))
    assert kept[7_777] == 25.0 and kept[3_333] == -4.0                           # the spike and the dip


@pytest.mark.parametrize("max_points", [2000, 300])
def test_compare_curves_come_from_the_rollups(max_points):
    long_run, short_run = _running(STEPS), _running(2_000)
    truth = _curve()
    _write(long_run, truth)
    _write(short_run, {s: float(s) for s in range(1, 2_001)})
    with CaptureQueriesContext(connection) as queries:
        curves = curves_reads.metric_curves(
            run_ids=[long_run.id, short_run.id], name="loss", max_points=max_points
        )
    _check_curve(*curves[long_run.id], truth, max_points)
    assert len(curves[short_run.id][0]) <= max_points and curves[short_run.id][0][-1] == 2_000
    sql = " ".join(q["sql"] for q in queries.captured_queries)
    assert "experiments_metricrollup" in sql and len(queries.captured_queries) <= 4
    # Points imported without rollups (a bulk COPY before `rebuild_metric_rollups`) are read from the points.
    MetricRollup.objects.filter(run=long_run).delete()
    _check_curve(
        *curves_reads.metric_curves(run_ids=[long_run.id], name="loss", max_points=max_points)[long_run.id],
        truth,
        max_points,
    )


def test_the_bucket_query_can_read_the_rollups_from_their_covering_index_alone():
    """The compare and run pages read each bucket's extremes: the migration's covering index holds every
    column the query touches, so Postgres can answer it by an index-only scan (no visit to the table's
    rows)."""
    long_run = _running(STEPS)
    _write(long_run, _curve())
    with CaptureQueriesContext(connection) as queries:
        curves_reads.metric_curves(run_ids=[long_run.id], name="loss")
    bucket_sql = next(q["sql"] for q in queries.captured_queries if "min_value" in q["sql"])
    with connection.cursor() as cursor:
        # A test table is small enough that any plan is cheap: leave the planner only index-only scans to
        # choose.
        for method in ("seqscan", "indexscan", "bitmapscan"):
            cursor.execute(f"SET LOCAL enable_{method} = off")
        cursor.execute("EXPLAIN " + bucket_sql)
        plan = "\n".join(row[0] for row in cursor.fetchall())
    assert "Index Only Scan using metricrollup_curve_covering" in plan


def test_the_run_page_reads_a_long_run_from_its_rollups():
    run = _running(STEPS)
    truth = _curve()
    _write(run, truth)
    with CaptureQueriesContext(connection) as queries:
        series = curves_reads.run_metric_series(run=run)
    assert set(series) == {"loss", "ce"}
    for name in ("loss", "ce"):
        _check_curve(*series[name], truth, 2000)
    aggregates = [q["sql"] for q in queries.captured_queries if "GROUP BY" in q["sql"]]
    assert aggregates and all("experiments_metricrollup" in sql for sql in aggregates)


def test_nan_and_infinite_values_fold_like_postgres_orders_them():
    run = _running(STEPS)
    values = _curve()
    values[5_001], values[5_002], values[6_000] = float("nan"), float("-inf"), float("inf")
    _write(run, values, batch=333)
    incremental = _stored(run)
    rollups.rebuild([run.id])                   # the SQL aggregate is the reference for the order
    rebuilt = _stored(run)
    assert len(incremental) == len(rebuilt)
    for a, b in zip(incremental, rebuilt, strict=True):
        assert a[:4] == b[:4] and a[5] == b[5]
        assert (math.isnan(a[4]) and math.isnan(b[4])) or a[4] == b[4]
        assert (math.isnan(a[6]) and math.isnan(b[6])) or a[6] == b[6]
    nan_bucket = next(r for r in incremental if r[0] == "loss" and r[2] == 5_001 // 16)
    assert nan_bucket[3] == 5_002 and nan_bucket[4] == float("-inf") and math.isnan(nan_bucket[6])
