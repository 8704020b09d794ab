"""The worker fleet's writes: registration, heartbeats and the offline sweep (the Worker rows are written here
only), and the staff's remote-control commands (drain, resume, shutdown, queues)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

from django.conf import settings
from django.db import transaction
from django.db.models import Q
from django.utils import timezone
from kombu.exceptions import KombuError

from distillweb.celery import app as celery_app
from experiments.broker import timeout_options
from experiments.models import (
    Worker,
)
from experiments.selectors import fleet as fleet_reads

logger = logging.getLogger(__name__)


class WorkerNameInUse(Exception):
    """Another live worker process holds this Celery node name."""


def _holds_name(worker: Worker, *, hostname: str, pid: int, now: datetime,
                pid_alive: Callable[[int], bool] | None) -> bool:
    """Whether ``worker`` is a different process that still owns its name (online, with a fresh heartbeat).

    ``pid_alive`` lets a worker on the same host tell that the previous holder of its name has died (a restart
    after a crash), instead of waiting for its heartbeat to go stale.
    """
    if worker.state == Worker.State.OFFLINE or worker.last_heartbeat is None:
        return False
    if (worker.hostname, worker.pid) == (hostname, pid):
        return False
    if now - worker.last_heartbeat > timedelta(seconds=settings.WORKER_OFFLINE_AFTER_S):
        return False
    if worker.hostname == hostname and worker.pid is not None and pid_alive is not None:
        return pid_alive(worker.pid)
    return True


@transaction.atomic
def worker_register(
    *,
    name: str,
    hostname: str,
    pid: int,
    queues: list[str],
    versions: dict[str, str],
    pid_alive: Callable[[int], bool] | None = None,
    memory_total_bytes: int | None = None,
) -> Worker:
    """Register a worker, or raise WorkerNameInUse when another live worker process holds the name.

    ``memory_total_bytes``: the RAM its runs may use (pre-flight checks CPU runs against it)."""
    now = timezone.now()
    current = Worker.objects.select_for_update().filter(name=name).first()
    if current is not None and _holds_name(current, hostname=hostname, pid=pid, now=now, pid_alive=pid_alive):
        logger.error(
            "refused to register worker %s (pid %s on %s): pid %s on %s holds that name and is online",
            name,
            pid,
            hostname,
            current.pid,
            current.hostname,
        )
        raise WorkerNameInUse(
            f"Worker {name} is online as pid {current.pid} on {current.hostname}; start this worker with "
            "another node name (-n)."
        )
    worker, _ = Worker.objects.update_or_create(
        name=name,
        defaults={"hostname": hostname, "pid": pid, "queues": queues, "versions": versions,
                  "state": Worker.State.ONLINE, "started_at": now, "last_heartbeat": now,
                  "memory_total_bytes": memory_total_bytes},
    )
    return worker


def worker_heartbeat(*, name: str, gpus: list[dict] | None = None, hostname: str | None = None,
                     pid: int | None = None) -> bool:
    """Record a heartbeat (and the GPUs). With ``hostname`` and ``pid``, only the process that registered the
    name beats for it. False when there is no such row or it is marked offline (see ``worker_revive``)."""
    fields: dict[str, Any] = {"last_heartbeat": timezone.now()}
    if gpus is not None:
        fields["gpus"] = gpus
    workers = Worker.objects.filter(name=name).exclude(state=Worker.State.OFFLINE)
    if hostname is not None and pid is not None:
        workers = workers.filter(hostname=hostname, pid=pid)
    return bool(workers.update(**fields))


@transaction.atomic
def worker_revive(*, name: str, hostname: str, pid: int, consuming: list[str]) -> bool:
    """Bring back a worker that the offline sweep marked offline while it was only silent (a database outage).

    It comes back ``online`` on the queues it consumes now, or ``draining`` (its queues kept for resume) when
    it consumes none. False when the row belongs to another process or is not offline.
    """
    worker = (Worker.objects.select_for_update()
              .filter(name=name, hostname=hostname, pid=pid, state=Worker.State.OFFLINE).first())
    if worker is None:
        return False
    worker.last_heartbeat = timezone.now()
    if consuming:
        worker.state, worker.queues = Worker.State.ONLINE, sorted(consuming)
    else:
        worker.state = Worker.State.DRAINING
    worker.save(update_fields=["last_heartbeat", "state", "queues"])
    logger.info("worker %s is heartbeating again; back as %s", name, worker.state)
    return True


def worker_mark_offline(*, name: str, hostname: str | None = None, pid: int | None = None) -> None:
    """Mark a worker offline; with ``hostname`` and ``pid``, only if that process still holds the name."""
    workers = Worker.objects.filter(name=name)
    if hostname is not None and pid is not None:
        workers = workers.filter(hostname=hostname, pid=pid)
    workers.update(state=Worker.State.OFFLINE)


class FleetError(Exception):
    """A console action that could not be done; the message says why, for the page."""


def fleet_sweep() -> int:
    """Mark every worker whose last heartbeat is older than WORKER_OFFLINE_AFTER_S offline."""
    stale = timezone.now() - timedelta(seconds=settings.WORKER_OFFLINE_AFTER_S)
    return (Worker.objects.exclude(state=Worker.State.OFFLINE)
            .filter(Q(last_heartbeat__lt=stale) | Q(last_heartbeat__isnull=True))
            .update(state=Worker.State.OFFLINE))


def validate_queue_name(name: str) -> str:
    name = (name or "").strip()
    if not fleet_reads.QUEUE_NAME_RE.fullmatch(name):
        raise FleetError(
            "A queue name is 1–64 letters, digits and the characters _ . : - (for example gpu-80g)."
        )
    return name


def _live_worker(worker_id: int) -> Worker:
    """The worker if it is registered and heartbeating; otherwise a FleetError that says which it is not."""
    worker = Worker.objects.filter(pk=worker_id).first()
    if worker is None:
        raise FleetError("There is no such worker; it may have been removed. Reload the worker list.")
    offline, age = fleet_reads.is_offline(worker, timezone.now())
    if offline:
        since = f"its last heartbeat was {age:.0f} s ago" if age is not None else "it never sent a heartbeat"
        raise FleetError(f"Worker {worker.name} is offline ({since}), so it cannot take commands. "
                         f"Start it again to manage it.")
    return worker


def _reply_text(reply: dict[str, Any]) -> str:
    return str(reply.get("ok") or reply.get("error") or reply)


def _send(worker: Worker, command: str, *, wait: bool = True, **arguments: Any) -> dict[str, Any] | None:
    """Send one remote-control command to this worker only; its reply, or None when it did not answer."""
    timeout = settings.WORKER_CONTROL_TIMEOUT_S
    # Every socket operation is bounded too (a hung broker accepts connections and answers nothing), with a
    # margin over the reply wait, which polls with its own timeout.
    url = celery_app.conf.broker_write_url or celery_app.conf.broker_url
    conn = celery_app.connection_for_write(connect_timeout=timeout,
                                           transport_options=timeout_options(url, timeout + 2))
    try:
        with conn:
            conn.ensure_connection(
                max_retries=0
            )  # fail at once, instead of retrying forever, when it is down
            method = getattr(celery_app.control, command)
            if command == "ping":  # ping always waits for replies
                replies = method(destination=[worker.name], timeout=timeout, connection=conn)
            else:
                replies = method(**arguments, destination=[worker.name], reply=wait, timeout=timeout,
                                 connection=conn)
    except (KombuError, OSError, *conn.connection_errors, *conn.channel_errors) as exc:
        raise FleetError(f"The message broker could not be reached ({exc}); nothing was sent to "
                         f"{worker.name}.") from exc
    for reply in replies or []:
        if isinstance(reply, dict) and worker.name in reply:
            answer = reply[worker.name]
            return answer if isinstance(answer, dict) else {"ok": str(answer)}
    if wait:
        logger.warning("worker %s did not answer %s within %s s", worker.name, command, timeout)
    return None


def _no_answer(worker: Worker, what: str) -> FleetError:
    return FleetError(
        f"Worker {worker.name} did not answer within {settings.WORKER_CONTROL_TIMEOUT_S:g} s, so it was not "
        f"{what}. It may be busy starting up or stuck; check its log, or shut it down from its host."
    )


@transaction.atomic
def _record(worker_id: int, *, state: str | None = None, add_queue: str | None = None,
            remove_queue: str | None = None) -> Worker:
    worker = Worker.objects.select_for_update().filter(pk=worker_id).first()
    if worker is None:
        raise FleetError("The worker was removed while the command was sent; reload the worker list.")
    if state is not None and worker.state != Worker.State.OFFLINE:  # an exit recorded meanwhile wins
        worker.state = state
    if add_queue is not None and add_queue not in worker.queues:
        worker.queues = sorted([*worker.queues, add_queue])
    if remove_queue is not None:
        worker.queues = [q for q in worker.queues if q != remove_queue]
    worker.save(update_fields=["state", "queues"])
    return worker


def worker_drain(*, worker_id: int) -> str:
    """Stop the worker consuming its queues: it finishes the runs it has and takes no new one."""
    worker = _live_worker(worker_id)
    if not worker.queues:
        raise FleetError(f"Worker {worker.name} consumes no queue; there is nothing to drain.")
    answered, silent = [], []
    for queue in worker.queues:
        reply = _send(worker, "cancel_consumer", queue=queue)
        (silent if reply is None else answered).append((queue, reply))
    if not answered:
        raise _no_answer(worker, "drained")
    _record(worker.pk, state=Worker.State.DRAINING)
    text = "; ".join(_reply_text(reply) for _, reply in answered)
    message = f"{worker.name} is draining: it finishes its current run and takes no new work ({text})."
    if silent:
        message += f" It did not answer for {', '.join(q for q, _ in silent)}; drain it again."
    return message


def worker_resume(*, worker_id: int) -> str:
    """Consume the worker's queues again after a drain."""
    worker = _live_worker(worker_id)
    if not worker.queues:
        raise FleetError(f"Worker {worker.name} has no queues to resume; add one first.")
    answered, silent = [], []
    for queue in worker.queues:
        reply = _send(worker, "add_consumer", queue=queue)
        (silent if reply is None else answered).append((queue, reply))
    if not answered:
        raise _no_answer(worker, "resumed")
    _record(worker.pk, state=Worker.State.ONLINE)
    text = "; ".join(_reply_text(reply) for _, reply in answered)
    message = f"{worker.name} takes work again ({text})."
    if silent:
        message += f" It did not answer for {', '.join(q for q, _ in silent)}; resume it again."
    return message


