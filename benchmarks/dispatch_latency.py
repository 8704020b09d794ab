"""Run lifecycle costs: dispatch latency to ``running``, and what the worker's database reporting adds to a
step.

1. Dispatch latency. A warm `celery worker` over Redis; each launch is ``services.experiment_create`` for one
   tiny run (the service a launch request calls: validates, inserts in one transaction, sends the task on
   commit). Latency = from just before the call to the run's ``queued → running`` transition, whose time the
   worker records when it claims the run, before any model is loaded. Launches go one at a time; each run
   finishes before the next starts (the worker stays warm and idle). Two warm-up launches are not counted.
2. Reporting overhead. The same training in this process with the worker's callbacks (``RunReporter`` as the
   task uses it: points buffered, written with the progress and the lease renewal by its thread every 2 s,
   durably before each checkpoint; cancellation polls), writing to the real database for a claimed run,
   against no callbacks at all; interleaved, medians of the training loop's own time
   (``TrainResult.train_seconds``), and the time the training thread spent inside the callbacks.

    DATABASE_URL=postgres://postgres@127.0.0.1:5432/distillweb_bench
    CELERY_BROKER_URL=redis://127.0.0.1:6379/13 \\
        .venv/bin/python benchmarks/dispatch_latency.py

The database is migrated if needed and gets a "dispatch benchmark" team; the worker consumes a queue of its
own.
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
from unittest import mock

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "distillweb.settings.base")
os.environ.setdefault("DEBUG", "true")
os.environ.setdefault("OMP_NUM_THREADS", "1")


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100)."""
    ordered = sorted(values)
    return ordered[max(0, min(len(ordered) - 1, round(q / 100 * len(ordered) + 0.5) - 1))]


def setup_records():
    from experiments.models import DatasetSpec, ModelSpec, Team
    from experiments.services import records

    team, _ = Team.objects.get_or_create(name="dispatch benchmark", defaults={"slug": "dispatch-benchmark"})
    digits = DatasetSpec.objects.filter(team=team, name="digits").first() or records.dataset_spec_create(
        team=team, created_by=None, name="digits", source="builtin", builtin_name="digits")
    mlp = ModelSpec.objects.filter(team=team, name="mlp-128x2").first() or records.model_spec_create(
        team=team, created_by=None, name="mlp-128x2", source="builtin", builtin_arch="mlp",
        config={"hidden_sizes": [128, 128]}, num_labels=10)
    return team, digits, mlp


def launch(team, digits, mlp, train: dict):
    from experiments.services import launch as launch_writes
    from experiments.services import records

    experiment = launch_writes.experiment_create(
        team=team, created_by=None, name=f"dispatch {uuid.uuid4().hex[:6]}", dataset=digits, students=[mlp],
        recipes=[records.hard_labels_recipe(team=team)], seeds=[0], train=train)
    return experiment.runs.get()


def start_worker(queue: str, artifacts: Path, log: Path) -> subprocess.Popen:
    env = {**os.environ, "RUN_QUEUE": queue, "ARTIFACT_ROOT": str(artifacts), "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "distillweb", "worker", "-Q", queue, "-n", f"{queue}@%h",
         "--concurrency", "1", "--loglevel", "WARNING", "--without-gossip", "--without-mingle"],
        cwd=REPO, env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT)


def dispatch_latency(launches: int, work: Path) -> dict[str, list[float]]:
    from django.conf import settings

    from experiments.models import Run, RunTransition

    queue = f"bench-{uuid.uuid4().hex[:6]}"
    settings.RUN_QUEUE = queue
    worker = start_worker(queue, work / "artifacts", work / "worker.log")
    team, digits, mlp = setup_records()
    tiny = {"max_steps": 2, "log_every": 1, "eval_every": 1000, "save_every": 1000, "batch_size": 32}
    totals, sends, claims = [], [], []
    try:
        for i in range(launches + 2):
            started = time.time()
            run = launch(team, digits, mlp, tiny)
            sent = time.time()
            deadline = time.monotonic() + 120
            while not (claimed := RunTransition.objects.filter(run=run, to_status="running").first()):
                if worker.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit(
                        f"the worker did not claim run {run.id}:\n{(work / 'worker.log').read_text()}"
                    )
                time.sleep(0.002)
            while not Run.objects.get(
                id=run.id
            ).is_terminal:  # the worker is idle again before the next launch
                time.sleep(0.01)
            if i >= 2:
                totals.append((claimed.at.timestamp() - started) * 1000)
                sends.append((sent - started) * 1000)
                claims.append((claimed.at.timestamp() - sent) * 1000)
    finally:
        worker.terminate()
        worker.wait(timeout=30)
    return {"launch → running": totals, "service call (insert + send)": sends, "send → claimed": claims}


class Stopwatch:
    """Time the training thread spends inside the callbacks it wraps: at checkpoint steps (the durable write
    of the points before the checkpoint, and its record) and at every other step."""

    def __init__(self, save_every: int) -> None:
        self.save_every = save_every
        self.routine = 0.0
        self.at_checkpoints = 0.0
        self.checkpoints = 0

    def wrap(self, callback, *, checkpoint: bool = False):
        def timed(*args):
            started = time.perf_counter()
            try:
                return callback(*args)
            finally:
                spent = time.perf_counter() - started
                step = args[0] if args else 0
                if checkpoint or (step and step % self.save_every == 0):
                    self.at_checkpoints += spent
                    self.checkpoints += checkpoint
                else:
                    self.routine += spent

        return timed


