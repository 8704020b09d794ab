"""Worker registry: each ``celery worker`` registers itself when ready and heartbeats from a thread.

The thread lives in the worker's main process (not in the pool children), so heartbeats continue while a
child trains. A worker that stops heartbeating shows as offline once its last heartbeat is older than
WORKER_OFFLINE_AFTER_S.
"""

from __future__ import annotations

import logging
import os
import platform
import socket
import threading
from importlib import metadata

from celery.signals import worker_ready, worker_shutdown
from django.conf import settings
from django.db import close_old_connections

logger = logging.getLogger(__name__)

_stop = threading.Event()


def software_versions() -> dict[str, str]:
    """Versions without importing torch in the worker's parent process (it must not touch CUDA)."""
    versions = {"python": platform.python_version()}
    for package in ("torch", "transformers", "celery", "django"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = "missing"
    return versions


def _heartbeat_loop(name: str, interval: float) -> None:
    from experiments import services

    while not _stop.wait(interval):
        try:
            close_old_connections()
            services.worker_heartbeat(name=name)
        except Exception:  # a database blip must not kill the heartbeat thread; the next beat retries
            logger.exception("worker heartbeat failed")


@worker_ready.connect
def register_worker(sender, **_kwargs) -> None:
    from experiments import services

    name = sender.hostname
    queues = sorted(q.name for q in sender.task_consumer.queues) if sender.task_consumer else []
    services.worker_register(
        name=name, hostname=socket.gethostname(), pid=os.getpid(), queues=queues, versions=software_versions()
    )
    _stop.clear()
    threading.Thread(
        target=_heartbeat_loop,
        args=(name, settings.WORKER_HEARTBEAT_INTERVAL_S),
        name="distillweb-heartbeat",
        daemon=True,
    ).start()
    logger.info("registered worker %s on queues %s", name, ", ".join(queues))


@worker_shutdown.connect
def unregister_worker(sender, **_kwargs) -> None:
    from experiments import services

    _stop.set()
    try:
        close_old_connections()
        services.worker_mark_offline(name=sender.hostname)
    except Exception:
        logger.exception("could not mark worker %s offline", sender.hostname)
