"""Route each run to a queue by the GPU memory it needs, and say why a queued run is still waiting.

Queues declare their memory by name: ``gpu-<N>g`` (one GPU of N GiB: ``gpu-24g``, ``gpu-80g``, ``gpu-141g``),
``gpu-<K>x<N>g`` (a group of K GPUs of N GiB each on one host, served by a worker that owns them all:
``gpu-4x80g``) and ``cpu`` (no GPU: runs pinned to the CPU, and small ones). A run of ``gpus`` > 1 (estimated
per GPU: ``workers.engine.memory``) fits only a group of at least that many GPUs, each holding its per-GPU
estimate; a one-GPU run fits any GPU queue that holds it, the single GPUs first. Any other name, like the
default ``training``, has an unknown capacity and takes any run. With ``RUN_ROUTING=auto`` (the default) a
new run goes to:

1. the smallest declared queue an online worker consumes that fits the run's estimate × ``HEADROOM``
   (``cpu`` counts as the smallest);
2. else ``RUN_QUEUE``, when an online worker consumes it and it declares no memory (unknown capacity:
   accepted);
3. else the smallest declared queue that fits among those of every registered worker, offline and draining
   ones included: the run waits for that worker to come back;
4. else ``gpu-<N>g`` (``gpu-<K>x<N>g`` for K GPUs) for the smallest common GPU size that fits: a queue no
   worker has yet.

A multi-GPU run never takes step 2: a queue of unknown capacity may be served by a single GPU.

While no registered worker declares a queue (the embedded default, a fleet on ``training`` only) every run
goes to ``RUN_QUEUE``, as with ``RUN_ROUTING=off``. A run whose size cannot be read (a hub model outside the
local cache) goes to ``RUN_QUEUE`` when it is served, else to the largest online GPU queue.

The estimate (``workers.engine.memory``) is computed from the frozen config, never stored in it: the engine's
``RunConfig.from_dict`` refuses unknown keys, and the config stays exactly what the worker trains. Why a
queued run waits is computed on read as well (:func:`run_queue_reason`), from one read of the worker table.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

from django.conf import settings
from django.utils import timezone

from experiments.domain.engine_config import RUN_OUTPUT_RE
from experiments.models import Run, Worker
from workers.engine.memory import GIB, MIB, MemoryEstimate, ModelShapeReader, estimate_run_memory, size_text

logger = logging.getLogger(__name__)

HEADROOM = 1.1  # allocator fragmentation, and the estimate's own error
CPU_QUEUE = "cpu"
# A run on the "auto" device this small (without the CUDA context) trains acceptably on a CPU worker.
CPU_SMALL_RUN_BYTES = 512 * MIB
# Total memory of common GPUs, in GiB as their queues name it (NVML reports a little less: an "80 GB" H100 has
# 79.6 GiB, a "24 GB" A10 22.5 GiB).
COMMON_GPU_GIB = (8, 12, 16, 24, 32, 40, 48, 64, 80, 94, 96, 141, 192, 288)
# A GPU is named after the smallest common size it reaches at least this fraction of.
COMMON_SIZE_MIN_FRACTION = 0.85
GPU_QUEUE_RE = re.compile(r"^gpu-(?:(\d{1,2})x)?(\d{1,5})g$")


# --- queue names --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class QueueCapacity:
    """What a declared queue offers: ``gpu_count`` GPUs of ``gpu_memory_bytes`` each, or None for ``cpu``."""

    name: str
    gpu_memory_bytes: int | None
    gpu_count: int = 1

    @property
    def is_cpu(self) -> bool:
        return self.gpu_memory_bytes is None

    @property
    def sort_key(self) -> tuple[int, int, int]:
        """``cpu`` first, then GPU queues from the fewest GPUs, then from the smallest."""
        return (0, 0, 0) if self.gpu_memory_bytes is None else (1, self.gpu_count, self.gpu_memory_bytes)

    def fits(self, estimate: MemoryEstimate) -> bool:
        """Whether a run of this estimate may go here (the estimate must be complete to mean anything).

        ``cpu`` takes runs pinned to the CPU and small one-GPU runs on the ``auto`` device; a GPU queue takes
        runs pinned to the CPU too, and the others when it has at least their GPUs and their per-GPU estimate
        with headroom is within each GPU's memory.
        """
        if self.gpu_memory_bytes is None:
            return not estimate.needs_gpu or (
                estimate.device == "auto" and estimate.ranks == 1
                and estimate.model_bytes <= CPU_SMALL_RUN_BYTES
            )
        return not estimate.needs_gpu or (
            self.gpu_count >= estimate.ranks and needed_bytes(estimate) <= self.gpu_memory_bytes)


def queue_capacity(name: str) -> QueueCapacity | None:
    """``gpu-80g`` → one GPU of 80 GiB; ``gpu-4x80g`` → four of 80 GiB; ``cpu`` → no GPU; None for any other
    name (unknown capacity)."""
    if name == CPU_QUEUE:
        return QueueCapacity(name, None)
    match = GPU_QUEUE_RE.fullmatch(name)
    count = int(match[1]) if match and match[1] else 1
    if match and int(match[2]) > 0 and count > 0:
        return QueueCapacity(name, int(match[2]) * GIB, count)
    return None


def gpu_queue_name(memory_total_bytes: int) -> str:
    """The queue a GPU of this much memory serves: whole GiB rounded up to the common size it nearly reaches
    (79.6 GiB → ``gpu-80g``, 22.5 GiB → ``gpu-24g``), else the whole GiB it has (``gpu-20g``)."""
    whole = max(1, math.floor(memory_total_bytes / GIB))
    for size in COMMON_GPU_GIB:
        if size >= whole:
            return f"gpu-{size if whole >= COMMON_SIZE_MIN_FRACTION * size else whole}g"
    return f"gpu-{whole}g"


def gpu_group_queue_name(count: int, memory_total_bytes: int) -> str:
    """The queue a worker owning ``count`` GPUs of this much memory each serves for multi-GPU runs
    (``gpu-4x80g``); one GPU is :func:`gpu_queue_name`'s ``gpu-<N>g``."""
    single = gpu_queue_name(memory_total_bytes)
    return single if count <= 1 else single.replace("gpu-", f"gpu-{count}x", 1)


