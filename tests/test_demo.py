"""`make demo`'s embedded shape for real: SQLite, kombu's filesystem broker, a web server and one worker."""

import os
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import urllib.request
from datetime import datetime
from pathlib import Path

import pytest

from tests.waiting import scaled, wait_until

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.integration


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_demo_serves_the_site_and_its_worker_finishes_the_seeded_experiments(tmp_path):
    port = _free_port()
    env = {
        k: v
        for k, v in os.environ.items()
        if k
        not in {
            "DATABASE_URL",
            "CELERY_BROKER_URL",
            "DJANGO_SETTINGS_MODULE",
            "ARTIFACT_ROOT",
            "SECURE_SSL_REDIRECT",
        }
    }
    env.update({"DEBUG": "true", "DISTILLWEB_VAR_DIR": str(tmp_path), "DEMO_ADMIN_PASSWORD": "demo-pass-123",
                "DEMO_TEACHER_STEPS": "100", "DEMO_STUDENT_STEPS": "40", "PYTHONUNBUFFERED": "1",
                # Frequent sweeps, and log times on the database's clock (UTC), to see one during training.
                "RUN_SWEEP_INTERVAL_S": "2", "TZ": "UTC"})
    log = tmp_path / "demo.log"
    demo = subprocess.Popen([sys.executable, "manage.py", "demo", "--port", str(port)], cwd=REPO, env=env,
                            stdout=log.open("wb"), stderr=subprocess.STDOUT, start_new_session=True)
    try:
        db = tmp_path / "distillweb.sqlite3"

        def finished_statuses() -> list[str] | None:
            """Every run's status once all have finished (the demo's own database), else None."""
            if not db.exists():
                return None
            try:
                with sqlite3.connect(db, timeout=5) as conn:
                    statuses = [row[0] for row in conn.execute("select status from experiments_run")]
            except sqlite3.OperationalError:
                return None
            return (
                statuses
                if statuses and all(s in ("succeeded", "failed", "cancelled") for s in statuses)
                else None
            )

        def demo_alive() -> None:
            assert demo.poll() is None, log.read_text()[-5000:]

        statuses = wait_until(finished_statuses, timeout=420, what="the demo's runs to finish", every=2,
                              check=demo_alive, describe=lambda: log.read_text()[-5000:])
        assert set(statuses) == {"succeeded"}, (statuses, log.read_text()[-5000:])
        assert len(statuses) == 1 + 2 * 2 * 3  # teacher + 2 students × (kd, hard labels) × 3 seeds
        output = log.read_text()
        assert "Admin login: admin / demo-pass-123" in output
        assert "No hostname was supplied" not in output
        assert "This is a development server" not in output and "superuser privileges" not in output
        _assert_a_sweep_ran_while_a_run_trained(output, db)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/login/", timeout=scaled(10)) as response:
            assert response.status == 200
    finally:
        os.killpg(demo.pid, signal.SIGINT)  # what Ctrl-C in a terminal does: the whole foreground group
        try:
            demo.wait(timeout=scaled(60))
        except subprocess.TimeoutExpired:
            os.killpg(demo.pid, signal.SIGKILL)
            raise
    assert demo.returncode == 0, log.read_text()[-3000:]
    assert "Stopped." in log.read_text()


def _assert_a_sweep_ran_while_a_run_trained(output: str, db: Path) -> None:
    """The demo's sweeps run on their own worker: at least one finished while a run was training (with one
    worker at concurrency 1 a sweep could only run between two runs)."""
    sweeps = [
        datetime.strptime(m[1], "%Y-%m-%d %H:%M:%S,%f")
        for m in re.finditer(r"^(\S+ \S+) INFO celery\.app\.trace: Task workers\.requeue_stale_runs\[\S+\] "
                             r"succeeded", output, re.MULTILINE)
    ]
    assert sweeps, output[-3000:]
    with sqlite3.connect(db, timeout=5) as conn:
        rows = conn.execute("select started_at, finished_at from experiments_run").fetchall()
    spans = [tuple(datetime.fromisoformat(x).replace(tzinfo=None) for x in row) for row in rows]
    assert any(start < t < end for t in sweeps for start, end in spans), (sweeps, spans)
