"""Runs survive faults: database outages in the worker's reporting, and, with real processes, a killed worker,
a restarted broker, cancellation, and a duplicate delivery.

The real-process tests start `celery worker` processes over Redis that share the test database; leases are
short (RUN_HEARTBEAT_TIMEOUT_S in the workers' environment) so a takeover happens within seconds. The broker
restart test starts its own redis-server and kills it by its PID, so the machine's Redis stays up.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from datetime import datetime, timedelta
from pathlib import Path
from types import SimpleNamespace
from unittest import mock

import pytest
from django.db import OperationalError, connection, connections
from django.utils import timezone

from experiments.models import Evaluation, MetricPoint, Run, RunTransition, Worker
from experiments.services import launch as launch_writes
from experiments.services import lifecycle, records, telemetry
from tests.factories import MembershipFactory, TeamFactory, UserFactory
from tests.waiting import scaled
from tests.worker_process import REPO, broker_reachable, free_port, redis_broker_url, shared_database_url
from workers.engine.checkpoint import latest_checkpoint
from workers.reporting import DatabaseUnavailable, RunReporter
from workers.tasks import run_distillation

DISPATCH = "workers.tasks.run_distillation.apply_async"
LEASE_S = 4  # the workers' RUN_HEARTBEAT_TIMEOUT_S in these tests
MLP = [128, 128]  # about 2 ms a step on one CPU thread: long enough runs to land faults mid-training


class FlakyDatabase:
    """Stands in for a service: the first ``failures`` calls fail like a database that went away."""

    def __init__(self, real: Callable, failures: int) -> None:
        self.real = real
        self.failures = failures
        self.calls = 0
        self.written: list[list] = []  # the points handed to each call that went through

    def __call__(self, **kwargs):
        self.calls += 1
        if self.calls <= self.failures:
            raise OperationalError("connection to server at 127.0.0.1, port 5432 failed: Connection refused")
        self.written.append(list(kwargs.get("points", [])))
        return self.real(**kwargs)


class FakeTime:
    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


@pytest.fixture
def claimed_run(digits_setup, team, user) -> Run:
    with mock.patch(DISPATCH):
        experiment = launch_writes.experiment_create(
            team=team,
            created_by=user,
            name="kd",
            dataset=digits_setup["dataset"],
            teacher=digits_setup["teacher"],
            students=digits_setup["students"][:1],
            recipes=[digits_setup["recipe"]],
            seeds=[0],
            train={"max_steps": 40, "eval_every": 20, "save_every": 20, "log_every": 10},
        )
    run = experiment.runs.get(is_baseline=False)
    return lifecycle.run_claim(run_id=run.id, task_id="t", worker_name="w")


def logged_steps(run: Run, name: str = "loss") -> list[int]:
    return list(
        MetricPoint.objects.filter(run=run, name=name).order_by("step").values_list("step", flat=True)
    )


# --- database outages, in process ---------------------------------------------------------------------
@pytest.mark.django_db
def test_metric_points_wait_out_a_database_outage_and_are_written_once(claimed_run):
    fake = FakeTime()
    reporter = RunReporter(
        run_id=claimed_run.id, task_id="t", flush_every_s=1.0, clock=fake.clock, sleep=fake.sleep
    )
    flaky = FlakyDatabase(telemetry.run_record_metrics, failures=4)
    with mock.patch("experiments.services.telemetry.run_record_metrics", side_effect=flaky):
        for step in range(1, 31):
            fake.now += 1.0
            reporter.on_metrics(step, {"loss": 1.0 / step, "kd": 0.5})
            if step == 8:  # the outage: nothing written, nothing lost, training never waited
                assert MetricPoint.objects.filter(run=claimed_run).count() == 0
        reporter.flush()
        writes = flaky.calls
        reporter.flush()  # nothing is left in memory: no further write
    assert fake.sleeps == [] and flaky.calls > 4 and flaky.calls == writes
    # The 16 points of the outage's first 8 steps were held, then came with the first write that went through.
    outage = {(name, step) for step in range(1, 9) for name in ("loss", "kd")}
    assert outage <= {(name, step) for name, step, *_ in flaky.written[0]}
    assert logged_steps(claimed_run) == list(range(1, 31)) and logged_steps(claimed_run, "kd") == list(
        range(1, 31)
    )
    assert MetricPoint.objects.filter(run=claimed_run).count() == 60


@pytest.mark.django_db
def test_a_checkpoint_waits_until_the_points_before_it_are_durable(claimed_run, settings):
    fake = FakeTime()
    reporter = RunReporter(
        run_id=claimed_run.id, task_id="t", clock=fake.clock, sleep=fake.sleep, retry_for_s=60
    )
    reporter.set_schedule(save_every=25, log_every=10)
    reporter.on_metrics(10, {"loss": 0.9})
    reporter.on_metrics(20, {"loss": 0.8})
    checkpoint = settings.ARTIFACT_ROOT / f"runs/{claimed_run.id}/checkpoints/step-25"
    checkpoint.mkdir(parents=True)
    with mock.patch("experiments.services.telemetry.run_record_metrics",
                    side_effect=FlakyDatabase(telemetry.run_record_metrics, failures=3)):
        reporter.on_progress(25, 40)  # the engine checkpoints step 25 next: the training pauses until written
    assert fake.sleeps == [0.5, 1.0, 2.0]  # exponential backoff while the database is down
    assert logged_steps(claimed_run) == [10, 20]
    reporter.on_checkpoint(25, str(checkpoint))
    claimed_run.refresh_from_db()
    assert claimed_run.checkpoint_path == f"runs/{claimed_run.id}/checkpoints/step-25"
    # At a log step the step's own points come before the checkpoint: that call writes them all.
    reporter.on_progress(50, 60)
    reporter.on_metrics(50, {"loss": 0.5})
    assert logged_steps(claimed_run) == [10, 20, 50]


@pytest.mark.django_db
def test_the_reporter_gives_up_after_the_retry_window_and_keeps_the_points(claimed_run):
    fake = FakeTime()
    reporter = RunReporter(
        run_id=claimed_run.id, task_id="t", clock=fake.clock, sleep=fake.sleep, retry_for_s=60
    )
    reporter.on_metrics(10, {"loss": 0.9})
    with mock.patch("experiments.services.telemetry.run_record_metrics",
                    side_effect=FlakyDatabase(telemetry.run_record_metrics, failures=10**6)), \
            pytest.raises(DatabaseUnavailable, match="unreachable for 60 s"):
        reporter.flush()
    assert sum(fake.sleeps) == pytest.approx(60) and max(fake.sleeps) == 5.0
    reporter.flush()  # the database is back: the point it kept is written
    assert logged_steps(claimed_run) == [10]


@pytest.mark.django_db
def test_a_full_buffer_pauses_training_until_the_database_is_back(claimed_run):
    fake = FakeTime()
    reporter = RunReporter(
        run_id=claimed_run.id,
        task_id="t",
        max_buffer=10,
        max_pending=40,
        clock=fake.clock,
        sleep=fake.sleep,
        retry_for_s=600,
    )
    flaky = FlakyDatabase(telemetry.run_record_metrics, failures=8)
    with mock.patch("experiments.services.telemetry.run_record_metrics", side_effect=flaky):
        for step in range(1, 21):
            reporter.on_metrics(step, {"loss": 1.0, "kd": 0.5})
            unwritten = 2 * step - MetricPoint.objects.filter(run=claimed_run).count()
            assert unwritten <= 40  # bounded
    assert fake.sleeps  # it waited for the database instead of dropping points
    reporter.flush()
    assert logged_steps(claimed_run) == list(range(1, 21))


@pytest.mark.django_db
def test_cancellation_polls_during_an_outage_keep_the_last_answer(claimed_run):
    fake = FakeTime()
    reporter = RunReporter(
        run_id=claimed_run.id, task_id="t", poll_every_s=1.0, clock=fake.clock, sleep=fake.sleep
    )
    assert reporter.should_stop() is False
    Run.objects.filter(id=claimed_run.id).update(cancel_requested=True)
    with mock.patch("experiments.selectors.records.run_is_cancel_requested",
                    side_effect=OperationalError("server closed the connection unexpectedly")):
        fake.now += 5
        assert reporter.should_stop() is False  # unknown: training goes on
    fake.now += 30
    assert reporter.should_stop() is True


@pytest.mark.django_db
def test_a_run_whose_outcome_cannot_be_recorded_goes_back_to_the_broker(claimed_run, settings):
    settings.RUN_DB_RETRY_S = 0.3
    Run.objects.filter(id=claimed_run.id).update(status=Run.Status.QUEUED, task_id="")
    result = SimpleNamespace(stopped=False, to_dict=lambda: {"steps": 40, "student": {"accuracy": 0.9}})
    down = OperationalError("connection to server at 127.0.0.1, port 5432 failed: Connection refused")
    with mock.patch("workers.engine.trainer.train", return_value=result), \
            mock.patch("experiments.services.lifecycle.run_finish", side_effect=down) as finish:
        outcome = run_distillation.apply(args=(claimed_run.id,), task_id="delivery-1")
    assert outcome.state == "REJECTED"  # not acknowledged as done: the broker delivers it again
    assert finish.call_count >= 2
    run = Run.objects.get(id=claimed_run.id)
    assert run.status == Run.Status.RUNNING and run.error == ""  # neither failed nor lost: its lease expires


@pytest.mark.django_db(transaction=True)
def test_the_reporter_thread_writes_and_renews_the_lease_while_the_engine_is_silent(digits_setup, team, user):
    with mock.patch(DISPATCH):
        experiment = launch_writes.experiment_create(
            team=team,
            created_by=user,
            name="kd",
            dataset=digits_setup["dataset"],
            teacher=digits_setup["teacher"],
            students=digits_setup["students"][:1],
            recipes=[digits_setup["recipe"]],
            seeds=[0],
        )
    run = experiment.runs.get(is_baseline=False)
    lifecycle.run_claim(run_id=run.id, task_id=run.task_id, worker_name="w")
    old = timezone.now() - timedelta(hours=1)
    Run.objects.filter(id=run.id).update(heartbeat_at=old)
    reporter = RunReporter(run_id=run.id, task_id=run.task_id, flush_every_s=0.05, poll_every_s=0.05)

    def soon(condition: Callable[[], bool]) -> bool:
        deadline = time.monotonic() + scaled(10)
        while not condition() and time.monotonic() < deadline:
            time.sleep(0.02)
        return condition()

    with reporter:
        reporter.on_progress(3, 40)
        reporter.on_metrics(
            3, {"loss": 0.7}
        )  # the training thread only buffers: the reporter's thread writes
        assert soon(lambda: logged_steps(run) == [3] and Run.objects.get(id=run.id).step == 3)
        assert soon(lambda: Run.objects.get(id=run.id).heartbeat_at > old + timedelta(minutes=59))
        renewed = Run.objects.get(id=run.id).heartbeat_at
        assert soon(lambda: Run.objects.get(id=run.id).heartbeat_at > renewed)  # and again, with nothing new
        assert reporter.should_stop() is False
        Run.objects.filter(id=run.id).update(cancel_requested=True)
        assert soon(reporter.should_stop)  # polled by the thread
        Run.objects.filter(id=run.id).update(task_id="another-delivery")
        assert soon(lambda: not reporter.owned)  # taken over: the engine stops at its next poll


@pytest.mark.django_db
def test_the_sweep_task_requeues_stale_runs_and_resends_lost_messages(claimed_run, settings,
                                                                       django_capture_on_commit_callbacks):
    redis_broker_url()  # the sweep reads queue sizes from the broker
    from workers.lifecycle_tasks import broker_queue_size, requeue_stale_runs

    settings.RUN_QUEUE = queue = f"sweep-{uuid.uuid4().hex[:8]}"
    lost = Run.objects.filter(experiment=claimed_run.experiment, is_baseline=True)
    lost.update(queue=queue, created_at=timezone.now() - timedelta(hours=1))
    Run.objects.filter(id=claimed_run.id).update(
        queue=queue, heartbeat_at=timezone.now() - timedelta(seconds=settings.RUN_HEARTBEAT_TIMEOUT_S + 1))
    assert broker_queue_size(queue) == 0  # the broker does not know the queue yet
    with mock.patch(DISPATCH) as dispatch, django_capture_on_commit_callbacks(execute=True):
        counts = requeue_stale_runs.apply().get()
    assert counts == {"queued": 1, "redispatched": 1}
    assert sorted(call.kwargs["args"][0] for call in dispatch.call_args_list) == sorted(
        [claimed_run.id, lost.get().id]
    )
    with mock.patch("celery.app.base.Celery.connection_for_read", side_effect=OSError("Connection refused")):
        assert broker_queue_size(queue) is None  # unknown: the sweep sends nothing on a guess


# --- real processes -------------------------------------------------------------------------------------
class FaultWorker:
    """A real `celery worker` in a process group of its own, so that the test can kill it with its pool
    child."""

    def __init__(
        self,
        name: str,
        *,
        queues: list[str],
        broker_url: str,
        log: Path,
        beat_schedule: Path | None,
        env: dict[str, str],
        database_port: int | None = None,
    ) -> None:
        self.name = f"{name}@{os.uname().nodename}"
        self.log = log
        command = [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "distillweb",
            "worker",
            "-Q",
            ",".join(queues),
            "-n",
            self.name,
            "--concurrency",
            "1",
            "--loglevel",
            "INFO",
            "--without-gossip",
            "--without-mingle",
        ]
        if beat_schedule is not None:
            command += ["-B", "--schedule", str(beat_schedule)]
        self.process = subprocess.Popen(
            command, cwd=REPO, stdout=log.open("wb"), stderr=subprocess.STDOUT, start_new_session=True,
            env={**os.environ, "DJANGO_SETTINGS_MODULE": "distillweb.settings.test",
                 "DATABASE_URL": shared_database_url(port=database_port),
                 "CELERY_BROKER_URL": broker_url, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", **env},
        )

    def wait_registered(self, timeout: float = 90) -> None:
        deadline = time.monotonic() + scaled(timeout)
        while time.monotonic() < deadline:
            if Worker.objects.filter(name=self.name, state=Worker.State.ONLINE).exists():
                return
            assert self.process.poll() is None, f"worker {self.name} exited:\n{self.tail()}"
            time.sleep(0.2)
        raise AssertionError(f"worker {self.name} did not register:\n{self.tail()}")

    def kill(self) -> None:
        """SIGKILL the whole worker: the main process and its pool child."""
        os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=30)

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()

    def tail(self, chars: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-chars:] if self.log.exists() else ""


@pytest.fixture
def fleet(transactional_db, settings, tmp_path):
    """Starts real workers for one test (on a queue of its own) and stops them all at the end."""
    broker = redis_broker_url()
    if connection.settings_dict["ENGINE"] != "django.db.backends.postgresql":
        if os.environ.get("DISTILLWEB_REQUIRE_SERVICES"):
            pytest.fail("the fault tests need Postgres (DATABASE_URL): the workers share its test database")
        pytest.skip("the workers share the Postgres test database")
    tag = uuid.uuid4().hex[:8]
    queue, sweeps = f"faults-{tag}", f"faults-{tag}-fleet"
    settings.RUN_QUEUE = queue
    started: list[FaultWorker] = []

    def start(
        name: str,
        *,
        queues: list[str] | None = None,
        beat: bool = False,
        broker_url: str | None = None,
        database_port: int | None = None,
        **env: str,
    ) -> FaultWorker:
        worker = FaultWorker(
            f"{name}-{tag}",
            queues=queues or [queue],
            broker_url=broker_url or broker,
            log=tmp_path / f"{name}.log",
            beat_schedule=tmp_path / f"{name}-beat" if beat else None,
            database_port=database_port,
            env={
                "ARTIFACT_ROOT": str(settings.ARTIFACT_ROOT),
                "RUN_QUEUE": queue,
                "FLEET_QUEUE": sweeps,
                "WORKER_HEARTBEAT_INTERVAL_S": "1",
                "RUN_HEARTBEAT_TIMEOUT_S": str(LEASE_S),
                "RUN_SWEEP_INTERVAL_S": "1",
                **env,
            },
        )
        started.append(worker)
        return worker

    user, team = UserFactory(), TeamFactory()
    MembershipFactory(user=user, team=team)
    digits = records.dataset_spec_create(team=team, created_by=user, name="digits", source="builtin",
                                          builtin_name="digits")
    student = records.model_spec_create(team=team, created_by=user, name="mlp", source="builtin",
                                         builtin_arch="mlp", config={"hidden_sizes": MLP}, num_labels=10)

    def launch(*, max_steps: int, save_every: int = 100, log_every: int = 10, eval_every: int = 1000) -> Run:
        """One hard-label run on digits, sent to the test's queue (on commit, through the test's broker)."""
        experiment = launch_writes.experiment_create(
            team=team,
            created_by=user,
            name=f"run {uuid.uuid4().hex[:4]}",
            dataset=digits,
            students=[student],
            recipes=[records.hard_labels_recipe(team=team)],
            seeds=[0],
            train={
                "max_steps": max_steps,
                "save_every": save_every,
                "log_every": log_every,
                "eval_every": eval_every,
                "batch_size": 64,
                "lr": 0.01,
            },
        )
        return experiment.runs.get()

    try:
        yield SimpleNamespace(
            start=start, launch=launch, queue=queue, sweeps=sweeps, broker=broker, workers=started
        )
    finally:
        for worker in started:
            worker.stop()
        connections.close_all()


def wait_for(condition: Callable[[], object], *, timeout: float, workers: list[FaultWorker], what: str):
    """Poll ``condition`` until it holds; ``timeout`` is an idle machine's bound, scaled
    (tests/waiting.py)."""
    deadline = time.monotonic() + scaled(timeout)
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.1)
    logs = "\n".join(f"--- {w.name}\n{w.tail()}" for w in workers)
    raise AssertionError(f"timed out waiting for {what}\n{logs}")


def reload(run: Run) -> Run:
    return Run.objects.get(id=run.id)


def training_with_a_checkpoint(run: Run) -> Callable[[], Run | None]:
    def check() -> Run | None:
        current = reload(run)
        return current if current.status == Run.Status.RUNNING and current.checkpoint_path else None

    return check


def finished(run: Run) -> Callable[[], Run | None]:
    def check() -> Run | None:
        current = reload(run)
        return current if current.is_terminal else None

    return check


def history(run: Run) -> list[RunTransition]:
    return list(RunTransition.objects.filter(run=run).order_by("id"))


def assert_every_logged_step_once(run: Run, *, log_every: int) -> None:
    steps = logged_steps(run)
    assert steps == list(range(log_every, run.total_steps + 1, log_every)), f"gaps or extras: {steps[:50]}"
    for name in set(MetricPoint.objects.filter(run=run).values_list("name", flat=True)):
        named = logged_steps(run, name)
        assert len(named) == len(set(named)), name  # also a database constraint


@pytest.mark.integration
def test_a_killed_worker_s_run_is_taken_over_and_finishes_from_its_last_checkpoint(fleet, settings):
    # A takes runs; B only sweeps (it runs celery beat: the lease sweep every second) until it is told to take
    # runs too, so the run lands on A and B's sweeps watch A's live lease meanwhile.
    a = fleet.start("a")
    b = fleet.start("b", queues=[fleet.sweeps], beat=True)
    a.wait_registered()
    b.wait_registered()
    # Long enough to outlast the lease wait below on an idle machine too (~1 ms a step there, 2–3 ms under
    # load).
    run = fleet.launch(max_steps=20000)
    wait_for(training_with_a_checkpoint(run), timeout=90, workers=[a, b], what="A's first checkpoint")
    time.sleep(LEASE_S + 1.5)  # longer than the lease: B's sweeps must leave A's live run alone
    live = reload(run)
    assert live.status == Run.Status.RUNNING, f"the run ended before the kill ({live.status}); make it longer"
    assert (live.worker_name, live.attempt) == (a.name, 1)
    assert [(t.from_status, t.to_status) for t in history(run)] == [("queued", "running")]

    a.kill()
    killed_at = timezone.now()
    resume_from = latest_checkpoint(Path(settings.ARTIFACT_ROOT) / f"runs/{run.id}")
    assert resume_from is not None
    resume_step = int(resume_from.name.split("-")[1])
    assert 0 < resume_step < run.total_steps
    from distillweb.celery import app

    assert app.control.add_consumer(fleet.queue, destination=[b.name], reply=True, timeout=10), b.tail()

    done = wait_for(finished(run), timeout=240, workers=[b], what="B to finish the run")
    assert done.status == Run.Status.SUCCEEDED, done.error
    assert (done.worker_name, done.attempt, done.step) == (b.name, 2, done.total_steps)
    rows = history(run)
    assert [(t.from_status, t.to_status, t.worker_name, t.attempt) for t in rows] == [
        ("queued", "running", a.name, 1), ("running", "queued", a.name, 1), ("queued", "running", b.name, 2),
        ("running", "succeeded", b.name, 2)]
    assert rows[1].reason.startswith(f"Worker lost: {a.name} stopped renewing the lease")
    assert Evaluation.objects.filter(run=run, role="student").count() == 1  # succeeded once
    assert_every_logged_step_once(done, log_every=10)
    # B resumed from A's last checkpoint: the points up to it are A's, written before the kill, never redone.
    wall: dict[int, datetime] = dict(
        MetricPoint.objects.filter(run=run, name="loss").values_list("step", "wall_time")
    )
    assert all(wall[s] < killed_at for s in range(10, resume_step + 1, 10))
    assert all(wall[s] > killed_at for s in range(resume_step + 10, run.total_steps + 1, 10))


class RedisServer:
    """The test's own redis-server (no persistence, like a broker restart that loses its data)."""

    def __init__(self, log: Path) -> None:
        self.port = free_port()
        self.log = log
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        self.process = subprocess.Popen(
            [
                "redis-server",
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ],
            stdout=self.log.open("ab"),
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + scaled(20)
        while not broker_reachable(self.url):
            assert time.monotonic() < deadline and self.process.poll() is None, self.log.read_text()
            time.sleep(0.1)

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=10)


