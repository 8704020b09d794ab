"""Runs of several ranks go through torchrun from the Celery task (workers/launcher.py): real `celery worker`
processes over Redis (tests/workers/test_faults.py) start real torchrun launches of 2 gloo ranks on the CPU.

Rank 0 reports (workers/rank_reporting.py) with the delivery's fencing token; the task records the outcome
from the result file. Checked here: a 2-process run succeeds with every metric step once and its model and
evaluation recorded; a cancelled one stops with no rank left; a killed worker leaves no orphan rank, and a
fresh worker resumes the run from its last registered checkpoint once the lease expired.
"""

from __future__ import annotations

import os
import time
from datetime import datetime
from pathlib import Path
from unittest import mock

import pytest
from django.utils import timezone

from experiments.models import Artifact, Evaluation, MetricPoint, Run
from experiments.services import lifecycle
from tests.waiting import scaled
from tests.workers import test_faults as faults
from tests.workers.test_faults import (
    DISPATCH,
    assert_every_logged_step_once,
    finished,
    history,
    logged_steps,
    publish,
    reload,
    wait_for,
)
from workers.engine.checkpoint import latest_checkpoint

fleet = faults.fleet  # real `celery worker` processes on a queue of the test's own

# torchrun starts 2 interpreters that import torch (and rank 0 Django) before rank 0's reporter renews the
# lease: the lease of these tests' workers outlasts that start on a loaded machine.
LEASE_S = 20

pytestmark = pytest.mark.integration


def launch_two_ranks(fleet, *, batch_size: int = 64, **train) -> Run:
    """A hard-label MLP run on digits whose frozen config asks for 2 CPU processes, sent to the test's
    queue."""
    with mock.patch(DISPATCH):
        run = fleet.launch(**train)
    config = run.config
    config["train"] = {**config["train"], "processes": 2, "device": "cpu", "batch_size": batch_size}
    Run.objects.filter(id=run.id).update(config=config)
    publish(run, broker_url=fleet.broker, queue=fleet.queue, task_id=reload(run).task_id)
    return run


def launch_folder(run: Run, attempt: int) -> Path:
    from django.conf import settings

    return Path(settings.ARTIFACT_ROOT) / f"runs/{run.id}/launch-a{attempt}"


def processes_naming(text: str) -> list[tuple[int, str]]:
    """Live processes whose command line contains ``text`` (a launch's config file)."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            words = cmdline.read_bytes().split(b"\0")
            state = (cmdline.parent / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        line = " ".join(w.decode(errors="replace") for w in words if w)
        if text in line and state != "Z":  # a zombie is dead: only its parent has not read its status yet
            found.append((int(cmdline.parent.name), line))
    return found


def ranks_running(run: Run, attempt: int) -> list[tuple[int, str]]:
    return processes_naming(str(launch_folder(run, attempt) / "config.json"))


def wait_no_rank_left(run: Run, attempt: int, workers) -> None:
    wait_for(lambda: not ranks_running(run, attempt), timeout=20, workers=workers,
             what=f"no process of launch a{attempt} left: {ranks_running(run, attempt)}")


def training_ranks(run: Run, workers, *, timeout: float = 60) -> Run:
    """Wait until the run trains (a checkpoint registered) in torchrun's ranks, and return it."""
    live = wait_for(faults.training_with_a_checkpoint(run), timeout=timeout, workers=workers,
                    what="the 2-process run to register a checkpoint")
    procs = ranks_running(run, live.attempt)
    ranks = [line for _, line in procs
             if "workers.launcher run" in line and "torch.distributed.run" not in line]
    assert len(ranks) == 2, procs  # two ranks, and torchrun above them
    return live


