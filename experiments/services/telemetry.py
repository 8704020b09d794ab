"""A running worker's writes: metric points, progress and checkpoints, each fenced by the run's lease (its
task id): a worker that lost the run writes nothing more."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from django.conf import settings
from django.db import connection, transaction
from django.utils import timezone

from experiments import rollups
from experiments.models import (
    Artifact,
    MetricPoint,
    Run,
)
from experiments.services import artifacts


def _owned(run_id: int, task_id: str):
    """The run row, only while this delivery still owns it (a taken-over or cancelled run matches nothing)."""
    return Run.objects.filter(id=run_id, task_id=task_id, status=Run.Status.RUNNING)


def _telemetry_commit() -> None:
    """Inside a transaction: let Postgres confirm its commit before the WAL is on disk (saves a disk flush,
    about 4 ms here, per write). Heartbeats and progress are rewritten within seconds, so losing the last ones
    in a crash of the database server costs nothing; the rest of the database stays consistent.
    https://www.postgresql.org/docs/current/wal-async-commit.html"""
    if connection.vendor == "postgresql":
        with connection.cursor() as cursor:
            cursor.execute("SET LOCAL synchronous_commit TO OFF")


def run_record_metrics(*, run_id: int, task_id: str, points: Sequence[tuple[str, int, float, datetime]],
                       durable: bool = True, progress: tuple[int, int, float | None] | None = None,
                       phase: tuple[str, int, int, datetime | None] | None = None) -> bool:
    """Write a batch of (name, step, value, wall_time) points and renew the lease, with the progress (step,
    total, samples/s) and the phase (name, done, total, started; name "" while the steps run) when given: one
    transaction.

    A resumed run re-logs the steps after its last checkpoint: the upsert on (run, name, step) keeps exactly
    one point per step. ``durable=False`` (routine batches) confirms the commit before the disk flush; the
    next durable write, the one before each checkpoint, flushes them too. Returns False when this delivery no
    longer owns the run.
    """
    fields: dict[str, Any] = {"heartbeat_at": timezone.now()}
    if progress is not None:
        step, total, samples_per_s = progress
        fields |= {"step": min(step, total), "total_steps": total, "samples_per_s": samples_per_s}
    if phase is not None:
        name, done, total_rows, started = phase
        fields |= {"phase": name[:32], "phase_done": max(done, 0), "phase_total": max(total_rows, 0),
                   "phase_started_at": started}
    with transaction.atomic():
        if not durable:
            _telemetry_commit()
        owned = _owned(run_id, task_id).update(**fields)
        if not owned:
            return False
        _upsert_points(run_id, points)
    return True


def _upsert_points(run_id: int, points: Sequence[tuple[str, int, float, datetime]]) -> None:
    latest = {(name, step): (value, wall_time) for name, step, value, wall_time in points}  # one row per key
    if not latest:
        return
    if connection.vendor != "postgresql":
        MetricPoint.objects.bulk_create(
            [
                MetricPoint(run_id=run_id, name=n, step=s, value=v, wall_time=t)
                for (n, s), (v, t) in latest.items()
            ],
            update_conflicts=True,
            unique_fields=["run", "name", "step"],
            update_fields=["value", "wall_time"],
            batch_size=1000,
        )
        return
    # One statement over arrays: Django's bulk_create compiles SQL per row, which costs more than the write.
    names, steps = zip(*latest.keys(), strict=True)
    values, times = zip(*latest.values(), strict=True)
    table = connection.ops.quote_name(MetricPoint._meta.db_table)
    with connection.cursor() as cursor:
        # Wall times travel as epoch seconds: adapting a float8 array costs a fraction of a timestamptz one.
        cursor.execute(
            f"INSERT INTO {table} (run_id, name, step, value, wall_time) "
            "SELECT %s, n, s, v, to_timestamp(e) "
            "FROM unnest(%s::varchar[], %s::integer[], %s::double precision[], "
            "%s::double precision[]) AS u(n, s, v, e) "
            "ON CONFLICT (run_id, name, step) "
            "DO UPDATE SET value = EXCLUDED.value, wall_time = EXCLUDED.wall_time",
            [run_id, list(names), list(steps), list(values), [t.timestamp() for t in times]],
        )
        rollups.record(cursor, run_id, names, steps, values)


def run_record_checkpoint(*, run_id: int, task_id: str, step: int, path: Path) -> bool:
    """Register a complete checkpoint folder as the one the run resumes from, only while this delivery owns
    the run (one conditional UPDATE). Returns False when it does not: the caller deletes the folder and
    stops."""
    rel, size = artifacts.relative_artifact_path(path), artifacts.du(path)
    with transaction.atomic():
        if not _owned(run_id, task_id).update(checkpoint_path=rel, heartbeat_at=timezone.now()):
            return False
        Artifact.objects.update_or_create(
            run_id=run_id,
            path=rel,
            defaults={"kind": Artifact.Kind.CHECKPOINT, "step": step, "size_bytes": size},
        )
        # The engine keeps only its newest checkpoints on disk; drop records of the ones it deleted.
        stale = [a.pk for a in Artifact.objects.filter(run_id=run_id, kind=Artifact.Kind.CHECKPOINT)
                 if not (settings.ARTIFACT_ROOT / a.path).exists()]
        Artifact.objects.filter(pk__in=stale).delete()
    return True