def needed_bytes(estimate: MemoryEstimate) -> int:
    """The GPU memory a run asks of a queue: its estimate with the headroom."""
    return math.ceil(estimate.total_bytes * HEADROOM)


def smallest_gpu_queue_for(n_bytes: int, gpus: int = 1) -> str:
    """``gpu-<N>g`` for the smallest common GPU size that holds ``n_bytes`` (whole GiB beyond the largest);
    ``gpu-<K>x<N>g`` for a group of ``gpus`` such GPUs."""
    gib = n_bytes / GIB
    size = next((s for s in COMMON_GPU_GIB if s >= gib), math.ceil(gib))
    return f"gpu-{gpus}x{size}g" if gpus > 1 else f"gpu-{size}g"


def multi_gpu(estimate: MemoryEstimate) -> bool:
    """Whether the run needs a group of GPUs (several ranks on GPUs)."""
    return estimate.needs_gpu and estimate.ranks > 1


def gpus_needed_text(estimate: MemoryEstimate) -> str:
    """What a run asks of a queue, in words: "needs 4 GPUs with ≥ 38 GiB each" (whole GiB, headroom
    included) or, for one GPU, "needs a GPU with ≥ 12 GiB"."""
    each = f"≥ {math.ceil(needed_bytes(estimate) / GIB)} GiB"
    if multi_gpu(estimate):
        return f"needs {estimate.ranks} GPUs with {each} each"
    return f"needs a GPU with {each}"


# --- the fleet ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class FleetQueues:
    """The queues of the registered workers: consumed by an online worker, held by a draining one, and all."""

    online: frozenset[str] = frozenset()
    draining: frozenset[str] = frozenset()
    known: frozenset[str] = frozenset()

    def declared(self, names: Iterable[str]) -> list[QueueCapacity]:
        """The declared queues among ``names``, smallest first (``cpu`` before any GPU)."""
        found = (queue_capacity(name) for name in names)
        return sorted((c for c in found if c is not None), key=lambda c: (c.sort_key, c.name))


def fleet_queues() -> FleetQueues:
    """Read the worker table once. Online means in state online with a heartbeat within WORKER_OFFLINE_AFTER_S
    (the fleet console's rule); a draining worker consumes nothing."""
    fresh_since = timezone.now() - timedelta(seconds=settings.WORKER_OFFLINE_AFTER_S)
    online: set[str] = set()
    draining: set[str] = set()
    known: set[str] = set()
    for state, heartbeat, queues in Worker.objects.values_list("state", "last_heartbeat", "queues"):
        names = {q for q in queues if isinstance(q, str)} if isinstance(queues, list) else set()
        known |= names
        if heartbeat is None or heartbeat < fresh_since:
            continue
        if state == Worker.State.ONLINE:
            online |= names
        elif state == Worker.State.DRAINING:
            draining |= names
    return FleetQueues(frozenset(online), frozenset(draining), frozenset(known))


