"""The pre-flight check of memory (``preflight.experiment_preflight``'s "GPU memory" row).

Each distinct run shape of an experiment (student, teacher, recipe, and the swept settings that change tensor
sizes: batch size and the resources) is estimated from its frozen config (``workers.engine.memory``, per rank)
and routed like a new run (``routing.route``):

- a run no online worker can take is a warning; one larger than any GPU is an error;
- a multi-GPU run (``gpus`` > 1) says what it needs, e.g. "needs 4 GPUs with ≥ 38 GiB each", and is a warning
  when no online worker serves a group of that many GPUs with that much memory each (``gpu-<K>x<N>g``), or
  when it goes to a queue that declares no group at all (the worker that takes it may have one GPU);
- a run that trains on the CPU (pinned to it, sent to the ``cpu`` queue, or on the ``auto`` device while no
  GPU queue is declared and no worker that takes it has a GPU) holds its estimate in RAM once per CPU process:
  with the headroom, more than the largest RAM among the workers that take it (``Worker.memory_total_bytes``),
  or, when none of them has reported it, than this machine's, is an error;
- a 4-bit QLoRA run (``lora_r`` > 0 with ``lora_4bit``) that would train on the CPU by the same rule is an
  error: bitsandbytes' 4-bit layers need a CUDA GPU, and the worker would refuse the run when it starts.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from django.conf import settings
from django.utils import timezone

from experiments.domain import engine_config, routing, sweep_plan
from experiments.models import DatasetSpec, Experiment, ModelSpec, Recipe, Worker
from workers.engine.memory import MemoryEstimate
from workers.engine.out_of_memory import MODEL_COMPONENTS, host_memory_bytes

if TYPE_CHECKING:
    from experiments.domain.preflight import Check

# The largest single GPU a queue can declare (routing.COMMON_GPU_GIB): a run above it fits no GPU at all.
LARGEST_GPU_BYTES = max(routing.COMMON_GPU_GIB) * 1024**3
# Swept training settings that change what one rank holds: each combination is sized on its own.
SHAPE_AXES = ("batch_size", "gpus", "processes", "strategy", "precision", "activation_checkpointing",
              "lora_r", "lora_4bit")


@dataclass(frozen=True)
class RunShape:
    """One distinct kind of run of the experiment, for the memory estimate."""

    label: str
    config: dict[str, Any]


def _kinds(*, teacher: ModelSpec | None, students: Sequence[ModelSpec], recipes: Sequence[Recipe],
           assistant: ModelSpec | None, with_baseline: bool) -> list[tuple[str, ModelSpec, Recipe | None,
                                                                           ModelSpec | None]]:
    """(label, student, recipe, teacher) of every distinct run of the experiment's models and recipes."""
    kinds: list[tuple[str, ModelSpec, Recipe | None, ModelSpec | None]] = []
    for student in students:
        for recipe in recipes:
            if recipe.scheme == Recipe.Scheme.HARD_LABELS:
                continue
            if recipe.scheme == Recipe.Scheme.TEACHER_ASSISTANT and assistant is not None:
                kinds.append((f"{assistant} · {recipe} (assistant stage)", assistant, recipe, teacher))
                kinds.append((f"{student} · {recipe}", student, recipe, assistant))
                continue
            kinds.append((f"{student} · {recipe}", student, recipe, teacher))
            if recipe.scheme == Recipe.Scheme.SELF_DISTILLATION:
                kinds.append((f"{student} · {recipe} (later generations)", student, recipe, student))
        if with_baseline:
            kinds.append((f"{student} · baseline", student, None, None))
    return kinds


def _point_label(point: dict[str, Any]) -> str:
    """", batch 64" and, where the resources are not the defaults, ", 4 GPUs, fsdp, bf16, checkpointed"."""
    text = f", batch {point['batch_size']}"
    if point.get("gpus", 1) != 1:
        text += f", {point['gpus']} GPUs"
    if point.get("processes", 1) != 1:
        text += f", {point['processes']} CPU processes"
    for key in ("strategy", "precision"):
        if point.get(key, "auto") != "auto":
            text += f", {point[key]}"
    if point.get("activation_checkpointing"):
        text += ", checkpointed"
    rank, four_bit = _qlora_rank(point)
    if rank:
        text += f", LoRA r={rank}" + (", 4-bit" if four_bit else "")
    return text