@pytest.fixture
def own_redis(tmp_path):
    try:
        subprocess.run(["redis-server", "--version"], check=True, capture_output=True)
    except (OSError, subprocess.CalledProcessError):
        if os.environ.get("DISTILLWEB_REQUIRE_SERVICES"):
            pytest.fail("redis-server is needed for the broker restart test")
        pytest.skip("redis-server is not installed")
    server = RedisServer(tmp_path / "redis.log")
    server.start()
    try:
        yield server
    finally:
        server.kill()


def publish(run: Run, *, broker_url: str, queue: str, task_id: str) -> None:
    """Send the run's task through a given broker (the test process's own app talks to the shared Redis)."""
    from kombu import Connection

    with Connection(broker_url) as broker:
        run_distillation.apply_async(args=(run.id,), queue=queue, task_id=task_id, connection=broker)


@pytest.mark.integration
def test_a_broker_restart_during_a_run_loses_and_duplicates_nothing(fleet, own_redis):
    worker = fleet.start("w", broker_url=own_redis.url)
    worker.wait_registered()
    with mock.patch(DISPATCH):  # the task goes to the test's own redis-server below
        run = fleet.launch(
            max_steps=10000
        )  # still training when the broker comes back, even on an idle machine
    publish(run, broker_url=own_redis.url, queue=fleet.queue, task_id=reload(run).task_id)
    wait_for(training_with_a_checkpoint(run), timeout=90, workers=[worker], what="the first checkpoint")

    own_redis.kill()  # the broker is gone, with every message and acknowledgement it held
    step_at_kill = reload(run).step
    time.sleep(3)
    assert worker.process.poll() is None, worker.tail()
    own_redis.start()

    done = wait_for(finished(run), timeout=240, workers=[worker], what="the run to finish")
    assert done.status == Run.Status.SUCCEEDED, done.error
    assert step_at_kill < done.total_steps and done.attempt == 1 and done.worker_name == worker.name
    assert "Connection to broker lost" in worker.tail(10**6)  # the restart did reach the worker
    assert [(t.from_status, t.to_status) for t in history(run)] == [
        ("queued", "running"),
        ("running", "succeeded"),
    ]
    assert_every_logged_step_once(done, log_every=10)
    assert Evaluation.objects.filter(run=run, role="student").count() == 1
    # The worker came back to the restarted broker: it takes the next run from it.
    with mock.patch(DISPATCH):
        after = fleet.launch(max_steps=50)
    publish(after, broker_url=own_redis.url, queue=fleet.queue, task_id=reload(after).task_id)
    assert (
        wait_for(finished(after), timeout=120, workers=[worker], what="a run after the restart").status
        == Run.Status.SUCCEEDED
    )


