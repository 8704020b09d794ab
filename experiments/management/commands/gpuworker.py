"""`manage.py gpuworker`: start one Celery worker process per GPU of this host, each pinned to its GPU, or one
per group of GPUs for runs that span several (``--gpus-per-worker N`` or ``--groups 0,1,2,3 4,5,6,7``).

Each GPU gets ``celery -A distillweb worker -Q gpu-<N>g -n gpu<index>@%h --concurrency 1`` with
``CUDA_VISIBLE_DEVICES=<index>``, where N is the GPU's memory in GiB rounded to its common size (an 80 GB H100
reports 79.6 GiB: ``gpu-80g``), so the router (experiments.domain.routing) sends it the runs that fit. The
GPUs are read through NVML (workers.gpus), whose indices are in PCI bus order; the workers get
``CUDA_DEVICE_ORDER=PCI_BUS_ID`` so that CUDA numbers the GPUs the same way.

A group of K GPUs gets one worker with ``CUDA_VISIBLE_DEVICES`` set to the group, node
``gpus<i>-<j>-…@%h`` and queue ``gpu-<K>x<N>g`` (N from the group's smallest GPU), so the router sends it
the multi-GPU runs whose per-GPU estimate fits; such a run starts one rank per GPU of the group.

The workers run in their own process groups: a Ctrl-C or SIGTERM reaches this command only, which forwards it
to each worker once (a warm shutdown: each finishes its current run), then waits for all of them to exit. A
second signal is forwarded too, which Celery takes as a cold shutdown.
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError, CommandParser

from experiments.domain import routing
from experiments.services.fleet import FleetError, validate_queue_name
from workers import gpus

POLL_INTERVAL_S = 0.5


def gpu_groups(
    found: list[gpus.GpuInfo], *, per_worker: int = 1, groups: list[list[int]] | tuple = ()
) -> list[list[gpus.GpuInfo]]:
    """The GPUs each worker owns: the explicit ``groups``, else consecutive groups of ``per_worker``.

    Raises:
        CommandError: a group names a GPU this host does not have or one already in another group, or the
            GPUs do not split evenly into groups of ``per_worker``.
    """
    by_index = {gpu["index"]: gpu for gpu in found}
    if groups:
        taken: set[int] = set()
        for group in groups:
            if not group:
                raise CommandError("--groups takes comma-separated GPU indices per group, e.g. 0,1 2,3.")
            for index in group:
                if index not in by_index:
                    have = ", ".join(str(i) for i in by_index)
                    raise CommandError(f"No GPU {index} here; the GPUs are: {have}.")
                if index in taken:
                    raise CommandError(f"GPU {index} is in two groups; each GPU belongs to one worker.")
                taken.add(index)
        return [[by_index[i] for i in group] for group in groups]
    if per_worker < 1:
        raise CommandError("--gpus-per-worker takes a whole number of at least 1.")
    if len(found) % per_worker:
        raise CommandError(
            f"{len(found)} GPUs do not split into groups of {per_worker}: choose a count that divides "
            f"{len(found)}, or name the groups with --groups."
        )
    return [found[i : i + per_worker] for i in range(0, len(found), per_worker)]


@dataclass(frozen=True)
class WorkerLaunch:
    """One worker process to start: its node name, what it is for, the environment it adds, and its argv."""

    node: str
    description: str
    env: dict[str, str] = field(default_factory=dict)
    argv: list[str] = field(default_factory=list)

    def command_line(self) -> str:
        """The launch as one shell line (``CUDA_VISIBLE_DEVICES=0 … celery … worker …``)."""
        return shlex.join([f"{name}={value}" for name, value in self.env.items()] + self.argv)


def celery_command(*, queues: list[str], node: str, loglevel: str) -> list[str]:
    """argv of one worker: one process, one task at a time (a run holds its GPU for hours)."""
    return [sys.executable, "-m", "celery", "-A", "distillweb", "worker", "-Q", ",".join(queues), "-n", node,
            "--concurrency", "1", "--prefetch-multiplier", "1", "--loglevel", loglevel]


def _gib(n_bytes: int) -> str:
    return f"{n_bytes / routing.GIB:.1f} GiB"


class Command(BaseCommand):
    help = (
        "Start one Celery worker per GPU (CUDA_VISIBLE_DEVICES pinned, queue gpu-<N>g by its memory), or one "
        "CPU-only worker on queue cpu; forwards Ctrl-C / SIGTERM to them and waits."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--queues", default="",
                            help="comma-separated queues every worker consumes, instead of gpu-<N>g (or cpu)")
        parser.add_argument(
            "--gpus",
            default="",
            dest="gpu_indices",
            help="comma-separated GPU indices (NVML's) to start workers for; default: every GPU "
            "this process may see",
        )
        parser.add_argument(
            "--gpus-per-worker",
            type=int,
            default=1,
            help="GPUs each worker owns (consecutive indices), for runs that span several GPUs",
        )
        parser.add_argument(
            "--groups",
            nargs="+",
            default=[],
            help="explicit GPU groups, one worker each: e.g. --groups 0,1,2,3 4,5,6,7",
        )
        parser.add_argument("--cpu", action="store_true",
                            help="start one CPU-only worker on queue cpu instead (GPUs hidden from it)")
        parser.add_argument("--loglevel", default="INFO", help="the workers' log level (default INFO)")
        parser.add_argument(
            "--dry-run", action="store_true", help="print the commands instead of running them"
        )

    def handle(self, *args: Any, queues: str = "", gpu_indices: str = "", cpu: bool = False,
               loglevel: str = "INFO", dry_run: bool = False, gpus_per_worker: int = 1,
               groups: list[str] | None = None, **options: Any) -> None:
        launches = self.plan(queues=self._queues(queues), only=self._indices(gpu_indices), cpu=cpu,
                             loglevel=loglevel, per_worker=gpus_per_worker,
                             groups=[self._indices(g) or [] for g in groups or []])
        for launch in launches:
            self.stdout.write(f"# {launch.node}: {launch.description}" if dry_run else
                              f"Starting {launch.node}: {launch.description}")
            if dry_run:
                self.stdout.write(launch.command_line())
        if not dry_run:
            self.supervise(launches)

    # --- what to start --------------------------------------------------------------------------------------
    def plan(
        self,
        *,
        queues: list[str],
        only: list[int] | None,
        cpu: bool,
        loglevel: str,
        per_worker: int = 1,
        groups: list[list[int]] | None = None,
    ) -> list[WorkerLaunch]:
        """The workers to start: one per GPU or group of GPUs (or the chosen ones), or the one CPU worker."""
        if cpu:
            chosen = queues or [routing.CPU_QUEUE]
            node = "cpu@%h"
            return [WorkerLaunch(node, f"CPU only, queue {', '.join(chosen)}", {"CUDA_VISIBLE_DEVICES": ""},
                                 celery_command(queues=chosen, node=node, loglevel=loglevel))]
        found = gpus.read_gpus()
        if not found:
            raise CommandError(
                "No GPU found through NVML (no NVIDIA driver, or CUDA_VISIBLE_DEVICES hides every "
                "GPU). Use --cpu to start a CPU-only worker on queue 'cpu'."
            )
        if only is not None:
            missing = sorted(set(only) - {gpu["index"] for gpu in found})
            if missing:
                have = ", ".join(str(gpu["index"]) for gpu in found)
                raise CommandError(f"No GPU {missing[0]} here; the GPUs are: {have}.")
            found = [gpu for gpu in found if gpu["index"] in only]
        return [self._gpu_launch(group, queues=queues, loglevel=loglevel)
                for group in gpu_groups(found, per_worker=per_worker, groups=groups or [])]

    @staticmethod
    def _gpu_launch(group: list[gpus.GpuInfo], *, queues: list[str], loglevel: str) -> WorkerLaunch:
        indices = [str(gpu["index"]) for gpu in group]
        memory = min(gpu["memory_total_bytes"] for gpu in group)
        chosen = queues or [routing.gpu_group_queue_name(len(group), memory)]
        if len(group) == 1:
            node = f"gpu{indices[0]}@%h"
            what = f"GPU {indices[0]} ({group[0]['name']}, {_gib(memory)})"
        else:
            node = f"gpus{'-'.join(indices)}@%h"
            what = f"GPUs {', '.join(indices)} ({len(group)} × {group[0]['name']}, {_gib(memory)} each)"
        return WorkerLaunch(
            node, f"{what}, queue {', '.join(chosen)}",
            {"CUDA_VISIBLE_DEVICES": ",".join(indices), "CUDA_DEVICE_ORDER": "PCI_BUS_ID"},
            celery_command(queues=chosen, node=node, loglevel=loglevel),
        )

    @staticmethod
    def _queues(text: str) -> list[str]:
        names = [part.strip() for part in text.split(",") if part.strip()]
        try:
            return [validate_queue_name(name) for name in names]
        except FleetError as exc:
            raise CommandError(str(exc)) from None

    @staticmethod
    def _indices(text: str) -> list[int] | None:
        parts = [part.strip() for part in text.split(",") if part.strip()]
        if not parts:
            return None
        if not all(part.isdigit() for part in parts):
            raise CommandError(f"--gpus takes GPU indices such as 0,1; got '{text}'.")
        return [int(part) for part in parts]

    # --- running them ---------------------------------------------------------------------------------------
    def supervise(self, launches: list[WorkerLaunch]) -> None:
        """Start every worker, forward SIGINT/SIGTERM to them, and return once all have exited.

        Raises:
            CommandError: a worker exited with an error (the others ran on until their own end).
        """
        children: list[tuple[WorkerLaunch, subprocess.Popen]] = []

        def forward(signum: int, _frame: Any) -> None:
            for _, child in children:
                if child.poll() is None:
                    child.send_signal(signum)

        previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM)}
        failed = []
        try:
            for launch in launches:
                # Own session: a terminal's Ctrl-C reaches this process only, so each worker gets it once.
                children.append((launch, subprocess.Popen(launch.argv, env={**os.environ, **launch.env},
                                                          cwd=settings.BASE_DIR, start_new_session=True)))
            running = list(children)
            while running:
                time.sleep(POLL_INTERVAL_S)
                for launch, child in list(running):
                    code = child.poll()
                    if code is None:
                        continue
                    running.remove((launch, child))
                    self.stdout.write(f"{launch.node} exited ({code}).")
                    if code != 0:
                        failed.append(f"{launch.node} ({code})")
        finally:
            for _, child in children:  # an error in this loop must not orphan the workers
                if child.poll() is None:
                    child.terminate()
                    child.wait()
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        if failed:
            raise CommandError(f"Workers exited with an error: {', '.join(failed)}.")
