"""Database sessions of worker processes: a frozen worker never holds a run's row for long.

A worker paused in the middle of a transaction (SIGSTOP, a VM pause, a swap storm) keeps its row locks, and
the update that hands its run to another worker would wait for it as long as it sleeps. Every Postgres session
a worker opens therefore ends a transaction left idle for a quarter of the run lease (at least a few seconds):
Postgres closes the session and releases its locks, and the paused worker, when it wakes, finds its
transaction gone and, through the run's fencing, writes nothing more. Worker transactions never wait on
anything but the database (files are read before a transaction opens), so a live worker never comes near the
limit.
"""

from __future__ import annotations

from typing import Any

from celery.signals import worker_init
from django.conf import settings
from django.db.backends.signals import connection_created

MIN_IDLE_IN_TRANSACTION_S = 5


def idle_in_transaction_timeout_ms() -> int:
    return int(1000 * max(MIN_IDLE_IN_TRANSACTION_S, settings.RUN_HEARTBEAT_TIMEOUT_S / 4))


def _bound_idle_transactions(sender: Any, connection: Any, **_kwargs: Any) -> None:
    if connection.vendor == "postgresql":
        with connection.cursor() as cursor:
            cursor.execute(f"SET idle_in_transaction_session_timeout = {idle_in_transaction_timeout_ms():d}")


@worker_init.connect
def _on_worker_init(**_kwargs: Any) -> None:
    """In a worker (before its pool starts, so every pool process inherits it), for every new connection."""
    connection_created.connect(_bound_idle_transactions, dispatch_uid="distillweb-worker-idle-in-transaction")
