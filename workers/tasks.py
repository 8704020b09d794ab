"""Celery tasks: thin. Ids in; services and the engine do the work."""

from __future__ import annotations

import logging

from celery import shared_task

logger = logging.getLogger(__name__)


@shared_task(name="workers.run_distillation", bind=True, acks_late=True, ignore_result=True)
def run_distillation(self, run_id: int) -> None:
    """Train and evaluate one run. A second delivery of a live run claims nothing and returns."""
    # Lazy imports: torch must not touch CUDA in the prefork parent process.
    from django.conf import settings

    from experiments import selectors, services
    from experiments.engine_config import resolve_paths
    from workers.engine.config import RunConfig
    from workers.engine.errors import EngineError
    from workers.engine.trainer import Callbacks, train
    from workers.reporting import RunReporter

    task_id = self.request.id or f"local-{run_id}"
    run = services.run_claim(run_id=run_id, task_id=task_id, worker_name=self.request.hostname or "")
    if run is None:
        logger.info("run %s is owned by a live delivery or finished; nothing to do", run_id)
        return
    reporter = RunReporter(run_id=run_id, task_id=task_id)
    try:
        resolved = resolve_paths(run.config, run=run, artifact_root=settings.ARTIFACT_ROOT)
        resolved["evaluate_teacher"] = not selectors.teacher_evaluation_exists(run=run)
        cfg = RunConfig.from_dict(resolved)
        reporter.set_batch_size(cfg.train.batch_size)
        result = train(
            cfg,
            Callbacks(
                on_metrics=reporter.on_metrics,
                on_progress=reporter.on_progress,
                on_checkpoint=reporter.on_checkpoint,
                should_stop=reporter.should_stop,
            ),
        )
        reporter.flush()
    except EngineError as exc:
        _flush_quietly(reporter)
        services.run_fail(run_id=run_id, task_id=task_id, error=str(exc))
        return
    except (ValueError, TypeError, KeyError) as exc:
        _flush_quietly(reporter)
        logger.exception("run %s has an invalid config", run_id)
        services.run_fail(run_id=run_id, task_id=task_id, error=f"The run's configuration is invalid: {exc}")
        return
    except Exception as exc:
        _flush_quietly(reporter)
        logger.exception("run %s crashed", run_id)
        services.run_fail(run_id=run_id, task_id=task_id, error=f"Internal error ({type(exc).__name__}): {exc}")
        return
    if result.stopped:
        if reporter.cancel_requested:
            services.run_mark_cancelled(run_id=run_id, task_id=task_id)
        return  # taken over by another delivery: that one finishes the run
    services.run_finish(run_id=run_id, task_id=task_id, result=result.to_dict())


def _flush_quietly(reporter) -> None:
    try:
        reporter.flush()
    except Exception:
        logger.exception("could not write the last metric points")
