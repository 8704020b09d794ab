"""Bridges the engine's callbacks to the database, batching writes so they never slow training down.

A run's writes also renew its lease (the heartbeat). In a worker, a thread of the reporter does the routine
writes and the cancellation polls, so the training loop never waits for the database except before a
checkpoint, whose points must be durable first. A database outage does not crash the run: metric points stay
buffered (up to a bound) and are written when the database is back, and a checkpoint waits for them. Only an
outage longer than RUN_DB_RETRY_S gives up, with DatabaseUnavailable: the task then leaves the run to be
resumed, never marks it. The same thread runs the stall watchdog (workers.watchdog): a run whose callbacks
show no progress for RUN_STALL_TIMEOUT_S stops renewing its lease, is recorded as stalled, and its pool
process is killed.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

from django.conf import settings
from django.db import InterfaceError, OperationalError, connection

from experiments.selectors import records
from experiments.services import telemetry
from workers import watchdog as stall_watchdog

logger = logging.getLogger(__name__)

T = TypeVar("T")

# Errors of a database that went away (psycopg maps refused or dropped connections to these).
DATABASE_ERRORS = (OperationalError, InterfaceError)
# Retries back off exponentially from 0.5 s up to this, so a run resumes within seconds of the database's
# return.
MAX_BACKOFF_S = 5.0


class DatabaseUnavailable(RuntimeError):
    """The database stayed unreachable for longer than the reporter's retry window."""