@pytest.mark.integration
def test_cancelled_queued_and_running_runs_stop_and_the_running_one_keeps_its_work(fleet, settings):
    worker = fleet.start("w")
    worker.wait_registered()
    running = fleet.launch(max_steps=20000)  # far longer than the test: only the cancellation ends it
    wait_for(training_with_a_checkpoint(running), timeout=90, workers=[worker], what="the first checkpoint")
    queued = fleet.launch(max_steps=50)  # behind the running one: the worker takes one run at a time
    time.sleep(1)
    assert reload(queued).status == Run.Status.QUEUED and reload(queued).task_id

    assert lifecycle.run_cancel(run=queued).status == Run.Status.CANCELLED  # at once
    assert lifecycle.run_cancel(run=running).status == Run.Status.RUNNING  # at its next check
    stopped = wait_for(finished(running), timeout=30, workers=[worker], what="the running run to stop")
    assert stopped.status == Run.Status.CANCELLED and stopped.step < stopped.total_steps

    # The worker then receives the cancelled run's message and drops it: the message was revoked.
    wait_for(
        lambda: (
            f"Discarding revoked task: workers.run_distillation[{reload(queued).task_id}]" in worker.tail()
        ),
        timeout=30,
        workers=[worker],
        what="the revoked message to be dropped",
    )
    points = MetricPoint.objects.filter(run=running).count()
    time.sleep(2)
    for run in (stopped, reload(queued)):  # neither continues
        assert reload(run).step == run.step and reload(run).is_terminal
    assert MetricPoint.objects.filter(run=running).count() == points > 0
    assert logged_steps(running) == list(range(10, stopped.step + 1, 10))  # its metrics stay, every step once
    checkpoint = latest_checkpoint(Path(settings.ARTIFACT_ROOT) / f"runs/{running.id}")
    # ... and its checkpoint to resume from, written by its owner (attempt 1) and registered
    assert checkpoint is not None and checkpoint.name == f"step-{stopped.step}-a1"
    assert stopped.checkpoint_path == f"runs/{running.id}/checkpoints/{checkpoint.name}"
    assert stopped.artifacts.filter(kind="checkpoint").exists()
    never = reload(queued)
    assert (
        never.attempt == 0 and never.started_at is None and not MetricPoint.objects.filter(run=never).exists()
    )
    assert [(t.from_status, t.to_status) for t in history(never)] == [("queued", "cancelled")]
    assert [(t.from_status, t.to_status) for t in history(running)] == [("queued", "running"),
                                                                        ("running", "cancelled")]


