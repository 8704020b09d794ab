"""What a worker's main process does when the pool process running a run dies under it.

The kernel's out-of-memory killer ends the largest process with SIGKILL: with a run training, that is the pool
child. Nothing in the child can report it, but Celery's prefork parent sees the child exit and fails the
delivery with ``WorkerLostError("Worker exited prematurely: signal 9 (SIGKILL) Job: 0.")``. The run task's
request class (``Request=`` on the task) hears that in the parent and records it on the run at once
(``services.run_worker_process_lost``: requeued with the reason, or failed once the restart budget is spent),
instead of leaving the run to wait for its lease to expire as "worker lost". When the whole worker dies (its
main process too), nothing is left to tell: the lease expiry and the lifecycle sweep handle the run as before.
A pool process that the stall watchdog killed (workers/watchdog.py) recorded the stall itself first: the run
no longer belongs to that delivery, so nothing more is recorded here.
"""

from __future__ import annotations

import logging
import re

from billiard.einfo import ExceptionWithTraceback
from billiard.exceptions import WorkerLostError
from celery.worker.request import Request

logger = logging.getLogger(__name__)

# "Worker exited prematurely: signal 9 (SIGKILL) Job: 0." → "signal 9 (SIGKILL)"
_STATUS = re.compile(r"exited prematurely: (.+?)(?: Job: \d+)?\.?$")


def exit_status(exc: BaseException) -> str:
    """How the pool process ended, in Celery's words ("signal 9 (SIGKILL)", "exitcode 1")."""
    text = str(exc).strip()
    match = _STATUS.search(text)
    return match[1] if match else text or type(exc).__name__


class RunRequest(Request):
    """The request class of ``workers.run_distillation``: records a lost pool process on its run."""

    def on_failure(self, exc_info, send_failed_event=True, return_ok=False):
        exc = exc_info.exception
        if isinstance(exc, ExceptionWithTraceback):
            exc = exc.exc
        if isinstance(exc, WorkerLostError):
            self._record_lost_process(exc)
        return super().on_failure(exc_info, send_failed_event=send_failed_event, return_ok=return_ok)

    def _record_lost_process(self, exc: WorkerLostError) -> None:
        from django.db import close_old_connections

        from experiments.services import lifecycle

        args = self.args or []
        if not args or not isinstance(args[0], int):
            return
        status = exit_status(exc)
        try:
            close_old_connections()
            run = lifecycle.run_worker_process_lost(
                run_id=args[0], task_id=self.id, worker_name=self.hostname or "", status=status
            )
        except Exception:  # the database is away: the lease expiry requeues the run later
            logger.exception("run %s: could not record that its worker process died (%s)", args[0], status)
            return
        if run is not None:
            logger.warning("run %s: its worker process died (%s); the run is %s", args[0], status, run.status)
