"""A worker that lost its lease never writes into the run again, with real processes.

A killed worker never comes back; the dangerous one is a worker that does: frozen past its lease (SIGSTOP, a
VM pause, a swap storm) or cut off from Postgres for longer than the lease, it wakes up with a model, buffered
points and a checkpoint to write while another worker owns the run. These tests freeze and cut real `celery
worker` processes at different moments of a run and check, each time, that

- the run succeeds once (one success, one student evaluation);
- every logged step of every series exists exactly once;
- the model's trajectory matches its metrics: every logged loss equals an uninterrupted run's at the same step
  (a step trained without its points, or a checkpoint of a lost worker resumed, would shift the curve), and so
  does the final evaluation;
- no file of the owner is deleted by the evicted worker, and the evicted worker registers nothing more.
"""

from __future__ import annotations

import os
import random
import signal
import time
import uuid
from pathlib import Path

import pytest
from django.db import connection

from experiments.models import Artifact, Evaluation, MetricPoint, Run
from experiments.services import launch as launch_writes
from experiments.services import records
from tests.factories import MembershipFactory, TeamFactory, UserFactory
from tests.workers import test_faults as faults
from tests.workers.test_faults import (
    LEASE_S,
    FaultWorker,
    FlakyTcpProxy,
    assert_every_logged_step_once,
    finished,
    history,
    reload,
    wait_for,
)
from workers.engine.config import RunConfig
from workers.engine.trainer import Callbacks, train

fleet = faults.fleet  # real `celery worker` processes on a queue of the test's own

# Large enough that a step costs a few milliseconds: the run outlasts five takeovers, and the in-process
# reference below stays short.
HIDDEN = [512, 512]
MAX_STEPS, SAVE_EVERY, LOG_EVERY = 3000, 25, 5
# Every worker keeps all its checkpoints, so any folder of the owner that disappears was deleted by someone
# else. A lease a little longer than the other fault tests', so a loaded machine does not add takeovers of its
# own.
WORKER_ENV = {"RUN_MAX_ATTEMPTS": "20", "RUN_KEEP_CHECKPOINTS": "100000", "RUN_HEARTBEAT_TIMEOUT_S": "8"}


def launch(fleet) -> Run:
    user, team = UserFactory(), TeamFactory()
    MembershipFactory(user=user, team=team)
    digits = records.dataset_spec_create(team=team, created_by=user, name="digits", source="builtin",
                                          builtin_name="digits")
    student = records.model_spec_create(team=team, created_by=user, name="mlp", source="builtin",
                                         builtin_arch="mlp", config={"hidden_sizes": HIDDEN}, num_labels=10)
    experiment = launch_writes.experiment_create(
        team=team, created_by=user, name=f"fenced {uuid.uuid4().hex[:4]}", dataset=digits, students=[student],
        recipes=[records.hard_labels_recipe(team=team)], seeds=[0],
        train={"max_steps": MAX_STEPS, "save_every": SAVE_EVERY, "log_every": LOG_EVERY, "eval_every": 100000,
               "batch_size": 128, "lr": 0.01},
    )
    return experiment.runs.get()


def checkpoint_folders(run: Run, root: Path, attempt: int) -> set[str]:
    folder = root / f"runs/{run.id}/checkpoints"
    return {p.name for p in folder.glob(f"step-*-a{attempt}")} if folder.is_dir() else set()


def registered_by(run: Run, *, after: int = 0):
    """The run, once an attempt later than ``after`` is training and has registered a checkpoint of its
    own."""

    def check() -> Run | None:
        current = reload(run)
        return current if (current.status == Run.Status.RUNNING and current.attempt > after
                           and current.checkpoint_path.endswith(f"-a{current.attempt}")) else None

    return check


def task_ended(worker: FaultWorker, task_id: str):
    return lambda: f"run_distillation[{task_id}] succeeded" in worker.tail(10**7)


def assert_matches_an_uninterrupted_run(run: Run, tmp_path: Path) -> None:
    """Train the run's frozen config in this process, without interruption, and compare every logged loss and
    the final evaluation (CPU training is deterministic for a seed: a resumed run continues bit for bit)."""
    config = {**run.config, "output_dir": str(tmp_path / "reference"), "cache_dir": str(tmp_path / "cache")}
    losses: dict[int, float] = {}
    result = train(
        RunConfig.from_dict(config),
        Callbacks(on_metrics=lambda step, m: losses.__setitem__(step, m["loss"]) if "loss" in m else None),
    )
    logged = dict(MetricPoint.objects.filter(run=run, name="loss").values_list("step", "value"))
    assert sorted(logged) == sorted(losses)
    off = {
        s: (logged[s], losses[s])
        for s in losses
        if abs(logged[s] - losses[s]) > 1e-6 * max(1.0, abs(losses[s]))
    }
    assert not off, f"the run's curve leaves the uninterrupted one at steps {sorted(off)[:10]}: {off}"
    assert run.result["student"]["accuracy"] == pytest.approx(result.student["accuracy"], abs=1e-9)
    assert run.result["student"]["nll"] == pytest.approx(result.student["nll"], rel=1e-6)


