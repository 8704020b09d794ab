"""Reads of what a run holds: its trainable and total parameters, its memory per rank, and whether its student
is a merged LoRA adapter (the run page, the leaderboard, the model page and the model card).

- **Parameters**: a LoRA run's result records ``student.trainable_params`` and ``student.total_params``
  (``workers.engine.adapters.counts``); a full fine-tuning run trains every weight, so trainable = total (the
  evaluated parameter count, else the student record's).
- **Memory per rank**: the peak of the run's ``gpu_memory_bytes`` points when it logged any (on CUDA, rank 0's
  maximum allocated memory), else the pre-flight estimate per rank (``routing.config_memory_estimate``) for
  where the run trains: on a CPU (its processes, no CUDA context) or on GPUs.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from django.db.models import Count, Max

from experiments.domain import routing
from experiments.models import MetricPoint, ModelSpec, Run, Worker

GPU_MEMORY_METRIC = "gpu_memory_bytes"


def lora_rank(train: Mapping[str, Any] | None) -> int:
    """The LoRA rank of a frozen config's training settings (0: full fine-tuning, or not a number)."""
    value = (train or {}).get("lora_r") if isinstance(train, Mapping) else None
    if isinstance(value, bool) or not isinstance(value, int | float):
        return 0
    return max(int(value), 0)


def adapter_text(train: Mapping[str, Any] | None) -> str:
    """"LoRA r=8, merged" for a run that trained LoRA adapters (its final model holds them merged into the
    weights), "LoRA r=8, 4-bit, merged" for QLoRA; "" for full fine-tuning."""
    rank = lora_rank(train)
    if not rank:
        return ""
    four_bit = ", 4-bit" if (train or {}).get("lora_4bit") is True else ""
    return f"LoRA r={rank}{four_bit}, merged"


@dataclass(frozen=True)
class ParameterCounts:
    """Trainable and total parameters of a run's student (None where not known yet)."""

    trainable: int | None
    total: int | None
    lora_r: int = 0

    @property
    def fraction(self) -> float | None:
        if self.trainable is None or not self.total:
            return None
        return self.trainable / self.total


@dataclass(frozen=True)
class RankMemory:
    """Memory per rank: ``measured`` (the peak of the run's CUDA points, rank 0) or the estimate; ``where``
    the run trains ("gpu", "cpu", or "" when not known), ``ranks`` how many ranks share the run."""

    bytes: int
    measured: bool
    where: str
    ranks: int
    complete: bool = True
    points: int = 0

    @property
    def label(self) -> str:
        if self.measured:
            return f"measured peak on rank 0 (CUDA, {self.points} point{'s' if self.points != 1 else ''})"
        where = {"cpu": " (CPU run)", "gpu": " (GPU run, not measured yet)"}.get(self.where, "")
        return f"estimate{where}" + ("" if self.complete else ", a lower bound: some sizes are unknown")


@dataclass(frozen=True)
class RunFootprint:
    parameters: ParameterCounts
    memory: RankMemory | None
    adapter: str


def run_trains_on_gpu(*, run: Run) -> bool | None:
    """Whether ``run`` trains (or trained) on a GPU: no when pinned to the CPU; else what its queue says
    (``gpu-…`` or ``cpu``); else whether the worker that took it has GPUs; None when nothing says."""
    train = (run.config or {}).get("train") or {}
    if str(train.get("device") or "auto") == "cpu":
        return False
    capacity = routing.queue_capacity(run.queue)
    if capacity is not None:
        return not capacity.is_cpu
    if run.worker_name:
        gpus = Worker.objects.filter(name=run.worker_name).values_list("gpus", flat=True).first()
        if gpus is not None:
            return bool(gpus)
    return None


def _parameters(run: Run, lora_r: int) -> ParameterCounts:
    student = (run.result or {}).get("student") or {}
    trainable, total = student.get("trainable_params"), student.get("total_params")
    if isinstance(trainable, int | float) and isinstance(total, int | float):
        return ParameterCounts(int(trainable), int(total), lora_r)
    params = student.get("params")
    total = int(params) if isinstance(params, int | float) and params else run.student.param_count
    if lora_r:  # counted by the engine when the adapters are attached; known once the run has finished
        return ParameterCounts(None, total, lora_r)
    return ParameterCounts(total, total, 0)


def _memory(run: Run, on_gpu: bool | None) -> RankMemory | None:
    measured = MetricPoint.objects.filter(run=run, name=GPU_MEMORY_METRIC).aggregate(
        peak=Max("value"), points=Count("pk"))
    if measured["peak"] is not None:
        return RankMemory(int(measured["peak"]), True, "gpu", 0, points=measured["points"])
    estimate = routing.config_memory_estimate(run.config or {}, reader=routing.model_shape_reader(),
                                              on_cpu=on_gpu is False)
    if not estimate.model_bytes:  # no model could be sized: a CUDA context alone says nothing
        return None
    size = estimate.model_bytes if on_gpu is False else estimate.total_bytes
    where = "" if on_gpu is None else "gpu" if on_gpu else "cpu"
    return RankMemory(size, False, where, estimate.ranks, complete=estimate.complete)


def run_footprint(*, run: Run, on_gpu: bool | None) -> RunFootprint:
    """The run page's parameters and memory per rank; ``on_gpu`` from :func:`run_trains_on_gpu`. At most one
    query for the measured peak (plus the model sizes an estimate reads)."""
    train = (run.config or {}).get("train") or {}
    rank = lora_rank(train)
    return RunFootprint(_parameters(run, rank), _memory(run, on_gpu), adapter_text(train))


def model_adapter(*, spec: ModelSpec) -> str:
    """For a model registered from a run: that run's adapter text ("LoRA r=8, merged"), "" otherwise. No query
    when ``spec.source_run`` was selected with it."""
    if spec.source != ModelSpec.Source.RUN or spec.source_run_id is None or spec.source_run is None:
        return ""
    return adapter_text((spec.source_run.config or {}).get("train"))
