"""Celery tasks: thin. Ids in; services and the engine do the work."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from celery import shared_task
from celery.exceptions import Reject

if TYPE_CHECKING:
    from experiments.models import Run
    from workers.reporting import RunReporter

logger = logging.getLogger(__name__)


@shared_task(name="workers.run_distillation", bind=True, acks_late=True, ignore_result=True,
             Request="workers.lost_process:RunRequest")  # a pool process killed under a run is recorded on it
def run_distillation(self, run_id: int) -> None:
    """Train and evaluate one run. A second delivery of a live run claims nothing and returns.

    While it runs, the reporter's thread renews the run's lease. When the database stays unreachable (longer
    than RUN_DB_RETRY_S) the outcome cannot be recorded: the message is rejected back to the broker instead of
    being acknowledged, and the run, still ``running`` with an expiring lease, resumes from its last
    checkpoint in a later delivery. A run of several ranks (``train.processes`` on a CPU, ``train.gpus`` on
    CUDA) trains under torchrun, in a child process group that dies with this process (workers/launcher.py);
    its rank 0 reports as this process does for a one-rank run. When nothing advances for RUN_STALL_TIMEOUT_S
    (a hung load, a stuck collective), the reporter's stall watchdog records it on the run and kills this pool
    process (workers/watchdog.py); the worker goes on with a fresh one.
    """
    # Lazy imports: torch must not touch CUDA in the prefork parent process.
    from experiments.services import baseline_reuse, dispatch, lifecycle
    from workers import launcher
    from workers.reporting import DatabaseUnavailable, RunReporter

    task_id = self.request.id or f"local-{run_id}"
    reporter = RunReporter(run_id=run_id, task_id=task_id)
    try:
        # A baseline identical to a run that succeeded meanwhile takes its results instead of training; one
        # gives its turn to distilled runs of its experiment that became ready after it
        # (experiments.domain.queue_order): its message goes to the end of the queue.
        if reporter.call(baseline_reuse.run_reuse_on_delivery, run_id=run_id, task_id=task_id) is not None:
            logger.info("run %s reused an identical run's results", run_id)
            return
        if reporter.call(dispatch.run_yield_turn, run_id=run_id, task_id=task_id):
            return
        run = reporter.call(
            lifecycle.run_claim, run_id=run_id, task_id=task_id, worker_name=self.request.hostname or ""
        )
        if run is None:
            logger.info(
                "run %s is owned by a live delivery, finished, or expects another message; nothing to do",
                run_id,
            )
            return
        world, cuda = launcher.ranks(run.config.get("train") or {})
        if world > 1:  # torchrun's rank 0 reports; this process waits and records the outcome
            _train_in_ranks(run, reporter, world=world, cuda=cuda)
            return
        with (
            reporter
        ):  # its thread writes metrics and progress, renewing the lease, until the run is recorded
            _train_and_record(run, reporter)
    except DatabaseUnavailable as exc:
        logger.error("run %s: %s; the message goes back to the broker and the run resumes later", run_id, exc)
        raise Reject(str(exc), requeue=True) from exc


def _train_and_record(run: Run, reporter: RunReporter) -> None:
    """Train the claimed run and record how it ended: succeeded, failed with a readable error, or
    cancelled."""
    from django.conf import settings

    from experiments.domain.engine_config import resolve_paths
    from experiments.selectors import records
    from experiments.services import lifecycle
    from workers import warmup
    from workers.engine.config import RunConfig
    from workers.engine.errors import EngineError
    from workers.reporting import DatabaseUnavailable

    owner = {"run_id": run.id, "task_id": reporter.task_id}
    reporter.on_phase("loading")  # the engine's modules are imported (seconds in a fresh pool process)
    warmup.settle()  # after this process's warm-up, never beside it (the lease is renewed meanwhile)
    from workers.engine.trainer import Callbacks, train
    try:
        resolved = resolve_paths(run.config, run=run, artifact_root=settings.ARTIFACT_ROOT)
        resolved["evaluate_teacher"] = not reporter.call(records.teacher_evaluation_exists, run=run)
        cfg = RunConfig.from_dict(resolved)
        reporter.on_phase("loading")
        reporter.set_batch_size(cfg.train.batch_size)
        reporter.set_schedule(save_every=cfg.train.save_every, log_every=cfg.train.log_every,
                              eval_every=cfg.train.eval_every)
        # A phase's progress (loading, cache fill, evaluation) keeps the stall watchdog quiet, where the
        # engine reports it.
        phases = {"on_phase": reporter.on_phase} if "on_phase" in Callbacks.__dataclass_fields__ else {}
        result = train(
            cfg,
            Callbacks(
                on_metrics=reporter.on_metrics,
                on_progress=reporter.on_progress,
                on_checkpoint=reporter.on_checkpoint,
                should_stop=reporter.should_stop,
                owns_run=reporter.owns_run,
                **phases,
            ),
        )
        reporter.flush()
    except DatabaseUnavailable:
        raise
    except EngineError as exc:
        reporter.finish_with(lifecycle.run_fail, **owner, error=str(exc))
        return
    except (ValueError, TypeError, KeyError) as exc:
        logger.exception("run %s has an invalid config", run.id)
        reporter.finish_with(lifecycle.run_fail, **owner, error=f"The run's configuration is invalid: {exc}")
        return
    except Exception as exc:
        logger.exception("run %s crashed", run.id)
        reporter.finish_with(
            lifecycle.run_fail, **owner, error=f"Internal error ({type(exc).__name__}): {exc}"
        )
        return
    if result.stopped:
        if reporter.cancel_requested:
            reporter.call(lifecycle.run_mark_cancelled, **owner, step=reporter.last_step or None)
        return  # or taken over by another delivery: that one finishes the run
    reporter.call(lifecycle.run_finish, **owner, result=result.to_dict())


def _train_in_ranks(run: Run, reporter: RunReporter, *, world: int, cuda: bool) -> None:
    """Train the claimed run in ``world`` ranks under torchrun (workers/launcher.py) and record how it ended;
    a config the engine cannot read fails the run here, with the in-process path's message."""
    from django.conf import settings

    from experiments.domain.engine_config import resolve_paths
    from experiments.selectors import records
    from experiments.services import lifecycle
    from workers import launcher
    from workers.engine.config import RunConfig
    from workers.reporting import DatabaseUnavailable

    owner = {"run_id": run.id, "task_id": reporter.task_id}
    try:
        resolved = resolve_paths(run.config, run=run, artifact_root=settings.ARTIFACT_ROOT)
        resolved["evaluate_teacher"] = not reporter.call(records.teacher_evaluation_exists, run=run)
        RunConfig.from_dict(resolved)
    except DatabaseUnavailable:
        raise
    except (ValueError, TypeError, KeyError) as exc:
        logger.exception("run %s has an invalid config", run.id)
        reporter.finish_with(lifecycle.run_fail, **owner, error=f"The run's configuration is invalid: {exc}")
        return
    try:
        launcher.train_in_ranks(run, reporter, resolved, world=world, cuda=cuda)
    except DatabaseUnavailable:
        raise
    except Exception as exc:
        logger.exception("run %s: the multi-process launch crashed", run.id)
        reporter.call(lifecycle.run_fail, **owner, error=f"Internal error ({type(exc).__name__}): {exc}")