def worker_shutdown(*, worker_id: int) -> str:
    """Warm shutdown: the worker stops taking work, finishes its current run and exits.

    Celery's ``shutdown`` command sends no reply (the worker raises its shutdown at once), so a ``ping`` first
    establishes that the worker is there to receive it.
    """
    worker = _live_worker(worker_id)
    if _send(worker, "ping") is None:
        raise _no_answer(worker, "shut down")
    _send(worker, "shutdown", wait=False)  # no reply comes: the worker begins its shutdown at once
    _record(worker.pk, state=Worker.State.DRAINING)
    return (f"{worker.name} answered and was told to shut down: it finishes its current run, then exits "
            f"and shows as offline.")


def worker_add_queue(*, worker_id: int, queue: str) -> str:
    queue = validate_queue_name(queue)
    worker = _live_worker(worker_id)
    if queue in worker.queues:
        raise FleetError(f"Worker {worker.name} already has the queue {queue}.")
    if worker.state == Worker.State.DRAINING:
        _record(worker.pk, add_queue=queue)
        return f"Added {queue} to {worker.name}; it consumes it when resumed."
    reply = _send(worker, "add_consumer", queue=queue)
    if reply is None:
        raise _no_answer(worker, f"given the queue {queue}")
    if "error" in reply:
        raise FleetError(f"Worker {worker.name} refused the queue {queue}: {_reply_text(reply)}")
    _record(worker.pk, add_queue=queue)
    return f"{worker.name}: {_reply_text(reply)}."


def worker_remove_queue(*, worker_id: int, queue: str) -> str:
    queue = validate_queue_name(queue)
    worker = _live_worker(worker_id)
    if queue not in worker.queues:
        raise FleetError(f"Worker {worker.name} does not have the queue {queue}.")
    if worker.queues == [queue]:
        raise FleetError(f"{queue} is the only queue of {worker.name}; drain the worker instead.")
    if worker.state == Worker.State.DRAINING:
        _record(worker.pk, remove_queue=queue)
        return f"Removed {queue} from {worker.name}; it will not consume it when resumed."
    reply = _send(worker, "cancel_consumer", queue=queue)
    if reply is None:
        raise _no_answer(worker, f"taken off the queue {queue}")
    _record(worker.pk, remove_queue=queue)
    return f"{worker.name}: {_reply_text(reply)}."
