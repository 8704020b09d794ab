"""Out of memory: the RAM this process may use (the host's, or its cgroup's limit), and what a run that ran
out of memory is told — which part of the estimate was largest and what to change (batch, length, ranks)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .memory import MIB, MemoryEstimate, ModelShapeReader, estimate_run_memory, size_text
from .model_files import positive_int

# The models' part of an estimate: what the batch size and max length do not change.
MODEL_COMPONENTS = ("student_weights", "student_grads", "optimizer_states", "teacher_weights")


def host_memory_bytes() -> int | None:
    """RAM this process may use: the host's physical memory, or its cgroup's limit when lower (a container
    with a memory limit, where the kernel's out-of-memory killer acts at that limit); None when neither is
    known."""
    try:
        physical: int | None = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, OSError, ValueError):  # not a POSIX host
        physical = None
    known = [n for n in (physical, _cgroup_memory_limit()) if n and n > 0]
    return min(known) if known else None


def _cgroup_memory_limit() -> int | None:
    """The memory limit of this process's cgroup (v2 ``memory.max``, v1 ``memory.limit_in_bytes``), or
    None."""
    folders = [Path("/sys/fs/cgroup")]
    try:
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            hierarchy, _, path = line.partition(":")[2].partition(":")
            if hierarchy in ("", "memory") and path not in ("", "/"):
                folders.insert(0, Path("/sys/fs/cgroup") / path.lstrip("/"))
                folders.insert(1, Path("/sys/fs/cgroup/memory") / path.lstrip("/"))
    except OSError:
        pass
    folders.append(Path("/sys/fs/cgroup/memory"))
    for folder in folders:
        for name in ("memory.max", "memory.limit_in_bytes"):
            try:
                text = (folder / name).read_text().strip()
            except OSError:
                continue
            if text.isdigit() and int(text) < 2**60:  # "max" or a huge number: no limit
                return int(text)
    return None


def safe_estimate(
    config: Mapping[str, Any], *, reader: ModelShapeReader | None = None
) -> MemoryEstimate | None:
    """:func:`estimate_run_memory`, or None when the config cannot be read (a message must still be
    written)."""
    try:
        return estimate_run_memory(config, reader=reader)
    except Exception:
        return None


def out_of_memory_message(
    config: Mapping[str, Any],
    *,
    headline: str,
    gpu: bool,
    estimate: MemoryEstimate | None = None,
    available_bytes: int | None = None,
) -> str:
    """What the run page says when a run ran out of memory: ``headline``, the run's estimate and what to
    change.

    Args:
        config: the run's config (``RunConfig.to_dict`` or the frozen ``Run.config``).
        headline: the first sentence, e.g. "Out of GPU memory at step 12."
        gpu: GPU memory ran out (the estimate's total, a bigger GPU as advice); else the host's RAM
            (the estimate without the CUDA context, a GPU queue as advice).
        estimate: the run's estimate; computed from ``config`` when None.
        available_bytes: the RAM of the machine, quoted when known (RAM only).
    """
    estimate = estimate if estimate is not None else safe_estimate(config)
    sentences = [headline.rstrip(".") + "."]
    models_first = False
    if estimate is None or not (estimate.total_bytes if gpu else estimate.model_bytes):
        sentences.append("The run's memory could not be estimated.")
    else:
        figure = estimate.total_bytes if gpu else estimate.model_bytes
        kind = "GPU memory" if gpu else "RAM"
        largest = sorted(
            (row for row in estimate.breakdown() if row[0] != "CUDA context"), key=lambda r: -r[1]
        )[:3]
        parts = ", ".join(
            f"{label if label.startswith('AdamW') else label[0].lower() + label[1:]} {text}"
            for label, _, text in largest
        )
        bound = "at least " if not estimate.complete else ""
        approx = size_text(figure) if figure < MIB else f"~{size_text(figure)}"
        each = f" per rank ({estimate.ranks} ranks, {estimate.strategy})" if estimate.ranks > 1 else ""
        text = f"The run's estimate is {bound}{approx} of {kind}{each}: {parts}"
        if not gpu and available_bytes:
            text += f"; this machine has {size_text(available_bytes)}"
        sentences.append(text + ".")
        models = sum(getattr(estimate, name) for name in MODEL_COMPONENTS)
        models_first = models * 2 > figure
        if models_first:
            sentences.append(
                "Most of it is the models' weights, gradients and optimizer states, which a smaller "
                "batch does not shrink."
            )
    sentences.append(_out_of_memory_advice(config, gpu=gpu, estimate=estimate, models_first=models_first))
    return " ".join(sentences)


def _out_of_memory_advice(
    config: Mapping[str, Any], *, gpu: bool, estimate: MemoryEstimate | None, models_first: bool
) -> str:
    """The changes that shrink the run, those that matter most first."""
    train = config.get("train") or {}
    batch = positive_int(train.get("batch_size")) or 64
    accum = positive_int(train.get("grad_accum_steps")) or 1
    options = []
    if batch > 1:
        options.append(
            f"a smaller batch size (now {batch}; batch size {batch // 2} with {accum * 2} gradient "
            f"accumulation steps trains on the same {(batch // 2) * accum * 2} rows per step)"
        )
    student = config.get("student") or {}
    if student.get("source") != "builtin":
        length = positive_int((config.get("dataset") or {}).get("max_length")) or 128
        options.append(f"a shorter max length (now {length})")
    options.insert(0 if models_first else len(options), "a smaller student or teacher")
    if gpu:
        needed = (
            f" (more than {size_text(estimate.total_bytes)})"
            if estimate and estimate.total_bytes >= MIB
            else ""
        )
        options.append(f"a queue with a bigger GPU{needed}")
    else:
        options.append("a GPU queue (training device auto, on a worker with a GPU)")
    return "What to change: " + ", ".join(options[:-1]) + f", or {options[-1]}."