def test_a_two_process_run_records_every_step_once_its_model_and_evaluation(fleet):
    worker = fleet.start("w", RUN_HEARTBEAT_TIMEOUT_S=str(LEASE_S))
    worker.wait_registered()
    started = time.monotonic()
    run = launch_two_ranks(fleet, max_steps=60, save_every=20, log_every=10, eval_every=30)

    done = wait_for(finished(run), timeout=120, workers=[worker], what="the 2-process run to finish")
    assert done.status == Run.Status.SUCCEEDED, done.error
    assert (done.attempt, done.step, done.total_steps) == (1, 60, 60)
    assert_every_logged_step_once(done, log_every=10)  # rank 0 alone reports: no step from another rank
    assert logged_steps(done, "eval/accuracy") == [30, 60]
    assert Evaluation.objects.filter(run=run, role="student").count() == 1
    model = Artifact.objects.get(run=run, kind=Artifact.Kind.MODEL)
    assert model.path.startswith(f"runs/{run.id}/final") and model.size_bytes > 0
    assert done.artifacts.filter(kind=Artifact.Kind.CHECKPOINT).exists()
    assert [(t.from_status, t.to_status) for t in history(run)] == [
        ("queued", "running"), ("running", "succeeded")]
    launch = launch_folder(run, 1)
    assert (launch / "result.json").exists() and "workers.rank_reporting" not in worker.tail(10**6)
    assert "started torchrun" in worker.tail(10**6)
    wait_no_rank_left(run, 1, [worker])
    print(f"2-process run of 60 steps: {time.monotonic() - started:.1f} s")


def test_a_two_process_run_the_engine_refuses_fails_with_the_engine_s_message(fleet):
    worker = fleet.start("w", RUN_HEARTBEAT_TIMEOUT_S=str(LEASE_S))
    worker.wait_registered()
    run = launch_two_ranks(fleet, max_steps=50, batch_size=63)  # every rank takes an equal share of a batch

    done = wait_for(finished(run), timeout=60, workers=[worker], what="the refused run to fail")
    assert done.status == Run.Status.FAILED
    refused = "The batch size (63) must be divisible by the number of ranks (2)"
    assert done.error.startswith(refused), done.error
    assert not MetricPoint.objects.filter(run=run).exists()
    assert [(t.from_status, t.to_status) for t in history(run)] == [
        ("queued", "running"), ("running", "failed")]
    wait_no_rank_left(run, 1, [worker])

def test_a_cancelled_two_process_run_stops_within_a_few_steps_and_leaves_no_rank(fleet):
    worker = fleet.start("w", RUN_HEARTBEAT_TIMEOUT_S=str(LEASE_S))
    worker.wait_registered()
    run = launch_two_ranks(fleet, max_steps=200000, save_every=100, log_every=10)  # only the cancel ends it
    live = training_ranks(run, [worker])

    lifecycle.run_cancel(run=live)
    asked = time.monotonic()
    stopped = wait_for(finished(run), timeout=30, workers=[worker], what="the cancelled run to stop")
    took = time.monotonic() - asked
    assert stopped.status == Run.Status.CANCELLED and stopped.step < stopped.total_steps
    wait_no_rank_left(run, 1, [worker])
    # Rank 0 saw the cancellation and the engine stopped every rank: the task did not have to kill them.
    assert "did not stop within" not in worker.tail(10**6)
    assert logged_steps(stopped) == list(range(10, stopped.step + 1, 10))  # every step once, up to the stop
    checkpoint = latest_checkpoint(launch_folder(run, 1).parent)
    assert checkpoint is not None and checkpoint.name == f"step-{stopped.step}-a1"  # saved at the stop
    assert stopped.checkpoint_path == f"runs/{run.id}/checkpoints/{checkpoint.name}"
    assert [(t.from_status, t.to_status) for t in history(run)] == [
        ("queued", "running"), ("running", "cancelled")]
    points = MetricPoint.objects.filter(run=run).count()
    time.sleep(1)
    assert MetricPoint.objects.filter(run=run).count() == points and reload(run).step == stopped.step
    print(f"cancelled at step {stopped.step}, {took:.1f} s after the request")


def test_a_two_process_run_taken_over_stops_every_rank_and_records_nothing_more(fleet):
    worker = fleet.start("w", RUN_HEARTBEAT_TIMEOUT_S=str(LEASE_S))
    worker.wait_registered()
    run = launch_two_ranks(fleet, max_steps=200000, save_every=100, log_every=10)
    training_ranks(run, [worker])

    Run.objects.filter(id=run.id).update(task_id="another-delivery")  # as a takeover leaves the run
    wait_no_rank_left(run, 1, [worker])  # rank 0's next write is refused; the engine stops every rank
    task = f"workers.run_distillation[{run.task_id}] succeeded"
    wait_for(lambda: task in worker.tail(10**6), timeout=20, workers=[worker], what="the task to end")
    after = reload(run)
    points = MetricPoint.objects.filter(run=run).count()
    time.sleep(1)
    # The task recorded nothing: the run is the other delivery's, still running, with no model of this one.
    assert (after.status, after.task_id) == (Run.Status.RUNNING, "another-delivery")
    assert not Artifact.objects.filter(run=run, kind=Artifact.Kind.MODEL).exists()
    assert MetricPoint.objects.filter(run=run).count() == points
    assert [(t.from_status, t.to_status) for t in history(run)] == [("queued", "running")]
    assert "did not stop within" not in worker.tail(10**6)

