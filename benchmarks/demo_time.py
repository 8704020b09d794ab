"""How long `make demo`'s seeded experiments take on this machine, end to end.

Starts `manage.py demo` on a fresh embedded setup (SQLite + filesystem broker + one worker) in a temporary
folder, and reports the seconds from launch until the site answers, the teacher-training experiment has
finished, and the distillation experiment has finished. Then stops the demo as Ctrl-C would.

    .venv/bin/python benchmarks/demo_time.py
"""

from __future__ import annotations

import os
import platform
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TERMINAL = {"succeeded", "failed", "cancelled"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def experiment_states(db: Path) -> dict[str, list[str]]:
    query = ("select e.name, r.status from experiments_run r join experiments_experiment e "
             "on e.id = r.experiment_id order by r.id")
    try:
        with sqlite3.connect(db, timeout=5) as conn:
            rows = conn.execute(query).fetchall()
    except sqlite3.OperationalError:
        return {}
    states: dict[str, list[str]] = {}
    for name, status in rows:
        states.setdefault(name, []).append(status)
    return states


def main() -> int:
    var = Path(tempfile.mkdtemp(prefix="distillweb-demo-"))
    port = free_port()
    env = {
        k: v for k, v in os.environ.items() if k not in {"DATABASE_URL", "CELERY_BROKER_URL", "ARTIFACT_ROOT"}
    }
    env.update({"DEBUG": "true", "DISTILLWEB_VAR_DIR": str(var), "DEMO_ADMIN_PASSWORD": "benchmark-pass"})
    start = time.monotonic()
    demo = subprocess.Popen(
        [sys.executable, "manage.py", "demo", "--port", str(port)],
        cwd=REPO,
        env=env,
        stdout=(var / "demo.log").open("wb"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    marks: dict[str, float] = {}
    try:
        while time.monotonic() - start < 900 and demo.poll() is None:
            elapsed = time.monotonic() - start
            if "site" not in marks:
                try:
                    urllib.request.urlopen(f"http://127.0.0.1:{port}/login/", timeout=2)
                    marks["site"] = elapsed
                except OSError:
                    pass
            for name, statuses in experiment_states(var / "distillweb.sqlite3").items():
                if name not in marks and statuses and set(statuses) <= TERMINAL:
                    marks[name] = elapsed
                    print(
                        f"{elapsed:7.1f} s  {name}: {len(statuses)} runs {sorted(set(statuses))}",
                        file=sys.stderr,
                    )
            if len(marks) >= 3:
                break
            time.sleep(0.5)
    finally:
        os.killpg(demo.pid, signal.SIGINT)
        demo.wait(timeout=60)
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}")
    for name, seconds in marks.items():
        print(f"{seconds:7.1f} s  {name}")
    return 0 if len(marks) >= 3 else 1


if __name__ == "__main__":
    sys.exit(main())
