"""Metric ingestion through the worker path: points/s that ``workers.reporting.RunReporter`` writes to
Postgres.

A running run of 10,000,000 steps (so its curves also keep rollups) receives 100,000 steps × 5 metrics, logged
the way a training loop logs them (``on_metrics`` + ``on_progress`` every step); the reporter batches them and
writes through ``services.run_record_metrics``. Run it against a migrated scratch database:

    createdb -h 127.0.0.1 -U postgres distillweb_ingest
    DATABASE_URL=postgres://postgres@127.0.0.1:5432/distillweb_ingest DEBUG=true .venv/bin/python manage.py
    migrate DATABASE_URL=postgres://postgres@127.0.0.1:5432/distillweb_ingest DEBUG=true .venv/bin/python
    benchmarks/metric_ingest.py
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "distillweb.settings.base")


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=100_000)
    args = parser.parse_args()
    import django

    django.setup()
    from django.utils import timezone

    from experiments.models import MetricPoint, Run, Team
    from tests.factories import RunFactory, TeamFactory
    from workers.reporting import RunReporter

    tag = uuid.uuid4().hex[:8]
    now = timezone.now()
    team = TeamFactory(name=f"ingest-{tag}", slug=f"ingest-{tag}")
    run = RunFactory(experiment__team=team, status=Run.Status.RUNNING, task_id=tag, total_steps=10_000_000,
                     started_at=now, heartbeat_at=now)
    reporter = RunReporter(run_id=run.pk, task_id=tag)
    start = time.perf_counter()
    with reporter:
        for step in range(1, args.steps + 1):
            x = step / 50_000
            reporter.on_metrics(step, {"loss": 2.3 * math.exp(-x) + 0.1, "ce": 0.9 * math.exp(-x) + 0.05,
                                       "kd": 1.4 * math.exp(-x) + 0.05, "lr": 1e-3 * (1 - x / 100),
                                       "grad_norm": 1.0 + 0.1 * math.sin(step)})
            reporter.on_progress(step, 10_000_000)
            if step % 10_000 == 0:
                print(f"\r{step:,}/{args.steps:,} steps", end="", file=sys.stderr, flush=True)
        reporter.flush()
    seconds = time.perf_counter() - start
    stored = MetricPoint.objects.filter(run=run).count()
    print(file=sys.stderr)
    print(f"{stored:,} points stored in {seconds:.2f} s: {stored / seconds:,.0f} points/s "
          f"(load average {os.getloadavg()[0]:.2f})")
    Team.objects.filter(pk=team.pk).delete()
    return 0 if stored == args.steps * 5 else 1


if __name__ == "__main__":
    sys.exit(main())