def _qlora_rank(train: dict[str, Any]) -> tuple[int, bool]:
    """(LoRA rank, 4-bit) of training settings: (0, False) without an adapter."""
    rank = train.get("lora_r")
    if isinstance(rank, bool) or not isinstance(rank, int | float) or rank <= 0:
        return 0, False
    return int(rank), train.get("lora_4bit") is True


def run_shapes(*, dataset: DatasetSpec, teacher: ModelSpec | None, students: Sequence[ModelSpec],
               recipes: Sequence[Recipe], train: dict[str, Any], assistant: ModelSpec | None = None,
               extra_teachers: Sequence[ModelSpec] = (), with_baseline: bool = True) -> list[RunShape]:
    """A frozen config for every distinct (student, teacher, recipe, batch size, resources) of the experiment.

    Chained recipes are sized by the models their stages load (the assistant as a student, then as the
    teacher; a self-distilled student as its own teacher). Term sweeps and the other training settings change
    no tensor size and are left out (their first value is used).
    """
    axes = sweep_plan.train_axes(train)
    base = {k: v for k, v in train.items() if k not in axes and k != "term_sweeps"}
    base.update({k: v[0] for k, v in axes.items()})
    base.setdefault("batch_size", engine_config.TRAIN_DEFAULTS["batch_size"])
    points = sweep_plan.grid_points({k: axes[k] for k in SHAPE_AXES if k in axes})
    weights = [1.0 / (1 + len(extra_teachers))] * (1 + len(extra_teachers))
    kinds = _kinds(teacher=teacher, students=students, recipes=recipes, assistant=assistant,
                   with_baseline=with_baseline)
    shapes: list[RunShape] = []
    for point in points:
        values = {**base, **point}
        experiment = Experiment(dataset=dataset, train=values)
        for label, student, recipe, run_teacher in kinds:
            config = engine_config.build_run_config(
                experiment=experiment,
                student=student,
                recipe=recipe,
                seed=0,
                teacher=run_teacher,
                extra_teachers=extra_teachers,
                teacher_weights=weights,
            )
            shapes.append(RunShape(f"{label}{_point_label(values)}", config))
    return shapes


@dataclass(frozen=True)
class CpuRam:
    """The RAM a CPU run may find: the largest among the workers that take it, or this machine's when none of
    them has reported it (``where`` says which, for the message)."""

    memory_bytes: int | None
    where: str


def _worker_hosts() -> list[dict[str, Any]]:
    """The worker table, once: what a CPU run's RAM check needs of each worker."""
    fresh_since = timezone.now() - timedelta(seconds=settings.WORKER_OFFLINE_AFTER_S)
    rows = Worker.objects.values("state", "last_heartbeat", "queues", "gpus", "memory_total_bytes")
    return [{**row, "online": row["state"] == Worker.State.ONLINE and row["last_heartbeat"] is not None
             and row["last_heartbeat"] >= fresh_since} for row in rows]


def cpu_ram(estimate: MemoryEstimate, queue: str, *, fleet: routing.FleetQueues,
            workers: Sequence[dict[str, Any]]) -> CpuRam | None:
    """The RAM a run on ``queue`` finds when it trains on the CPU; None when it trains on a GPU.

    It trains on the CPU when pinned to it (``train.device``), on the ``cpu`` queue, or on the ``auto`` device
    on a queue that declares no GPU while no GPU queue is declared at all and none of the workers that take it
    has a GPU. Those workers are the online ones consuming the queue, else every registered one that has it.
    """
    takers = [w for w in workers if isinstance(w["queues"], list) and queue in w["queues"]]
    takers = [w for w in takers if w["online"]] or takers
    if estimate.needs_gpu and queue != routing.CPU_QUEUE:
        if estimate.device != "auto" or routing.queue_capacity(queue) is not None:
            return None  # pinned to a GPU, or on a gpu-<N>g queue
        if any(not c.is_cpu for c in fleet.declared(fleet.known)) or any(w["gpus"] for w in takers):
            return None
        takers = [w for w in takers if not w["gpus"]]
    reported = [w["memory_total_bytes"] for w in takers if w["memory_total_bytes"]]
    if reported:
        return CpuRam(max(reported), "the largest CPU worker")
    return CpuRam(host_memory_bytes(), "this machine")


