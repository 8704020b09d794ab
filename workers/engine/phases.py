"""Progress of a run's long phases other than the training steps, for a caller's ``Callbacks.on_phase``.

Phases (``on_phase(phase, done, total)``, ``total`` 0 when unknown):

- ``loading``: the dataset read, each tokenisation, each model load (student, teachers, a resumed checkpoint):
  ``(0, 1)`` when a part starts, ``(1, 1)`` when it ends;
- ``teacher_cache``: a teacher-output cache entry being filled, rows done / rows, per batch;
- ``seq_kd``: seq_kd's teacher continuations being generated, rows done / rows, per batch;
- ``evaluation``: the student's evaluation (eval split or validation slice), rows done / rows, per batch;
- ``teacher_evaluation``: the teacher's own metrics at the end of a run, rows done / rows, per batch;
- ``saving``: a checkpoint, the best weights or the final model being written: ``(0, 1)`` then ``(1, 1)``.

The training steps report through ``on_progress``, not here.

The engine's code reports without carrying the callback around: :func:`reporting` installs the run's
``on_phase`` (a context variable: a run on another thread reports to its own caller; with several ranks only
rank 0 installs one), :func:`part` reports the start and end of one part of a phase, :func:`within` names the
phase that rows belong to, and :func:`track` reports the rows done as a loop consumes batches. Outside
:func:`reporting` (or within it without a callback) every call does nothing.

Rate: the first and the last report of a part always pass; those in between pass at most ``MAX_PER_SECOND``
times a second per phase (:class:`PhaseLimiter`).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterable, Iterator
from contextvars import ContextVar
from typing import Any, TypeVar

LOADING, TEACHER_CACHE, SEQ_KD = "loading", "teacher_cache", "seq_kd"
EVALUATION, TEACHER_EVALUATION, SAVING = "evaluation", "teacher_evaluation", "saving"
PHASES = (LOADING, TEACHER_CACHE, SEQ_KD, EVALUATION, TEACHER_EVALUATION, SAVING)
MAX_PER_SECOND = 4.0

OnPhase = Callable[[str, int, int], None]
T = TypeVar("T")


class PhaseLimiter:
    """Passes reports to ``on_phase`` at a bounded rate: a part's first (``done`` 0) and last (``done`` >=
    ``total`` > 0) report and the first report of a phase other than the last one sent always pass (unless
    they repeat the last report sent); the others pass when ``per_second`` allows, per phase."""

    def __init__(
        self,
        on_phase: OnPhase,
        *,
        per_second: float = MAX_PER_SECOND,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.on_phase, self.interval, self.clock = on_phase, 1.0 / per_second, clock
        self._last: dict[str, float] = {}  # when each phase last passed
        self._sent: tuple[str, int, int] | None = None

    def report(self, phase: str, done: int, total: int) -> bool:
        """Forward ``(phase, done, total)`` if the rate allows; True when it was forwarded."""
        report = (phase, int(done), int(total))
        if report == self._sent:
            return False
        now = self.clock()
        boundary = done == 0 or 0 < total <= done or self._sent is None or self._sent[0] != phase
        last = self._last.get(phase)
        if not boundary and last is not None and now - last < self.interval:
            return False
        self._last[phase], self._sent = now, report
        self.on_phase(*report)
        return True


_limiter: ContextVar[PhaseLimiter | None] = ContextVar("phase_limiter", default=None)
_phase: ContextVar[str | None] = ContextVar("phase", default=None)


@contextlib.contextmanager
def reporting(
    on_phase: OnPhase | None, *, per_second: float | None = None, clock: Callable[[], float] = time.monotonic
) -> Iterator[PhaseLimiter | None]:
    """Route this context's reports to ``on_phase`` (None: nowhere), at most ``per_second`` (default
    ``MAX_PER_SECOND``) in-between reports a second per phase."""
    limiter = (
        PhaseLimiter(on_phase, per_second=per_second or MAX_PER_SECOND, clock=clock) if on_phase else None
    )
    token = _limiter.set(limiter)
    try:
        yield limiter
    finally:
        _limiter.reset(token)


def report(phase: str, done: int, total: int = 0) -> None:
    """Report ``done`` of ``total`` in ``phase`` (subject to the rate limit); nothing without a reporter."""
    limiter = _limiter.get()
    if limiter is not None:
        limiter.report(phase, done, total)


@contextlib.contextmanager
def within(phase: str) -> Iterator[None]:
    """Rows that :func:`track` reports in this context belong to ``phase`` (the innermost one wins)."""
    token = _phase.set(phase)
    try:
        yield
    finally:
        _phase.reset(token)


@contextlib.contextmanager
def part(phase: str) -> Iterator[None]:
    """One part of ``phase`` (a model load, a tokenisation, a checkpoint write): ``(0, 1)`` at its start,
    ``(1, 1)`` when it ends without an error."""
    report(phase, 0, 1)
    with within(phase):
        yield
    report(phase, 1, 1)


def track(batches: Iterable[T], total: int) -> Iterator[T]:
    """Yield ``batches`` and report the rows done (``len`` of each batch, capped at ``total``) in the current
    phase of :func:`within`, after the loop has consumed each batch; without a phase or a reporter, only
    yield them."""
    phase = _phase.get()
    if phase is None or _limiter.get() is None:
        yield from batches
        return
    done = 0
    report(phase, 0, total)
    for batch in batches:
        yield batch
        done += _rows_in(batch)
        report(phase, min(done, total) if total else done, total)


def _rows_in(batch: Any) -> int:
    try:
        return len(batch)
    except TypeError:
        return 1
