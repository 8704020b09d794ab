"""The stall watchdog: a run whose work stops advancing (a hung load, a stuck collective) is stopped although
its worker is alive: the lease is renewed no more, the run is requeued once and failed on the next stall with
"No progress for N min at step S (phase: …); the run was stopped.", and the stuck pool process is killed while
the worker goes on. The decision logic with a fake clock; the reporter and the service in process; and a real
`celery worker` whose run blocks forever loading its dataset from a hub that never answers
(tests/workers/test_faults.py's fleet)."""

from __future__ import annotations

import json
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path
from unittest import mock

import pytest

from experiments.models import DatasetSpec, Run, RunTransition
from experiments.services import launch as launch_writes
from experiments.services import lifecycle, records
from tests.waiting import scaled
from tests.worker_process import REPO
from tests.workers import test_faults as faults
from tests.workers.test_faults import FakeTime, finished, history, reload, wait_for
from tests.workers.test_worker_killed import pool_processes
from workers.reporting import RunReporter
from workers.watchdog import EVALUATION, LOADING, TRAINING, Stall, Watchdog, stop_stuck_work

fleet = faults.fleet  # real `celery worker` processes on a queue of the test's own
claimed_run = faults.claimed_run  # a run claimed by delivery "t" on worker "w"

REQUEUED_THEN_FAILED = [
    ("queued", "running", 1), ("running", "queued", 1), ("queued", "running", 2), ("running", "failed", 2)]
STALLED = re.compile(r"^No progress for \d+ s at step 0 \(phase: loading\); the run was stopped\.")


# --- the decision, with a fake clock --------------------------------------------------------------------
def test_the_watchdog_declares_a_stall_once_nothing_advanced_for_the_timeout():
    fake = FakeTime()
    dog = Watchdog(timeout_s=60, clock=fake.clock)
    fake.now = 59.9
    assert dog.check() is None  # loading, not yet too long
    dog.progress(phase="cache fill")  # a phase's progress counts
    fake.now = 119
    assert dog.check() is None
    dog.step_done(1, 10)
    fake.now = 170
    assert dog.check() is None and (dog.step, dog.phase) == (1, TRAINING)
    dog.progress(step=5)  # a metric point of step 5
    fake.now = 229.9
    assert dog.check() is None
    fake.now = 230
    assert dog.check() == Stall(idle_s=60, step=5, phase=TRAINING)
    assert dog.stall == Stall(idle_s=60, step=5, phase=TRAINING)
    fake.now = 1000
    assert dog.check() is None  # reported once


def test_the_phase_follows_the_steps_and_a_zero_timeout_turns_the_watchdog_off():
    fake = FakeTime()
    dog = Watchdog(timeout_s=10, clock=fake.clock)
    dog.eval_every = 4
    assert (dog.step, dog.phase) == (0, LOADING)
    dog.step_done(3, 10)
    assert dog.phase == TRAINING
    dog.step_done(4, 10)  # the periodic evaluation follows step 4 (after the step's training metrics)
    dog.metrics(4, ["loss", "lr"])
    assert (dog.step, dog.phase) == (4, EVALUATION)
    dog.metrics(4, ["eval/loss", "eval/accuracy"])  # its results: training goes on
    assert dog.phase == TRAINING
    dog.step_done(10, 10)  # the last step: the final evaluation follows
    dog.metrics(10, ["eval/accuracy"])
    assert dog.phase == EVALUATION
    fake.now = 10
    assert dog.check() == Stall(idle_s=10, step=10, phase=EVALUATION)
    off = Watchdog(timeout_s=0, clock=fake.clock)
    fake.now = 10**9
    assert off.check() is None


def test_the_message_says_how_long_at_which_step_in_which_phase():
    assert lifecycle.stall_message(idle_s=1800.4, step=1200, phase="training") == (
        "No progress for 30 min at step 1200 (phase: training); the run was stopped.")
    assert lifecycle.stall_message(idle_s=5.2, step=0, phase="loading") == (
        "No progress for 5 s at step 0 (phase: loading); the run was stopped.")


