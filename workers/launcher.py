"""Multi-process runs from the Celery task: torchrun as a child process group that dies with the worker.

A run whose world size is above one (``train.gpus`` on a worker with CUDA, ``train.processes`` without) is not
trained in the pool process. :func:`train_in_ranks` writes the resolved config under the run's output folder
(``runs/<id>/launch-a<attempt>/config.json``) and starts::

    python -m torch.distributed.run --standalone --nproc_per_node N \\
        -m workers.launcher run config.json --callbacks workers.rank_reporting:callbacks \\
        --result-json result.json

Rank 0 reports through a :class:`~workers.reporting.RunReporter` of its own (workers/rank_reporting.py), with
the delivery's task id as fencing token (``DISTILLWEB_RUN_ID`` / ``DISTILLWEB_TASK_ID``): metric points,
progress, checkpoints, the lease heartbeat, cancellation polls and the stall watchdog all come from rank 0,
as they come from the pool process for a one-process run. The task only waits, then records the outcome from
the result file through the same fenced services as the in-process path (``run_finish``, ``run_fail`` with the
engine's message, ``run_mark_cancelled``).

Process hygiene. torchrun starts in a session (process group) of its own and so do its ranks (torchrun starts
each in a new session). No rank may outlive the worker:

- torchrun gets ``PR_SET_PDEATHSIG = SIGKILL`` (prctl through ctypes, in ``preexec_fn``): the kernel kills it
  when the pool process that started it dies, SIGKILL included (a killed worker, the OOM killer, the stall
  watchdog). The death signal follows the *thread* that forked: the task forks from the pool process's main
  thread, which lives as long as the pool process.
- every rank runs this module's ``run`` entry point, which sets the same death signal towards torchrun before
  it hands over to the engine's CLI: torchrun killed outright (it cannot forward a SIGKILL) takes every rank
  with it. A parent that died before the prctl took effect is caught by checking the parent after it.
- on every exit path of the task (an exception, a soft time limit, a worker shutdown raising in the task)
  :func:`kill_launch` kills torchrun's group and each rank's group.
- the task polls the run (a read) while it waits: once a cancellation is requested or the run no longer
  belongs to this delivery, the ranks have ``RUN_CANCEL_GRACE_S`` (default 60 s) to stop by themselves
  (rank 0 sees it too, and the engine broadcasts the stop); then the task kills them.

Between the claim and rank 0's first write nothing renews the run's lease: torchrun's start and the ranks'
imports (seconds) must fit in RUN_HEARTBEAT_TIMEOUT_S (120 s by default); loading models is covered, rank 0's
reporter starts before the engine loads anything.

The stall watchdog runs in rank 0's reporter: it records the stall, then kills torchrun (its parent), and
every rank dies with it; the task then finds no result and records nothing more (the fencing refuses it). The
pool process's own watchdog kill (workers/watchdog.py ``kill_children``) finds torchrun as a child that leads
its own group; its ranks then die of their death signal.
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from experiments.models import Run
    from workers.reporting import RunReporter

logger = logging.getLogger(__name__)

RUN_ID_ENV = "DISTILLWEB_RUN_ID"
TASK_ID_ENV = "DISTILLWEB_TASK_ID"
RESULT_ENV = "DISTILLWEB_RESULT_JSON"
GRACE_ENV = "RUN_CANCEL_GRACE_S"
DEFAULT_GRACE_S = 60.0
CALLBACKS = "workers.rank_reporting:callbacks"
PR_SET_PDEATHSIG = 1
POLL_S = 1.0


def ranks(train: dict[str, Any], *, cuda: bool | None = None) -> tuple[int, bool]:
    """(world size, on CUDA) of a frozen config's ``train`` on this worker: ``gpus`` ranks when it trains on
    CUDA (device ``cuda…``, or ``auto`` on a worker with a GPU: ``cuda`` or torch.cuda.is_available()), else
    ``processes``. A config asking for one rank either way is one rank without asking torch."""
    gpus, processes = int(train.get("gpus", 1)), int(train.get("processes", 1))
    device = str(train.get("device") or "auto")
    if device.startswith("cuda"):
        return gpus, True
    if device != "auto" or gpus == processes == 1:
        return processes, False
    if cuda is None:
        import torch

        cuda = torch.cuda.is_available()
    return (gpus, True) if cuda else (processes, False)


# --- dying with the parent ------------------------------------------------------------------------------
def _death_signal_setter(sig: int) -> Callable[[], None]:
    """A function (safe between fork and exec: no allocation, no lock) that asks the kernel to send ``sig``
    to this process when its parent dies, and exits at once when the parent is already gone."""
    prctl = ctypes.CDLL(None, use_errno=True).prctl
    prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
    parent = os.getpid()  # called in the parent: the pid the child must see as its parent

    def set_death_signal() -> None:
        prctl(PR_SET_PDEATHSIG, sig, 0, 0, 0)
        if os.getppid() != parent:  # died between the fork and the prctl
            os._exit(1)

    return set_death_signal


def die_with_parent(
    sig: int = signal.SIGKILL, *, parent_markers: tuple[str, ...] = ("torch.distributed.run", "torchrun")
) -> None:
    """In a running process (a rank): get ``sig`` when the parent (torchrun) dies. A parent that died before
    the prctl took effect left this process to init or a subreaper, whose command line names none of
    ``parent_markers``: the process exits at once."""
    prctl = ctypes.CDLL(None, use_errno=True).prctl
    prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
    if prctl(PR_SET_PDEATHSIG, sig, 0, 0, 0) != 0:
        logger.warning("prctl(PR_SET_PDEATHSIG) failed: errno %s", ctypes.get_errno())
    try:
        parent = Path(f"/proc/{os.getppid()}/cmdline").read_bytes().decode(errors="replace")
    except OSError:
        parent = ""
    if not any(marker in parent for marker in parent_markers):
        os._exit(1)


# --- starting, watching and killing the launch ----------------------------------------------------------
@dataclass
class Launch:
    process: subprocess.Popen
    folder: Path
    world: int

    @property
    def config_path(self) -> Path:
        return self.folder / "config.json"

    @property
    def result_path(self) -> Path:
        return self.folder / "result.json"

    @property
    def log_path(self) -> Path:
        return self.folder / "torchrun.log"

    def log_tail(self, lines: int = 12, chars: int = 2000) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.strip().splitlines()[-lines:])[-chars:]


def start(resolved: dict[str, Any], *, run_id: int, task_id: str, world: int, cuda: bool) -> Launch:
    """Write the resolved config and start torchrun with ``world`` ranks in a session of its own."""
    folder = Path(resolved["output_dir"]) / f"launch-a{resolved.get('attempt', 0)}"
    folder.mkdir(parents=True, exist_ok=True)
    launch = Launch(process=None, folder=folder, world=world)  # type: ignore[arg-type]
    launch.result_path.unlink(missing_ok=True)
    launch.config_path.write_text(json.dumps(resolved, indent=1))
    env = {**os.environ, RUN_ID_ENV: str(run_id), TASK_ID_ENV: task_id, RESULT_ENV: str(launch.result_path),
           "PYTHONUNBUFFERED": "1"}
    if not cuda:
        env["OMP_NUM_THREADS"] = "1"
    root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}",
               "-m", "workers.launcher", "run", str(launch.config_path), "--callbacks", CALLBACKS,
               "--result-json", str(launch.result_path)]
    with launch.log_path.open("ab") as log:
        launch.process = spawn(command, cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT)
    logger.info("run %s: started torchrun (pid %s) with %d ranks; log %s", run_id, launch.process.pid, world,
                launch.log_path)
    return launch


def spawn(command: list[str], **popen: Any) -> subprocess.Popen:
    """Start ``command`` in a session (process group) of its own that the kernel kills (SIGKILL) when this
    process dies."""
    return subprocess.Popen(command, stdin=subprocess.DEVNULL, start_new_session=True,
                            preexec_fn=_death_signal_setter(signal.SIGKILL), **popen)


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (read from /proc), children first."""
    from workers.watchdog import child_pids

    found, queue = [], [pid]
    while queue:
        children = child_pids(queue.pop(0))
        found += children
        queue += children
    return found


