"""Launch → first step of a small run on a fresh worker: with the worker's warm-up (the default) and without
(``WORKER_WARMUP=0``).

Each trial starts a new ``celery worker`` (prefork, concurrency 1) over Redis, waits until it is online (and,
warm, until its pool process logged the end of its warm-up: a worker host that has been up a few seconds),
then launches one tiny run the way the launch request does (``experiment_create``: a 2×128 MLP on digits,
hard labels, 2 steps, a metric point every step) and measures from just before the call to the wall time of
the run's first metric point (written by the worker at step 1). Trials alternate cold, warm, cold, warm…

    DATABASE_URL=postgres://postgres@127.0.0.1:5432/distillweb_bench
    CELERY_BROKER_URL=redis://127.0.0.1:6379/13 .venv/bin/python benchmarks/first_step.py --repeats 3
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "distillweb.settings.base")
os.environ.setdefault("DEBUG", "true")


def trial(*, warm: bool, work: Path, records) -> float:
    from dispatch_latency import launch
    from django.conf import settings

    from experiments.models import MetricPoint, Worker

    queue = f"first-step-{uuid.uuid4().hex[:6]}"
    settings.RUN_QUEUE = queue
    log = work / f"{queue}.log"
    env = {**os.environ, "RUN_QUEUE": queue, "ARTIFACT_ROOT": str(work / "artifacts"),
           "PYTHONUNBUFFERED": "1", "WORKER_WARMUP": "1" if warm else "0"}
    worker = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "distillweb", "worker", "-Q", queue, "-n", f"{queue}@%h",
         "--concurrency", "1", "--loglevel", "INFO", "--without-gossip", "--without-mingle"],
        cwd=REPO, env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 300
        ready = (lambda: "Warm-up of process" in log.read_text(errors="replace")) if warm else (
            lambda: Worker.objects.filter(name__startswith=f"{queue}@", state=Worker.State.ONLINE).exists())
        while not ready():
            if worker.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"the worker did not get ready:\n{log.read_text(errors='replace')[-3000:]}")
            time.sleep(0.05)
        time.sleep(1.0)  # the worker idles a moment, as a host that has been up does
        team, digits, mlp = records
        started = time.time()
        run = launch(team, digits, mlp, {"max_steps": 2, "log_every": 1, "eval_every": 1000,
                                         "save_every": 1000, "batch_size": 32})
        while not (point := MetricPoint.objects.filter(run=run).order_by("wall_time").first()):
            if worker.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"no first step:\n{log.read_text(errors='replace')[-3000:]}")
            time.sleep(0.01)
        return point.wall_time.timestamp() - started
    finally:
        worker.terminate()
        worker.wait(timeout=60)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    import django

    django.setup()
    from dispatch_latency import setup_records
    from django.conf import settings
    from django.core.management import call_command

    if not settings.CELERY_BROKER_URL.startswith("redis://"):
        raise SystemExit("Set CELERY_BROKER_URL to a Redis broker (redis://host:6379/N).")
    call_command("migrate", interactive=False, verbosity=0)
    records = setup_records()
    results: dict[str, list[float]] = {"cold (WORKER_WARMUP=0)": [], "warm (default)": []}
    with tempfile.TemporaryDirectory(prefix="first-step-bench-") as tmp:
        for _ in range(args.repeats):
            for name, warm in (("cold (WORKER_WARMUP=0)", False), ("warm (default)", True)):
                seconds = trial(warm=warm, work=Path(tmp), records=records)
                results[name].append(seconds)
                print(f"{name}: {seconds:.2f} s", file=sys.stderr)
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
          f"load average {os.getloadavg()[0]:.2f}; a fresh worker per trial, median (min–max) of "
          f"{args.repeats}")
    print("| worker | launch → first step (s) |")
    print("|---|---|")
    for name, values in results.items():
        print(f"| {name} | {statistics.median(values):.2f} ({min(values):.2f}–{max(values):.2f}) |")


if __name__ == "__main__":
    main()