KILL_RANKS = """
import json, os, subprocess, sys, time
from workers.watchdog import child_pids, kill_children
sleeper = [sys.executable, "-c", "import time; time.sleep(600)"]
launcher = [sys.executable, "-c", f"import subprocess, time; subprocess.Popen({sleeper!r}); time.sleep(600)"]
ranks = subprocess.Popen(launcher, start_new_session=True)  # like torchrun: a group of its own, with a rank
helper = subprocess.Popen(sleeper)  # in this process's group
deadline = time.monotonic() + float(sys.argv[1])
while not child_pids(ranks.pid) and time.monotonic() < deadline:
    time.sleep(0.05)
(rank,) = child_pids(ranks.pid)
killed = kill_children(os.getpid())
codes = [ranks.wait(timeout=30), helper.wait(timeout=30)]
def gone(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except OSError:
        return True
while not gone(rank) and time.monotonic() < deadline:
    time.sleep(0.05)
print(json.dumps({"killed": sorted(killed), "expected": sorted([ranks.pid, helper.pid]), "codes": codes,
                  "rank_gone": gone(rank)}))
"""


def test_the_stuck_work_s_child_process_groups_are_killed_with_their_ranks():
    if not Path("/proc/self/stat").exists():
        pytest.skip("finds child processes through /proc")
    out = subprocess.run([sys.executable, "-c", KILL_RANKS, str(scaled(20))], cwd=REPO, capture_output=True,
                         text=True, timeout=scaled(60), check=True).stdout
    result = json.loads(out.strip().splitlines()[-1])
    assert result["killed"] == result["expected"]
    assert result["codes"] == [-signal.SIGKILL, -signal.SIGKILL] and result["rank_gone"], result


def test_nothing_is_killed_outside_a_celery_pool_process():
    kill = mock.Mock()
    assert stop_stuck_work(kill=kill) is False  # the test's own process: never
    kill.assert_not_called()


# --- the reporter and the service, in process ----------------------------------------------------------
def _stall_once(run: Run, task_id: str, fake: FakeTime, kill: mock.Mock) -> RunReporter:
    reporter = RunReporter(run_id=run.id, task_id=task_id, clock=fake.clock, sleep=fake.sleep,
                           stall_timeout_s=60, stop_stuck_work=kill)
    reporter.on_progress(3, 40)  # step 3 of 40, then nothing
    fake.now += 59
    reporter._routine_work()  # the heartbeat thread's beat: not yet
    assert reporter.stalled is None and kill.call_count == 0
    fake.now += 1
    reporter._routine_work()
    assert reporter.stalled == Stall(idle_s=60, step=3, phase=TRAINING)
    assert kill.call_count == 1 and not reporter.owns_run() and reporter.should_stop()
    return reporter


@pytest.mark.django_db
def test_a_stalled_run_is_requeued_once_then_failed_and_its_lease_is_renewed_no_more(claimed_run, settings):
    settings.RUN_MAX_ATTEMPTS = 3
    fake, kill = FakeTime(), mock.Mock()
    with mock.patch("experiments.services.dispatch.enqueue_on_commit") as enqueue:
        reporter = _stall_once(claimed_run, "t", fake, kill)
    run = reload(claimed_run)
    assert run.status == Run.Status.QUEUED and run.task_id != "t"
    enqueue.assert_called_once()
    requeue = history(run)[-1]
    assert requeue.reason == ("No progress for 1 min at step 3 (phase: training); the run was stopped. "
                              "Requeued for attempt 2 of 3 (on w).")
    # The stalled delivery writes nothing more: no point, no progress, no lease renewal.
    beat = run.heartbeat_at
    reporter.on_metrics(4, {"loss": 0.5})
    reporter.flush()
    fake.now += 120
    reporter._routine_work()
    assert reload(run).heartbeat_at == beat and not run.metric_points.exists()
    assert kill.call_count == 1

    again = lifecycle.run_claim(run_id=run.id, task_id=run.task_id, worker_name="w")
    assert again is not None and again.attempt == 2
    _stall_once(again, again.task_id, fake, mock.Mock())
    done = reload(run)
    assert done.status == Run.Status.FAILED
    assert done.error == ("No progress for 1 min at step 3 (phase: training); the run was stopped. "
                          "It also stalled on an earlier attempt; giving up.")
    assert [(t.from_status, t.to_status, t.attempt) for t in history(run)] == REQUEUED_THEN_FAILED


