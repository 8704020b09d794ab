"""A broker that is down or hung never holds a launch or a cancel: the web process (gunicorn over
distillweb.wsgi, as deployed) stores the runs queued and answers at once, and the lifecycle sweep sends them
when the broker is back.

The broker is the test's own redis-server, stopped with SIGSTOP: it still accepts connections but answers
nothing, as a hung or overloaded broker (or a half-open connection) does; then it is restarted, empty. Before
the fix a send waited on it for ever (a refused connection cost up to 1 s, an AMQP broker that does not answer
4 s)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import redis
import requests
from django.conf import settings
from django.db import connection

from experiments.models import Experiment, Run
from tests.api.conftest import make_token
from tests.waiting import scaled, wait_until
from tests.worker_process import broker_reachable, free_port, shared_database_url

pytestmark = [pytest.mark.integration, pytest.mark.django_db(transaction=True)]

REPO = Path(__file__).resolve().parents[3]
PUBLISH_TIMEOUT_S = 0.25  # the web's BROKER_PUBLISH_TIMEOUT_S here: a send gives up after about twice this


class Broker:
    """The test's own redis-server, which the test can freeze (SIGSTOP) and thaw (SIGCONT) by its pid."""

    def __init__(self, log: Path) -> None:
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.log = log
        self.client = redis.Redis.from_url(self.url, socket_timeout=scaled(5))
        self.start()

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
        wait_until(lambda: broker_reachable(self.url), timeout=10, what="the test's redis-server",
                   check=self._alive)

    def _alive(self) -> None:
        assert self.process.poll() is None, self.log.read_text()

    def freeze(self) -> None:
        os.kill(self.process.pid, signal.SIGSTOP)

    def restart(self) -> None:
        """Kill the hung server (with whatever it had not executed yet) and start an empty one on its port."""
        self.stop()
        self.start()

    def task_ids(self, queue: str) -> list[str]:
        """The task ids of the messages waiting in ``queue`` (kombu's Redis transport: one list per queue)."""
        return [json.loads(raw)["headers"]["id"] for raw in self.client.lrange(queue, 0, -1)]

    def stop(self) -> None:
        if self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGCONT)
            os.kill(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=30)


class WebServer:
    """gunicorn serving distillweb.wsgi on the test database, sending to ``broker_url``."""

    def __init__(self, *, broker_url: str, log: Path) -> None:
        if connection.settings_dict["ENGINE"] != "django.db.backends.postgresql":
            pytest.skip("the web process shares the Postgres test database")
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        env = {
            **os.environ,
            "DJANGO_SETTINGS_MODULE": "distillweb.settings.test",
            "DATABASE_URL": shared_database_url(),
            "CELERY_BROKER_URL": broker_url,
            "BROKER_PUBLISH_TIMEOUT_S": str(PUBLISH_TIMEOUT_S),
            "ARTIFACT_ROOT": str(settings.ARTIFACT_ROOT),
            "PYTHONUNBUFFERED": "1",
        }
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "gunicorn",
                "distillweb.wsgi:application",
                "--bind",
                f"127.0.0.1:{self.port}",
                "--workers",
                "1",
                "--timeout",
                str(int(scaled(20))),
            ],
            cwd=REPO,
            env=env,
            stdout=log.open("wb"),
            stderr=subprocess.STDOUT,
        )
        wait_until(self._answers, timeout=60, what="gunicorn to serve", every=0.5, check=self._alive,
                   describe=lambda: log.read_text()[-4000:])

    def _alive(self) -> None:
        assert self.process.poll() is None, self.log.read_text()[-4000:]

    def _answers(self) -> bool:
        try:
            return requests.get(f"{self.url}/api/schema/", timeout=5).status_code == 200
        except requests.RequestException:
            return False

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=30)


@pytest.fixture
def broker(tmp_path):
    try:
        subprocess.run(["redis-server", "--version"], check=True, capture_output=True)
    except (OSError, subprocess.CalledProcessError):
        if os.environ.get("DISTILLWEB_REQUIRE_SERVICES"):
            pytest.fail("redis-server is needed for the broker outage test")
        pytest.skip("redis-server is not installed")
    server = Broker(tmp_path / "redis.log")
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def web(broker, tmp_path):
    server = WebServer(broker_url=broker.url, log=tmp_path / "gunicorn.log")
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def sweep_broker(broker, monkeypatch):
    """This process's Celery app (where the test runs the lifecycle sweep, as a worker would) sends to
    ``broker``."""
    from distillweb.celery import app

    # The app builds its pools from the broker URL on first use, in kombu's process-wide pool groups keyed by
    # the URL: set the suite's own aside (never close them: every later test of this process sends through
    # them) and close only the ones built for the test's broker.
    original = app.conf.broker_url, app._pool, app.amqp._producer_pool
    monkeypatch.setenv("CELERY_BROKER_URL", broker.url)  # Celery reads the variable before its own setting
    app.conf.broker_url = broker.url
    app._pool = app.amqp._producer_pool = None
    try:
        yield app
    finally:
        if app._pool is not None:
            app._pool.force_close_all()
        app.conf.broker_url, app._pool, app.amqp._producer_pool = original


