"""Real `celery worker` processes over a real broker, for the integration and browser tests."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from django.conf import settings
from django.db import connection

REPO = Path(__file__).resolve().parents[1]


def redis_broker_url() -> str:
    """The Redis broker for tests; skips when there is none, unless the run says the services must be there."""
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
    def __init__(self, *, queue: str, name: str, broker_url: str, log: Path) -> None:
        db = connection.settings_dict
        database_url = f"postgres://{db['USER']}@{db['HOST'] or '127.0.0.1'}:{db['PORT'] or 5432}/{db['NAME']}"
        if db["ENGINE"] != "django.db.backends.postgresql":
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
            "RUN_QUEUE": queue,
            "WORKER_HEARTBEAT_INTERVAL_S": "1",
            "PYTHONUNBUFFERED": "1",
        }
        self.process = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "distillweb", "worker", "-Q", queue, "-n", self.name,
             "--concurrency", "1", "--loglevel", "INFO", "--without-gossip", "--without-mingle"],
            cwd=REPO, env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT,
        )

    def wait_registered(self, timeout: float = 60) -> None:
        from experiments.models import Worker

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if Worker.objects.filter(name=self.name, state=Worker.State.ONLINE).exists():
                return
            if self.process.poll() is not None:
                break
            time.sleep(0.3)
        raise AssertionError(f"worker {self.name} did not register; log:\n{self.log.read_text()[-4000:]}")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