def kill_launch(launch: Launch) -> None:
    """SIGKILL torchrun's process group and every rank's (each rank leads a session of its own)."""
    if launch.process.poll() is not None:
        return
    below = descendants(launch.process.pid)
    for pid in [launch.process.pid, *below]:
        try:
            if os.getpgid(pid) == pid:
                os.killpg(pid, signal.SIGKILL)
            else:
                os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            continue
    launch.process.wait()


def _grace_s() -> float:
    try:
        return float(os.environ.get(GRACE_ENV) or DEFAULT_GRACE_S)
    except ValueError:
        return DEFAULT_GRACE_S


def _run_state(run_id: int, task_id: str) -> tuple[bool, bool] | None:
    """(cancel requested, still this delivery's) of the run; None when the database cannot be read now."""
    from django.db import connection

    from experiments.models import Run
    from workers.reporting import DATABASE_ERRORS

    try:
        row = Run.objects.filter(id=run_id).values_list("status", "task_id", "cancel_requested").first()
    except DATABASE_ERRORS:
        if not connection.in_atomic_block:
            connection.close()
        return None
    if row is None:
        return True, False
    status, owner, cancel = row
    return bool(cancel), status == "running" and owner == task_id


def wait(launch: Launch, *, run_id: int, task_id: str, poll_s: float = POLL_S) -> bool:
    """Wait for torchrun to exit. Once the run is cancelled or no longer this delivery's, the ranks get the
    grace period to stop by themselves, then are killed. Returns True when the task killed them."""
    deadline = None
    while True:
        try:
            launch.process.wait(timeout=poll_s)
            return False
        except subprocess.TimeoutExpired:
            pass
        state = _run_state(run_id, task_id)
        if deadline is None and state is not None and (state[0] or not state[1]):
            deadline = time.monotonic() + _grace_s()
            logger.info("run %s: %s; the ranks have %.0f s to stop", run_id,
                        "cancellation requested" if state[0] else "no longer this delivery's", _grace_s())
        if deadline is not None and time.monotonic() >= deadline:
            logger.warning("run %s: the ranks did not stop within %.0f s; killing them", run_id, _grace_s())
            kill_launch(launch)
            return True