def _launch(web: WebServer, token: str, setup: dict, name: str) -> tuple[requests.Response | None, float]:
    body = {
        "name": name,
        "dataset": setup["dataset"].pk,
        "teacher": setup["teacher"].pk,
        "students": [setup["students"][0].pk],
        "recipes": [setup["recipe"].pk],
        "seeds": [0],
        "max_steps": 10,
    }
    started = time.monotonic()
    try:
        response = requests.post(f"{web.url}/api/experiments/", json=body, timeout=scaled(5),
                                 headers={"Authorization": f"Bearer {token}"})
    except requests.Timeout:
        response = None
    return response, time.monotonic() - started


def test_a_hung_broker_holds_no_launch_or_cancel_and_the_sweep_sends_the_runs_later(
        web, broker, sweep_broker, user, digits_setup, settings):
    from workers.lifecycle_tasks import requeue_stale_runs

    token = make_token(user)
    # While the broker answers, the web sends each run's message at once.
    response, _ = _launch(web, token, digits_setup, "before")
    assert response is not None and response.status_code == 201, response and response.text
    before = Experiment.objects.get(pk=response.json()["id"])
    queue = before.runs.first().queue
    assert sorted(broker.task_ids(queue)) == sorted(r.task_id for r in before.runs.all())
    broker.client.delete(queue)  # as if a worker had taken them
    before.delete()

    broker.freeze()
    response, elapsed = _launch(web, token, digits_setup, "during")

    assert response is not None, f"the launch was still waiting on the broker after {elapsed:.1f} s"
    assert response.status_code == 201, response.text
    assert elapsed < scaled(0.7), f"the launch took {elapsed:.2f} s"  # 2.1 s at the default scale
    runs = list(Run.objects.filter(experiment_id=response.json()["id"]))
    assert len(runs) == 2 and {r.status for r in runs} == {Run.Status.QUEUED}

    # Cancelling a queued run whose message was sent revokes that message: not on the request's time either.
    sent_run = next(r for r in runs if r.task_id)
    started = time.monotonic()
    try:
        cancelled = requests.post(f"{web.url}/api/runs/{sent_run.pk}/cancel/", timeout=scaled(5),
                                  headers={"Authorization": f"Bearer {token}"})
    except requests.Timeout:
        cancelled = None
    elapsed = time.monotonic() - started
    assert cancelled is not None, f"the cancel was still waiting on the broker after {elapsed:.1f} s"
    assert cancelled.status_code == 200 and cancelled.json()["status"] == Run.Status.CANCELLED
    assert elapsed < scaled(0.7), f"the cancel took {elapsed:.2f} s"

    broker.restart()  # the hung broker is restarted, empty
    settings.RUN_REDISPATCH_AFTER_S = 0
    counts = requeue_stale_runs.apply().get()

    assert counts == {"redispatched": 1}  # the run still queued; the cancelled one stays cancelled
    waiting = Run.objects.get(pk=next(r.pk for r in runs if r.pk != sent_run.pk))
    assert waiting.status == Run.Status.QUEUED and broker.task_ids(queue) == [waiting.task_id]


def test_a_hung_broker_holds_no_fleet_command(broker, sweep_broker, staff_user, client, settings):
    """A staff action on the Workers page goes through remote control: a broker that accepts connections and
    answers nothing gives a clear message within about the control timeout, instead of holding the request."""
    from django.urls import reverse

    from experiments.models import Worker
    from tests.workers.test_fleet_console import make_worker, texts

    settings.WORKER_CONTROL_TIMEOUT_S = 1
    worker = make_worker()
    client.force_login(staff_user)
    broker.freeze()
    answer: dict[str, object] = {}

    def drain() -> None:
        answer["response"] = client.post(reverse("experiments:worker_drain", args=[worker.pk]), follow=True)

    started = time.monotonic()
    request = threading.Thread(target=drain, daemon=True)
    request.start()
    request.join(scaled(4))  # 12 s at the default scale; the control timeout is 1 s, plus 2 s for a socket
    elapsed = time.monotonic() - started
    assert "response" in answer, f"the drain was still waiting on the broker after {elapsed:.1f} s"
    assert any("broker could not be reached" in text for text in texts(answer["response"]))
    assert Worker.objects.get(pk=worker.pk).state == Worker.State.ONLINE
