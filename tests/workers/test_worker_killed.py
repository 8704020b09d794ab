"""A worker's pool process killed under a run (SIGKILL: what the kernel's out-of-memory killer sends) is
recorded on the run at once: requeued with the reason, the run's memory estimate and what to change, and
failed with that message once its restart budget is spent. Real `celery worker` processes
(tests/workers/test_faults.py)."""

from __future__ import annotations

import os
import re
import signal
from pathlib import Path

import pytest
from django.urls import reverse

from experiments.domain import routing
from experiments.models import Run, Worker
from tests.workers import test_faults as faults
from tests.workers.test_faults import history, reload, training_with_a_checkpoint, wait_for
from workers.engine.memory import size_text
from workers.engine.out_of_memory import host_memory_bytes

fleet = faults.fleet  # real `celery worker` processes on a queue of the test's own


def pool_processes(parent_pid: int) -> list[int]:
    """The pids whose parent is ``parent_pid`` (the prefork pool of a `celery worker`)."""
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # exited meanwhile
            continue
        if int(fields[1]) == parent_pid:
            children.append(int(stat.parent.name))
    return children


def kill_the_pool_process(worker) -> int:
    children = pool_processes(worker.process.pid)
    assert len(children) == 1, f"expected one pool process under {worker.process.pid}: {children}"
    os.kill(children[0], signal.SIGKILL)
    return children[0]


def approx(n_bytes: int) -> str:
    return f"~{size_text(n_bytes)}" if n_bytes >= 1024**2 else size_text(n_bytes)


@pytest.mark.integration
def test_a_pool_process_killed_mid_run_is_reported_as_likely_out_of_memory_with_the_estimate(fleet, client):
    if not Path("/proc/self/stat").exists():
        pytest.skip("finds the pool process through /proc")
    a = fleet.start("a", RUN_MAX_ATTEMPTS="2")
    a.wait_registered()
    assert (
        Worker.objects.get(name=a.name).memory_total_bytes == host_memory_bytes()
    )  # registered with its RAM
    run = fleet.launch(max_steps=500000, save_every=100)
    live = wait_for(training_with_a_checkpoint(run), timeout=60, workers=[a], what="the run to train")
    estimate = routing.run_memory_estimate(run=live)
    about = (
        f"most likely by the kernel's out-of-memory killer. The run's estimate is "
        f"{approx(estimate.model_bytes)} of RAM: "
    )
    killed = re.compile(rf"^The worker process running this run on {re.escape(a.name)} was killed \(SIGKILL\)"
                        rf" at step \d+, {re.escape(about)}")

    kill_the_pool_process(a)

    def requeued():
        rows = [t for t in history(run) if (t.from_status, t.to_status) == ("running", "queued")]
        return rows[0] if rows else None

    first = wait_for(requeued, timeout=30, workers=[a], what="the kill to be recorded")
    assert killed.match(first.reason), first.reason
    assert f"this machine has {size_text(host_memory_bytes())}" in first.reason
    assert "What to change: " in first.reason
    assert "a smaller batch size (now 64; batch size 32 with 2 gradient accumulation steps" in first.reason
    assert first.reason.endswith("Requeued for attempt 2 of 2."), first.reason
    assert (first.attempt, first.worker_name) == (1, a.name)

    # A fresh pool process resumes it; killed again, the restart budget is spent: the run fails with the
    # reason.
    def resumed() -> Run | None:
        current = reload(run)
        return (
            current
            if current.status == Run.Status.RUNNING and current.attempt == 2 and current.step > 0
            else None
        )

    wait_for(resumed, timeout=60, workers=[a], what="the run to resume on a fresh pool process")
    kill_the_pool_process(a)

    def failed() -> Run | None:
        current = reload(run)
        return current if current.is_terminal else None

    done = wait_for(failed, timeout=30, workers=[a], what="the second kill to fail the run")
    assert done.status == Run.Status.FAILED, (done.status, done.error)
    assert killed.match(done.error), done.error
    assert done.error.endswith("That was attempt 2 of 2; giving up."), done.error
    assert [(t.from_status, t.to_status, t.attempt) for t in history(run)] == [
        ("queued", "running", 1),
        ("running", "queued", 1),
        ("queued", "running", 2),
        ("running", "failed", 2),
    ]

    client.force_login(done.experiment.created_by)
    page = client.get(reverse("experiments:run_detail", kwargs={"run_id": run.id})).content.decode()
    assert "was killed (SIGKILL)" in page and "out-of-memory killer" in page