@pytest.mark.integration
def test_a_duplicate_delivery_of_a_live_run_does_nothing(fleet):
    first, second = fleet.start("one"), fleet.start("two")
    first.wait_registered()
    second.wait_registered()
    run = fleet.launch(max_steps=10000)  # still training once the idle worker has refused both copies
    live = wait_for(
        training_with_a_checkpoint(run), timeout=90, workers=[first, second], what="the run to start"
    )
    owner, idle = (first, second) if live.worker_name == first.name else (second, first)
    # The same message again (as Redis redelivers it), and a stray copy under another id: the idle worker gets
    # both.
    run_distillation.apply_async(args=(run.id,), queue=fleet.queue, task_id=live.task_id)
    run_distillation.apply_async(args=(run.id,), queue=fleet.queue, task_id=str(uuid.uuid4()))
    wait_for(lambda: idle.tail().count("nothing to do") == 2, timeout=60, workers=[owner, idle],
             what="the idle worker to refuse both copies")
    during = reload(run)
    assert (during.status, during.task_id, during.worker_name, during.attempt) == (
        Run.Status.RUNNING, live.task_id, owner.name, 1)

    done = wait_for(finished(run), timeout=240, workers=[owner, idle], what="the run to finish")
    assert done.status == Run.Status.SUCCEEDED and done.attempt == 1 and done.worker_name == owner.name
    assert [(t.from_status, t.to_status) for t in history(run)] == [
        ("queued", "running"),
        ("running", "succeeded"),
    ]
    assert_every_logged_step_once(done, log_every=10)