def test_a_killed_worker_leaves_no_rank_and_a_fresh_worker_resumes_from_the_last_checkpoint(fleet, settings):
    a = fleet.start("a", RUN_HEARTBEAT_TIMEOUT_S=str(LEASE_S))
    a.wait_registered()
    run = launch_two_ranks(fleet, max_steps=2500, save_every=100, log_every=10)
    live = training_ranks(run, [a])
    assert (live.worker_name, live.attempt) == (a.name, 1)

    a.kill()  # the worker's main and pool processes: torchrun and its ranks live in sessions of their own
    killed_at = timezone.now()
    # Nothing is left running: torchrun dies with the pool process, every rank with torchrun.
    wait_no_rank_left(run, 1, [a])
    resume_from = latest_checkpoint(Path(settings.ARTIFACT_ROOT) / f"runs/{run.id}")
    assert resume_from is not None
    resume_step = int(resume_from.name.split("-")[1])
    assert 0 < resume_step < run.total_steps
    assert reload(run).status == Run.Status.RUNNING  # until its lease expires

    b = fleet.start("b", queues=[fleet.queue, fleet.sweeps], beat=True, RUN_HEARTBEAT_TIMEOUT_S=str(LEASE_S))
    done = wait_for(finished(run), timeout=150, workers=[b], what="B to resume and finish the run")
    assert done.status == Run.Status.SUCCEEDED, done.error
    assert (done.worker_name, done.attempt, done.step) == (b.name, 2, done.total_steps)
    rows = history(run)
    assert [(t.from_status, t.to_status, t.worker_name, t.attempt) for t in rows] == [
        ("queued", "running", a.name, 1), ("running", "queued", a.name, 1), ("queued", "running", b.name, 2),
        ("running", "succeeded", b.name, 2)]
    assert rows[1].reason.startswith(f"Worker lost: {a.name} stopped renewing the lease")
    assert_every_logged_step_once(done, log_every=10)
    assert Evaluation.objects.filter(run=run, role="student").count() == 1
    # B resumed from A's last registered checkpoint: the points up to it are A's, the later ones B's.
    wall: dict[int, datetime] = dict(
        MetricPoint.objects.filter(run=run, name="loss").values_list("step", "wall_time"))
    assert all(wall[s] < killed_at for s in range(10, resume_step + 1, 10))
    assert all(wall[s] > killed_at for s in range(resume_step + 10, run.total_steps + 1, 10))
    wait_no_rank_left(run, 2, [b])


def test_the_task_kills_ranks_that_do_not_stop_within_the_grace_period(tmp_path, monkeypatch):
    """A launch whose processes ignore the cancellation (here: a process that only sleeps, in a session of its
    own with a child in another, as torchrun and its ranks) is killed, children included, once the grace
    period is over; and a launch that ends by itself is left alone."""
    import signal
    import subprocess
    import sys

    from workers import launcher

    monkeypatch.setenv(launcher.GRACE_ENV, "1")
    stubborn = (
        "import signal, subprocess, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
        "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)', 'marker-%s'], "
        "start_new_session=True); time.sleep(600)"
    )
    marker = f"marker-{tmp_path.name}"
    process = subprocess.Popen([sys.executable, "-c", stubborn % tmp_path.name], start_new_session=True)
    launch = launcher.Launch(process=process, folder=tmp_path, world=2)
    wait_for(lambda: processes_naming(marker), timeout=10, workers=[], what="the child to start")
    states = iter([(False, True), (True, True)])
    with mock.patch.object(launcher, "_run_state", side_effect=lambda *_: next(states, (True, True))):
        began = time.monotonic()
        assert launcher.wait(launch, run_id=0, task_id="t", poll_s=0.2) is True
    assert 1 <= time.monotonic() - began < scaled(10)
    assert process.returncode == -signal.SIGKILL
    wait_for(lambda: not processes_naming(marker), timeout=10, workers=[], what="the child to be killed")

    ends = subprocess.Popen([sys.executable, "-c", "pass"])
    quick = launcher.Launch(process=ends, folder=tmp_path, world=2)
    with mock.patch.object(launcher, "_run_state", return_value=(False, True)):
        assert launcher.wait(quick, run_id=0, task_id="t", poll_s=0.2) is False
    assert quick.process.returncode == 0