def ram_needed_bytes(estimate: MemoryEstimate) -> int:
    """The RAM a CPU run needs: its estimate (no CUDA context on a CPU) for each of its processes, with the
    router's headroom."""
    return math.ceil(estimate.host_bytes * routing.HEADROOM)


@dataclass(frozen=True)
class _Sized:
    """One run shape with its estimate, its queue and why it would wait there (None: it is taken)."""

    shape: RunShape
    estimate: MemoryEstimate
    queue: str
    reason: str | None


@dataclass(frozen=True)
class _Sizes:
    """Every shape estimated and routed (``rows``); those that train on the CPU, estimated there (its
    processes), with the RAM they find (``on_cpu``); and the 4-bit QLoRA shapes that would train on the CPU
    (``qlora_on_cpu``)."""

    rows: list[_Sized]
    on_cpu: list[tuple[RunShape, MemoryEstimate, CpuRam]]
    qlora_on_cpu: list[_Sized]


def _size(shapes: Sequence[RunShape], fleet: routing.FleetQueues) -> _Sizes:
    reader = routing.model_shape_reader()
    sizes = _Sizes([], [], [])
    workers: list[dict[str, Any]] | None = None
    for shape in shapes:
        estimate = routing.config_memory_estimate(shape.config, reader=reader)
        queue = routing.route(estimate, fleet)
        reason = routing.queue_reason(queue=queue, fleet=fleet, estimate=lambda e=estimate: e)
        if reason is None and routing.multi_gpu(estimate) and routing.queue_capacity(queue) is None:
            group = routing.smallest_gpu_queue_for(routing.needed_bytes(estimate), estimate.ranks)
            reason = (f"{shape.label} {routing.gpus_needed_text(estimate)} and goes to queue '{queue}', "
                      "which declares no GPU group: the worker that takes it may have fewer GPUs (a worker "
                      f"that owns them serves '{group}').")
        sized = _Sized(shape, estimate, queue, reason)
        sizes.rows.append(sized)
        # Where a run trains does not depend on its size: a QLoRA run of unknown size is placed too.
        four_bit = _qlora_rank(shape.config.get("train") or {})[1]
        if not (estimate.complete or four_bit):
            continue
        workers = _worker_hosts() if workers is None else workers
        ram = cpu_ram(estimate, queue, fleet=fleet, workers=workers)
        if ram is None:
            continue
        if four_bit:
            sizes.qlora_on_cpu.append(sized)
        if estimate.complete and ram.memory_bytes:
            there = routing.config_memory_estimate(shape.config, reader=reader, on_cpu=True)
            sizes.on_cpu.append((shape, there, ram))
    return sizes


def _why_on_cpu(row: _Sized) -> str:
    """Why a run trains on the CPU (``cpu_ram``'s rule), for a message."""
    if not row.estimate.needs_gpu:
        return "it is pinned to the CPU (device cpu)"
    if row.queue == routing.CPU_QUEUE:
        return f"it goes to queue '{routing.CPU_QUEUE}'"
    return f"no GPU queue is declared and no worker that takes queue '{row.queue}' has a GPU"


def check_qlora(qlora_on_cpu: Sequence[_Sized], *, details: Sequence[str] = ()) -> Check | None:
    """The error for 4-bit QLoRA runs that would train on the CPU (None when there are none)."""
    from experiments.domain.preflight import Check

    if not qlora_on_cpu:
        return None
    first = qlora_on_cpu[0]
    others = [f"Also on the CPU with 4-bit QLoRA: {r.shape.label}." for r in qlora_on_cpu[1:]]
    return Check(
        "memory",
        "GPU memory",
        "error",
        f"{first.shape.label} uses 4-bit QLoRA, which needs a CUDA GPU with bitsandbytes, but it would train "
        f"on the CPU: {_why_on_cpu(first)}. Turn 4-bit QLoRA off, or run it on a GPU queue that an online "
        "GPU worker serves.",
        (*others, *details),
        field="lora_4bit",
    )