# --- estimates ----------------------------------------------------------------------------------------------
def model_shape_reader(*, runs: Iterable[Run] = (), query: bool = True) -> ModelShapeReader:
    """A shape reader for this site: ``run`` models under ARTIFACT_ROOT, and a run that has not written its
    model yet sized by the student it trains, taken from ``runs`` or (when ``query``) read once per run id."""
    configs: dict[int, Any] = {run.pk: run.config for run in runs if run.pk is not None}

    def pending_run(path: str) -> Mapping[str, Any] | None:
        match = RUN_OUTPUT_RE.fullmatch(path)
        if match is None:
            return None
        run_id = int(match[1])
        if run_id not in configs and query:
            configs[run_id] = Run.objects.filter(pk=run_id).values_list("config", flat=True).first()
        config = configs.get(run_id)
        student = config.get("student") if isinstance(config, dict) else None
        return student if isinstance(student, dict) else None

    return ModelShapeReader(artifact_root=Path(settings.ARTIFACT_ROOT), pending_run=pending_run)


def config_memory_estimate(
    config: Mapping[str, Any], *, reader: ModelShapeReader, on_cpu: bool = False
) -> MemoryEstimate:
    """The estimate of a frozen config, per rank (``on_cpu``: as it trains on a CPU, with its processes).
    Never raises: an estimate is advice, and a config it cannot read (which the worker will report properly)
    must not stop an experiment from being created or a page from showing, so a failure gives an estimate of
    unknown size."""
    try:
        return estimate_run_memory(config, reader=reader, on_cpu=on_cpu)
    except Exception:
        logger.exception("could not estimate the memory of a run config")
        return MemoryEstimate(unknown=("the run's models",))


def run_memory_estimate(*, run: Run, reader: ModelShapeReader | None = None) -> MemoryEstimate:
    """The run's estimated peak GPU memory, from its frozen config."""
    return config_memory_estimate(run.config, reader=reader or model_shape_reader())


# --- routing ------------------------------------------------------------------------------------------------
def route(estimate: MemoryEstimate, fleet: FleetQueues) -> str:
    """The queue for a new run of this estimate (the rules are in the module docstring)."""
    if settings.RUN_ROUTING == "off" or not fleet.declared(fleet.known):
        return settings.RUN_QUEUE
    run_queue_accepts = settings.RUN_QUEUE in fleet.online and queue_capacity(settings.RUN_QUEUE) is None
    online = fleet.declared(fleet.online)
    if multi_gpu(estimate):
        # A queue of unknown capacity may be served by one GPU: a group run waits for a group instead.
        run_queue_accepts = False
        online = [c for c in online if c.is_cpu or c.gpu_count >= estimate.ranks]
    if not estimate.complete:
        gpu = [c for c in online if not c.is_cpu]
        if multi_gpu(estimate) and gpu:
            return max(gpu, key=lambda c: (c.gpu_memory_bytes, c.gpu_count)).name
        return settings.RUN_QUEUE if run_queue_accepts or not gpu else gpu[-1].name
    for capacity in online:
        if capacity.fits(estimate):
            return capacity.name
    if run_queue_accepts:
        return settings.RUN_QUEUE
    for capacity in fleet.declared(fleet.known):
        if capacity.fits(estimate):
            return capacity.name
    return smallest_gpu_queue_for(needed_bytes(estimate), estimate.ranks if multi_gpu(estimate) else 1)


class RunRouter:
    """Routes the runs of one experiment: the worker table is read once, each model's size once."""

    def __init__(self, *, fleet: FleetQueues | None = None) -> None:
        self.enabled = settings.RUN_ROUTING != "off"
        if fleet is None and self.enabled:
            fleet = fleet_queues()
        self.fleet = fleet
        self.reader = model_shape_reader()

    def queue_for(self, config: Mapping[str, Any]) -> str:
        """The queue for a new run with this frozen config."""
        if not self.enabled or self.fleet is None:
            return settings.RUN_QUEUE
        if not self.fleet.declared(self.fleet.known):
            return settings.RUN_QUEUE  # nothing to route between: skip the estimate
        return route(config_memory_estimate(config, reader=self.reader), self.fleet)


