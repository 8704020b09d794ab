"""Waiting in tests for what another process does (a worker training runs, a browser page, a server starting).

Every such wait follows the state it waits for (polls the database, the page or the process) until it is
reached, and gives up only after a bound that scales with the machine's load: the bound a test names is what
an idle machine needs with a margin, multiplied by ``DISTILLWEB_TEST_WAIT_SCALE`` (default 3). A busy CI
machine raises the scale (e.g. 10 at 5x load); nothing else changes. pytest-timeout's per-test guard scales
the same way (tests/conftest.py), so a slow machine is never cut off by it before a wait's own bound.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, TypeVar

if TYPE_CHECKING:
    from experiments.models import Run

T = TypeVar("T")

SCALE_VARIABLE = "DISTILLWEB_TEST_WAIT_SCALE"
DEFAULT_SCALE = 3.0


def wait_scale() -> float:
    """The factor every wait's bound is multiplied by (``DISTILLWEB_TEST_WAIT_SCALE``, default 3)."""
    raw = os.environ.get(SCALE_VARIABLE, "").strip()
    if not raw:
        return DEFAULT_SCALE
    try:
        scale = float(raw)
    except ValueError:
        raise ValueError(f"{SCALE_VARIABLE} must be a number, not {raw!r}") from None
    if not scale > 0:
        raise ValueError(f"{SCALE_VARIABLE} must be positive, not {raw!r}")
    return scale


def scaled(seconds: float) -> float:
    """An idle machine's bound in seconds, scaled for this machine."""
    return seconds * wait_scale()


def scaled_ms(seconds: float) -> int:
    """The same bound in milliseconds, for Playwright's ``timeout=`` arguments."""
    return int(scaled(seconds) * 1000)


def wait_until(condition: Callable[[], T], *, timeout: float, what: str, every: float = 0.25,
               check: Callable[[], None] | None = None, describe: Callable[[], str] | None = None) -> T:
    """Call ``condition()`` until it returns something truthy, and return that.

    Args:
        timeout: the idle machine's bound in seconds; the wait gives up after ``scaled(timeout)``.
        what: what is awaited, for the failure message.
        every: seconds between two polls.
        check: called on every poll; raises when waiting is pointless (e.g. the worker process died).
        describe: the state to report when the wait gives up (run statuses, a process's log).
    """
    deadline = time.monotonic() + scaled(timeout)
    while True:
        value = condition()
        if value:
            return value
        if check is not None:
            check()
        if time.monotonic() >= deadline:
            state = f"\n{describe()}" if describe is not None else ""
            raise AssertionError(f"gave up waiting for {what} after {scaled(timeout):.0f} s "
                                 f"({SCALE_VARIABLE}={wait_scale():g}){state}")
        time.sleep(every)


def wait_for_runs(runs: Iterable[Run | int], *, timeout: float, check: Callable[[], None] | None = None,
                  describe: Callable[[], str] | None = None) -> list[Run]:
    """Poll the database until every run is in a terminal state (succeeded, failed or cancelled); returns them
    ordered by id. ``timeout`` is the idle machine's bound for all of them together."""
    from experiments.models import Run

    ids = sorted(r if isinstance(r, int) else r.pk for r in runs)

    def finished() -> list[Run] | None:
        current = list(Run.objects.filter(id__in=ids).order_by("id"))
        return current if all(r.is_terminal for r in current) else None

    def state() -> str:
        runs_now = {r.id: (r.status, f"step {r.step}/{r.total_steps}", r.error[:200])
                    for r in Run.objects.filter(id__in=ids).order_by("id")}
        return f"runs: {runs_now}" + (f"\n{describe()}" if describe is not None else "")

    return wait_until(finished, timeout=timeout, what=f"runs {ids} to finish", every=0.5, check=check,
                      describe=state)