class FlakyTcpProxy:
    """Forwards a local port to Postgres; ``cut()`` drops every connection and refuses new ones until
    ``restore()``: a database outage as the worker sees it."""

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self.port = free_port()
        self._lock = threading.Lock()
        self._sockets: set[socket.socket] = set()
        self._listener: socket.socket | None = None
        self.restore()

    def restore(self) -> None:
        self._listener = socket.create_server(("127.0.0.1", self.port))
        threading.Thread(target=self._accept, args=(self._listener,), daemon=True).start()

    def cut(self) -> None:
        listener, self._listener = self._listener, None
        if listener is not None:
            _close(listener)
        with self._lock:
            sockets, self._sockets = self._sockets, set()
        for sock in sockets:
            _close(sock)

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return  # cut
            try:
                server = socket.create_connection(self.upstream)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._sockets |= {client, server}
            for source, target in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(source, target), daemon=True).start()

    @staticmethod
    def _pump(source: socket.socket, target: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                target.sendall(data)
        except OSError:
            pass
        finally:
            _close(source)
            _close(target)


def _close(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)  # also wakes a thread blocked in accept() or recv()
    except OSError:
        pass
    sock.close()


@pytest.mark.integration
def test_a_database_outage_pauses_the_run_and_loses_nothing(fleet):
    db = connection.settings_dict
    proxy = FlakyTcpProxy((db["HOST"] or "127.0.0.1", int(db["PORT"] or 5432)))
    try:
        # The default lease (120 s) outlasts the outage: no sweep may hand the run to someone else meanwhile.
        worker = fleet.start(
            "w", database_port=proxy.port, RUN_HEARTBEAT_TIMEOUT_S="120", DB_CONN_MAX_AGE="0"
        )
        worker.wait_registered()
        run = fleet.launch(max_steps=3000)
        wait_for(training_with_a_checkpoint(run), timeout=90, workers=[worker], what="the first checkpoint")
        proxy.cut()
        time.sleep(8)
        assert worker.process.poll() is None and not reload(run).is_terminal
        proxy.restore()
        done = wait_for(finished(run), timeout=240, workers=[worker], what="the run to finish")
    finally:
        proxy.cut()
    assert done.status == Run.Status.SUCCEEDED, done.error
    assert done.attempt == 1 and "database unreachable" in worker.tail(10**6)
    assert [(t.from_status, t.to_status) for t in history(run)] == [
        ("queued", "running"),
        ("running", "succeeded"),
    ]
    assert_every_logged_step_once(done, log_every=10)