class RunReporter:
    """Buffers metric points, progress and cancellation polls for one run delivery.

    Points and progress go to the database together, in one write every ``flush_every_s`` that also renews the
    run's lease; the points logged before a checkpoint are written (durably) before the engine saves it. Used
    as a context manager, a thread does the routine writes and polls, also while the engine loads models or
    evaluates, so the lease only expires when the worker dies; without it (or inside a transaction, where
    another connection cannot see the run) the callbacks do them in line.

    ``owned`` turns False when the run was taken over by another delivery or cancelled; the engine then stops
    at its next poll. ``max_buffer`` points trigger a write; while the database is down up to ``max_pending``
    points wait in memory, then training pauses until they are written.

    Durability: routine writes on Postgres are confirmed before their disk flush (cheaper), so the reporter
    keeps their points until a durable commit covers them: every ``durable_every_s``, before each checkpoint
    and at the end. A durable commit flushes every earlier commit of the same server incarnation; points
    confirmed by an incarnation that has since ended (the server crashed or restarted, see
    ``records.database_incarnation``) are written again. A crash of the database server therefore loses no
    point.
    """

    def __init__(
        self,
        *,
        run_id: int,
        task_id: str,
        flush_every_s: float = 2.0,
        max_buffer: int = 500,
        max_pending: int = 100_000,
        poll_every_s: float = 2.0,
        retry_for_s: float | None = None,
        durable_every_s: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
        stall_timeout_s: float | None = None,
        stop_stuck_work: Callable[[], object] = stall_watchdog.stop_stuck_work,
    ) -> None:
        self.run_id = run_id
        self.task_id = task_id
        self.flush_every_s = flush_every_s
        self.max_buffer = max_buffer
        self.max_pending = max(max_pending, max_buffer)
        self.poll_every_s = poll_every_s
        self.durable_every_s = durable_every_s
        self.retry_for_s = settings.RUN_DB_RETRY_S if retry_for_s is None else retry_for_s
        self.clock = clock
        self.sleep = sleep
        self.owned = True
        self.cancel_requested = False
        self._buffer: list[tuple[str, int, float, datetime]] = []
        # Points whose commit is not yet known to be on disk, by the server incarnation that confirmed them.
        self._unconfirmed: list[tuple[str, list[tuple[str, int, float, datetime]]]] = []
        self._last_durable = clock()
        self._state = threading.Lock()  # the buffer and the progress, shared with the writer thread
        self._writing = threading.Lock()  # one database write at a time, so a flush waits for one in flight
        self._last_flush = clock()
        self._last_progress = float("-inf")  # the first progress is written at once
        self._last_poll = float("-inf")  # the first poll always reads the database
        self._last_step_time: tuple[int, float] | None = None
        self._last_step = 0
        self._total = 0
        # The phase besides the steps (name, done, total, started), "" while the steps run, and the last one
        # written.
        self._phase: tuple[str, int, int, datetime | None] = ("", 0, 0, None)
        self._phase_written: tuple[str, int, int, datetime | None] | None = None
        self._batch_size = 1
        self._save_every = 0
        self._log_every = 0
        self._failures = 0  # consecutive failed writes that did not wait
        self._retry_at = float("-inf")  # no such write before this time after a failure
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        timeout = settings.RUN_STALL_TIMEOUT_S if stall_timeout_s is None else stall_timeout_s
        self.watchdog = stall_watchdog.Watchdog(timeout_s=timeout, clock=clock)
        self._stop_stuck_work = stop_stuck_work

    # --- the writer thread ------------------------------------------------------------------------
    def __enter__(self) -> RunReporter:
        self.watchdog.progress()  # the run starts now (claiming it may have waited out a database outage)
        if not connection.in_atomic_block:
            self._thread = threading.Thread(
                target=self._run_writer, name=f"report-run-{self.run_id}", daemon=True
            )
            self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=60)
            self._thread = None

    def _run_writer(self) -> None:
        try:
            while not self._stop.wait(min(0.2, self.flush_every_s)):
                self._routine_work()
        finally:
            connection.close()  # this thread's own connection

    def _routine_work(self) -> None:
        """A write when one is due (also renewing the lease when nothing new was logged), and a poll; or, once
        nothing advanced for the stall timeout, the end of the run (see ``_stop_stalled``)."""
        if self.stalled is not None:
            return  # the lease is left to expire; the run's outcome is recorded
        stall = self.watchdog.check()
        if stall is not None:
            self._stop_stalled(stall)
            return
        now = self.clock()
        with self._state:
            due = now - self._last_flush >= self.flush_every_s or len(self._buffer) >= self.max_buffer
        if due:
            self._attempt(self._write_points, durable=now - self._last_durable >= self.durable_every_s)
        if now - self._last_poll >= self.poll_every_s:
            self._last_poll = now
            requested = self._attempt(records.run_is_cancel_requested, run_id=self.run_id)
            if requested is not None:  # None: the database is down, keep the last answer
                self.cancel_requested = requested

    @property
    def stalled(self) -> stall_watchdog.Stall | None:
        """The stall the watchdog declared (nothing advanced for the stall timeout), or None."""
        return self.watchdog.stall

    def _stop_stalled(self, stall: stall_watchdog.Stall) -> None:
        """No progress for the stall timeout: renew the lease no more, write nothing more, record the stall
        on the run (requeued once, failed on the next stall), then kill the stuck work."""
        from experiments.services import lifecycle

        self.owned = False  # should the hung code wake up, it stops at its next poll and saves nothing
        logger.error(
            "run %s: no progress for %.0f s at step %s (phase: %s); stopping it",
            self.run_id, stall.idle_s, stall.step, stall.phase,
        )
        try:
            run = self.call(lifecycle.run_stalled, run_id=self.run_id, task_id=self.task_id, step=stall.step,
                            phase=stall.phase, idle_s=stall.idle_s)
        except Exception:  # the database is away: the lease expires and the sweep requeues the run
            logger.exception("run %s: could not record the stall", self.run_id)
        else:
            if run is not None:
                logger.error("run %s: the stall was recorded; the run is %s", self.run_id, run.status)
        self._stop_stuck_work()

    # --- engine callbacks -------------------------------------------------------------------------
    def on_metrics(self, step: int, metrics: dict[str, float]) -> None:
        self.watchdog.metrics(step, metrics)
        now = datetime.now(UTC)
        with self._state:
            self._buffer.extend((name, step, float(value), now) for name, value in metrics.items())
            pending = len(self._buffer)
        if pending >= self.max_pending or self._is_checkpoint_step(step):
            # The database has been down for long: pause rather than drop points. Or the engine writes a
            # checkpoint after this call: a resume from it never logs this step again, so it must be durable.
            self.flush()
        elif self._thread is None and (
            pending >= self.max_buffer or self.clock() - self._last_flush >= self.flush_every_s
        ):
            self._attempt(self._write_points, durable=False)

    def on_progress(self, step: int, total: int) -> None:
        self.watchdog.step_done(step, total)
        with self._state:
            self._last_step, self._total = step, total
            if self._phase[0]:
                self._phase = ("", 0, 0, None)  # the steps again (after a mid-run evaluation, say)
        if self._is_checkpoint_step(step) and not self._is_log_step(step, total):
            # Everything logged before a checkpoint is durable before the checkpoint exists (at a log step,
            # the metrics of the step come before the checkpoint too, and that call flushes).
            self.flush()
        elif self._thread is None and (
            self.clock() - self._last_progress >= self.flush_every_s or step == total
        ):
            self._attempt(self._write_points, durable=False)  # progress, with any buffered points

    def on_checkpoint(self, step: int, path: str) -> bool:
        """Register the checkpoint, only while this delivery owns the run (False: the engine deletes it and
        stops). Points up to the checkpoint are durable before it counts, so a resume never loses any."""
        self.flush()
        registered = self.owned and self.call(
            telemetry.run_record_checkpoint,
            run_id=self.run_id,
            task_id=self.task_id,
            step=step,
            path=Path(path),
        )
        self.owned = bool(registered) and self.owned
        return self.owned

    def on_phase(self, phase: str, done: int | None = None, total: int | None = None) -> None:
        """Progress of a phase other than the training steps (loading, cache fill, evaluation rows): keeps
        the stall watchdog quiet, names the phase a stall is reported in, and goes on the run record with
        the next write (the run page shows it with the time left)."""
        self.watchdog.progress(phase=phase)
        with self._state:
            name, _, _, started = self._phase
            if name != phase or not done or started is None:  # a new phase, or a new part of it
                started = datetime.now(UTC)
            self._phase = (phase, int(done or 0), int(total or 0), started)

    def owns_run(self) -> bool:
        """False once a write found the run taken over (or cancelled and closed): the engine writes no
        weights."""
        return self.owned

    def should_stop(self) -> bool:
        if self._thread is None:
            now = self.clock()
            if now - self._last_poll >= self.poll_every_s:
                self._last_poll = now
                requested = self._attempt(records.run_is_cancel_requested, run_id=self.run_id)
                if requested is not None:  # None: the database is down, keep the last answer
                    self.cancel_requested = requested
        stop = self.cancel_requested or not self.owned
        if stop and self.owned:
            self.flush()  # the engine checkpoints this step before it stops
        return stop

    # --- plumbing ---------------------------------------------------------------------------------
    @property
    def last_step(self) -> int:
        return self._last_step

    def set_batch_size(self, batch_size: int) -> None:
        self._batch_size = batch_size

    def set_schedule(self, *, save_every: int, log_every: int, eval_every: int = 0) -> None:
        """The engine checkpoints every ``save_every`` steps, and logs metrics every ``log_every`` steps (and
        at the last); the points before each checkpoint must be durable first. It evaluates every
        ``eval_every`` steps: a stall after such a step's progress is one of the evaluation."""
        self._save_every, self._log_every = save_every, log_every
        self.watchdog.eval_every = eval_every

    def _is_checkpoint_step(self, step: int) -> bool:
        return self._save_every > 0 and step > 0 and step % self._save_every == 0

    def _is_log_step(self, step: int, total: int) -> bool:
        return step == total or (self._log_every > 0 and step % self._log_every == 0)

    def flush(self) -> None:
        """Write every buffered point durably, retrying through a database outage (raises
        DatabaseUnavailable). A stalled run writes nothing more."""
        while self._buffer and self.stalled is None:
            self.call(self._write_points)
        self._last_flush = self.clock()

    def finish_with(self, write: Callable[..., T], **kwargs: Any) -> T:
        """Write the points logged so far, then record the run's outcome (e.g. ``lifecycle.run_fail``), both
        through a database outage. A bad point does not stop the outcome from being recorded."""
        try:
            self.flush()
        except DatabaseUnavailable:
            raise
        except Exception:
            logger.exception("run %s: could not write the last metric points", self.run_id)
            with self._state:
                self._buffer.clear()
        return self.call(write, **kwargs)

    def call(self, write: Callable[..., T], **kwargs: Any) -> T:
        """Run a database call, retrying with exponential backoff while the database is unreachable.

        Raises DatabaseUnavailable when it stays unreachable for ``retry_for_s``.
        """
        deadline = None
        delay = 0.5
        while True:
            try:
                result = write(**kwargs)
            except DATABASE_ERRORS as exc:
                _drop_connection()
                now = self.clock()
                if deadline is None:
                    deadline = now + self.retry_for_s
                    logger.warning(
                        "run %s: database unreachable (%s); retrying for up to %.0f s",
                        self.run_id,
                        _first_line(exc),
                        self.retry_for_s,
                    )
                if now >= deadline:
                    raise DatabaseUnavailable(
                        f"The database was unreachable for {self.retry_for_s:.0f} s: {_first_line(exc)}"
                    ) from exc
                self.sleep(min(delay, max(deadline - now, 0.0)))
                delay = min(delay * 2, MAX_BACKOFF_S)
                continue
            if deadline is not None:
                logger.info("run %s: database reachable again", self.run_id)
            self._failures, self._retry_at = 0, float("-inf")
            return result

    def _attempt(self, write: Callable[..., T], **kwargs: Any) -> T | None:
        """One try that never waits: None when the database is down (or was, moments ago)."""
        if self.clock() < self._retry_at:
            return None
        try:
            result = write(**kwargs)
        except DATABASE_ERRORS as exc:
            _drop_connection()
            self._failures += 1
            self._retry_at = self.clock() + min(0.5 * 2**self._failures, MAX_BACKOFF_S)
            if self._failures == 1:
                logger.warning(
                    "run %s: database unreachable (%s); %d metric points kept for later",
                    self.run_id,
                    _first_line(exc),
                    len(self._buffer),
                )
            return None
        self._failures, self._retry_at = 0, float("-inf")
        return result

    def _write_points(self, durable: bool = True) -> bool:
        """One write: buffered points, the progress (renewing the lease) and the throughput since the last
        one. Nothing once the run stalled: its lease is left to expire."""
        with self._writing:
            if self.stalled is not None:
                return False
            now = self.clock()
            with self._state:
                batch = self._buffer[: self.max_pending]
                step, total = self._last_step, self._total
                phase = self._phase if self._phase != self._phase_written else None
            progress = None  # unchanged since the last write (loading, evaluating): renew the lease only
            if total and (self._last_step_time is None or step != self._last_step_time[0]):
                rate = None
                if self._last_step_time is not None and now > self._last_step_time[1]:
                    rate = (step - self._last_step_time[0]) / (now - self._last_step_time[1])
                progress = (step, total, None if rate is None else rate * self._batch_size)
            owned = telemetry.run_record_metrics(
                run_id=self.run_id,
                task_id=self.task_id,
                points=batch,
                durable=durable,
                progress=progress,
                phase=phase,
            )
            # On the same connection: had the server restarted since the commit, this read would fail instead.
            incarnation = records.database_incarnation()
            with self._state:
                del self._buffer[: len(batch)]  # only once written: a failed write keeps them
                self._settle(batch if owned else [], durable=durable, incarnation=incarnation)
            if durable:
                self._last_durable = now
            self._last_flush = now
            if progress is not None:
                self._last_progress, self._last_step_time = now, (step, now)
            if phase is not None:
                self._phase_written = phase
            self.owned = owned and self.owned
            return owned

    def _settle(
        self, batch: list[tuple[str, int, float, datetime]], *, durable: bool, incarnation: str | None
    ) -> None:
        """After a write (``_state`` held): forget the points a durable commit covers, keep the others, and
        put back in the buffer those a server that has since restarted may have lost."""
        lost = [points for seen, points in self._unconfirmed if seen != incarnation]
        if lost:
            again = [p for points in lost for p in points]
            logger.warning(
                "run %s: the database server restarted; writing again %d metric points it may have lost",
                self.run_id,
                len(again),
            )
            self._buffer[:0] = again
        if durable or incarnation is None:
            self._unconfirmed = []
        else:
            self._unconfirmed = [(seen, points) for seen, points in self._unconfirmed if seen == incarnation]
            if batch:
                self._unconfirmed.append((incarnation, batch))


def _drop_connection() -> None:
    """Close a broken connection so the next query opens a new one (never inside a transaction: a test's
    atomic block, or a caller's, owns its connection)."""
    if not connection.in_atomic_block:
        try:
            connection.close()
        except DATABASE_ERRORS:
            pass


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]
