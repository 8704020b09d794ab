"""The GPU worker fleet: reads for the staff console and the home page, and console actions.

Actions act on real workers through Celery's remote control (``cancel_consumer`` / ``add_consumer`` /
``shutdown``, sent to that worker only) and record the result on the Worker row only once the worker has
answered. Every refusal is a ``FleetError`` whose text is meant for the page.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta
from typing import Any

from amqp.exceptions import ChannelError
from django.conf import settings
from django.db import transaction
from django.db.models import Q
from django.urls import reverse
from django.utils import timezone
from kombu.exceptions import KombuError

from distillweb.celery import app as celery_app

from . import selectors
from .broker import timeout_options
from .humanize import ago
from .models import Run, Worker

logger = logging.getLogger(__name__)

QUEUE_NAME_RE = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")
GPU_BUSY_UTILIZATION_PCT = 10
GIB = 1024**3


class FleetError(Exception):
    """A console action that could not be done; the message says why, for the page."""


# --- reads ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class GpuView:
    """One GPU from a heartbeat, with its display text computed once (for the page and the JSON)."""

    index: int | None
    name: str
    uuid: str
    memory_used_bytes: int | None
    memory_total_bytes: int | None
    memory_pct: int
    memory_text: str
    utilization_pct: int | None
    utilization_text: str
    temperature_c: int | None
    temperature_text: str
    busy: bool


@dataclass
class WorkerRow:
    worker: Worker
    heartbeat_age_s: float | None
    offline: bool
    runs: list[Run]
    gpus: list[GpuView] = field(default_factory=list)

    @property
    def state(self) -> str:
        """What the worker is now: its recorded state, or offline when it has gone silent."""
        return Worker.State.OFFLINE if self.offline else self.worker.state


def _int_or_none(value: Any) -> int | None:
    try:
        return None if value is None or isinstance(value, bool) else int(value)
    except (TypeError, ValueError):
        return None


def gpu_views(raw: Any, *, has_run: bool) -> list[GpuView]:
    """The GPUs of a heartbeat (JSON from the worker) as display rows; malformed entries are skipped."""
    views = []
    for gpu in raw if isinstance(raw, list) else []:
        if not isinstance(gpu, dict):
            continue
        used, total = _int_or_none(gpu.get("memory_used_bytes")), _int_or_none(gpu.get("memory_total_bytes"))
        util = _int_or_none(gpu.get("utilization_pct"))
        temperature = _int_or_none(gpu.get("temperature_c"))
        known = used is not None and total
        views.append(GpuView(
            index=_int_or_none(gpu.get("index")),
            name=str(gpu.get("name", "GPU")),
            uuid=str(gpu.get("uuid", "")),
            memory_used_bytes=used,
            memory_total_bytes=total,
            memory_pct=max(0, min(100, round(100 * used / total))) if known else 0,
            memory_text=f"{used / GIB:.1f} / {total / GIB:.1f} GiB" if known else "memory unknown",
            utilization_pct=util,
            utilization_text=f"util {util}%" if util is not None else "util —",
            temperature_c=temperature,
            temperature_text=f"{temperature} °C" if temperature is not None else "— °C",
            busy=has_run or (util is not None and util > GPU_BUSY_UTILIZATION_PCT),
        ))
    return views


def _is_offline(worker: Worker, now: datetime) -> tuple[bool, float | None]:
    age = (now - worker.last_heartbeat).total_seconds() if worker.last_heartbeat else None
    offline = worker.state == Worker.State.OFFLINE or age is None or age > settings.WORKER_OFFLINE_AFTER_S
    return offline, age


def worker_rows() -> tuple[list[WorkerRow], list[Run]]:
    """Every registered worker with its heartbeat age, runs and GPUs; and running runs no worker row claims."""
    now = timezone.now()
    current = selectors.worker_current_runs()
    rows = []
    for worker in selectors.worker_list():
        offline, age = _is_offline(worker, now)
        runs = current.pop(worker.name, [])
        rows.append(WorkerRow(worker, age, offline, runs, gpu_views(worker.gpus, has_run=bool(runs))))
    orphans = [run for runs in current.values() for run in runs]
    return rows, orphans


def worker_row_data(row: WorkerRow) -> dict[str, Any]:
    """One row as plain JSON for the console's live refresh; the page inserts it as text, never as HTML."""
    worker = row.worker
    return {
        "id": worker.pk,
        "name": worker.name,
        "hostname": worker.hostname,
        "pid": worker.pid,
        "state": row.state,
        "reported_state": worker.state,
        "offline": row.offline,
        "heartbeat_age_s": row.heartbeat_age_s,
        "heartbeat_text": ago(row.heartbeat_age_s),
        "queues": list(worker.queues),
        "gpus": [asdict(gpu) for gpu in row.gpus],
        "runs": [
            {"id": run.pk, "url": reverse("experiments:run_detail", args=[run.pk]),
             "label": f"#{run.pk}", "detail": f"{run.experiment} · {run.step}/{run.total_steps}"}
            for run in row.runs
        ],
    }


