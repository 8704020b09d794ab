"""The stall watchdog: a run whose work stopped advancing is stopped, even though its worker is alive.

A hung training process (a stuck collective, a read from a hung network filesystem, a lock never released)
keeps its worker alive, so its lease alone would be renewed forever. The reporter's heartbeat thread
(workers.reporting) asks a :class:`Watchdog` at every beat whether anything advanced: every callback that
shows progress (a training step, a progress update of any phase, a metric point, a checkpoint) marks it. When
nothing advanced for RUN_STALL_TIMEOUT_S the reporter stops renewing the lease, records the stall
(``lifecycle.run_stalled``: requeued once, failed on the next stall) and calls :func:`stop_stuck_work`, which
ends the hung code: the process groups of this process's children (a multi-process run's ranks), then the
Celery pool process itself. Celery's main process sees its pool child die, starts a fresh one, and takes the
next task; the run's message finds the run already recorded and claims nothing.

The decision logic is pure (an injected clock) and imports nothing of Django.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

LOADING, TRAINING, EVALUATION = "loading", "training", "evaluation"


@dataclass(frozen=True)
class Stall:
    """What the watchdog saw when it gave up: ``idle_s`` seconds without progress, at ``step`` in
    ``phase``."""

    idle_s: float
    step: int
    phase: str


class Watchdog:
    """Tracks when the run last advanced, its step and its phase; ``check()`` says when it stalled.

    ``timeout_s`` <= 0 turns it off. Thread-safe: the training thread marks progress, the heartbeat thread
    checks. Once it has reported a stall it stays stalled (``stall``) and reports nothing more.
    """

    def __init__(self, *, timeout_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.timeout_s = timeout_s
        self.clock = clock
        self.step = 0
        self.phase = LOADING
        self.eval_every = 0  # the engine evaluates after every such step (0: only after the last)
        self.total = 0
        self.stall: Stall | None = None
        self._last = clock()
        self._lock = threading.Lock()

    def progress(self, *, step: int | None = None, phase: str | None = None) -> None:
        """Something advanced now (optionally: the step reached, the phase it belongs to)."""
        with self._lock:
            self._last = self.clock()
            if step is not None:
                self.step = step
            if phase:
                self.phase = phase

    def step_done(self, step: int, total: int) -> None:
        """A training step finished: training goes on, or an evaluation follows (every ``eval_every`` steps
        and after the last)."""
        self.total = total
        evaluates = step >= total or (self.eval_every > 0 and step % self.eval_every == 0)
        self.progress(step=step, phase=EVALUATION if evaluates else TRAINING)

    def metrics(self, step: int, names: Iterable[str]) -> None:
        """Metric points of ``step``; evaluation results (``eval/…``, ``val/…``) before the last step end a
        periodic evaluation: training goes on."""
        done_evaluating = step < self.total and any(n.startswith(("eval/", "val/")) for n in names)
        self.progress(step=step, phase=TRAINING if done_evaluating else None)

    def idle_s(self) -> float:
        with self._lock:
            return self.clock() - self._last

    def check(self) -> Stall | None:
        """The stall, once (the first call that finds nothing advanced for ``timeout_s``); else None."""
        if self.timeout_s <= 0 or self.stall is not None:
            return None
        with self._lock:
            idle = self.clock() - self._last
            if idle < self.timeout_s:
                return None
            self.stall = Stall(idle_s=idle, step=self.step, phase=self.phase)
            return self.stall


# --- ending the stuck work ------------------------------------------------------------------------------
def in_pool_process() -> bool:
    """True in a Celery prefork pool process (billiard names them ``ForkPoolWorker-N``): killing it leaves the
    worker up. In the worker's main process (solo pool), a test's process or a CLI, nothing may be killed."""
    try:
        from billiard.process import current_process
    except ImportError:  # pragma: no cover - billiard comes with celery
        return False
    return "PoolWorker" in current_process().name


def child_pids(parent: int) -> list[int]:
    """The pids whose parent is ``parent`` (read from /proc; empty where there is none)."""
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):  # exited meanwhile
            continue
        if int(fields[1]) == parent:
            children.append(int(stat.parent.name))
    return children


def kill_children(parent: int) -> list[int]:
    """SIGKILL every child of ``parent`` with its process group when it leads one of its own (torchrun's
    ranks), else alone. Returns the pids it signalled."""
    own_group = os.getpgid(parent)
    killed = []
    for pid in child_pids(parent):
        try:
            group = os.getpgid(pid)
            if group == pid and group != own_group:
                os.killpg(group, signal.SIGKILL)
            else:
                os.kill(pid, signal.SIGKILL)
            killed.append(pid)
        except ProcessLookupError:
            continue
    return killed


def stop_stuck_work(*, kill: Callable[[int, int], None] = os.kill) -> bool:
    """End the hung run: its child processes (with their process groups), then this pool process. Only in a
    Celery pool process (False elsewhere: there the engine stops at its next poll, if it ever wakes)."""
    if not in_pool_process():
        return False
    pid = os.getpid()
    children = kill_children(pid)
    logger.error("stall watchdog: killing the stuck pool process %s (and children %s)", pid, children)
    for handler in logging.getLogger().handlers:
        try:
            handler.flush()
        except Exception:  # noqa: BLE001 - flushing is a courtesy before the kill
            pass
    kill(pid, signal.SIGKILL)
    return True
