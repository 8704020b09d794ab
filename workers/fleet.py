"""Worker registry: each ``celery worker`` registers itself when ready and heartbeats from a thread.

The thread lives in the worker's main process (not in the pool children), so heartbeats continue while a
child trains. Registration records the RAM the worker's runs may use (the host's, or its cgroup's limit),
which pre-flight checks CPU runs against. Each beat carries the GPUs this worker may use, read through NVML
(``workers.gpus``; never torch, which must not touch CUDA in this process). A worker that stops heartbeating
shows as offline once its last heartbeat is older than WORKER_OFFLINE_AFTER_S, and the ``workers.fleet_sweep``
beat task marks it so.
"""

from __future__ import annotations

import logging
import os
import platform
import socket
import threading
from importlib import metadata
from typing import Any

from celery.signals import worker_ready, worker_shutdown
from django.conf import settings
from django.db import close_old_connections

from . import gpus
from .engine.out_of_memory import host_memory_bytes

logger = logging.getLogger(__name__)

_stop = threading.Event()
# Set when this process registered; a worker refused its name must not beat for, or unregister, the holder.
_registered: dict[str, Any] = {}


def software_versions() -> dict[str, str]:
    """Versions without importing torch in the worker's parent process (it must not touch CUDA)."""
    versions = {"python": platform.python_version()}
    for package in ("torch", "transformers", "celery", "django"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = "missing"
    versions.update(gpus.cuda_versions())
    return versions


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists on this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def consumed_queues(consumer: Any) -> list[str]:
    """The queues the worker consumes right now (none while drained)."""
    task_consumer = getattr(consumer, "task_consumer", None)
    return sorted(q.name for q in task_consumer.queues) if task_consumer else []


def beat(*, name: str, hostname: str, pid: int, consumer: Any) -> None:
    """One heartbeat with the GPUs; a worker the sweep marked offline while it was silent comes back."""
    from experiments.services import fleet

    inventory = gpus.read_gpus()
    if not fleet.worker_heartbeat(name=name, gpus=inventory, hostname=hostname, pid=pid):
        if fleet.worker_revive(name=name, hostname=hostname, pid=pid, consuming=consumed_queues(consumer)):
            fleet.worker_heartbeat(name=name, gpus=inventory, hostname=hostname, pid=pid)


def _heartbeat_loop(name: str, hostname: str, pid: int, consumer: Any, interval: float) -> None:
    while not _stop.wait(interval):
        try:
            close_old_connections()
            beat(name=name, hostname=hostname, pid=pid, consumer=consumer)
        except Exception:  # a database blip must not kill the heartbeat thread; the next beat retries
            logger.exception("worker heartbeat failed")


@worker_ready.connect
def register_worker(sender, **_kwargs) -> None:
    from experiments.services import fleet

    name, hostname, pid = sender.hostname, socket.gethostname(), os.getpid()
    queues = consumed_queues(sender)
    try:
        fleet.worker_register(name=name, hostname=hostname, pid=pid, queues=queues,
                                 versions=software_versions(), pid_alive=pid_alive,
                                 memory_total_bytes=host_memory_bytes())
    except fleet.WorkerNameInUse as exc:
        logger.error("not registered: %s", exc)
        return
    _registered.update(name=name, hostname=hostname, pid=pid)
    beat(name=name, hostname=hostname, pid=pid, consumer=sender)  # the GPUs show at once, not after a beat
    _stop.clear()
    threading.Thread(
        target=_heartbeat_loop,
        args=(name, hostname, pid, sender, settings.WORKER_HEARTBEAT_INTERVAL_S),
        name="distillweb-heartbeat",
        daemon=True,
    ).start()
    logger.info("registered worker %s on queues %s", name, ", ".join(queues))


@worker_shutdown.connect
def unregister_worker(sender, **_kwargs) -> None:
    from experiments.services import fleet

    _stop.set()
    if not _registered:
        return
    try:
        close_old_connections()
        fleet.worker_mark_offline(name=_registered["name"], hostname=_registered["hostname"],
                                     pid=_registered["pid"])
    except Exception:
        logger.exception("could not mark worker %s offline", _registered["name"])
