"""Rank 0's callbacks for a run launched under torchrun by the Celery task (workers/launcher.py).

``python -m workers.launcher run CONFIG --callbacks workers.rank_reporting:callbacks`` makes rank 0 (alone)
call :func:`callbacks` with the run's config. It sets Django up in this fresh process
(``DJANGO_SETTINGS_MODULE`` and the database settings come from the worker's environment), and builds a
:class:`~workers.reporting.RunReporter` for the run and the delivery the launcher names
(``DISTILLWEB_RUN_ID``, ``DISTILLWEB_TASK_ID``): the same fencing token, so every write of rank 0 is refused
once another delivery took the run over. Its thread writes metric points and progress (renewing the lease),
polls for cancellation and runs the stall watchdog, exactly as in the pool process for a one-process run; the
engine broadcasts rank 0's decisions (stop, lost ownership, a refused checkpoint) to every rank.

At exit the points still buffered are written durably; should the database stay away longer than
RUN_DB_RETRY_S, the result file says so (``error_type: DatabaseUnavailable``) and the task gives the message
back to the broker instead of recording an outcome, as for a one-process run. A stall kills torchrun (this
process's parent) after it is recorded; every rank dies with it (workers/launcher.py).
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import signal
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from workers.engine.config import RunConfig
    from workers.engine.trainer import Callbacks
    from workers.reporting import RunReporter

logger = logging.getLogger(__name__)


def callbacks(cfg: RunConfig) -> Callbacks:
    """The engine callbacks of rank 0: a started RunReporter's, flushed and stopped at exit."""
    import django

    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "distillweb.settings.base")  # as the worker's app does
    django.setup()
    from django.db import connections

    connections.close_all()  # nothing inherited may be shared with the worker
    from workers import launcher, sessions
    from workers.engine.trainer import Callbacks
    from workers.reporting import RunReporter

    sessions._on_worker_init()  # a frozen rank never holds the run's row locks for long either
    reporter = RunReporter(
        run_id=int(os.environ[launcher.RUN_ID_ENV]), task_id=os.environ[launcher.TASK_ID_ENV],
        stop_stuck_work=_stop_launch,
    )
    reporter.set_batch_size(cfg.train.batch_size)
    reporter.set_schedule(save_every=cfg.train.save_every, log_every=cfg.train.log_every,
                          eval_every=cfg.train.eval_every)
    reporter.__enter__()  # its thread writes, renews the lease and polls until the process ends
    atexit.register(_finish, reporter)
    # A phase's progress (loading, cache fill, evaluation) keeps the stall watchdog quiet, where the engine
    # reports it (as in workers.tasks for a one-rank run).
    phases = {"on_phase": reporter.on_phase} if "on_phase" in Callbacks.__dataclass_fields__ else {}
    return Callbacks(
        on_metrics=reporter.on_metrics,
        on_progress=reporter.on_progress,
        on_checkpoint=reporter.on_checkpoint,
        should_stop=reporter.should_stop,
        owns_run=reporter.owns_run,
        **phases,
    )


def _finish(reporter: RunReporter) -> None:
    """At exit: the last points, durably, before the task reads the result; then the thread stops."""
    from workers import launcher
    from workers.reporting import DatabaseUnavailable

    try:
        reporter.flush()
    except DatabaseUnavailable as exc:
        logger.error("run %s: the last metric points could not be written: %s", reporter.run_id, exc)
        result = os.environ.get(launcher.RESULT_ENV)
        if result:
            Path(result).write_text(json.dumps({"error": str(exc), "error_type": "DatabaseUnavailable"}))
    finally:
        reporter.__exit__(None, None, None)


def _stop_launch() -> bool:
    """The stall watchdog's end of a stuck launch (the stall is recorded): kill torchrun, whose ranks die with
    it (their death signal)."""
    logger.error("stall watchdog: killing torchrun (pid %s) and its ranks", os.getppid())
    os.kill(os.getppid(), signal.SIGKILL)
    return True