# --- the task's side ------------------------------------------------------------------------------------
def train_in_ranks(
    run: Run, reporter: RunReporter, resolved: dict[str, Any], *, world: int, cuda: bool
) -> None:
    """Train the claimed run in ``world`` ranks under torchrun and record how it ended."""
    owner = {"run_id": run.id, "task_id": reporter.task_id}
    launch = start(resolved, run_id=run.id, task_id=reporter.task_id, world=world, cuda=cuda)
    try:
        killed = wait(launch, run_id=run.id, task_id=reporter.task_id)
    finally:
        kill_launch(launch)  # nothing left running, whatever ended the wait (a time limit, a shutdown)
    record_outcome(run, reporter, launch, killed=killed, owner=owner)


def read_result(launch: Launch) -> dict[str, Any] | None:
    try:
        return json.loads(launch.result_path.read_text())
    except (OSError, ValueError):
        return None


def record_outcome(run: Run, reporter: RunReporter, launch: Launch, *, killed: bool,
                   owner: dict[str, Any]) -> None:
    """The result file's outcome, recorded as the in-process path records it (fenced by the task id)."""
    from experiments.selectors import records
    from experiments.services import lifecycle
    from workers.reporting import DatabaseUnavailable

    result = None if killed else read_result(launch)
    if result is not None and result.get("error_type") == "DatabaseUnavailable":
        raise DatabaseUnavailable(str(result.get("error")))
    if result is not None and "error" in result:
        reporter.call(lifecycle.run_fail, **owner, error=str(result["error"]))
        return
    if result is None or result.get("stopped"):
        if reporter.call(records.run_is_cancel_requested, run_id=run.id):
            step = result.get("steps") if result else None
            if step is None:
                from experiments.models import Run

                step = reporter.call(lambda: Run.objects.filter(id=run.id).values_list("step", flat=True)
                                     .first())
            reporter.call(lifecycle.run_mark_cancelled, **owner, step=step or None)
            return
        if result is not None:
            return  # taken over by another delivery: that one finishes the run
        code = launch.process.returncode
        how = f"signal {-code}" if code is not None and code < 0 else f"exit code {code}"
        tail = launch.log_tail()
        reporter.call(lifecycle.run_fail, **owner, error=(
            f"The training processes (torchrun, {launch.world} ranks) ended with {how} without a result."
            + (f" Last lines of their log:\n{tail}" if tail else "")))
        return
    reporter.call(lifecycle.run_finish, **owner, result=result)


# --- the ranks' entry point -----------------------------------------------------------------------------
def rank_main(argv: list[str]) -> int:
    """A rank: die with torchrun, then run the engine's command line."""
    die_with_parent(signal.SIGKILL)
    from workers.engine.__main__ import main

    return main(argv)


if __name__ == "__main__":
    sys.exit(rank_main(sys.argv[1:]))
