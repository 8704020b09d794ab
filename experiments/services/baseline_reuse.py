"""Reusing a finished hard-label baseline instead of training an identical one again.

A run's content address (``Run.config_digest``, experiments.domain.config_digest) covers its frozen config,
the content of its inputs and the engine's code. When a baseline (``Run.may_reuse``) has the address of a run
that succeeded by training in the same team, at launch or when a worker receives it (an identical baseline of
another experiment launched minutes before may have finished meanwhile), it takes that run's results: its
student evaluation, metric curves and final model are copied onto it (rows only; the model's files stay where
the source wrote them), and it succeeds at once, marked ``reused_from``. Copies, rather than reads through
the source, keep every reader (leaderboards, KD gains, compare, exports) unchanged and team-scoped, and
survive the source's deletion. A user can still train it: ``run_retrain`` drops the copies and queues it like
any run, never to reuse again.
"""

from __future__ import annotations

import uuid

from django.db import connection, transaction
from django.db.models import Q
from django.utils import timezone

from experiments.models import Artifact, Evaluation, MetricPoint, MetricRollup, Run, Team
from experiments.services import dispatch


def reusable_source(*, team: Team, digest: str) -> Run | None:
    """The latest run of the team with this content address that succeeded by training (a reused run points
    at its own source, so the copies always come from a trained run)."""
    if not digest:
        return None
    return (Run.objects.filter(team=team, config_digest=digest, status=Run.Status.SUCCEEDED,
                               reused_from__isnull=True)
            .exclude(result__has_key="reused_from")
            .order_by("-finished_at", "-id").first())


def _copy_rows(model, *, columns: list[str], source_id: int, run_id: int) -> None:
    """INSERT … SELECT the source run's rows of ``model`` for the new run, in the database."""
    table = connection.ops.quote_name(model._meta.db_table)
    names = ", ".join(connection.ops.quote_name(model._meta.get_field(c).column) for c in columns)
    run_column = connection.ops.quote_name(model._meta.get_field("run").column)
    with connection.cursor() as cursor:
        cursor.execute(
            f"INSERT INTO {table} ({run_column}, {names}) SELECT %s, {names} FROM {table} "
            f"WHERE {run_column} = %s",
            [run_id, source_id],
        )


def run_reuse_on_delivery(*, run_id: int, task_id: str) -> Run | None:
    """A delivery of a queued baseline that may reuse and never trained: take the results of an identical run
    that succeeded since the launch, instead of training. Returns the run, succeeded, or None (train it)."""
    with transaction.atomic():
        run = (Run.objects.select_for_update()
               .filter(id=run_id, status=Run.Status.QUEUED, may_reuse=True, attempt=0,
                       waiting_for__isnull=True, cancel_requested=False)
               .filter(Q(task_id=task_id) | Q(task_id="")).exclude(config_digest="").first())
        if run is None:
            return None
        source = reusable_source(team=run.team, digest=run.config_digest)
        return run_take_results(run=run, source=source) if source is not None else None


def run_take_results(*, run: Run, source: Run) -> Run:
    """Give the queued ``run`` the results of ``source`` (same team, same content address) and mark it
    succeeded, in the caller's transaction. Returns the updated run."""
    from experiments.services.lifecycle import _transition

    assert run.team_id == source.team_id and run.config_digest == source.config_digest
    reason = (f"Reused the results of run #{source.pk}, which trained an identical config "
              f"(same content address).")
    claimed = _transition(run_id=run.pk, to=Run.Status.RUNNING, sources=[Run.Status.QUEUED], reason=reason,
                          where=Q(attempt=0), worker_name="")
    if claimed is None:
        return Run.objects.get(pk=run.pk)
    result = {**source.result, "reused_from": source.pk}
    done = _transition(
        run_id=run.pk, to=Run.Status.SUCCEEDED, sources=[Run.Status.RUNNING], reason=reason, worker_name="",
        values={"result": result, "reused_from": source, "step": source.step,
                "total_steps": source.total_steps, "samples_per_s": source.samples_per_s, "error": ""},
    )
    assert done is not None  # the run's row is ours inside this transaction
    for evaluation in source.evaluations.filter(role=Evaluation.Role.STUDENT):
        Evaluation.objects.create(
            team=done.team, role=Evaluation.Role.STUDENT, run=done, model=done.student,
            dataset=done.experiment.dataset, split=evaluation.split, split_key=evaluation.split_key,
            accuracy=evaluation.accuracy, macro_f1=evaluation.macro_f1, param_count=evaluation.param_count,
            latency_ms=evaluation.latency_ms, metrics=evaluation.metrics,
        )
    _copy_rows(MetricPoint, columns=["name", "step", "value", "wall_time"], source_id=source.pk,
               run_id=run.pk)
    _copy_rows(MetricRollup, columns=["name", "width", "bucket", "min_step", "min_value", "max_step",
                                      "max_value"], source_id=source.pk, run_id=run.pk)
    for artifact in source.artifacts.filter(kind=Artifact.Kind.MODEL):
        Artifact.objects.create(run=done, kind=artifact.kind, path=artifact.path, step=artifact.step,
                                size_bytes=artifact.size_bytes, sha256=artifact.sha256)
    return done


@transaction.atomic
def run_retrain(*, run: Run, reason: str = "Train it instead of reusing another run's results.") -> Run:
    """Queue a run that reused another run's results, to train it after all: the copied evaluation, curves
    and model rows go, and it is sent like a new run. Returns the run; raises ValueError if it was not
    reused."""
    from experiments.services.lifecycle import _transition

    current = Run.objects.get(pk=run.pk)
    if not current.is_reused:
        raise ValueError(f"Run #{run.pk} did not reuse another run's results.")
    current.evaluations.filter(role=Evaluation.Role.STUDENT).delete()
    current.metric_points.all().delete()
    current.metric_rollups.all().delete()
    current.artifacts.all().delete()
    task_id = str(uuid.uuid4())
    queued = _transition(
        run_id=run.pk, to=Run.Status.QUEUED, sources=[Run.Status.SUCCEEDED], reason=reason, worker_name="",
        values={"result": {}, "reused_from": None, "may_reuse": False, "step": 0, "samples_per_s": None,
                "task_id": task_id,
                "attempt": 0, "started_at": None, "ready_at": timezone.now(), "cancel_requested": False},
    )
    if queued is None:
        raise ValueError(f"Run #{run.pk} changed meanwhile; reload it.")
    dispatch.enqueue_on_commit(queued, task_id=task_id)
    return queued
