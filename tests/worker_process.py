"""Real `celery worker` processes over a real broker, for the integration and browser tests."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from django.conf import settings
from django.db import connection

from tests.waiting import wait_until

REPO = Path(__file__).resolve().parents[1]


def shared_database_url(*, port: int | None = None) -> str:
    """The URL of this test run's database, for the processes a test starts (workers, a web server) to share
    it; ``port`` points them at the same server through another port (a proxy, or a cluster of the test's
    own)."""
    db = connection.settings_dict
    return f"postgres://{db['USER']}@{db['HOST'] or '127.0.0.1'}:{port or db['PORT'] or 5432}/{db['NAME']}"


def free_port() -> int:
    """A loopback port nothing listens on (for a server a test starts)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def redis_broker_url() -> str:
    """The Redis broker for tests; skips when there is none, unless the run says the services must be
    there."""
    url = settings.CELERY_BROKER_URL
    if not url.startswith("redis://"):
        pytest.skip("integration tests need CELERY_BROKER_URL to name a Redis broker")
    if not broker_reachable(url):
        if os.environ.get("DISTILLWEB_REQUIRE_SERVICES"):
            pytest.fail(f"Redis is not reachable at {url}, and DISTILLWEB_REQUIRE_SERVICES is set")
        pytest.skip(f"Redis is not reachable at {url}")
    return url


def broker_reachable(url: str) -> bool:
    import redis

    try:
        return bool(redis.Redis.from_url(url, socket_connect_timeout=2).ping())
    except redis.RedisError:
        return False


class WorkerProcess:
    def __init__(
        self,
        *,
        queue: str,
        name: str,
        broker_url: str,
        log: Path,
        read_roots: tuple[Path, ...] = (),
        warmup: bool = False,
    ) -> None:
        database_url = shared_database_url()
        if connection.settings_dict["ENGINE"] != "django.db.backends.postgresql":
            pytest.skip("the integration test shares the Postgres test database with the worker")
        self.name = f"{name}@{os.uname().nodename}"
        self.queue = queue
        self.log = log
        env = {
            **os.environ,
            "DJANGO_SETTINGS_MODULE": "distillweb.settings.test",
            "DATABASE_URL": database_url,
            "CELERY_BROKER_URL": broker_url,
            "ARTIFACT_ROOT": str(settings.ARTIFACT_ROOT),
            # The worker checks local model and data paths against its own roots: the test's, and
            # ``read_roots``.
            "MODEL_ROOTS": ",".join(str(p) for p in (*settings.MODEL_ROOTS, *read_roots)),
            "DATASET_ROOTS": ",".join(str(p) for p in (*settings.DATASET_ROOTS, *read_roots)),
            "RUN_QUEUE": queue,
            "WORKER_HEARTBEAT_INTERVAL_S": "1",
            # The pool's import warm-up (workers/warmup.py) only costs CPU on a test machine that starts a
            # worker per test; tests/workers/test_warmup.py turns it on.
            "WORKER_WARMUP": "1" if warmup else "0",
            "PYTHONUNBUFFERED": "1",
        }
        self.process = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "distillweb", "worker", "-Q", queue, "-n", self.name,
             "--concurrency", "1", "--loglevel", "INFO", "--without-gossip", "--without-mingle"],
            cwd=REPO, env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT,
        )

    def wait_registered(self, timeout: float = 60) -> None:
        """Wait until the worker is online; ``timeout`` is an idle machine's bound, scaled
        (tests/waiting.py)."""
        from experiments.models import Worker

        wait_until(lambda: Worker.objects.filter(name=self.name, state=Worker.State.ONLINE).exists(),
                   timeout=timeout, what=f"worker {self.name} to register", every=0.3, check=self.check_alive,
                   describe=self.tail)

    def check_alive(self) -> None:
        """Raises when the worker process has exited: nothing it was awaited for will happen any more."""
        assert self.process.poll() is None, f"worker {self.name} exited; log:\n{self.tail()}"

    def tail(self, chars: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-chars:] if self.log.exists() else ""

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
