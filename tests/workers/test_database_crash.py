"""Metric points survive a crash of the database server (`pg_ctl -m immediate`), with real processes.

The test runs a Postgres cluster of its own (initdb in a temporary folder, a spare loopback port), so the
machine's server stays up. Its WAL writer flushes rarely (``wal_writer_delay=10s``): a commit confirmed before
its disk flush stays in memory for seconds, as it may on a busy server, and an immediate shutdown loses it. A
real `celery worker` trains a run against that cluster; the test crashes the server right after the worker
wrote points, starts it again, and checks that the run succeeds with every logged step of every series exactly
once.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from django.db import connection

from tests.waiting import scaled
from tests.worker_process import REPO, free_port
from tests.workers import test_faults as faults

LOG_EVERY = 20

fleet = faults.fleet  # real `celery worker` processes on a queue of the test's own


def postgres_bin() -> Path | None:
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
    if found:
        return found[-1].parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


class PrivatePostgres:
    """A throwaway Postgres cluster on a spare loopback port, run as the ``postgres`` user when we are
    root."""

    def __init__(self, bin_dir: Path) -> None:
        self.bin = bin_dir
        self.dir = Path(tempfile.mkdtemp(prefix="distillweb-pg-"))
        self.dir.chmod(0o755)
        self.port = free_port()
        if os.geteuid() == 0:
            shutil.chown(self.dir, user="postgres")
        self._as_owner("initdb", "-D", str(self.dir / "data"), "-A", "trust", "-U", "postgres", "--no-sync")

    def _as_owner(self, program: str, *args: str) -> None:
        command = [str(self.bin / program), *args]
        if os.geteuid() == 0:
            command = ["runuser", "-u", "postgres", "--", *command]
        subprocess.run(command, check=True, capture_output=True, timeout=scaled(120))

    def start(self) -> None:
        options = (f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 -c wal_writer_delay=10s "
                   "-c fsync=on")
        self._as_owner(
            "pg_ctl", "-D", str(self.dir / "data"), "-l", str(self.dir / "log"), "-w", "-o", options, "start"
        )

    def crash(self) -> None:
        self._as_owner("pg_ctl", "-D", str(self.dir / "data"), "-m", "immediate", "stop")

    def close(self) -> None:
        try:
            self._as_owner("pg_ctl", "-D", str(self.dir / "data"), "-m", "immediate", "stop")
        except subprocess.CalledProcessError:
            pass  # not running
        shutil.rmtree(self.dir, ignore_errors=True)

    def url(self, name: str) -> str:
        return f"postgres://postgres@127.0.0.1:{self.port}/{name}"

    def query(self, name: str, sql: str, *params: object) -> list[tuple]:
        import psycopg

        with psycopg.connect(self.url(name).replace("postgres://", "postgresql://"), autocommit=True) as conn:
            cursor = conn.execute(sql, params)
            return cursor.fetchall() if cursor.description else []


@pytest.fixture
def private_postgres():
    bin_dir = postgres_bin()
    if bin_dir is None:
        if os.environ.get("DISTILLWEB_REQUIRE_SERVICES"):
            pytest.fail("this test needs the Postgres server binaries (initdb, pg_ctl)")
        pytest.skip("the Postgres server binaries (initdb, pg_ctl) are not installed")
    cluster = PrivatePostgres(bin_dir)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.close()


SETUP = """
from experiments.services import launch, records
from tests.factories import MembershipFactory, TeamFactory, UserFactory
user, team = UserFactory(), TeamFactory()
MembershipFactory(user=user, team=team)
digits = records.dataset_spec_create(team=team, created_by=user, name="digits", source="builtin",
                                     builtin_name="digits")
student = records.model_spec_create(team=team, created_by=user, name="mlp", source="builtin",
                                    builtin_arch="mlp", config={"hidden_sizes": [256, 256]}, num_labels=10)
experiment = launch.experiment_create(
    team=team, created_by=user, name="crash", dataset=digits, students=[student],
    recipes=[records.hard_labels_recipe(team=team)], seeds=[0],
    train={"max_steps": 4000, "save_every": 100000, "log_every": LOG_EVERY, "eval_every": 100000,
           "batch_size": 64, "lr": 0.01})
print("RUN", experiment.runs.get().id)
""".replace("LOG_EVERY", str(LOG_EVERY))


def wait(condition: Callable[[], object], *, timeout: float, what: str, log: Callable[[], str]) -> object:
    deadline = time.monotonic() + scaled(timeout)
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}\n{log()}")


@pytest.mark.integration
def test_metric_points_survive_a_crash_of_the_database_server(fleet, private_postgres, settings):
    pg = private_postgres
    name = connection.settings_dict["NAME"]  # the workers are given the test database's name, on pg's port
    pg.query("postgres", f'CREATE DATABASE "{name}"')
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "distillweb.settings.test",
        "DATABASE_URL": pg.url(name),
        "CELERY_BROKER_URL": fleet.broker,
        "RUN_QUEUE": fleet.queue,
        "ARTIFACT_ROOT": str(settings.ARTIFACT_ROOT),
    }
    manage = [sys.executable, "manage.py"]
    subprocess.run([*manage, "migrate", "--noinput"], cwd=REPO, env=env, check=True, capture_output=True,
                   timeout=scaled(300))
    # Rare worker heartbeats: their commits would flush the WAL, and the point is what the run's writes do.
    worker = fleet.start("w", database_port=pg.port, DB_CONN_MAX_AGE="0", WORKER_HEARTBEAT_INTERVAL_S="60")
    setup = subprocess.run(
        [*manage, "shell", "-c", SETUP],
        cwd=REPO,
        env=env,
        check=True,
        capture_output=True,
        text=True,
        timeout=scaled(300),
    )
    run_id = int(setup.stdout.split("RUN", 1)[1].split()[0])

    def steps(series: str = "loss") -> list[int]:
        return [s for (s,) in pg.query(name, "SELECT step FROM experiments_metricpoint WHERE run_id = %s AND "
                                             "name = %s ORDER BY step", run_id, series)]

    def status() -> str:
        return pg.query(name, "SELECT status FROM experiments_run WHERE id = %s", run_id)[0][0]

    wait(lambda: len(steps()) >= 10, timeout=300, what="the first points", log=worker.tail)
    before = len(steps())
    wait(lambda: len(steps()) > before, timeout=120, what="a routine write", log=worker.tail)
    written = steps()
    pg.crash()  # right after a routine write: its commit was confirmed, its WAL still in the server's memory
    time.sleep(2)
    pg.start()
    print(f"confirmed before the crash: {len(written)} loss points; after it: {len(steps())}")

    wait(lambda: status() in ("succeeded", "failed"), timeout=600, what="the run to finish", log=worker.tail)
    assert status() == "succeeded", pg.query(name, "SELECT error FROM experiments_run WHERE id = %s", run_id)
    # Whatever the crash took away, the worker wrote again: every logged step of every series, exactly once.
    assert steps() == list(range(LOG_EVERY, 4000 + 1, LOG_EVERY))
    for (series,) in pg.query(
        name, "SELECT DISTINCT name FROM experiments_metricpoint WHERE run_id = %s", run_id
    ):
        logged = steps(series)
        assert len(logged) == len(set(logged)), series
