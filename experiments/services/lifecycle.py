"""A run's state machine: claiming it, its lease, requeue after a lost worker, finishing, failing, cancelling
and requeueing, with the dependents of each.

RUN_TRANSITIONS (experiments.models) is the state machine and ``_transition`` the only code that changes a
run's status."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Sequence
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from django.conf import settings
from django.core.exceptions import ValidationError
from django.db import transaction
from django.db.models import F, Q
from django.db.models.functions import Coalesce
from django.utils import timezone

from experiments.domain import engine_config, routing
from experiments.models import (
    RUN_TRANSITIONS,
    Artifact,
    Evaluation,
    Experiment,
    Run,
    RunTransition,
)
from experiments.services import artifacts, dispatch, teacher_stores
from workers.engine.out_of_memory import host_memory_bytes, out_of_memory_message

logger = logging.getLogger(__name__)


# RUN_TRANSITIONS (experiments.models) is the state machine and _transition the only code that changes a run's
# status. The heartbeat is the run's lease: the worker renews it with every metric, progress and checkpoint
# write; a running run whose lease expired lost its worker and is requeued (run_requeue_stale, run by celery
# beat) or taken over by the next delivery, up to RUN_MAX_ATTEMPTS attempts.
def _transition(
    *,
    run_id: int,
    to: str,
    sources: Sequence[str],
    reason: str,
    where: Q | None = None,
    values: dict[str, Any] | None = None,
    worker_name: str | None = None,
    related: Sequence[str] = (),
) -> Run | None:
    """Move the run from one of ``sources`` to ``to`` and record the RunTransition, in one transaction.

    Each source gets one conditional UPDATE (``status = source AND where``), so of two concurrent changes
    exactly one applies. Returns the updated run, or None when it was in none of ``sources`` or ``where`` did
    not hold.
    """
    for source in sources:
        if to not in RUN_TRANSITIONS[source]:
            raise ValueError(f"A run cannot go from {source} to {to}.")
    now = timezone.now()
    fields: dict[str, Any] = {"status": to}
    if to in Run.TERMINAL:
        fields |= {"finished_at": now, "heartbeat_at": now}
    else:
        fields["finished_at"] = None
    if to == Run.Status.RUNNING:
        fields |= {"started_at": Coalesce("started_at", now), "heartbeat_at": now}
    if to == Run.Status.QUEUED:
        fields["ready_at"] = now  # its new message goes to the end of its queue
    fields |= values or {}
    with transaction.atomic():
        for source in sources:
            if Run.objects.filter(where or Q(), id=run_id, status=source).update(**fields):
                run = Run.objects.select_related(*related).get(id=run_id)
                RunTransition.objects.create(
                    run=run,
                    from_status=source,
                    to_status=to,
                    at=now,
                    reason=reason[:2000],
                    attempt=run.attempt,
                    worker_name=run.worker_name if worker_name is None else worker_name,
                )
                return run
    return None


def _lease_cutoff() -> datetime:
    return timezone.now() - timedelta(seconds=settings.RUN_HEARTBEAT_TIMEOUT_S)


def _last_user_requeue(run_id: int) -> int:
    """The attempt after which a user last requeued the run (0: never); each user requeue starts a fresh
    budget."""
    base = (RunTransition.objects.filter(run_id=run_id, to_status=Run.Status.QUEUED,
                                         from_status__in=[Run.Status.FAILED, Run.Status.CANCELLED])
            .order_by("-id").values_list("attempt", flat=True).first())
    return base or 0


def _attempts_since_requeue(run_id: int, attempt: int) -> int:
    """Attempts made since the run was last requeued by a user (each user requeue starts a fresh budget)."""
    return attempt - _last_user_requeue(run_id)


def _expire_lease(run_id: int, *, next_task_id: str) -> Run | None:
    """A running run whose lease expired: requeue it for ``next_task_id``, cancel it when cancellation had
    been requested, or fail it once RUN_MAX_ATTEMPTS attempts have lost their worker. None if its lease is
    alive."""
    cutoff = _lease_cutoff()
    stale = (Run.objects.filter(id=run_id, status=Run.Status.RUNNING, heartbeat_at__lt=cutoff)
             .values("worker_name", "attempt", "cancel_requested", "heartbeat_at").first())
    if stale is None:
        return None
    worker = stale["worker_name"] or "its worker"
    silent = int((timezone.now() - stale["heartbeat_at"]).total_seconds())
    still_stale = Q(heartbeat_at__lt=cutoff)  # a worker that renewed in the meantime keeps its run
    if stale["cancel_requested"]:
        reason = f"Cancelled: {worker} stopped responding ({silent} s) after cancellation was requested."
        return _transition(
            run_id=run_id,
            to=Run.Status.CANCELLED,
            sources=[Run.Status.RUNNING],
            where=still_stale,
            reason=reason,
        )
    attempts = _attempts_since_requeue(run_id, stale["attempt"])
    if attempts >= settings.RUN_MAX_ATTEMPTS:
        error = f"The worker running this run stopped responding {attempts} times; giving up."
        run = _transition(
            run_id=run_id,
            to=Run.Status.FAILED,
            sources=[Run.Status.RUNNING],
            where=still_stale,
            values={"error": error},
            reason=f"{error} (last: {worker}, silent {silent} s)",
        )
        if run is not None:
            _fail_dependents(
                run_id, reason=f"Run #{run_id}, which trains this run's teacher, failed: {error}"
            )
        return run
    return _transition(
        run_id=run_id, to=Run.Status.QUEUED, sources=[Run.Status.RUNNING], where=still_stale,
        values={"task_id": next_task_id},
        reason=f"Worker lost: {worker} stopped renewing the lease ({silent} s without a heartbeat); "
               f"requeued for attempt {attempts + 1} of {settings.RUN_MAX_ATTEMPTS}.",
    )


def run_claim(*, run_id: int, task_id: str, worker_name: str) -> Run | None:
    """Claim the run for this delivery with one conditional UPDATE.

    A run that ran before is claimed only by the delivery it expects (its recorded ``task_id``), so the old
    message of a requeued run claims nothing; one that never ran, by any delivery. A running run whose lease
    expired is requeued first (its restart budget permitting) and then claimed: it resumes from its last
    checkpoint. Returns None when a live delivery owns the run, it has finished or been cancelled, or it waits
    for another run.
    """
    with transaction.atomic():
        _expire_lease(run_id, next_task_id=task_id)
        return _transition(
            run_id=run_id, to=Run.Status.RUNNING, sources=[Run.Status.QUEUED],
            where=(Q(attempt=0) | Q(task_id="") | Q(task_id=task_id)) & Q(cancel_requested=False)
            & (Q(waiting_for__isnull=True) | Q(waiting_for__status=Run.Status.SUCCEEDED)),
            values={"task_id": task_id, "worker_name": worker_name, "attempt": F("attempt") + 1, "error": ""},
            reason=f"Claimed by {worker_name or 'a worker'}.",
            related=("experiment", "student", "teacher", "recipe"),
        )


def run_requeue_stale() -> dict[str, int]:
    """Requeue every running run whose lease expired (a fresh task on the run's queue), or fail it when its
    restart budget is spent. Returns how many runs went to each status."""
    counts: dict[str, int] = {}
    stale = Run.objects.filter(status=Run.Status.RUNNING, heartbeat_at__lt=_lease_cutoff())
    for run_id in stale.values_list("id", flat=True):
        with transaction.atomic():
            run = _expire_lease(run_id, next_task_id=str(uuid.uuid4()))
            if run is None:
                continue
            if run.status == Run.Status.QUEUED:
                logger.warning(
                    "run %s lost its worker %s; requeued as task %s", run_id, run.worker_name, run.task_id
                )
                dispatch.enqueue_on_commit(run, task_id=run.task_id)
            counts[run.status] = counts.get(run.status, 0) + 1
    return counts


def run_worker_process_lost(*, run_id: int, task_id: str, worker_name: str, status: str) -> Run | None:
    """The pool process running this delivery of the run died under its worker (Celery's WorkerLostError, seen
    by the worker's main process): requeue the run at once (it resumes from its last checkpoint), cancel it
    when cancellation had been requested, or fail it once RUN_MAX_ATTEMPTS attempts have lost their worker.

    ``status`` is how the process ended, as Celery words it ("signal 9 (SIGKILL)", "exitcode 1"). A SIGKILL is
    how the kernel's out-of-memory killer ends a process, so the reason (and the error, once the budget is
    spent) says so, with the run's memory estimate, this machine's RAM and what to change. Returns the updated
    run, or None when this delivery no longer owns it (it finished or was taken over in the meantime).
    """
    with transaction.atomic():
        run = Run.objects.filter(id=run_id, status=Run.Status.RUNNING, task_id=task_id).first()
        if run is None:
            return None
        owned = Q(task_id=task_id)
        worker = worker_name or run.worker_name or "its worker"
        at = f" at step {run.step}" if run.step else ""
        if "SIGKILL" in status:
            what = out_of_memory_message(
                run.config,
                gpu=False,
                estimate=routing.run_memory_estimate(run=run),
                available_bytes=host_memory_bytes(),
                headline=f"The worker process running this run on {worker} was killed (SIGKILL){at}, most "
                "likely by the kernel's out-of-memory killer",
            )
        else:
            what = f"The worker process running this run on {worker} exited prematurely ({status}){at}."
        if run.cancel_requested:
            return _transition(
                run_id=run_id,
                to=Run.Status.CANCELLED,
                sources=[Run.Status.RUNNING],
                where=owned,
                reason=f"Cancelled: {what}",
            )
        attempts = _attempts_since_requeue(run_id, run.attempt)
        if attempts >= settings.RUN_MAX_ATTEMPTS:
            error = f"{what} That was attempt {attempts} of {settings.RUN_MAX_ATTEMPTS}; giving up."
            failed = _transition(
                run_id=run_id,
                to=Run.Status.FAILED,
                sources=[Run.Status.RUNNING],
                where=owned,
                values={"error": error[:5000]},
                reason=error,
            )
            if failed is not None:
                _fail_dependents(
                    run_id, reason=f"Run #{run_id}, which trains this run's teacher, failed: {error[:500]}"
                )
            return failed
        next_task_id = str(uuid.uuid4())
        requeued = _transition(
            run_id=run_id,
            to=Run.Status.QUEUED,
            sources=[Run.Status.RUNNING],
            where=owned,
            values={"task_id": next_task_id},
            reason=f"{what} Requeued for attempt {attempts + 1} of {settings.RUN_MAX_ATTEMPTS}.",
        )
        if requeued is not None:
            logger.warning(
                "run %s: its worker process died (%s); requeued as task %s", run_id, status, next_task_id
            )
            dispatch.enqueue_on_commit(requeued, task_id=next_task_id)
        return requeued


STALL_PREFIX = "No progress for "


def stall_message(*, idle_s: float, step: int, phase: str) -> str:
    """A stall in a user's words: "No progress for 30 min at step 1200 (phase: training); the run was
    stopped." (seconds under a minute)."""
    idle = f"{int(idle_s // 60)} min" if idle_s >= 60 else f"{max(int(idle_s), 1)} s"
    return f"{STALL_PREFIX}{idle} at step {step} (phase: {phase}); the run was stopped."


def run_stalled(*, run_id: int, task_id: str, step: int, phase: str, idle_s: float) -> Run | None:
    """The stall watchdog of this delivery saw no progress for RUN_STALL_TIMEOUT_S (``idle_s``) at ``step`` in
    ``phase``; its worker kills the stuck work next. Requeue the run once (it resumes from its last
    checkpoint), as a lost worker's run is; fail it when an earlier attempt since the last user requeue
    stalled too, or once RUN_MAX_ATTEMPTS attempts are spent; cancel it when cancellation had been requested.
    Returns the updated run, or None when this delivery no longer owns it."""
    with transaction.atomic():
        run = Run.objects.filter(id=run_id, status=Run.Status.RUNNING, task_id=task_id).first()
        if run is None:
            return None
        owned = Q(task_id=task_id)
        what = stall_message(idle_s=idle_s, step=step, phase=phase)
        worker = run.worker_name or "its worker"
        if run.cancel_requested:
            return _transition(run_id=run_id, to=Run.Status.CANCELLED, sources=[Run.Status.RUNNING],
                               where=owned, reason=f"Cancelled: {what}")
        since = _last_user_requeue(run_id)
        attempts = run.attempt - since
        stalled_before = RunTransition.objects.filter(
            run_id=run_id, from_status=Run.Status.RUNNING, to_status=Run.Status.QUEUED,
            reason__startswith=STALL_PREFIX, attempt__gt=since).exists()
        if stalled_before or attempts >= settings.RUN_MAX_ATTEMPTS:
            why = "It also stalled on an earlier attempt" if stalled_before else \
                f"That was attempt {attempts} of {settings.RUN_MAX_ATTEMPTS}"
            error = f"{what} {why}; giving up."
            failed = _transition(run_id=run_id, to=Run.Status.FAILED, sources=[Run.Status.RUNNING],
                                 where=owned, values={"error": error}, reason=f"{error} (on {worker})")
            if failed is not None:
                _fail_dependents(
                    run_id, reason=f"Run #{run_id}, which trains this run's teacher, failed: {error}"
                )
            return failed
        next_task_id = str(uuid.uuid4())
        requeued = _transition(
            run_id=run_id, to=Run.Status.QUEUED, sources=[Run.Status.RUNNING], where=owned,
            values={"task_id": next_task_id},
            reason=f"{what} Requeued for attempt {attempts + 1} of {settings.RUN_MAX_ATTEMPTS} "
                   f"(on {worker}).",
        )
        if requeued is not None:
            logger.warning("run %s: no progress in %s at step %s; requeued as task %s", run_id, phase, step,
                           next_task_id)
            dispatch.enqueue_on_commit(requeued, task_id=next_task_id)
        return requeued


def run_finish(*, run_id: int, task_id: str, result: dict[str, Any]) -> Run | None:
    """Mark the run succeeded with its evaluations and final model, only while this delivery owns the run;
    start runs that waited for it. The files' sizes and digests are read before the transaction, so a worker
    never holds the run's row while it reads gigabytes."""
    final_dir = result.get("final_dir")
    model = None
    if final_dir:
        path = Path(final_dir)
        model = (artifacts.relative_artifact_path(path), artifacts.du(path), artifacts.sha256_tree(path))
    caches = [(artifacts.relative_artifact_path(path), entry.get("bytes") or artifacts.du(path))
              for entry in result.get("teacher_cache") or [] if entry.get("path")
              for path in [Path(entry["path"])]
              if path.resolve().is_relative_to(Path(settings.ARTIFACT_ROOT).resolve())]
    stores = teacher_stores.store_facts(result)
    with transaction.atomic():
        run = _record_finish(run_id=run_id, task_id=task_id, result=result, model=model, caches=caches)
        if run is not None:  # fenced: only the delivery that owned the run records its stores
            teacher_stores.stores_record(run=run, facts=stores)
        return run


def _record_finish(*, run_id: int, task_id: str, result: dict[str, Any], model: tuple[str, int, str] | None,
                   caches: list[tuple[str, int]]) -> Run | None:
    values: dict[str, Any] = {"result": result, "error": ""}
    values |= {"step": result["steps"], "total_steps": result["steps"]} if "steps" in result \
        else {"step": F("total_steps")}
    if result.get("last_checkpoint"):
        values["checkpoint_path"] = artifacts.relative_artifact_path(Path(result["last_checkpoint"]))
    run = _transition(run_id=run_id, to=Run.Status.SUCCEEDED, sources=[Run.Status.RUNNING],
                      where=Q(task_id=task_id), values=values, reason=_finished_reason(result),
                      related=("team", "experiment__dataset"))
    if run is None:
        return None
    student_metrics = result.get("student") or {}
    dataset = run.experiment.dataset
    key = engine_config.split_key(run.config["dataset"])
    Evaluation.objects.create(
        team=run.team,
        role=Evaluation.Role.STUDENT,
        run=run,
        model=run.student,
        dataset=dataset,
        split_key=key,
        **_evaluation_columns(student_metrics),
    )
    teacher_metrics = result.get("teacher")
    if run.teacher_id and teacher_metrics:
        Evaluation.objects.get_or_create(
            role=Evaluation.Role.TEACHER,
            model_id=run.teacher_id,
            dataset=dataset,
            split="eval",
            split_key=key,
            defaults={"team": run.team, "run": run, **_evaluation_columns(teacher_metrics)},
        )
    if model is not None:
        rel, size, digest = model
        Artifact.objects.update_or_create(
            run=run, path=rel, defaults={"kind": Artifact.Kind.MODEL, "size_bytes": size, "sha256": digest})
    for rel, size in caches:
        Artifact.objects.update_or_create(run=run, path=rel,
                                          defaults={"kind": Artifact.Kind.TEACHER_CACHE, "size_bytes": size})
    _release_dependents(run)
    return run


def _release_dependents(run: Run) -> None:
    """The queued runs that waited for ``run`` wait no more: the wait is cleared in the transaction that
    finishes ``run`` (pages stop saying "waits for run #N" at once) and they are sent after the commit."""
    waiting = Run.objects.filter(waiting_for=run, status=Run.Status.QUEUED)
    dependents = list(waiting.values_list("id", flat=True))
    if not dependents:
        return
    Run.objects.filter(id__in=dependents, status=Run.Status.QUEUED).update(
        waiting_for=None, ready_at=timezone.now())
    released = Run.objects.filter(id__in=dependents, status=Run.Status.QUEUED)
    for dependent in released.order_by("is_baseline", "id"):
        dispatch.enqueue_on_commit(dependent)


def _finished_reason(result: dict[str, Any]) -> str:
    steps = result.get("steps")
    early = " (stopped early)" if result.get("stopped_early") else ""
    return f"Trained {steps} steps{early} and evaluated." if steps is not None else "Trained and evaluated."


def _evaluation_columns(metrics: dict[str, Any]) -> dict[str, Any]:
    return {
        "accuracy": metrics.get("accuracy"),
        "macro_f1": metrics.get("macro_f1"),
        "param_count": metrics.get("params"),
        "latency_ms": metrics.get("latency_ms_p50"),
        "metrics": metrics,
    }


@transaction.atomic
def run_fail(*, run_id: int, task_id: str, error: str) -> bool:
    """Mark the run failed with a readable message; metrics and checkpoints already written stay. The message
    shows no absolute path of the machine (``ARTIFACT_ROOT/...`` for the artifact root)."""
    error = engine_config.public_message(error)
    failed = _transition(
        run_id=run_id,
        to=Run.Status.FAILED,
        sources=[Run.Status.RUNNING],
        where=Q(task_id=task_id),
        values={"error": error[:5000]},
        reason=error,
    )
    if failed:
        _fail_dependents(
            run_id, reason=f"Run #{run_id}, which trains this run's teacher, failed: {error[:500]}"
        )
    return failed is not None


def run_mark_cancelled(*, run_id: int, task_id: str, step: int | None = None) -> bool:
    """The worker stopped a run whose cancellation was requested; its metrics and checkpoint stay."""
    at = f" at step {step}" if step is not None else ""
    with transaction.atomic():
        done = _transition(run_id=run_id, to=Run.Status.CANCELLED, sources=[Run.Status.RUNNING],
                           where=Q(task_id=task_id), reason=f"Stopped{at} after cancellation was requested.")
        if done:
            _fail_dependents(run_id, reason=f"Run #{run_id}, which trains this run's teacher, was cancelled.",
                             status=Run.Status.CANCELLED)
    return done is not None


def _fail_dependents(run_id: int, *, reason: str, status: str = Run.Status.FAILED) -> None:
    """Runs still queued behind ``run_id`` cannot start: fail (or cancel) them, and the runs behind those."""
    for dependent_id in Run.objects.filter(waiting_for_id=run_id, status=Run.Status.QUEUED).values_list(
        "id", flat=True
    ):
        if _transition(run_id=dependent_id, to=status, sources=[Run.Status.QUEUED], values={"error": reason},
                       reason=reason):
            _fail_dependents(dependent_id, reason=reason, status=status)


@transaction.atomic
def run_cancel(*, run: Run, reason: str = "Cancelled by a user.") -> Run:
    """Cancel a run: a queued one at once (its message is revoked), a running one at its next cancellation
    poll (within a few steps; it keeps its metrics and checkpoint), a running one whose worker died at
    once."""
    cancelled = _transition(
        run_id=run.pk,
        to=Run.Status.CANCELLED,
        sources=[Run.Status.QUEUED],
        reason=reason,
        values={"cancel_requested": True},
    )
    if cancelled is not None and cancelled.task_id:
        dispatch.revoke_on_commit(cancelled.task_id)
    if cancelled is None:
        Run.objects.filter(pk=run.pk, status=Run.Status.RUNNING).update(cancel_requested=True)
        _transition(
            run_id=run.pk,
            to=Run.Status.CANCELLED,
            sources=[Run.Status.RUNNING],
            where=Q(heartbeat_at__lt=_lease_cutoff()),
            reason=f"{reason} Its worker had stopped responding.",
        )
    _fail_dependents(run.pk, reason=f"Run #{run.pk}, which trains this run's teacher, was cancelled.",
                     status=Run.Status.CANCELLED)
    run.refresh_from_db()
    return run


@transaction.atomic
def run_requeue(*, run: Run, reason: str) -> Run:
    """Queue a failed, cancelled or stale (lease expired) run again as a new attempt, with a fresh restart
    budget; it resumes from its last checkpoint. Runs that were failed or cancelled only because they waited
    for it are queued again behind it.

    A run that reused another run's results is trained after all (``baseline_reuse.run_retrain``).

    Raises ValidationError when the run is queued, live or succeeded by training, or waits for a run that did
    not succeed.
    """
    run = Run.objects.select_related("waiting_for").get(pk=run.pk)
    if run.is_reused:
        from experiments.services import baseline_reuse

        return baseline_reuse.run_retrain(run=run, reason=reason)
    upstream = run.waiting_for
    if upstream is not None and upstream.status in (Run.Status.FAILED, Run.Status.CANCELLED):
        raise ValidationError(f"Run #{run.pk} waits for run #{upstream.pk}, which {upstream.status}; "
                              f"requeue that one first.")
    task_id = str(uuid.uuid4())
    values = {"task_id": task_id, "cancel_requested": False, "error": ""}
    if run.status in (Run.Status.FAILED, Run.Status.CANCELLED):
        requeued = _transition(
            run_id=run.pk, to=Run.Status.QUEUED, sources=[run.status], values=values, reason=reason
        )
    elif run.status == Run.Status.RUNNING and run.lease_expired:
        requeued = _transition(
            run_id=run.pk,
            to=Run.Status.QUEUED,
            sources=[Run.Status.RUNNING],
            values=values,
            where=Q(heartbeat_at__lt=_lease_cutoff()),
            reason=f"{reason} (its worker had stopped responding)",
        )
    else:
        requeued = None
    if requeued is None:
        raise ValidationError(_not_requeueable(run))
    _requeue_dependents(run.pk)
    if upstream is None or upstream.status == Run.Status.SUCCEEDED:
        dispatch.enqueue_on_commit(requeued, task_id=task_id)
    return requeued


def _not_requeueable(run: Run) -> str:
    if run.status == Run.Status.SUCCEEDED:
        return f"Run #{run.pk} succeeded; launch a new experiment to train it again."
    if run.status == Run.Status.QUEUED:
        return f"Run #{run.pk} is already queued."
    return f"Run #{run.pk} is running and its worker is alive; cancel it first, or wait for it to finish."


def _requeue_dependents(run_id: int) -> None:
    """Runs that failed or were cancelled, without ever starting, because they waited for ``run_id`` wait
    again."""
    behind = Run.objects.filter(waiting_for_id=run_id, status__in=[Run.Status.FAILED, Run.Status.CANCELLED],
                                started_at__isnull=True, cancel_requested=False)
    for dependent in behind.values_list("id", "status"):
        dependent_id, status = dependent
        if _transition(
            run_id=dependent_id,
            to=Run.Status.QUEUED,
            sources=[status],
            values={"error": "", "task_id": ""},
            reason=f"Run #{run_id}, which it waits for, was requeued.",
        ):
            _requeue_dependents(dependent_id)


@transaction.atomic
def experiment_cancel(*, experiment: Experiment) -> int:
    runs = list(experiment.runs.exclude(status__in=Run.TERMINAL))
    for run in runs:
        run_cancel(run=run)
    return len(runs)