@pytest.mark.django_db
def test_only_the_delivery_that_owns_the_run_records_a_stall(claimed_run):
    assert lifecycle.run_stalled(run_id=claimed_run.id, task_id="another", step=0, phase="loading",
                                 idle_s=60) is None
    assert reload(claimed_run).status == Run.Status.RUNNING
    Run.objects.filter(id=claimed_run.id).update(cancel_requested=True)
    cancelled = lifecycle.run_stalled(run_id=claimed_run.id, task_id="t", step=0, phase="loading", idle_s=60)
    assert cancelled.status == Run.Status.CANCELLED
    assert history(cancelled)[-1].reason.startswith("Cancelled: No progress for 1 min at step 0")


# --- a real worker whose run hangs loading its data ----------------------------------------------------
@pytest.fixture
def silent_hub():
    """A hub endpoint that accepts connections and never answers: a dataset read from it blocks forever,
    like a read from a hung network filesystem."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)  # the kernel completes the handshakes; nobody ever reads a request
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    finally:
        listener.close()


@pytest.mark.integration
def test_a_run_hung_loading_its_data_is_requeued_then_failed_and_the_worker_goes_on(fleet, silent_hub,
                                                                                     tmp_path):
    worker = fleet.start(
        # Short, yet longer than a fresh pool process needs to import the engine and load the next run.
        "a", RUN_STALL_TIMEOUT_S=str(round(scaled(4))), RUN_MAX_ATTEMPTS="3", HF_ENDPOINT=silent_hub,
        HF_HOME=str(tmp_path / "hf"), HF_HUB_OFFLINE="0", HF_DATASETS_OFFLINE="0",
        HF_HUB_ETAG_TIMEOUT="3600", HF_HUB_DOWNLOAD_TIMEOUT="3600",
    )
    worker.wait_registered()
    hung = _launch_hub_run(fleet)

    def stalled_attempt(n: int):
        def check():
            rows = [t for t in history(hung) if t.from_status == "running" and t.attempt == n]
            return rows[0] if rows else None
        return check

    first = wait_for(stalled_attempt(1), timeout=90, workers=[worker], what="the first stall")
    assert (first.to_status, first.worker_name) == ("queued", worker.name)
    assert STALLED.match(first.reason), first.reason
    assert first.reason.endswith(f"Requeued for attempt 2 of 3 (on {worker.name}).")

    done = wait_for(finished(hung), timeout=90, workers=[worker], what="the second stall to fail the run")
    assert done.status == Run.Status.FAILED, (done.status, done.error)
    assert STALLED.match(done.error), done.error
    assert done.error.endswith("It also stalled on an earlier attempt; giving up.")
    assert [(t.from_status, t.to_status, t.attempt) for t in history(hung)] == REQUEUED_THEN_FAILED
    assert done.step == 0 and not done.metric_points.exists()

    # The worker survived (a fresh pool process), and trains the next run to the end.
    assert worker.process.poll() is None, worker.tail()
    normal = fleet.launch(max_steps=30, save_every=10)
    ok = wait_for(finished(normal), timeout=120, workers=[worker], what="the next run on the same worker")
    assert ok.status == Run.Status.SUCCEEDED, ok.error
    assert ok.worker_name == worker.name and worker.process.poll() is None
    assert len(pool_processes(worker.process.pid)) == 1
    # Killed, the stalled pool processes never renewed the failed run's lease again.
    assert reload(hung).heartbeat_at == done.heartbeat_at == done.finished_at
    assert RunTransition.objects.filter(run=hung).count() == 4
    log = worker.tail(20000)
    assert log.count("stall watchdog: killing the stuck pool process") == 2, log


def _launch_hub_run(fleet) -> Run:
    """One run of a small text model on a hub dataset, sent to the fleet's queue."""
    digits = DatasetSpec.objects.get(name="digits")  # the fleet's team and user
    team, user = digits.team, digits.created_by
    dataset = records.dataset_spec_create(team=team, created_by=user, name="hung", source="hf",
                                          hub_name="distillweb-tests/hung-dataset", text_column="text",
                                          num_labels=2)
    tiny_bert = records.model_spec_create(
        team=team, created_by=user, name="tiny-bert", source="config", num_labels=2,
        config={"model_type": "bert", "hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2,
                "intermediate_size": 32, "vocab_size": 200},
    )
    experiment = launch_writes.experiment_create(
        team=team, created_by=user, name="hung", dataset=dataset, students=[tiny_bert],
        recipes=[records.hard_labels_recipe(team=team)], seeds=[0], train={"max_steps": 6},
    )
    return experiment.runs.get()