def reporting_overhead(repeats: int, steps: int, work: Path
                       ) -> tuple[list[float], list[float], list[tuple[float, float, float]]]:
    import torch
    from django.conf import settings

    from experiments.domain.engine_config import resolve_paths
    from experiments.services import lifecycle
    from workers.engine.config import RunConfig
    from workers.engine.trainer import Callbacks, train
    from workers.reporting import RunReporter

    torch.set_num_threads(1)
    settings.ARTIFACT_ROOT = work / "artifacts"  # checkpoints are recorded relative to it
    team, digits, mlp = setup_records()
    settings_train = {
        "max_steps": steps,
        "log_every": 10,
        "eval_every": 1000,
        "save_every": 1000,
        "batch_size": 64,
    }
    with_reporting, without, inside = [], [], []
    for i in range(2 * repeats + 1):
        with mock.patch("workers.tasks.run_distillation.apply_async"):
            run = launch(team, digits, mlp, settings_train)
        run.refresh_from_db()
        claimed = lifecycle.run_claim(run_id=run.id, task_id=run.task_id, worker_name="benchmark")
        cfg = RunConfig.from_dict(
            {
                **resolve_paths(claimed.config, run=claimed, artifact_root=work / "artifacts"),
                "output_dir": str(settings.ARTIFACT_ROOT / f"overhead-{i}"),
            }
        )
        if i == 0:  # warm-up: first data load, allocator
            train(cfg)
            continue
        if i % 2:
            reporter = RunReporter(run_id=run.id, task_id=run.task_id)
            reporter.set_batch_size(cfg.train.batch_size)
            reporter.set_schedule(save_every=cfg.train.save_every, log_every=cfg.train.log_every)
            watch = Stopwatch(cfg.train.save_every)
            callbacks = Callbacks(
                on_metrics=watch.wrap(reporter.on_metrics),
                on_progress=watch.wrap(reporter.on_progress),
                on_checkpoint=watch.wrap(reporter.on_checkpoint, checkpoint=True),
                should_stop=watch.wrap(reporter.should_stop),
            )
            with (
                reporter
            ):  # as in the worker: its thread writes points and progress and polls for cancellation
                result = train(cfg, callbacks)
                reporter.flush()
            with_reporting.append(result.train_seconds)
            inside.append(
                (watch.routine, watch.at_checkpoints / max(watch.checkpoints, 1), result.train_seconds)
            )
        else:
            without.append(train(cfg).train_seconds)
    return with_reporting, without, inside


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--launches", type=int, default=30)
    parser.add_argument(
        "--repeats", type=int, default=7, help="training runs with and without reporting, each"
    )
    parser.add_argument("--steps", type=int, default=3000)
    args = parser.parse_args()
    if args.steps % 1000:
        parser.error("--steps must be a multiple of 1000 (the checkpoint interval)")

    import django

    django.setup()
    from django.conf import settings
    from django.core.management import call_command

    if not settings.CELERY_BROKER_URL.startswith("redis://"):
        raise SystemExit("Set CELERY_BROKER_URL to a Redis broker (redis://host:6379/N).")
    call_command("migrate", interactive=False, verbosity=0)
    with tempfile.TemporaryDirectory(prefix="dispatch-bench-") as tmp:
        work = Path(tmp)
        latency = dispatch_latency(args.launches, work)
        with_reporting, without, inside = reporting_overhead(args.repeats, args.steps, work)

    import torch

    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
          f"torch {torch.__version__}, load average {os.getloadavg()[0]:.2f}")
    print(f"database: {settings.DATABASES['default']['ENGINE'].rsplit('.', 1)[-1]}, "
          f"broker: {settings.CELERY_BROKER_URL.split('://')[0]}")
    print(f"\ndispatch latency over {args.launches} launches (ms):")
    print(f"{'':32} {'p50':>7} {'p95':>7} {'max':>7}")
    for name, values in latency.items():
        print(f"{name:32} {percentile(values, 50):7.1f} {percentile(values, 95):7.1f} {max(values):7.1f}")
    base, reported = statistics.median(without), statistics.median(with_reporting)
    print(f"\ntraining loop, {args.steps} steps of a 2x128 MLP on digits (batch 64, log every 10), "
          f"median of {args.repeats}:")
    print(f"  without callbacks: {base:.3f} s  ({1000 * base / args.steps:.3f} ms/step) {sorted(without)}")
    print(f"  with RunReporter:  {reported:.3f} s  ({1000 * reported / args.steps:.3f} ms/step) "
          f"{sorted(with_reporting)}")
    print(
        f"  overhead: {100 * (reported - base) / base:+.2f}% (difference of medians; the machine's noise "
        "shows in the spread above)"
    )
    routine = [100 * r / loop for r, _, loop in inside]
    per_checkpoint = [1000 * c for _, c, _ in inside]
    share = [100 * (r + c * (args.steps // 1000)) / loop for r, c, loop in inside]
    print(
        "  the training thread inside the callbacks, at other steps: "
        f"median {statistics.median(routine):.2f}% "
        f"of the loop {[round(x, 2) for x in sorted(routine)]}"
    )
    print(f"  ... per checkpoint (durable write of the points before it, and its record): median "
          f"{statistics.median(per_checkpoint):.1f} ms {[round(x, 1) for x in sorted(per_checkpoint)]}")
    print(
        f"  ... in all, with a checkpoint every 1000 steps: median {statistics.median(share):.2f}% of the "
        f"loop"
    )


if __name__ == "__main__":
    main()