def _largest(sized: Sequence[_Sized]) -> tuple[str, list[str]]:
    """The summary line of the largest run, and its breakdown."""
    if not sized:
        return "No run could be sized.", []
    row = max(sized, key=lambda r: r.estimate.total_bytes)
    estimate = row.estimate
    parts = ", ".join(f"{label} {text}" for label, _, text in estimate.breakdown())
    if routing.multi_gpu(estimate):
        line = (f"Largest run: ~{estimate.total_text} per GPU ({row.shape.label}, {estimate.ranks} ranks, "
                f"{estimate.strategy}); it {routing.gpus_needed_text(estimate)} and goes to queue "
                f"'{row.queue}'.")
        return line, [f"Breakdown of the largest, per GPU: {parts}."]
    where = "runs on the CPU" if not estimate.needs_gpu else f"goes to queue '{row.queue}'"
    return f"Largest run: ~{estimate.total_text} ({row.shape.label}); it {where}.", [
        f"Breakdown of the largest: {parts}."
    ]


def check_memory(shapes: Sequence[RunShape], *, fleet: routing.FleetQueues | None = None) -> Check:
    from experiments.domain.preflight import Check

    title = "GPU memory"
    if not shapes:
        return Check("memory", title, "notice", "No runs to size.")
    fleet = fleet if fleet is not None else routing.fleet_queues()
    sizes = _size(shapes, fleet)
    rows, on_cpu = sizes.rows, sizes.on_cpu
    too_big = [r for r in rows if r.estimate.complete and r.estimate.needs_gpu
               and routing.needed_bytes(r.estimate) > LARGEST_GPU_BYTES]
    unknown = [r for r in rows if not r.estimate.complete]
    waiting = [r for r in rows if r.reason]
    largest, details = _largest([r for r in rows if r.estimate.complete])
    for row in unknown:
        details.append(f"{row.shape.label}: size unknown ({', '.join(row.estimate.unknown)}), at least "
                       f"~{row.estimate.total_text}.")
    short_of_ram = [(s, e, r) for s, e, r in on_cpu if ram_needed_bytes(e) > r.memory_bytes]
    if on_cpu:
        shape, estimate, ram = max(on_cpu, key=lambda row: row[1].host_bytes)
        details.append(f"Largest CPU run: needs about {routing.size_text(ram_needed_bytes(estimate))} of RAM "
                       f"({shape.label}); {ram.where} has {routing.size_text(ram.memory_bytes)}.")
    qlora = check_qlora(sizes.qlora_on_cpu, details=(largest, *details))
    if qlora is not None:
        return qlora
    if too_big:
        shape, estimate = too_big[0].shape, too_big[0].estimate
        return Check(
            "memory",
            title,
            "error",
            f"{shape.label} needs ~{estimate.total_text} of GPU memory "
            f"({routing.size_text(routing.needed_bytes(estimate))} with headroom), more than any single GPU "
            f"({routing.size_text(LARGEST_GPU_BYTES)}). Use a smaller batch, student or teacher"
            f"{'' if estimate.strategy == 'fsdp' else ', or several GPUs with the fsdp strategy'}.",
            (largest, *details),
            field="batch_size",
        )
    if short_of_ram:
        shape, estimate, ram = max(short_of_ram, key=lambda row: row[1].host_bytes)
        models = sum(getattr(estimate, name) for name in MODEL_COMPONENTS)
        processes = f" in {estimate.ranks} processes" if estimate.ranks > 1 else ""
        return Check(
            "memory",
            title,
            "error",
            f"{shape.label} trains on the CPU{processes} and needs about "
            f"{routing.size_text(ram_needed_bytes(estimate))} of RAM "
            f"(~{routing.size_text(estimate.host_bytes)}"
            f" estimated, with {round((routing.HEADROOM - 1) * 100)}% headroom); {ram.where} has "
            f"{routing.size_text(ram.memory_bytes)}. Use a smaller student, teacher or batch, "
            "or a GPU queue.",
            (largest, *details),
            field="students" if models * 2 > estimate.model_bytes else "batch_size",
        )
    if waiting:
        reasons = sorted({r.reason for r in waiting if r.reason})
        return Check("memory", title, "warning", f"{largest} Some runs will wait: {reasons[0]}",
                     (*reasons[1:], *details))
    if unknown:
        return Check("memory", title, "unknown", f"{largest} Some models could not be sized.", tuple(details))
    return Check("memory", title, "ok", largest, tuple(details))