def queue_depths(names: Iterable[str]) -> dict[str, int | None]:
    """Messages waiting in each broker queue; None for all of them when the broker cannot say."""
    names = sorted(set(names))
    timeout = settings.WORKER_CONTROL_TIMEOUT_S
    depths: dict[str, int | None] = {}
    try:
        with celery_app.connection_for_read(connect_timeout=timeout) as conn:
            conn.ensure_connection(max_retries=0)  # a page must not wait on a broker that is down
            channel = conn.default_channel
            for name in names:
                try:
                    depths[name] = channel.queue_declare(name, passive=True).message_count
                except ChannelError:
                    # No such queue: nothing waits in it (Redis keeps no key for an empty list). AMQP closes
                    # the channel after a failed passive declare, so continue on a new one.
                    depths[name] = 0
                    channel = conn.channel()
    except (KombuError, OSError, NotImplementedError) as exc:
        logger.warning("could not read queue depths from the broker: %s", exc)
        return dict.fromkeys(names)
    return depths


@dataclass(frozen=True)
class FleetSummary:
    workers_online: int
    workers_draining: int
    gpus_busy: int
    gpus_free: int
    queue_depths: dict[str, int | None]


def fleet_summary() -> FleetSummary:
    """Workers online, GPUs busy/free on live workers, and the depth of every queue runs or workers use."""
    rows, _ = worker_rows()
    live = [row for row in rows if not row.offline]
    gpus = [gpu for row in live for gpu in row.gpus]
    queues = {settings.RUN_QUEUE, *(q for row in live for q in row.worker.queues)}
    queues.update(Run.objects.filter(status=Run.Status.QUEUED).values_list("queue", flat=True).distinct())
    return FleetSummary(
        workers_online=sum(row.state == Worker.State.ONLINE for row in live),
        workers_draining=sum(row.state == Worker.State.DRAINING for row in live),
        gpus_busy=sum(gpu.busy for gpu in gpus),
        gpus_free=sum(not gpu.busy for gpu in gpus),
        queue_depths=queue_depths(queues),
    )


# --- writes ---------------------------------------------------------------------------------------
def fleet_sweep() -> int:
    """Mark every worker whose last heartbeat is older than WORKER_OFFLINE_AFTER_S offline."""
    stale = timezone.now() - timedelta(seconds=settings.WORKER_OFFLINE_AFTER_S)
    return (Worker.objects.exclude(state=Worker.State.OFFLINE)
            .filter(Q(last_heartbeat__lt=stale) | Q(last_heartbeat__isnull=True))
            .update(state=Worker.State.OFFLINE))


def validate_queue_name(name: str) -> str:
    name = (name or "").strip()
    if not QUEUE_NAME_RE.fullmatch(name):
        raise FleetError(
            "A queue name is 1–64 letters, digits and the characters _ . : - (for example gpu-80g)."
        )
    return name


def _live_worker(worker_id: int) -> Worker:
    """The worker if it is registered and heartbeating; otherwise a FleetError that says which it is not."""
    worker = Worker.objects.filter(pk=worker_id).first()
    if worker is None:
        raise FleetError("There is no such worker; it may have been removed. Reload the worker list.")
    offline, age = _is_offline(worker, timezone.now())
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
    # Every socket operation is bounded too (a hung broker accepts connections and answers nothing), with a margin
    # over the reply wait, which polls with its own timeout.
    url = celery_app.conf.broker_write_url or celery_app.conf.broker_url
    conn = celery_app.connection_for_write(connect_timeout=timeout,
                                           transport_options=timeout_options(url, timeout + 2))
    try:
        with conn:
            conn.ensure_connection(max_retries=0)  # fail at once, instead of retrying forever, when it is down
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