# A stand-in for the Celery pool process: starts a real torchrun of 2 ranks as the task does (workers.launcher
# spawn), each rank dying with torchrun as the run's ranks do; on SIGUSR1 it does what the stall watchdog does
# to the pool process's children (workers.watchdog.kill_children).
POOL = """
import os, signal, sys, time
sys.path.insert(0, {root!r})
from workers import launcher, watchdog

signal.signal(signal.SIGUSR1, lambda *_: watchdog.kill_children(os.getpid()))
command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", {rank!r}]
launcher.spawn(command, env={{**os.environ, "OMP_NUM_THREADS": "1"}})
while True:
    time.sleep(1)
"""
RANK = """
import os, sys, time
sys.path.insert(0, {root!r})
from workers.launcher import die_with_parent

die_with_parent()
open(os.path.join({ready!r}, str(os.getpid())), "w").close()
time.sleep(600)
"""


@pytest.mark.parametrize("how", ["pool process killed", "stall watchdog"])
def test_no_rank_outlives_the_pool_process_or_the_watchdog_s_kill(tmp_path, how):
    import signal
    import subprocess
    import sys

    root = str(Path(__file__).resolve().parents[2])
    rank = tmp_path / f"rank_{tmp_path.name}.py"
    ready = tmp_path / "ready"
    ready.mkdir()
    rank.write_text(RANK.format(root=root, ready=str(ready)))
    (tmp_path / "pool.py").write_text(POOL.format(root=root, rank=str(rank)))
    pool = subprocess.Popen([sys.executable, str(tmp_path / "pool.py")], start_new_session=True)
    try:
        def ranks() -> list[tuple[int, str]]:
            return [p for p in processes_naming(str(rank)) if "torch.distributed.run" not in p[1]]

        wait_for(lambda: len(list(ready.iterdir())) == 2, timeout=60, workers=[],
                 what="torchrun to start 2 ranks that die with it")
        assert len(ranks()) == 2
        assert len(processes_naming(str(rank))) == 3  # and torchrun, in a session of its own
        if how == "pool process killed":
            os.kill(pool.pid, signal.SIGKILL)
        else:
            os.kill(pool.pid, signal.SIGUSR1)
        wait_for(lambda: not processes_naming(str(rank)), timeout=10, workers=[],
                 what=f"torchrun and its ranks to die: {processes_naming(str(rank))}")
    finally:
        if pool.poll() is None:
            os.killpg(pool.pid, signal.SIGKILL)
        pool.wait()


def test_the_task_s_way_out_kills_the_launch(tmp_path):
    """A soft time limit (or any exception, a worker shutdown) while the task waits kills torchrun's group and
    every rank's before the exception goes on."""
    import signal
    import subprocess
    import sys
    from types import SimpleNamespace

    from celery.exceptions import SoftTimeLimitExceeded

    from workers import launcher

    marker = f"marker-{tmp_path.name}"
    child = f"import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)', '{marker}'], start_new_session=True); time.sleep(600)"  # noqa: E501
    process = subprocess.Popen([sys.executable, "-c", child, marker], start_new_session=True)
    launch = launcher.Launch(process=process, folder=tmp_path, world=2)
    wait_for(lambda: len(processes_naming(marker)) == 2, timeout=10, workers=[],
             what="the processes to start")
    with mock.patch.object(launcher, "start", return_value=launch), \
            mock.patch.object(launcher, "wait", side_effect=SoftTimeLimitExceeded()), \
            pytest.raises(SoftTimeLimitExceeded):
        launcher.train_in_ranks(SimpleNamespace(id=0), SimpleNamespace(task_id="t"), {}, world=2, cuda=False)
    assert process.returncode == -signal.SIGKILL
    wait_for(lambda: not processes_naming(marker), timeout=10, workers=[], what="the rank stand-in to die")
