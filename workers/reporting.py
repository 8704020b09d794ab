"""Bridges the engine's callbacks to the database, batching writes so they never slow training down."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from pathlib import Path

from django.db import InterfaceError, OperationalError, connection

from experiments import selectors, services


class RunReporter:
    """Buffers metric points and throttles progress writes and cancellation polls for one run delivery.

    ``owned`` turns False when the run was taken over by another delivery or cancelled; the engine then stops
    at its next poll.
    """

    def __init__(self, *, run_id: int, task_id: str, flush_every_s: float = 2.0, max_buffer: int = 500,
                 poll_every_s: float = 2.0, clock=time.monotonic) -> None:
        self.run_id = run_id
        self.task_id = task_id
        self.flush_every_s = flush_every_s
        self.max_buffer = max_buffer
        self.poll_every_s = poll_every_s
        self.clock = clock
        self.owned = True
        self.cancel_requested = False
        self._buffer: list[tuple[str, int, float, datetime]] = []
        self._last_flush = clock()
        self._last_progress = 0.0
        self._last_poll = float("-inf")  # the first poll always reads the database
        self._last_step_time: tuple[int, float] | None = None

    # --- engine callbacks -------------------------------------------------------------------------
    def on_metrics(self, step: int, metrics: dict[str, float]) -> None:
        now = datetime.now(UTC)
        self._buffer.extend((name, step, float(value), now) for name, value in metrics.items())
        if len(self._buffer) >= self.max_buffer or self.clock() - self._last_flush >= self.flush_every_s:
            self.flush()

    def on_progress(self, step: int, total: int) -> None:
        now = self.clock()
        if now - self._last_progress < 1.0 and step < total:
            return
        rate = None
        if self._last_step_time is not None and now > self._last_step_time[1]:
            rate = (step - self._last_step_time[0]) / (now - self._last_step_time[1])
        self._last_step_time = (step, now)
        self._last_progress = now
        self.owned = _retrying(services.run_report_progress,
            run_id=self.run_id, task_id=self.task_id, step=step, total=total, samples_per_s=None if rate is None
            else rate * self._batch_size
        ) and self.owned

    def on_checkpoint(self, step: int, path: str) -> None:
        # Points up to the checkpoint must be durable before it counts, so a resume never loses any.
        self.flush()
        _retrying(services.run_record_checkpoint, run_id=self.run_id, task_id=self.task_id, step=step, path=Path(path))

    def should_stop(self) -> bool:
        now = self.clock()
        if now - self._last_poll >= self.poll_every_s:
            self._last_poll = now
            self.cancel_requested = _retrying(selectors.run_is_cancel_requested, run_id=self.run_id)
        return self.cancel_requested or not self.owned

    # --- plumbing ---------------------------------------------------------------------------------
    _batch_size = 1

    def set_batch_size(self, batch_size: int) -> None:
        self._batch_size = batch_size

    def flush(self) -> None:
        if self._buffer:
            batch, self._buffer = self._buffer, []
            self.owned = _retrying(services.run_record_metrics, run_id=self.run_id, task_id=self.task_id,
                                   points=batch) and self.owned
        self._last_flush = self.clock()


def _retrying(write, **kwargs):
    """Run a database call; if the connection died during a long training run, reconnect once and retry."""
    try:
        return write(**kwargs)
    except (OperationalError, InterfaceError):
        if connection.in_atomic_block:
            raise
        connection.close()
        return write(**kwargs)
