"""Reads of the worker fleet: workers with their GPUs and current runs, queue depths and the fleet summary."""

from __future__ import annotations

import logging
import re
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any

from amqp.exceptions import ChannelError
from django.conf import settings
from django.db.models import (
    QuerySet,
)
from django.urls import reverse
from django.utils import timezone
from kombu.exceptions import KombuError

from distillweb.celery import app as celery_app
from experiments.humanize import ago
from experiments.models import Run, Worker

logger = logging.getLogger(__name__)


QUEUE_NAME_RE = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")


GPU_BUSY_UTILIZATION_PCT = 10


GIB = 1024**3


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


def is_offline(worker: Worker, now: datetime) -> tuple[bool, float | None]:
    age = (now - worker.last_heartbeat).total_seconds() if worker.last_heartbeat else None
    offline = worker.state == Worker.State.OFFLINE or age is None or age > settings.WORKER_OFFLINE_AFTER_S
    return offline, age


def worker_rows() -> tuple[list[WorkerRow], list[Run]]:
    """Every registered worker with its heartbeat age, runs and GPUs; and running runs no worker row
    claims."""
    now = timezone.now()
    current = worker_current_runs()
    rows = []
    for worker in worker_list():
        offline, age = is_offline(worker, now)
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


def worker_list() -> QuerySet[Worker]:
    return Worker.objects.all()


def worker_current_runs() -> dict[str, list[Run]]:
    runs: dict[str, list[Run]] = defaultdict(list)
    for run in Run.objects.filter(status=Run.Status.RUNNING).select_related("experiment"):
        runs[run.worker_name].append(run)
    return runs
