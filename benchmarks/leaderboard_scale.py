"""Leaderboard page and API over HTTP at 100, 2,000 and 10,000 runs: two checkouts side by side.

For each size: a fresh Postgres database migrated by the ``--after`` checkout, seeded with N succeeded runs on
one dataset (experiments of 5 students × {kd, hard labels} × 2 seeds: N / 2 leaderboard rows), the summary
rows rebuilt; then one gunicorn server per checkout (1 worker, 1 thread, DEBUG off, the same database and
SECRET_KEY) and the same client asking each, interleaved request by request, for the leaderboard page (50
rows shown) and the API's first page (50 rows). Prints p50 / p95 per checkout, endpoint and size.

    git worktree add /tmp/lb-before <commit before the summary rows>
    git worktree add /tmp/lb-after HEAD
    .venv/bin/python benchmarks/leaderboard_scale.py --before /tmp/lb-before --after /tmp/lb-after

Needs the Postgres server of DATABASE_URL (its user must create databases); the database it makes is dropped
at the end.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import secrets
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlparse

DB_NAME = "distillweb_leaderboard_scale"
RUNS_PER_EXPERIMENT = 20  # 5 students × 2 recipes × 2 seeds


def server_env(pg: str, secret: str) -> dict[str, str]:
    return {
        **os.environ,
        "DATABASE_URL": pg,
        "DJANGO_SETTINGS_MODULE": "distillweb.settings.base",
        "DEBUG": "false",
        "SECRET_KEY": secret,
        "SECURE_SSL_REDIRECT": "false",
        "SESSION_COOKIE_SECURE": "false",
        "CSRF_COOKIE_SECURE": "false",
        "ALLOWED_HOSTS": "localhost,127.0.0.1",
        "CELERY_BROKER_URL": "memory://",
    }


def recreate_database(admin_url: str) -> None:
    import psycopg

    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{DB_NAME}" WITH (FORCE)')
        conn.execute(f'CREATE DATABASE "{DB_NAME}"')


def drop_database(admin_url: str) -> None:
    import psycopg

    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{DB_NAME}" WITH (FORCE)')


def seed(runs: int) -> dict[str, object]:
    """In the ``--after`` checkout (a child process): N succeeded runs with their evaluations, the summary
    rows, and a session for a member of the team."""
    import django

    django.setup()
    from django.contrib.auth import get_user_model
    from django.db import connection
    from django.test import Client
    from django.utils import timezone

    from experiments.models import (
        DatasetSpec,
        Evaluation,
        Experiment,
        Membership,
        ModelSpec,
        Recipe,
        Run,
        Team,
    )
    from experiments.services.leaderboard_summary import leaderboard_summary_rebuild

    rng = random.Random(runs)
    team = Team.objects.create(name="bench")
    user = get_user_model().objects.create_user("bench", password=secrets.token_urlsafe(16))
    Membership.objects.create(user=user, team=team, role="member")
    dataset = DatasetSpec.objects.create(team=team, name="digits", source="builtin", builtin_name="digits",
                                         num_labels=10)
    teacher = ModelSpec.objects.create(team=team, name="teacher", source="builtin", builtin_arch="mlp",
                                       config={"hidden_sizes": [256]}, num_labels=10)
    students = [ModelSpec.objects.create(team=team, name=f"mlp-{w}", source="builtin", builtin_arch="mlp",
                                         config={"hidden_sizes": [w]}, num_labels=10)
                for w in (8, 16, 32, 64, 128)]
    kd = Recipe.objects.create(team=team, name="kd", scheme="online",
                               terms=[{"name": "kd", "weight": 1.0, "params": {"temperature": 4.0}}])
    base = Recipe.objects.create(team=team, name="hard_labels", scheme="hard_labels",
                                 terms=[{"name": "ce", "weight": 1.0, "params": {}}])
    now = timezone.now()
    experiments = Experiment.objects.bulk_create(
        Experiment(team=team, name=f"exp {i}", dataset=dataset, teacher=teacher, seeds=[0, 1], train={})
        for i in range(max(1, runs // RUNS_PER_EXPERIMENT)))
    planned = [(x, s, r, seed) for x in experiments for s in students for r in (kd, base) for seed in (0, 1)]
    config = {"dataset": {"eval_fraction": 0.2, "split_seed": 0}, "train": {}}
    run_rows = Run.objects.bulk_create(
        Run(team=team, experiment=x, student=s, recipe=r, seed=seed, is_baseline=r is base, config=config,
            status="succeeded", started_at=now, finished_at=now, step=100, total_steps=100)
        for x, s, r, seed in planned[:runs])
    evaluations = []
    for run in run_rows:
        accuracy = rng.uniform(0.7, 0.97)
        latency = rng.uniform(0.1, 2.0)
        evaluations.append(Evaluation(
            team=team, role="student", run=run, model=run.student, dataset=dataset, split_key="k",
            accuracy=accuracy, param_count=run.student.config["hidden_sizes"][0] * 74, latency_ms=latency,
            metrics={"accuracy": accuracy, "macro_f1": accuracy - 0.01, "latency_ms_p50": latency,
                     "latency_ms_p25": latency * 0.95, "latency_ms_p75": latency * 1.05,
                     "latency_ms_min": latency * 0.9, "latency_ms_max": latency * 1.2}))
    Evaluation.objects.bulk_create(evaluations, batch_size=2000)
    Evaluation.objects.create(team=team, role="teacher", model=teacher, dataset=dataset, split_key="k",
                              accuracy=0.98, param_count=256 * 74, latency_ms=3.0, metrics={"accuracy": 0.98})
    started = time.perf_counter()
    rows = leaderboard_summary_rebuild()
    rebuild_s = time.perf_counter() - started
    with connection.cursor() as cursor:
        cursor.execute("ANALYZE")  # as autovacuum would after a bulk load: planner statistics
    client = Client()
    client.force_login(user)
    return {"dataset": dataset.pk, "session": client.cookies["sessionid"].value, "runs": len(run_rows),
            "summary_rows": rows, "rebuild_s": round(rebuild_s, 2)}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, name: str, checkout: Path, env: dict[str, str]) -> None:
        self.name, self.port = name, free_port()
        cmd = [str(Path(sys.executable).parent / "gunicorn"), "distillweb.wsgi:application", "--workers", "1",
               "--worker-class", "gthread", "--threads", "1", "--keep-alive", "60",
               "--bind", f"127.0.0.1:{self.port}", "--log-level", "warning"]
        self.proc = subprocess.Popen(cmd, cwd=checkout, env=env, start_new_session=True)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.2)
        else:
            raise RuntimeError(f"{name} did not start")
        self.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=120)

    def get(self, path: str, session: str) -> tuple[float, int, bytes]:
        started = time.perf_counter()
        self.conn.request("GET", path, headers={"Cookie": f"sessionid={session}", "Host": "localhost"})
        response = self.conn.getresponse()
        body = response.read()
        return (time.perf_counter() - started) * 1000, response.status, body

    def stop(self) -> None:
        self.conn.close()
        os.killpg(self.proc.pid, signal.SIGTERM)
        self.proc.wait(timeout=30)


def percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def measure(size: int, args: argparse.Namespace, admin_url: str, pg: str) -> list[dict[str, object]]:
    recreate_database(admin_url)
    secret = secrets.token_urlsafe(50)
    env = server_env(pg, secret)
    subprocess.run([sys.executable, "manage.py", "migrate", "-v", "0"], cwd=args.after, env=env, check=True)
    out = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--seed", str(size)],
                         cwd=args.after, env={**env, "PYTHONPATH": str(args.after)}, check=True,
                         capture_output=True, text=True)
    info = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"# {size} runs: {info['summary_rows']} summary rows, rebuilt in {info['rebuild_s']} s", flush=True)
    servers = [Server("before", args.before, env), Server("after", args.after, env)]
    paths = {"page": f"/leaderboard/{info['dataset']}/",
             "api": f"/api/leaderboards/{info['dataset']}/?limit=50"}
    times: dict[tuple[str, str], list[float]] = {(s.name, p): [] for s in servers for p in paths}
    try:
        counts = {}
        for server in servers:
            for _ in range(args.warmup):
                for name, path in paths.items():
                    _, status, body = server.get(path, info["session"])
                    if status != 200:
                        raise RuntimeError(f"{server.name} {path}: HTTP {status}")
                    if name == "api":
                        counts[server.name] = json.loads(body)["count"]
        if len(set(counts.values())) != 1:
            raise RuntimeError(f"the two checkouts disagree on the row count: {counts}")
        for i in range(args.requests):
            order = servers if i % 2 == 0 else servers[::-1]
            for server in order:
                for name, path in paths.items():
                    ms, status, _ = server.get(path, info["session"])
                    assert status == 200, (server.name, path, status)
                    times[(server.name, name)].append(ms)
    finally:
        for server in servers:
            server.stop()
    return [{"runs": size, "rows": counts["after"], "checkout": s, "endpoint": p,
             "p50_ms": round(statistics.median(v), 1), "p95_ms": round(percentile(v, 0.95), 1), "n": len(v)}
            for (s, p), v in times.items()]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--before", type=Path, help="checkout of the code before the summary rows")
    parser.add_argument("--after", type=Path, help="checkout of the code with the summary rows")
    parser.add_argument("--sizes", type=int, nargs="+", default=[100, 2000, 10000])
    parser.add_argument("--requests", type=int, default=40, help="timed requests per checkout and endpoint")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--seed", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.seed is not None:
        print(json.dumps(seed(args.seed)))
        return 0
    base = urlparse(os.environ.get("DATABASE_URL", "postgres://postgres@127.0.0.1:5432/postgres"))
    admin_url = base._replace(path="/postgres").geturl()
    pg = base._replace(path=f"/{DB_NAME}").geturl()
    print(f"# machine: {os.uname().machine}, {os.cpu_count()} cores, load {os.getloadavg()}", flush=True)
    results = []
    try:
        for size in args.sizes:
            rows = measure(size, args, admin_url, pg)
            results += rows
            for r in rows:
                print(json.dumps(r), flush=True)
    finally:
        drop_database(admin_url)
    print(f"# load after: {os.getloadavg()}")
    print("| runs | rows | endpoint | before p50 / p95 ms | after p50 / p95 ms |")
    print("|---|---|---|---|---|")
    for size in args.sizes:
        for endpoint in ("page", "api"):
            cell = {r["checkout"]: f"{r['p50_ms']} / {r['p95_ms']}" for r in results
                    if r["runs"] == size and r["endpoint"] == endpoint}
            rows = next(r["rows"] for r in results if r["runs"] == size)
            print(f"| {size:,} | {rows:,} | {endpoint} | {cell['before']} | {cell['after']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