# --- why a queued run waits ---------------------------------------------------------------------------------
def queue_reason(*, queue: str, fleet: FleetQueues, estimate: Callable[[], MemoryEstimate]) -> str | None:
    """Why a run ready to start on ``queue`` is not taken, or None when an online worker consumes the queue.

    Args:
        estimate: the run's estimate, called only when the reason needs it (a GPU queue nobody serves).
    """
    if queue in fleet.online:
        return None
    capacity = queue_capacity(queue)
    if capacity is not None and not capacity.is_cpu:
        run = estimate()
        if run.complete and multi_gpu(run):
            return _group_reason(run, fleet)
        if run.complete and run.needs_gpu:
            gpus = [c for c in fleet.declared(fleet.online) if not c.is_cpu]
            if gpus and not any(c.fits(run) for c in gpus):
                largest = max(gpus, key=lambda c: (c.gpu_memory_bytes, c.gpu_count))
                return (
                    f"Needs ~{size_text(run.total_bytes)} of GPU memory ({size_text(needed_bytes(run))} with "
                    f"{round((HEADROOM - 1) * 100)}% headroom); no online worker serves a queue with that "
                    f"much (largest: {largest.name})."
                )
    reason = f"No online worker consumes queue '{queue}'."
    if queue in fleet.draining:
        reason += " The workers that have it are draining."
    return reason


def _group_reason(run: MemoryEstimate, fleet: FleetQueues) -> str | None:
    """Why a multi-GPU run finds no worker: no online group has that many GPUs with that much memory each."""
    groups = [c for c in fleet.declared(fleet.online) if not c.is_cpu]
    if any(c.fits(run) for c in groups):
        return None  # the run's queue is another fitting group: the generic reason says it is not consumed
    largest = max(groups, key=lambda c: (c.gpu_count, c.gpu_memory_bytes), default=None)
    return (
        f"The run {gpus_needed_text(run)} (~{size_text(run.total_bytes)} per GPU estimated, "
        f"{run.strategy}, with {round((HEADROOM - 1) * 100)}% headroom); no online worker serves a group "
        f"that large (largest: {largest.name if largest else 'none'})."
    )


@dataclass(frozen=True)
class QueueNotice:
    """Why a queued run waits, with its memory estimate for the page (None where it was not needed)."""

    reason: str
    estimate: MemoryEstimate | None = None


def _ready_to_start(run: Run) -> bool:
    return run.status == Run.Status.QUEUED and run.waiting_for_id is None


def run_queue_notice(*, run: Run, fleet: FleetQueues | None = None) -> QueueNotice | None:
    """Why this queued run waits for a worker (None when it is not queued, waits for another run, or its queue
    is consumed), with its memory estimate."""
    if not _ready_to_start(run):
        return None
    fleet = fleet if fleet is not None else fleet_queues()
    estimate = _Lazy(lambda: run_memory_estimate(run=run))
    reason = queue_reason(queue=run.queue, fleet=fleet, estimate=estimate)
    return QueueNotice(reason, estimate()) if reason else None


def run_queue_reason(*, run: Run, fleet: FleetQueues | None = None) -> str | None:
    """The text of :func:`run_queue_notice`: e.g. "No online worker consumes queue 'gpu-80g'."."""
    notice = run_queue_notice(run=run, fleet=fleet)
    return notice.reason if notice else None


@dataclass
class QueueNoticeGroup:
    """One reason and the runs of an experiment it holds back."""

    reason: str
    run_ids: list[int] = field(default_factory=list)


def experiment_queue_notices(*, runs: Sequence[Run]) -> list[QueueNoticeGroup]:
    """Why the experiment's queued runs wait, grouped by reason: one worker-table read whatever the number of
    runs (none when no run is ready to start), and no further query (upstream runs are sized from
    ``runs``)."""
    ready = [run for run in runs if _ready_to_start(run)]
    if not ready:
        return []
    fleet = fleet_queues()
    reader = model_shape_reader(runs=runs, query=False)
    groups: dict[str, QueueNoticeGroup] = {}
    for run in ready:
        reason = queue_reason(queue=run.queue, fleet=fleet,
                              estimate=lambda run=run: run_memory_estimate(run=run, reader=reader))
        if reason:
            groups.setdefault(reason, QueueNoticeGroup(reason)).run_ids.append(run.pk)
    return list(groups.values())


class _Lazy:
    """Computes a value on the first call and returns the same one after."""

    def __init__(self, compute: Callable[[], MemoryEstimate]) -> None:
        self._compute = compute
        self._value: MemoryEstimate | None = None

    def __call__(self) -> MemoryEstimate:
        if self._value is None:
            self._value = self._compute()
        return self._value