def assert_succeeded_once(run: Run, *, attempts: int | None) -> Run:
    done = wait_for(finished(run), timeout=600, workers=[], what="the run to finish")
    assert done.status == Run.Status.SUCCEEDED, done.error
    assert attempts is None or done.attempt == attempts
    assert [t.to_status for t in history(run)].count(Run.Status.SUCCEEDED) == 1
    assert Evaluation.objects.filter(run=run, role="student").count() == 1
    assert_every_logged_step_once(done, log_every=LOG_EVERY)
    return done


@pytest.mark.integration
def test_workers_frozen_past_their_lease_write_nothing_when_they_wake(fleet, settings, tmp_path):
    root = Path(settings.ARTIFACT_ROOT)
    sweeper = fleet.start("sweeper", queues=[fleet.sweeps], beat=True, **WORKER_ENV)
    a, b = fleet.start("a", **WORKER_ENV), fleet.start("b", **WORKER_ENV)
    for worker in (sweeper, a, b):
        worker.wait_registered()
    by_name = {a.name: a, b.name: b}
    run = launch(fleet)
    chance = random.Random(20261207)
    targets = [150, 600, 1050, 1500, 1950]  # the steps after which each freeze lands, plus a random delay
    frozen_at = []
    for target in targets:
        wait_for(registered_by(run), timeout=300, workers=fleet.workers, what="an attempt training")
        wait_for(
            lambda t=target: reload(run).step >= t, timeout=300, workers=fleet.workers, what=f"step {target}"
        )
        time.sleep(
            chance.uniform(0, 0.5)
        )  # a different moment of the loop each time: a step, a write, a save
        owner = reload(run)
        assert owner.status == Run.Status.RUNNING, "the run ended too soon"
        evicted = by_name[owner.worker_name]
        os.killpg(evicted.process.pid, signal.SIGSTOP)
        frozen_at.append(reload(run).step)
        try:
            # The lease expires, the sweep requeues the run and the other worker resumes it from the
            # checkpoint the frozen one registered last.
            successor = wait_for(registered_by(run, after=owner.attempt), timeout=300, workers=fleet.workers,
                                 what="another worker to take over")
            assert successor.worker_name != evicted.name
            owned_files = checkpoint_folders(run, root, successor.attempt)
            assert owned_files
        finally:
            os.killpg(evicted.process.pid, signal.SIGCONT)
        # The evicted worker wakes up, finds the run taken over at its next write and stops, writing nothing.
        wait_for(task_ended(evicted, owner.task_id), timeout=300, workers=fleet.workers,
                 what="the evicted worker to stop")
        assert owned_files <= checkpoint_folders(run, root, successor.attempt), \
            "the evicted worker deleted the owner's files"
        registered = {Path(p).name for p in Artifact.objects.filter(run=run, kind="checkpoint")
                      .values_list("path", flat=True)}
        assert checkpoint_folders(run, root, owner.attempt) <= registered, \
            "the evicted worker left an unregistered folder"
    assert len(set(frozen_at)) == len(targets)

    done = assert_succeeded_once(run, attempts=None)
    assert done.attempt > len(targets)
    assert_matches_an_uninterrupted_run(done, tmp_path)


@pytest.mark.integration
def test_a_worker_cut_off_from_the_database_past_its_lease_writes_nothing_when_it_is_back(fleet, settings,
                                                                                             tmp_path):
    root = Path(settings.ARTIFACT_ROOT)
    db = connection.settings_dict
    proxy = FlakyTcpProxy((db["HOST"] or "127.0.0.1", int(db["PORT"] or 5432)))
    try:
        # A trains through the proxy; B sweeps (beat) and takes runs only once told to, after A is cut off.
        a = fleet.start("a", database_port=proxy.port, DB_CONN_MAX_AGE="0", **WORKER_ENV)
        b = fleet.start("b", queues=[fleet.sweeps], beat=True, **WORKER_ENV)
        a.wait_registered()
        b.wait_registered()
        run = launch(fleet)
        wait_for(registered_by(run), timeout=300, workers=[a, b], what="A training")
        wait_for(lambda: reload(run).step >= 300, timeout=300, workers=[a, b], what="step 300")
        owner = reload(run)
        proxy.cut()  # longer than the lease, shorter than RUN_DB_RETRY_S: A keeps trying, its buffer grows
        from distillweb.celery import app

        assert app.control.add_consumer(fleet.queue, destination=[b.name], reply=True, timeout=10), b.tail()
        wait_for(registered_by(run, after=1), timeout=300, workers=[a, b], what="B to take over")
        time.sleep(LEASE_S)  # A, cut off, trains on meanwhile: all of that must come to nothing
        owned_files = checkpoint_folders(run, root, 2)
        proxy.restore()
        wait_for(task_ended(a, owner.task_id), timeout=300, workers=[a, b], what="A to stop")
        assert "database unreachable" in a.tail(10**7)
        assert owned_files <= checkpoint_folders(run, root, 2), "A deleted B's files"
        assert reload(run).checkpoint_path.endswith("-a2")
        done = assert_succeeded_once(run, attempts=2)
    finally:
        proxy.cut()
    assert done.worker_name == b.name
    assert_matches_an_uninterrupted_run(done, tmp_path)
