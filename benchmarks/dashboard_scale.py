"""distillweb's API and pages against MLflow's tracking server, over HTTP on both sides, at 10,000 runs and
5,000,000 metric points: the same work, the same client, one server worker each.

1. Seeds a dedicated Postgres database (``distillweb_scale``): 2 teams, 500 experiments of 20 runs (2 students
   × (4 recipes + the hard-label baseline) × 2 seeds) with a realistic mix of statuses, frozen configs built
   by ``engine_config.build_run_config``, transitions, artifacts, student and teacher evaluations, and
   5,000,000 metric points: 10 runs × 100,000 points of ``loss`` (the compare case) and the rest spread over
   every run that started. Records go in with COPY (psycopg 3), the points with one server-side
   INSERT … SELECT over generate_series per chunk of runs, then ``rollups.rebuild()``.
2. Seeds MLflow's store (its own database, ``mlflow_scale``) from it, in a child process running in MLflow's
   venv (``--mlflow-python``): ``SqlAlchemyStore`` creates MLflow's schema and the 500 experiments; the 10,000
   runs (status, times, 11 params, tags, the final evaluation metrics) and every one of the 5,000,000 points
   go into MLflow's own tables with COPY, and ``latest_metrics`` is derived from ``metrics``. Population is
   not timed.
3. Serves both over HTTP with one worker each (distillweb: gunicorn, one gthread worker with one thread and
   keep-alive, DEBUG off; MLflow: ``mlflow server --workers 1``, uvicorn, access log off as gunicorn's is)
   and times the same work from one client (``requests.Session`` per server, keep-alive on both; every body
   read and parsed), the two sides interleaved (A, B then B, A):
   - list the 50 newest runs (``GET /api/runs/?limit=50`` / ``runs/search`` over every experiment), and one
     experiment's 20 runs;
   - a run's ``loss`` curve downsampled (``/api/runs/{id}/metrics/`` asked for at least as many points as
     MLflow's ``get-history-bulk-interval`` returns) and at full resolution (every page of
     ``/api/runs/{id}/metrics/history/`` / one ``metrics/get-history``);
   - compare 10 runs × 100,000 points (the compare page with its figure / ``runs/search`` for the 10 runs and
     ``get-history-bulk-interval`` over them).
   Reports medians, p95 and MLflow / distillweb ratios, and checks every compare trace holds at most 2,000
   points. Both servers are stopped at the end (SIGTERM to each one's PID).

    .venv/bin/python benchmarks/dashboard_scale.py --mlflow-python var/bench/mlflow-venv/bin/python --readme
    .venv/bin/python benchmarks/dashboard_scale.py --reuse ...   # keep both seeded databases

``--scale 0.02`` runs the whole thing on a small copy (its own databases) as a smoke test.
"""

from __future__ import annotations

import argparse
import base64
import json
import math
import os
import platform
import random
import re
import secrets
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
BENCH_DIR = REPO / "var" / "bench"
PG = {"host": "127.0.0.1", "port": 5432, "user": "postgres"}

MAX_TRACE_POINTS = 2000
TARGET_RATIO = 3.0

RUNS_PER_EXPERIMENT = 20  # 2 students × (4 recipes + baseline) × 2 seeds
CURVE_RUNS = 10  # seed 0 of the curve experiment: 2 students × 5
TRAIN_NAMES = ("loss", "ce", "kd", "lr")
EVAL_NAME = "eval/accuracy"


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


class Progress:
    """One progress line on stderr, rewritten in place (at most a few times a second)."""

    def __init__(self, label: str, total: int) -> None:
        self.label, self.total, self.start, self._shown = label, total, time.monotonic(), 0.0

    def update(self, done: int, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._shown < 0.5:
            return
        self._shown = now
        elapsed = now - self.start
        rate = done / elapsed if elapsed > 0 else 0.0
        print(f"\r  {self.label}: {done:,}/{self.total:,} ({100 * done / max(self.total, 1):.0f}%, "
              f"{elapsed:.0f} s, {rate:,.0f}/s)   ", end="", file=sys.stderr, flush=True)

    def done(self, done: int | None = None) -> float:
        self.update(self.total if done is None else done, force=True)
        print(file=sys.stderr, flush=True)
        return time.monotonic() - self.start


def percentile(samples: list[float], q: float) -> float:
    """Linear-interpolated percentile (q in 0..100)."""
    ordered = sorted(samples)
    if not ordered:
        return math.nan
    pos = (len(ordered) - 1) * q / 100
    lo, hi = math.floor(pos), math.ceil(pos)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# =====================================================================================================
# Scale
# =====================================================================================================
@dataclass(frozen=True)
class Scale:
    experiments: int
    total_points: int
    curve_points: int

    @classmethod
    def of(cls, factor: float) -> Scale:
        experiments = max(20, round(500 * factor))
        curve_points = max(5_000, round(100_000 * factor))
        total = max(
            round(5_000_000 * factor), CURVE_RUNS * curve_points + 300 * experiments * RUNS_PER_EXPERIMENT
        )
        return cls(experiments, total, curve_points)

    @property
    def runs(self) -> int:
        return self.experiments * RUNS_PER_EXPERIMENT


# =====================================================================================================
# Postgres helpers (main process, psycopg 3)
# =====================================================================================================
def admin_connection():
    import psycopg

    return psycopg.connect(dbname="postgres", autocommit=True, **PG)


def database_comment(name: str) -> dict[str, Any] | None:
    """The seed marker stored as the database's comment, or None when the database does not exist."""
    with admin_connection() as conn:
        row = conn.execute("SELECT shobj_description(oid, 'pg_database') FROM pg_database WHERE datname = %s",
                           [name]).fetchone()
    if row is None:
        return None
    try:
        return json.loads(row[0]) if row[0] else {}
    except ValueError:
        return {}


def recreate_database(name: str) -> None:
    from psycopg import sql

    with admin_connection() as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))


def set_database_comment(name: str, marker: dict[str, Any]) -> None:
    from psycopg import sql

    with admin_connection() as conn:
        conn.execute(sql.SQL("COMMENT ON DATABASE {} IS {}").format(sql.Identifier(name),
                                                                     sql.Literal(json.dumps(marker))))


def pg_dsn(name: str) -> str:
    return f"host={PG['host']} port={PG['port']} user={PG['user']} dbname={name}"


# =====================================================================================================
# Django setup
# =====================================================================================================
def django_setup(db: str) -> None:
    """Production-like settings (DEBUG off) against the scale database; HTTPS redirects off for the in-process
    client, which speaks plain HTTP."""
    os.environ.update({
        "DATABASE_URL": f"postgres://{PG['user']}@{PG['host']}:{PG['port']}/{db}",
        "DJANGO_SETTINGS_MODULE": "distillweb.settings.base",
        "DEBUG": "false",
        "SECRET_KEY": secrets.token_urlsafe(50),
        "SECURE_SSL_REDIRECT": "false",
        "SESSION_COOKIE_SECURE": "false",
        "CSRF_COOKIE_SECURE": "false",
        "ALLOWED_HOSTS": "testserver,localhost,127.0.0.1",
        "CELERY_BROKER_URL": "memory://",
    })
    sys.path.insert(0, str(REPO))
    os.chdir(REPO)
    import django

    django.setup()


# =====================================================================================================
# Seeding distillweb
# =====================================================================================================
DATASETS = [  # name, classes, family, train rows, teacher accuracy
    ("bbc-news", 5, "text", 1780, 0.972),
    ("tweets", 3, "text", 9000, 0.731),
    ("digits", 10, "tab", 1437, 0.978),
    ("wine", 3, "tab", 142, 0.981),
    ("breast_cancer", 2, "tab", 455, 0.965),
    ("iris", 3, "tab", 120, 0.962),
]
TEXT_STUDENTS = [(1, 64), (2, 64), (2, 128), (4, 128)]  # layers, hidden
TAB_STUDENTS = [16, 32, 64, 128]
RECIPES = [  # name, terms, gain (fraction of the gap to the teacher that distillation closes)
    ("kd-t2", [{"name": "ce", "weight": 0.1, "params": {}}, {"name": "kd", "weight": 0.9,
                                                             "params": {"temperature": 2}}], 0.45),
    ("kd-t4", [{"name": "ce", "weight": 0.1, "params": {}}, {"name": "kd", "weight": 0.9,
                                                             "params": {"temperature": 4}}], 0.55),
    ("jsd", [{"name": "jsd", "weight": 1.0, "params": {"beta": 0.5, "temperature": 1}}], 0.5),
    ("tvd", [{"name": "tvd", "weight": 1.0, "params": {"temperature": 1}}], 0.35),
    ("reverse-kl", [{"name": "reverse_kl", "weight": 1.0, "params": {"temperature": 2}}], 0.4),
    ("skew-kl", [{"name": "skew_kl", "weight": 1.0, "params": {"alpha": 0.1, "temperature": 2}}], 0.48),
    ("taid", [{"name": "taid", "weight": 1.0, "params": {"t_start": 0.4, "t_end": 1.0}}], 0.58),
    ("topk-64", [{"name": "ce", "weight": 0.2, "params": {}}, {"name": "topk", "weight": 0.8,
                                                               "params": {"k": 64, "temperature": 2}}], 0.42),
]
ERRORS = [
    "CUDA out of memory. Tried to allocate 1.50 GiB (GPU 0; 23.64 GiB total capacity).",
    "Loss became NaN at step {step} (lr too high?).",
    "The worker running this run stopped responding 3 times; giving up.",
    "Column 'label' has values outside 0..{labels}: 7 rows.",
]


@dataclass
class SeedInfo:
    marker: dict[str, Any]
    seconds: dict[str, float] = field(default_factory=dict)


def _json_default(value: Any) -> Any:
    raise TypeError(f"not JSON: {value!r}")


def _copy_into(cursor, model, rows: Iterable[dict[str, Any]], progress: Progress | None = None) -> int:
    """COPY rows (dicts of attname → value) into the model's table; fields left out take their default, so the
    seed keeps working when a column with a default is added."""
    from django.db import connection, models

    fields = model._meta.concrete_fields
    cols = ", ".join(connection.ops.quote_name(f.column) for f in fields)
    table = connection.ops.quote_name(model._meta.db_table)
    n = 0
    with cursor.copy(f"COPY {table} ({cols}) FROM STDIN") as copy:
        for values in rows:
            row = []
            for f in fields:
                v = values[f.attname] if f.attname in values else f.get_default()
                if isinstance(f, models.JSONField):
                    v = json.dumps(v, default=_json_default)
                row.append(v)
            copy.write_row(row)
            n += 1
            if progress is not None and n % 1000 == 0:
                progress.update(n)
    return n


def seed_distillweb(scale: Scale, db: str) -> SeedInfo:
    from django.contrib.auth import get_user_model
    from django.core.management import call_command
    from django.core.management.color import no_style
    from django.db import connection, transaction

    from experiments.domain.engine_config import build_run_config, split_key
    from experiments.models import (
        Artifact,
        DatasetSpec,
        Evaluation,
        Experiment,
        Membership,
        ModelSpec,
        Recipe,
        Run,
        RunTransition,
        Team,
    )

    timings: dict[str, float] = {}
    t_all = time.monotonic()
    t0 = time.monotonic()
    call_command("migrate", verbosity=0)
    timings["migrate"] = time.monotonic() - t0
    rng = random.Random(5)
    now = datetime.now(UTC).replace(microsecond=0)

    # --- small records through the ORM ----------------------------------------------------------------
    t0 = time.monotonic()
    User = get_user_model()
    member = User.objects.create_user("bench-member", email="member@example.org")
    member.set_unusable_password()
    member.save()
    teams = [Team.objects.create(name=f"Scale team {c}", slug=f"scale-team-{c.lower()}") for c in "AB"]
    leads = []
    for team, c in zip(teams, "ab", strict=True):
        lead = User.objects.create_user(f"lead-{c}", email=f"lead-{c}@example.org")
        leads.append(lead)
        Membership.objects.create(user=lead, team=team, role=Membership.Role.LEAD)
        Membership.objects.create(user=member, team=team, role=Membership.Role.MEMBER)

    datasets: dict[int, list[DatasetSpec]] = {}
    teachers: dict[int, ModelSpec] = {}
    students: dict[int, list[ModelSpec]] = {}
    recipes: dict[int, list[tuple[Recipe, float]]] = {}
    baseline_recipe: dict[int, Recipe] = {}
    accuracy_of: dict[int, float] = {}
    for team, lead in zip(teams, leads, strict=True):
        datasets[team.pk] = []
        for name, classes, family, rows, teacher_acc in DATASETS:
            ds = DatasetSpec.objects.create(
                team=team, created_by=lead, name=name, source=DatasetSpec.Source.BUILTIN, builtin_name=name,
                num_labels=classes, label_names=[f"class {i}" for i in range(classes)],
                splits={"train": rows, "eval": rows // 4}, notes=family,
            )
            datasets[team.pk].append(ds)
            accuracy_of[ds.pk] = teacher_acc
            if family == "text":
                teacher = ModelSpec.objects.create(
                    team=team,
                    created_by=lead,
                    name=f"{name}-bert-6l-512-teacher",
                    source=ModelSpec.Source.CONFIG,
                    num_labels=classes,
                    param_count=41_370_000,
                    tokenizer_id="bert-base-uncased",
                    config={
                        "model_type": "bert",
                        "num_hidden_layers": 6,
                        "hidden_size": 512,
                        "num_attention_heads": 8,
                        "intermediate_size": 2048,
                        "vocab_size": 30522,
                    },
                )
                specs = [
                    ModelSpec.objects.create(
                        team=team, created_by=lead, name=f"{name}-bert-{layers}l-{hidden}",
                        source=ModelSpec.Source.CONFIG, num_labels=classes, tokenizer_id="bert-base-uncased",
                        param_count=30522 * hidden + layers * 12 * hidden * hidden,
                        config={"model_type": "bert", "num_hidden_layers": layers, "hidden_size": hidden,
                                "num_attention_heads": max(1, hidden // 64), "intermediate_size": 4 * hidden,
                                "vocab_size": 30522},
                    )
                    for layers, hidden in TEXT_STUDENTS
                ]
            else:
                teacher = ModelSpec.objects.create(
                    team=team,
                    created_by=lead,
                    name=f"{name}-mlp-2x256-teacher",
                    source=ModelSpec.Source.BUILTIN,
                    builtin_arch="mlp",
                    num_labels=classes,
                    param_count=64 * 256 + 256 * 256 + 256 * classes,
                    config={"hidden_sizes": [256, 256]},
                )
                specs = [
                    ModelSpec.objects.create(
                        team=team, created_by=lead, name=f"{name}-mlp-{h}", source=ModelSpec.Source.BUILTIN,
                        builtin_arch="mlp", num_labels=classes, param_count=64 * h + h * classes,
                        config={"hidden_sizes": [h]},
                    )
                    for h in TAB_STUDENTS
                ]
            teachers[ds.pk] = teacher
            students[ds.pk] = specs
        recipes[team.pk] = [
            (
                Recipe.objects.create(
                    team=team,
                    created_by=lead,
                    name=name,
                    scheme=Recipe.Scheme.OFFLINE,
                    terms=terms,
                    description=f"{name} distillation",
                ),
                gain,
            )
            for name, terms, gain in RECIPES
        ]
        baseline_recipe[team.pk] = Recipe.objects.create(
            team=team, created_by=lead, name="hard_labels", scheme=Recipe.Scheme.HARD_LABELS,
            terms=[{"name": "ce", "weight": 1.0, "params": {}}],
            description="Baseline: the student trained on hard labels only, added to every experiment.",
        )
    timings["records"] = time.monotonic() - t0

    # --- experiments, runs, transitions, evaluations, artifacts (COPY) --------------------------------------
    t0 = time.monotonic()
    n_exp = scale.experiments
    active_from = n_exp - max(2, n_exp * 3 // 50)  # the newest 6% are still running / queued
    big_dataset = datasets[teams[0].pk][0]  # team A's bbc-news: the leaderboard
    curve_index = (n_exp // 2) & ~1  # a team-A experiment in the middle of the history
    experiments: list[dict[str, Any]] = []
    runs: list[dict[str, Any]] = []
    transitions: list[dict[str, Any]] = []
    evaluations: list[dict[str, Any]] = []
    artifacts: list[dict[str, Any]] = []
    exp_students: list[dict[str, Any]] = []
    exp_recipes: list[dict[str, Any]] = []
    teacher_evaluated: set[tuple[int, str]] = set()
    curve_experiment = None
    curve_runs: list[int] = []
    plans: list[
        tuple[int, int, int, datetime, float, bool]
    ] = []  # run id, reached step, total, t0, s/step, curve
    run_id = 0
    progress = Progress("runs", scale.runs)
    for i in range(n_exp):
        team = teams[i % 2]
        lead = leads[i % 2]
        exp_id = i + 1
        ds = big_dataset if team is teams[0] and rng.random() < 0.4 else rng.choice(datasets[team.pk][1:] if
                                                                                     team is teams[0] else
                                                                                     datasets[team.pk])
        is_curve = i == curve_index
        if is_curve:
            ds, curve_experiment = big_dataset, exp_id
        created = now - timedelta(days=180) * (n_exp - i) / n_exp + timedelta(minutes=rng.randint(0, 120))
        if i >= active_from:
            created = now - timedelta(hours=(n_exp - i) * 0.5)
        picked_students = rng.sample(students[ds.pk], 2)
        picked_recipes = rng.sample(recipes[team.pk], 4)
        total = scale.curve_points if is_curve else rng.choice([1000, 2000, 3000, 5000])
        train = {
            "max_steps": total,
            "batch_size": rng.choice([32, 64, 128]),
            "lr": rng.choice([5e-4, 1e-3, 2e-3]),
            "eval_every": max(total // 20, 50),
            "save_every": max(total // 10, 100),
            "log_every": 10,
        }
        exp_obj = Experiment(id=exp_id, team=team, name="", dataset=ds, train=train, seeds=[0, 1])
        exp_obj.dataset = ds
        label = ("Distill " if rng.random() < 0.5 else "Sweep ") + f"{ds.name} #{exp_id}"
        experiments.append({
            "id": exp_id, "team_id": team.pk, "created_by_id": lead.pk, "created_at": created, "name": label,
            "description": f"{', '.join(s.name for s in picked_students)} × "
                           f"{', '.join(r.name for r, _ in picked_recipes)}",
            "teacher_id": teachers[ds.pk].pk, "dataset_id": ds.pk, "seeds": [0, 1], "train": train,
        })
        exp_students += [{"experiment_id": exp_id, "modelspec_id": s.pk} for s in picked_students]
        exp_recipes += [{"experiment_id": exp_id, "recipe_id": r.pk} for r, _ in picked_recipes]
        teacher = teachers[ds.pk]
        teacher_acc = accuracy_of[ds.pk]
        for student in sorted(picked_students, key=lambda s: s.param_count):
            capacity = 0.78 + 0.05 * (students[ds.pk].index(student)) + rng.uniform(-0.01, 0.01)
            for recipe, gain in [*picked_recipes, (baseline_recipe[team.pk], 0.0)]:
                is_baseline = recipe.scheme == Recipe.Scheme.HARD_LABELS
                for seed in (0, 1):
                    run_id += 1
                    config = build_run_config(experiment=exp_obj, student=student, recipe=recipe, seed=seed,
                                              teacher=teacher)
                    if is_curve:
                        status = "succeeded"
                        if seed == 0:
                            curve_runs.append(run_id)
                    elif i >= active_from:
                        status = rng.choices(["running", "queued", "succeeded", "failed"], [30, 40, 25, 5])[0]
                    else:
                        status = rng.choices(["succeeded", "failed", "cancelled"], [91, 6, 3])[0]
                    sec_per_step = rng.uniform(0.02, 0.2)
                    queued_for = timedelta(seconds=rng.uniform(1, 900))
                    started = created + queued_for if status != "queued" else None
                    reached = {"succeeded": total, "queued": 0}.get(
                        status, int(total * rng.uniform(0.3, 0.95))
                    )
                    finished = (started + timedelta(seconds=reached * sec_per_step)
                                if status in ("succeeded", "failed", "cancelled") else None)
                    if status == "running":
                        started = now - timedelta(seconds=reached * sec_per_step)
                    accuracy = teacher_acc * (capacity + (0 if is_baseline else gain * (1 - capacity)))
                    accuracy = min(0.999, max(0.05, accuracy + rng.gauss(0, 0.006)))
                    params = student.param_count
                    latency = 0.05 + params / 2e7 + rng.uniform(0, 0.02)
                    student_metrics = {
                        "accuracy": accuracy,
                        "macro_f1": max(0.0, accuracy - rng.uniform(0.002, 0.03)),
                        "nll": -math.log(accuracy) * 1.3,
                        "ece": rng.uniform(0.01, 0.06),
                        "agreement": min(1.0, accuracy / teacher_acc),
                        "kl_to_teacher": rng.uniform(0.02, 0.4),
                        "params": params,
                        "latency_ms_p50": latency,
                        "size_bytes": params * 4,
                    }
                    teacher_metrics = {"accuracy": teacher_acc, "macro_f1": teacher_acc - 0.01, "nll": 0.1,
                                       "params": teacher.param_count,
                                       "latency_ms_p50": 0.05 + teacher.param_count / 2e7}
                    error = ""
                    if status == "failed":
                        error = rng.choice(ERRORS).format(step=reached, labels=ds.num_labels - 1)
                    worker = f"gpu{rng.randint(0, 3)}@node-{rng.randint(1, 6)}"
                    runs.append(
                        {
                            "id": run_id,
                            "team_id": team.pk,
                            "experiment_id": exp_id,
                            "student_id": student.pk,
                            "teacher_id": None if is_baseline else teacher.pk,
                            "recipe_id": recipe.pk,
                            "seed": seed,
                            "is_baseline": is_baseline,
                            "stage": "",
                            "config": config,
                            "status": status,
                            "queue": "training",
                            "task_id": ""
                            if status == "queued" and rng.random() < 0.5
                            else f"{secrets.token_hex(16)}",
                            "worker_name": "" if status == "queued" else worker,
                            "attempt": 0 if status == "queued" else 1,
                            "step": reached,
                            "total_steps": total,
                            "samples_per_s": None
                            if status == "queued"
                            else train["batch_size"] / sec_per_step,
                            "cancel_requested": False,
                            "error": error,
                            "checkpoint_path": ""
                            if status == "queued"
                            else f"runs/{run_id}/checkpoints/step-{reached - reached % train['save_every']}",
                            "result": {
                                "steps": total,
                                "student": student_metrics,
                                "teacher": teacher_metrics,
                                "final_dir": f"runs/{run_id}/final",
                            }
                            if status == "succeeded"
                            else {},
                            "created_at": created,
                            "started_at": started,
                            "heartbeat_at": now - timedelta(seconds=5) if status == "running" else finished,
                            "finished_at": finished,
                        }
                    )
                    if status != "queued":
                        transitions.append(
                            {
                                "run_id": run_id,
                                "from_status": "queued",
                                "to_status": "running",
                                "at": started,
                                "reason": f"Claimed by {worker}.",
                                "worker_name": worker,
                                "attempt": 1,
                            }
                        )
                    if status in ("succeeded", "failed", "cancelled"):
                        reason = {"succeeded": f"Trained {total} steps and evaluated.", "failed": error,
                                  "cancelled": f"Stopped at step {reached} after cancellation was requested."}
                        transitions.append({"run_id": run_id, "from_status": "running", "to_status": status,
                                            "at": finished, "reason": reason[status], "worker_name": worker,
                                            "attempt": 1})
                    if status == "succeeded":
                        key = split_key(config["dataset"])
                        evaluations.append(
                            {
                                "team_id": team.pk,
                                "role": "student",
                                "run_id": run_id,
                                "model_id": student.pk,
                                "dataset_id": ds.pk,
                                "split": "eval",
                                "split_key": key,
                                "accuracy": accuracy,
                                "macro_f1": student_metrics["macro_f1"],
                                "param_count": params,
                                "latency_ms": latency,
                                "metrics": student_metrics,
                                "created_at": finished,
                            }
                        )
                        if not is_baseline and (teacher.pk, key) not in teacher_evaluated:
                            teacher_evaluated.add((teacher.pk, key))
                            evaluations.append(
                                {
                                    "team_id": team.pk,
                                    "role": "teacher",
                                    "run_id": run_id,
                                    "model_id": teacher.pk,
                                    "dataset_id": ds.pk,
                                    "split": "eval",
                                    "split_key": key,
                                    "accuracy": teacher_acc,
                                    "macro_f1": teacher_acc - 0.01,
                                    "param_count": teacher.param_count,
                                    "latency_ms": teacher_metrics["latency_ms_p50"],
                                    "metrics": teacher_metrics,
                                    "created_at": finished,
                                }
                            )
                        artifacts.append(
                            {
                                "run_id": run_id,
                                "kind": "model",
                                "path": f"runs/{run_id}/final",
                                "step": total,
                                "size_bytes": params * 4,
                                "sha256": secrets.token_hex(32),
                                "created_at": finished,
                            }
                        )
                    if status != "queued":
                        artifacts.append(
                            {
                                "run_id": run_id,
                                "kind": "checkpoint",
                                "path": f"runs/{run_id}/checkpoints/step-{reached}",
                                "step": reached,
                                "size_bytes": params * 12,
                                "sha256": "",
                                "created_at": finished or now,
                            }
                        )
                        plans.append((run_id, reached, total, started, sec_per_step, is_curve and seed == 0))
                    if run_id % 500 == 0:
                        progress.update(run_id)
    progress.done(run_id)
    timings["generate"] = time.monotonic() - t0

    t0 = time.monotonic()
    for n, item in enumerate(evaluations, 1):
        item["id"] = n
    for n, item in enumerate(artifacts, 1):
        item["id"] = n
    for n, item in enumerate(transitions, 1):
        item["id"] = n
    for n, item in enumerate(exp_students, 1):
        item["id"] = n
    for n, item in enumerate(exp_recipes, 1):
        item["id"] = n
    with transaction.atomic(), connection.cursor() as c:
        cursor = c.cursor
        cursor.execute("SET LOCAL synchronous_commit TO OFF")
        _copy_into(cursor, Experiment, experiments)
        _copy_into(cursor, Experiment.students.through, exp_students)
        _copy_into(cursor, Experiment.recipes.through, exp_recipes)
        copy_progress = Progress("COPY runs", len(runs))
        _copy_into(cursor, Run, runs, copy_progress)
        copy_progress.done()
        _copy_into(cursor, RunTransition, transitions)
        _copy_into(cursor, Evaluation, evaluations)
        _copy_into(cursor, Artifact, artifacts)
        for stmt in connection.ops.sequence_reset_sql(
                no_style(), [Experiment, Experiment.students.through, Experiment.recipes.through, Run,
                             RunTransition, Evaluation, Artifact]):
            cursor.execute(stmt)
    timings["copy records"] = time.monotonic() - t0
    log(f"  COPY: {len(experiments)} experiments, {len(runs)} runs, {len(transitions)} transitions, "
        f"{len(evaluations)} evaluations, {len(artifacts)} artifacts in {timings['copy records']:.1f} s")

    # --- metric points ------------------------------------------------------------------------------
    t0 = time.monotonic()
    points = seed_points(scale, plans)
    timings["metric points"] = time.monotonic() - t0
    t0 = time.monotonic()
    rolled = rebuild_rollups()
    if rolled is not None:
        timings["rollups"] = time.monotonic() - t0
        log(
            f"  rollups of the long runs rebuilt from their points: {rolled:,} rows in "
            f"{timings['rollups']:.1f} s"
        )
    t0 = time.monotonic()
    with connection.cursor() as cursor:
        cursor.execute("VACUUM (ANALYZE)")  # statistics and visibility maps, as autovacuum would leave them
    timings["vacuum analyze"] = time.monotonic() - t0
    timings["total"] = time.monotonic() - t_all
    status_counts = {s: sum(1 for r in runs if r["status"] == s) for s in Run.Status.values}
    marker = {
        "seed": secrets.token_hex(8), "complete": True, "scale": [scale.experiments, scale.total_points,
                                                                  scale.curve_points],
        "user": member.username, "leaderboard_dataset": big_dataset.pk, "curve_experiment": curve_experiment,
        "curve_runs": curve_runs, "runs": len(runs), "points": points, "statuses": status_counts,
        "evaluations": len(evaluations), "seed_seconds": timings, "seeded_at": now.isoformat(),
    }
    set_database_comment(db, marker)
    return SeedInfo(marker, timings)


def seed_points(scale: Scale, plans: list[tuple[int, int, int, datetime, float, bool]]) -> int:
    """Exactly ``scale.total_points`` points: CURVE_RUNS × curve_points of ``loss`` for the curve runs, the
    rest spread over every started run (``loss``/``ce``/``kd``/``lr`` and ``eval/accuracy`` every few steps).

    Each run's plan (name, number of points, last step reached) goes in with COPY; the points themselves are
    generated by Postgres (generate_series), one INSERT per chunk of runs so the progress line moves."""
    from django.db import connection

    curve_total = sum(1 for p in plans if p[5]) * scale.curve_points
    rest = scale.total_points - curve_total
    per_run, extra = divmod(rest, len(plans))
    rows: list[tuple[int, str, int, int, int, datetime, float, float]] = []
    rng = random.Random(11)
    for index, (run_id, reached, total, started, sec_per_step, curve) in enumerate(plans):
        quota = per_run + (1 if index < extra else 0)
        level = rng.uniform(0.8, 1.2)
        names = [n for n in TRAIN_NAMES if not (curve and n == "loss")]
        n_eval = quota // 10
        train_share, train_extra = divmod(quota - n_eval, len(names))
        for k, name in enumerate(names):
            rows.append((run_id, name, train_share + (1 if k < train_extra else 0), reached, total, started,
                         sec_per_step, level))
        rows.append((run_id, EVAL_NAME, n_eval, reached, total, started, sec_per_step, level))
        if curve:
            rows.append((run_id, "loss", scale.curve_points, reached, total, started, sec_per_step, level))
    assert all(n <= max(reached, 1) for _, _, n, reached, *_ in rows), "more points than steps"
    expected = sum(r[2] for r in rows)
    assert expected == scale.total_points, (expected, scale.total_points)

    with connection.cursor() as c:
        cursor = c.cursor
        cursor.execute("SET synchronous_commit TO OFF")
        cursor.execute("DROP TABLE IF EXISTS scale_plan")
        cursor.execute(
            "CREATE UNLOGGED TABLE scale_plan (run_id bigint, name text, n int, reached int, total int,"
            " t0 timestamptz, sec_per_step float8, level float8)"
        )
        with cursor.copy("COPY scale_plan FROM STDIN") as copy:
            for row in rows:
                copy.write_row(row)
        cursor.execute("CREATE INDEX ON scale_plan (run_id)")
        # Training losses decay with noise and rare spikes (what min/max downsampling must keep); the learning
        # rate decays linearly; eval accuracy rises to a plateau.
        insert = """
            INSERT INTO experiments_metricpoint (run_id, name, step, value, wall_time)
            SELECT p.run_id, p.name, s.step,
                CASE p.name
                    WHEN 'lr' THEN 0.001 * (1 - s.step::float8 / p.total)
                    WHEN 'eval/accuracy' THEN least(0.999, 0.93 * p.level * (1 - 0.75 * exp(-s.step::float8
                                                   / (0.15 * p.total))) + 0.01 * random())
                    ELSE p.level * (CASE p.name WHEN 'kd' THEN 0.6 WHEN 'ce' THEN 0.4 ELSE 1 END)
                         * (0.15 + 2.2 * exp(-s.step::float8 / (0.2 * p.total))) * (0.96 + 0.08 * random())
                         + CASE WHEN random() < 0.001 THEN 0.8 ELSE 0 END
                END,
                p.t0 + make_interval(secs => s.step * p.sec_per_step)
            FROM scale_plan p
            CROSS JOIN LATERAL (SELECT (g::bigint * greatest(p.reached, 1) / p.n)::int AS step
                                FROM generate_series(0, p.n - 1) g) s
            WHERE p.run_id BETWEEN %s AND %s AND p.n > 0
            ORDER BY p.run_id, p.name, s.step"""
        ids = sorted({p[0] for p in plans})
        chunks = 50
        progress = Progress("metric points", scale.total_points)
        inserted = 0
        for k in range(chunks):
            part = ids[k * len(ids) // chunks:(k + 1) * len(ids) // chunks]
            if not part:
                continue
            cursor.execute(insert, [part[0], part[-1]])
            inserted += cursor.rowcount
            progress.update(inserted, force=True)
        progress.done(inserted)
        cursor.execute("DROP TABLE scale_plan")
    assert inserted == scale.total_points, (inserted, scale.total_points)
    return inserted


def rebuild_rollups() -> int | None:
    """Points written with SQL bypass ``services.run_record_metrics``, which keeps the per-bucket rollups of
    long runs current: rebuild them the way the app documents for a bulk import (None where the app has
    none)."""
    try:
        from experiments import rollups
    except ImportError:
        return None
    rebuild = getattr(rollups, "rebuild", None)
    return rebuild() if rebuild is not None else None


def ensure_seeded(scale: Scale, db: str, reuse: bool) -> SeedInfo:
    marker = database_comment(db) if reuse else None
    expected = [scale.experiments, scale.total_points, scale.curve_points]
    if marker and marker.get("complete") and marker.get("scale") == expected:
        log(f"Reusing the seeded database {db} (seeded {marker.get('seeded_at')}).")
        django_setup(db)
        from django.core.management import call_command

        call_command("migrate", verbosity=0)
        from experiments.models import Run

        leftovers = list(Run.objects.filter(task_id__startswith="bench-ingest-").values_list("pk", flat=True))
        if leftovers:
            log(f"Deleting the ingest runs an interrupted run left behind: {leftovers}")
            delete_runs(leftovers)
        seconds = marker.setdefault("seed_seconds", {})
        if "rollups" not in seconds:  # seeded before the app kept rollups: build them as a fresh seed does
            t0 = time.monotonic()
            rolled = rebuild_rollups()
            if rolled is not None:
                seconds["rollups"] = time.monotonic() - t0
                seconds["total"] = seconds.get("total", 0) + seconds["rollups"]
                log(f"Rollups rebuilt from the points: {rolled:,} rows in {seconds['rollups']:.1f} s")
                set_database_comment(db, marker)
                from django.db import connection

                with connection.cursor() as cursor:
                    cursor.execute("VACUUM (ANALYZE)")
        return SeedInfo(marker, {})
    if reuse:
        log(f"{db} is missing or not fully seeded at this scale: seeding it again.")
    log(f"Creating {db} and seeding {scale.runs:,} runs and {scale.total_points:,} metric points…")
    recreate_database(db)
    django_setup(db)
    info = seed_distillweb(scale, db)
    log(f"Seeded {db} in {info.seconds['total']:.1f} s "
        f"({', '.join(f'{k} {v:.1f} s' for k, v in info.seconds.items() if k != 'total')}).")
    return info


# =====================================================================================================
# Timing over HTTP: the same client for both servers
# =====================================================================================================
def figure_traces(html: str, element_id: str) -> list[tuple[str, int]]:
    """(trace name, number of x values) of the plotly figure embedded with json_script under ``element_id``.
    Typed arrays (``{"dtype": …, "bdata": …}``) are counted from their decoded length."""
    match = re.search(
        rf'<script id="{re.escape(element_id)}" type="application/json">(.*?)</script>', html, re.S
    )
    if match is None:
        raise AssertionError(f"no figure {element_id!r} in the page")
    figure = json.loads(match.group(1))
    counted = []
    for trace in (figure or {}).get("data", []):
        x = trace.get("x")
        if isinstance(x, dict) and "bdata" in x:
            itemsize = int(re.sub(r"\D", "", x.get("dtype", "f8")) or 8)
            n = len(base64.b64decode(x["bdata"])) // itemsize
        else:
            n = len(x or [])
        counted.append((str(trace.get("name", "")), n))
    return counted


def delete_runs(run_ids: list[int]) -> None:
    """Delete benchmark runs (ingest runs an older version of this script left) with everything that hangs
    off them; their points first, in one statement, then the run through the ORM so every cascade follows."""
    from django.db import connection

    from experiments.models import MetricPoint, Run

    with connection.cursor() as cursor:
        cursor.execute(f"DELETE FROM {connection.ops.quote_name(MetricPoint._meta.db_table)} "
                       "WHERE run_id = ANY(%s::bigint[])", [run_ids])
    Run.objects.filter(pk__in=run_ids).delete()


class Server:
    """A server process in its own session (SIGTERM to it, then SIGKILL to its group: only what it started),
    ready when ``ready_path`` answers 200."""

    def __init__(self, name: str, cmd: list[str], env: dict[str, str], port: int, ready_path: str,
                 headers: dict[str, str] | None = None) -> None:
        self.name, self.cmd, self.env, self.port = name, cmd, env, port
        self.uri = f"http://127.0.0.1:{port}"
        self.ready_path, self.headers = ready_path, headers or {}
        self.proc: subprocess.Popen | None = None
        self.log_path = BENCH_DIR / f"dashboard-scale-{name}.log"

    def start(self) -> None:
        import requests

        self.proc = subprocess.Popen(self.cmd, cwd=REPO, env=self.env, stdout=self.log_path.open("wb"),
                                     stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited ({self.proc.returncode}); see {self.log_path}")
            try:
                answer = requests.get(self.uri + self.ready_path, headers=self.headers, timeout=5)
                if answer.status_code == 200:
                    log(f"{self.name} ready on {self.uri} (pid {self.proc.pid})")
                    return
            except requests.RequestException:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"{self.name} did not answer {self.ready_path} in 180 s; see {self.log_path}")

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)
        log(f"{self.name} (pid {self.proc.pid}) stopped")


def distillweb_server() -> Server:
    """gunicorn with one worker and one thread (gthread: HTTP keep-alive, as MLflow's uvicorn has), the
    settings ``django_setup`` put in the environment (DEBUG off, the scale database, the same SECRET_KEY as
    this process, so the session made here is valid there)."""
    port = free_port()
    cmd = [str(Path(sys.executable).parent / "gunicorn"), "distillweb.wsgi:application", "--workers", "1",
           "--worker-class", "gthread", "--threads", "1", "--keep-alive", "60", "--bind", f"127.0.0.1:{port}",
           "--log-level", "warning"]
    return Server("distillweb (gunicorn)", cmd, dict(os.environ), port, "/api/teams/")


def mlflow_server(mlflow_python: Path, db: str) -> Server:
    artifacts = BENCH_DIR / "mlflow-scale-artifacts"
    artifacts.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, **mlflow_env(), "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    for key in ("DATABASE_URL", "DJANGO_SETTINGS_MODULE", "SECRET_KEY"):
        env.pop(key, None)
    port = free_port()
    cmd = [str(mlflow_python.parent / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
           "--workers", "1", "--backend-store-uri", mlflow_store_uri(db), "--default-artifact-root",
           str(artifacts), "--uvicorn-opts", "--no-access-log"]  # as gunicorn: no line per request
    return Server("mlflow server", cmd, env, port, "/health")


def mlflow_store_uri(db: str) -> str:
    return f"postgresql+psycopg2://{PG['user']}@{PG['host']}:{PG['port']}/{db}"


def mlflow_env() -> dict[str, str]:
    return {
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "DO_NOT_TRACK": "true",
        "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true",
    }


# =====================================================================================================
# MLflow's store, seeded by a child process in MLflow's venv through its own storage layer
# =====================================================================================================
MLFLOW_STATUS = {"queued": "SCHEDULED", "running": "RUNNING", "succeeded": "FINISHED", "failed": "FAILED",
                 "cancelled": "KILLED"}


def _ms(value: datetime | None) -> int | None:
    return int(value.timestamp() * 1000) if value is not None else None


def _formula(terms: list[dict[str, Any]]) -> str:
    return " + ".join(f"{t.get('weight', 1)}·{t['name']}"
                      + (f"({', '.join(f'{k}={v}' for k, v in sorted(t.get('params', {}).items()))})"
                         if t.get("params") else "") for t in terms)


def _copy_csv(cursor, table: str, columns: tuple[str, ...], rows: Iterable[Iterable[Any]]) -> int:
    import csv
    import io

    buffer = io.StringIO()
    writer = csv.writer(buffer)
    n = 0
    for row in rows:
        writer.writerow(row)
        n += 1
    buffer.seek(0)
    cursor.copy_expert(f"COPY {table} ({', '.join(columns)}) FROM STDIN WITH (FORMAT csv)", buffer)
    return n


MLFLOW_RUNS_SQL = """
    SELECT r.id, r.experiment_id, r.seed, r.is_baseline, r.status, r.step, r.config,
           r.created_at, r.started_at, r.finished_at, s.name AS student, rc.name AS recipe, rc.terms,
           tch.name AS teacher, d.name AS dataset, t.name AS team,
           ev.accuracy, ev.macro_f1, ev.param_count, ev.latency_ms
    FROM experiments_run r
    JOIN experiments_modelspec s ON s.id = r.student_id
    JOIN experiments_recipe rc ON rc.id = r.recipe_id
    LEFT JOIN experiments_modelspec tch ON tch.id = r.teacher_id
    JOIN experiments_experiment e ON e.id = r.experiment_id
    JOIN experiments_datasetspec d ON d.id = e.dataset_id
    JOIN experiments_team t ON t.id = r.team_id
    LEFT JOIN experiments_evaluation ev ON ev.run_id = r.id AND ev.role = 'student'
    ORDER BY r.id"""


def mlflow_seed(*, dsn: str, store_uri: str, artifact_root: str) -> dict[str, Any]:
    """Runs in MLflow's venv. MLflow's ``SqlAlchemyStore`` creates its schema and the experiments; the runs,
    their tags, params and metrics (every one of the distillweb database's points, with their steps and wall
    times) go into its tables with COPY, and ``latest_metrics`` is derived from ``metrics`` as ``log_batch``
    keeps it. Returns the id maps and counts."""
    import uuid

    import psycopg2
    import psycopg2.extras
    from mlflow.entities import ExperimentTag
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    t_all = time.monotonic()
    store = SqlAlchemyStore(store_uri, artifact_root)
    src = psycopg2.connect(dsn)
    cur = src.cursor(cursor_factory=psycopg2.extras.RealDictCursor)
    cur.execute("""SELECT e.id, e.name, t.name AS team FROM experiments_experiment e
                   JOIN experiments_team t ON t.id = e.team_id ORDER BY e.id""")
    experiments = cur.fetchall()
    exp_map: dict[int, str] = {}
    locations: dict[int, str] = {}
    progress = Progress("MLflow experiments (SqlAlchemyStore.create_experiment)", len(experiments))
    for n, e in enumerate(experiments, 1):
        exp_id = store.create_experiment(
            f"{e['team']} / {e['name']}",
            tags=[ExperimentTag("team", e["team"]), ExperimentTag("distillweb_experiment_id", str(e["id"]))],
        )
        exp_map[e["id"]] = exp_id
        locations[e["id"]] = store.get_experiment(exp_id).artifact_location
        progress.update(n)
    progress.done()
    cur.execute(MLFLOW_RUNS_SQL)
    runs = cur.fetchall()
    run_map = {r["id"]: uuid.uuid4().hex for r in runs}
    run_rows, tag_rows, param_rows, final_rows = [], [], [], []
    for run in runs:
        rid = run_map[run["id"]]
        cfg = run["config"] or {}
        train = cfg.get("train") or {}
        name = f"{run['student']} · {'baseline' if run['is_baseline'] else run['recipe']} · s{run['seed']}"
        start = _ms(run["started_at"] or run["created_at"])
        status = MLFLOW_STATUS[run["status"]]
        end = _ms(run["finished_at"]) if status in ("FINISHED", "FAILED", "KILLED") else None
        run_rows.append((rid, name, "UNKNOWN", "", "", "bench", status, start, end, "", "active",
                         f"{locations[run['experiment_id']]}/{rid}/artifacts", exp_map[run["experiment_id"]]))
        tags = {"mlflow.runName": name, "mlflow.user": "bench", "team": run["team"],
                "distillweb_run_id": str(run["id"])}
        tag_rows += [(k, v, rid) for k, v in tags.items()]
        params = {
            "student": run["student"], "teacher": run["teacher"] or "none", "recipe": run["recipe"],
            "dataset": run["dataset"], "seed": run["seed"], "is_baseline": run["is_baseline"],
            "scheme": cfg.get("scheme") or "none", "terms": _formula(run["terms"] or []) or "none",
            "lr": train.get("lr"), "batch_size": train.get("batch_size"), "max_steps": train.get("max_steps"),
        }
        param_rows += [(k, str(v), rid) for k, v in params.items()]
        stamp = _ms(run["finished_at"] or run["started_at"] or run["created_at"]) or 0
        final = {"accuracy": run["accuracy"], "macro_f1": run["macro_f1"], "params": run["param_count"],
                 "latency_ms": run["latency_ms"]}
        final_rows += [(f"final/{k}", float(v), stamp, rid, run["step"] or 0, False)
                       for k, v in final.items() if v is not None]
    dst = psycopg2.connect(store_uri.replace("postgresql+psycopg2://", "postgresql://"))
    out = dst.cursor()
    t0 = time.monotonic()
    _copy_csv(out, "runs", ("run_uuid", "name", "source_type", "source_name", "entry_point_name", "user_id",
                            "status", "start_time", "end_time", "source_version", "lifecycle_stage",
                            "artifact_uri", "experiment_id"), run_rows)
    _copy_csv(out, "tags", ("key", "value", "run_uuid"), tag_rows)
    _copy_csv(out, "params", ("key", "value", "run_uuid"), param_rows)
    _copy_csv(out, "metrics", ("key", "value", "timestamp", "run_uuid", "step", "is_nan"), final_rows)
    log(f"  MLflow: {len(run_rows):,} runs, {len(tag_rows):,} tags, {len(param_rows):,} params in "
        f"{time.monotonic() - t0:.1f} s")
    # Every point: copied out of distillweb's table and into a staging table beside MLflow's, then into
    # ``metrics`` with each run's uuid.
    t0 = time.monotonic()
    out.execute("CREATE UNLOGGED TABLE bench_runmap (run_id bigint PRIMARY KEY, run_uuid varchar(32))")
    _copy_csv(out, "bench_runmap", ("run_id", "run_uuid"), run_map.items())
    out.execute("CREATE UNLOGGED TABLE bench_points (run_id bigint, key varchar(250), value float8, "
                "ts bigint, step bigint)")
    import tempfile

    with tempfile.TemporaryFile(dir=BENCH_DIR) as spool:
        src.cursor().copy_expert(
            "COPY (SELECT run_id, name, value, (extract(epoch FROM wall_time) * 1000)::bigint, step "
            "FROM experiments_metricpoint) TO STDOUT", spool)
        spool.seek(0)
        out.copy_expert("COPY bench_points FROM STDIN", spool)
    out.execute("""
        INSERT INTO metrics (key, value, timestamp, run_uuid, step, is_nan)
        SELECT p.key, CASE WHEN p.value = 'NaN' THEN 0 ELSE p.value END, p.ts, m.run_uuid, p.step,
               p.value = 'NaN'
        FROM bench_points p JOIN bench_runmap m USING (run_id)""")
    points = out.rowcount
    log(f"  MLflow: {points:,} metric points in {time.monotonic() - t0:.1f} s")
    t0 = time.monotonic()
    out.execute("""
        INSERT INTO latest_metrics (key, value, timestamp, step, is_nan, run_uuid)
        SELECT DISTINCT ON (run_uuid, key) key, value, timestamp, step, is_nan, run_uuid
        FROM metrics ORDER BY run_uuid, key, step DESC, timestamp DESC, value DESC""")
    out.execute("DROP TABLE bench_points")
    out.execute("DROP TABLE bench_runmap")
    dst.commit()
    dst.autocommit = True
    dst.cursor().execute("VACUUM (ANALYZE)")
    log(f"  MLflow: latest_metrics, VACUUM ANALYZE in {time.monotonic() - t0:.1f} s")
    src.close()
    dst.close()
    return {
        "experiments": {str(k): v for k, v in exp_map.items()},
        "runs": {str(k): v for k, v in run_map.items()},
        "summary": {"experiments": len(exp_map), "runs": len(run_map), "points": points,
                    "final_metrics": len(final_rows), "params": len(param_rows),
                    "seconds": time.monotonic() - t_all},
    }


def child_main(args: argparse.Namespace) -> int:
    """In MLflow's venv: seed its store, write the id maps to ``--map-file`` and print its version."""
    sys.stdout = sys.stderr  # whatever MLflow prints goes to stderr
    import mlflow

    result = mlflow_seed(dsn=args.source_dsn, store_uri=args.store_uri, artifact_root=args.artifact_root)
    result.update(seed=args.seed_token, complete=True, version=mlflow.__version__)
    Path(args.map_file).write_text(json.dumps(result))
    return 0


def ensure_mlflow_store(mlflow_python: Path, db: str, source_db: str, seed_token: str, map_file: Path,
                        reuse: bool) -> dict[str, Any]:
    """MLflow's database seeded from ``source_db`` (recreated unless the map file says it holds this seed)."""
    mapping = json.loads(map_file.read_text()) if map_file.exists() else {}
    if reuse and database_comment(db) is not None and mapping.get("seed") == seed_token and \
            mapping.get("complete"):
        log(f"Reusing MLflow's database {db}.")
        return {**mapping, "reused": True}
    recreate_database(db)
    map_file.unlink(missing_ok=True)
    env = {**os.environ, **mlflow_env()}
    for key in ("DJANGO_SETTINGS_MODULE", "DATABASE_URL"):
        env.pop(key, None)
    artifacts = BENCH_DIR / "mlflow-scale-artifacts"
    artifacts.mkdir(parents=True, exist_ok=True)
    log(f"Seeding MLflow's store {db} from {source_db} (through its own storage layer)…")
    subprocess.run(
        [str(mlflow_python), str(Path(__file__).resolve()), "--mlflow-child",
         "--source-dsn", pg_dsn(source_db),
         "--store-uri", mlflow_store_uri(db), "--artifact-root", str(artifacts), "--map-file", str(map_file),
         "--seed-token", seed_token],
        env=env, cwd=BENCH_DIR, check=True,
    )
    return {**json.loads(map_file.read_text()), "reused": False}


# =====================================================================================================
# The cases: the same work on both sides
# =====================================================================================================
@dataclass
class Side:
    """One contender's way of doing a case: ``call(session)`` makes its HTTP requests, reads and parses
    every body, and returns how many items (runs or points) it got."""

    label: str
    call: Any
    samples: list[float] = field(default_factory=list)
    count: int = 0
    requests: int = 1

    @property
    def p50(self) -> float:
        return 1000 * statistics.median(self.samples) if self.samples else math.nan

    @property
    def p95(self) -> float:
        return 1000 * percentile(self.samples, 95) if self.samples else math.nan


@dataclass
class Case:
    key: str
    label: str
    ours: Side
    theirs: Side


def _get_json(session, url: str, **params: Any) -> Any:
    response = session.get(url, params=params, timeout=300)
    if response.status_code != 200:
        raise AssertionError(f"{response.url} answered {response.status_code}: {response.text[:300]}")
    return response.json()


def _post_json(session, url: str, body: dict[str, Any]) -> Any:
    response = session.post(url, json=body, timeout=300)
    if response.status_code != 200:
        raise AssertionError(f"{url} answered {response.status_code}: {response.text[:300]}")
    return response.json()


def build_cases(marker: dict[str, Any], mapping: dict[str, Any], dw: str, ml: str, n_curve: int,
                list_experiment: int) -> list[Case]:
    curve_runs = marker["curve_runs"]
    uuids = [mapping["runs"][str(i)] for i in curve_runs]
    all_experiments = list(mapping["experiments"].values())
    one_experiment = mapping["experiments"][str(list_experiment)]
    search = f"{ml}/api/2.0/mlflow/runs/search"
    bulk = f"{ml}/ajax-api/2.0/mlflow/metrics/get-history-bulk-interval"

    def dw_runs(session, **params: Any) -> int:
        return len(_get_json(session, f"{dw}/api/runs/", **params)["results"])

    def ml_runs(session, experiment_ids: list[str], **extra: Any) -> int:
        body = {"experiment_ids": experiment_ids, "max_results": 50,
                "order_by": ["attributes.start_time DESC"], **extra}
        return len(_post_json(session, search, body).get("runs", []))

    def ml_sampled(session, run_ids: list[str]) -> int:
        return len(_get_json(session, bulk, run_ids=run_ids, metric_key="loss", max_results=MAX_TRACE_POINTS)
                   .get("metrics", []))

    sampled_points = {"n": MAX_TRACE_POINTS}

    def dw_sampled(session) -> int:
        body = _get_json(session, f"{dw}/api/runs/{curve_runs[0]}/metrics/", name="loss",
                         max_points=sampled_points["n"])
        return sum(len(series["steps"]) for series in body["series"])

    def dw_full(session) -> int:
        got, url, params = 0, f"{dw}/api/runs/{curve_runs[0]}/metrics/history/", {"name": "loss",
                                                                                   "limit": 10_000}
        while url:
            body = _get_json(session, url, **params)
            got += len(body["points"])
            url, params = body["next"], {}
        return got

    def ml_full(session) -> int:
        return len(_get_json(session, f"{ml}/api/2.0/mlflow/metrics/get-history", run_id=uuids[0],
                             metric_key="loss").get("metrics", []))

    def dw_compare(session) -> int:
        response = session.get(f"{dw}/compare/", params={"runs": ",".join(map(str, curve_runs)),
                                                         "metric": "loss"}, timeout=300)
        if response.status_code != 200:
            raise AssertionError(f"compare answered {response.status_code}")
        traces = figure_traces(response.text, "curves-figure-data")
        too_long = [t for t in traces if t[1] > MAX_TRACE_POINTS]
        if too_long:
            raise AssertionError(f"compare: traces over {MAX_TRACE_POINTS} points: {too_long}")
        return sum(n for _, n in traces)

    def ml_compare(session) -> int:
        ids = ", ".join(f"'{u}'" for u in uuids)
        ml_runs(session, all_experiments, filter=f"attributes.run_id IN ({ids})")
        return ml_sampled(session, uuids)

    cases = [
        Case("list", f"List the 50 newest runs of {len(all_experiments)} experiments "
                     f"({len(mapping['runs']):,} runs)",
             Side("`GET /api/runs/?limit=50`", lambda s: dw_runs(s, limit=50)),
             Side("`runs/search`, every experiment, max_results 50", lambda s: ml_runs(s, all_experiments))),
        Case("list_experiment", "List one experiment's runs (20)",
             Side("`GET /api/runs/?experiment=…&limit=50`", lambda s: dw_runs(s, experiment=list_experiment,
                                                                                limit=50)),
             Side("`runs/search`, one experiment, max_results 50", lambda s: ml_runs(s, [one_experiment]))),
        Case("sampled", f"A run's `loss` curve downsampled ({n_curve:,} points stored)",
             Side("`GET /api/runs/{id}/metrics/?name=loss&max_points=N` (N: as many points as MLflow's)",
                  dw_sampled),
             Side(f"`get-history-bulk-interval` (1 run, max_results {MAX_TRACE_POINTS:,})",
                  lambda s: ml_sampled(s, uuids[:1]))),
        Case("full", f"A run's full `loss` history ({n_curve:,} points)",
             Side("`GET /api/runs/{id}/metrics/history/?name=loss&limit=10000`, every page", dw_full,
                  requests=math.ceil(n_curve / 10_000)),
             Side("`metrics/get-history` (one response)", ml_full)),
        Case("compare", f"Compare {len(curve_runs)} runs × {n_curve:,} points (`loss`)",
             Side("the compare page `/compare/?runs=…&metric=loss` (HTML with the figure)", dw_compare),
             Side(f"`runs/search` for the 10 runs + `get-history-bulk-interval` (10 runs, max_results "
                  f"{MAX_TRACE_POINTS:,})", ml_compare, requests=2)),
    ]
    cases[2].sampled_points = sampled_points  # type: ignore[attr-defined]
    return cases


def measure(args: argparse.Namespace, marker: dict[str, Any], mapping: dict[str, Any], dw: Server,
            ml: Server, session_cookie: tuple[str, str], loads: list[float]) -> list[Case]:
    import requests

    from experiments.models import Run

    n_curve = marker["scale"][2]
    list_experiment = Run.objects.filter(id=marker["curve_runs"][0]).values_list("experiment_id",
                                                                                 flat=True).get()
    cases = build_cases(marker, mapping, dw.uri, ml.uri, n_curve, list_experiment)
    ours, theirs = requests.Session(), requests.Session()  # one client library, keep-alive on both
    ours.cookies.set(*session_cookie)
    # Equal work for the downsampled curve: ask distillweb for at least as many points as MLflow returns (its
    # min/max buckets return fewer than max_points where a bucket's lowest and highest point are one).
    sampled = next(c for c in cases if c.key == "sampled")
    wanted = sampled.theirs.call(theirs)
    asked = sampled.sampled_points  # type: ignore[attr-defined]
    asked["n"] = max(4, wanted)
    got = sampled.ours.call(ours)
    while got < wanted and asked["n"] < 10_000:  # ask for more, as long as more points come back
        before = asked["n"], got
        asked["n"] = min(10_000, asked["n"] * wanted // max(got, 1) + 2)
        if (got := sampled.ours.call(ours)) <= before[1]:  # a long run's rollups bound the resolution
            asked["n"], got = before
            break
    log(f"  sampled: max_points={asked['n']} gives distillweb {got:,} points, MLflow {wanted:,}")
    for case in cases:  # correctness and the first warm-up
        case.ours.count, case.theirs.count = case.ours.call(ours), case.theirs.call(theirs)
        log(f"  {case.key}: distillweb → {case.ours.count:,}, MLflow → {case.theirs.count:,}")
    rounds = args.warmup + args.requests
    progress = Progress("timing rounds (distillweb and MLflow interleaved)", rounds)
    for r in range(rounds):
        for case in cases:
            pair = [(case.ours, ours), (case.theirs, theirs)]
            if r % 2:
                pair.reverse()  # alternate who goes first
            for side, session in pair:
                if case.key == "full" and side is case.theirs and r >= args.warmup + args.full_rounds:
                    continue
                if case.key == "full" and side is case.ours and r >= args.warmup + args.full_rounds:
                    continue
                start = time.perf_counter()
                side.call(session)
                elapsed = time.perf_counter() - start
                if r >= args.warmup:
                    side.samples.append(elapsed)
        loads.append(os.getloadavg()[0])
        progress.update(r + 1, force=True)
    progress.done()
    return cases


# =====================================================================================================
# Report
# =====================================================================================================
def machine_line(loads: list[float]) -> str:
    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = ""
    try:
        kb = int(Path("/proc/meminfo").read_text().split()[1])
        mem = f", {kb / 2**20:.0f} GiB"
    except (OSError, ValueError, IndexError):
        pass
    load = (f"; load average (1 min) during the timings {min(loads):.1f}–{max(loads):.1f}, median "
            f"{statistics.median(loads):.1f}" if loads else "")
    return (
        f"{platform.machine()}, {os.cpu_count()} cores ({cpu}){mem}, Python {platform.python_version()}{load}"
    )


def fmt_ms(value: float) -> str:
    return (
        "—" if value is None or math.isnan(value) else (f"{value:,.0f}" if value >= 100 else f"{value:.1f}")
    )


def fmt_ratio(ratio: float) -> str:
    """Two decimals below 10 (so 2.95 never reads as a met 3.0), one above."""
    return f"{ratio:.2f}" if ratio < 10 else f"{ratio:.1f}"


def render(args, scale: Scale, info: SeedInfo, marker: dict[str, Any], cases: list[Case],
           mapping: dict[str, Any], loads: list[float], command: str, failures: list[str]) -> str:
    out = []
    seeded = marker.get("seed_seconds", {})
    statuses = ", ".join(f"{n:,} {s}" for s, n in marker.get("statuses", {}).items())
    summary = mapping["summary"]
    out.append(
        f"Data (the same in both stores): {marker['runs']:,} runs ({statuses}) in {scale.experiments} "
        f"experiments, {marker['points']:,} metric points ({CURVE_RUNS} runs × {scale.curve_points:,} `loss` "
        "points, the rest spread over every started run). distillweb's database seeded with COPY and "
        f"INSERT … SELECT generate_series in {seeded.get('total', 0):.0f} s; "
        f"MLflow {mapping.get('version')}'s "
        f"from it through its `SqlAlchemyStore` (schema, experiments) and COPY into its `runs`, `tags`, "
        f"`params`, `metrics` (all {summary['points']:,} points) and `latest_metrics` tables in "
        f"{summary['seconds']:.0f} s" + (" (both reused this run)." if mapping.get("reused") else ".")
    )
    out.append("")
    out.append(
        "HTTP vs HTTP: each server has one worker (distillweb: gunicorn, 1 gthread worker, 1 thread, "
        "DEBUG off; "
        "MLflow: `mlflow server --workers 1`), both on Postgres on this machine; one client "
        "(`requests.Session`, keep-alive on both) reads and parses every response body; the two sides "
        f"alternate (A, B then B, A), {args.requests} timed rounds after {args.warmup} warm-up rounds"
        + (f" ({args.full_rounds} for the full histories)" if args.full_rounds < args.requests else "")
        + ". Times are the client's wall time for all the requests a side needs for the work."
    )
    out.append("")
    out.append("| work | distillweb | got | p50 ms | p95 ms | MLflow | got | p50 ms | p95 ms "
               "| MLflow / distillweb (p50) |")
    out.append("|---|---|---|---|---|---|---|---|---|---|")
    for case in cases:
        ratio = case.theirs.p50 / case.ours.p50
        mark = "" if ratio >= TARGET_RATIO else " ✗"
        unit = "runs" if case.key.startswith("list") else "points"
        reqs = lambda side: f" ({side.requests} requests)" if side.requests > 1 else ""  # noqa: E731
        out.append(
            f"| {case.label} | {case.ours.label}{reqs(case.ours)} | {case.ours.count:,} {unit} "
            f"| {fmt_ms(case.ours.p50)} | {fmt_ms(case.ours.p95)} | {case.theirs.label}{reqs(case.theirs)} "
            f"| {case.theirs.count:,} {unit} | {fmt_ms(case.theirs.p50)} | {fmt_ms(case.theirs.p95)} "
            f"| **{fmt_ratio(ratio)}×**{mark} |"
        )
    out.append("")
    out.append(f"Machine: {machine_line(loads)}.")
    out.append("")
    out.append("```")
    out.append(command)
    out.append("```")
    if failures:
        out.append("")
        out.append("Below the target: " + "; ".join(failures) + ".")
    return "\n".join(out) + "\n"


def _terminate(signum: int, _frame: Any) -> None:
    raise SystemExit(128 + signum)


BEGIN, END = "<!-- dashboard_scale:begin -->", "<!-- dashboard_scale:end -->"


def write_readme(report: str) -> None:
    """Put the generated block between the markers of the dashboard section of benchmarks/README.md; the text
    around the markers is kept."""
    path = REPO / "benchmarks" / "README.md"
    text = path.read_text()
    block = f"{BEGIN}\n{report}{END}"
    if BEGIN not in text or END not in text:
        raise SystemExit(f"{path} has no {BEGIN} … {END} block")
    path.write_text(text[:text.index(BEGIN)] + block + text[text.index(END) + len(END):])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--db", default="distillweb_scale")
    parser.add_argument("--mlflow-db", default="mlflow_scale")
    parser.add_argument("--reuse", action="store_true", help="keep seeded databases that match this scale")
    parser.add_argument("--scale", type=float, default=1.0, help="1.0 = 10,000 runs and 5,000,000 points")
    parser.add_argument("--requests", type=int, default=30, help="timed rounds (after warm-up)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--full-rounds", type=int, default=10,
                        help="timed rounds of the full-history case (each moves the whole curve twice)")
    parser.add_argument("--mlflow-python", type=Path, default=None)
    parser.add_argument("--readme", action="store_true", help="write the results into benchmarks/README.md")
    parser.add_argument("--seed-only", action="store_true", help="seed (or check) the databases and stop")
    parser.add_argument("--mlflow-child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--source-dsn", help=argparse.SUPPRESS)
    parser.add_argument("--store-uri", help=argparse.SUPPRESS)
    parser.add_argument("--artifact-root", help=argparse.SUPPRESS)
    parser.add_argument("--map-file", help=argparse.SUPPRESS)
    parser.add_argument("--seed-token", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.mlflow_child:
        return child_main(args)
    signal.signal(signal.SIGTERM, _terminate)  # run the finally blocks: stop both servers

    BENCH_DIR.mkdir(parents=True, exist_ok=True)
    scale = Scale.of(args.scale)
    suffix = "" if args.scale == 1.0 else f"_{str(args.scale).replace('.', '_')}"
    db, mlflow_db = f"{args.db}{suffix}", f"{args.mlflow_db}{suffix}"
    command = "$ .venv/bin/python benchmarks/dashboard_scale.py " + " ".join(argv or sys.argv[1:])
    loads: list[float] = [os.getloadavg()[0]]
    info = ensure_seeded(scale, db, args.reuse)
    marker = info.marker
    if args.mlflow_python is None:
        if args.seed_only:
            return 0
        parser.error("--mlflow-python (the python of a venv with mlflow and psycopg2-binary) is required")
    mlflow_python = args.mlflow_python.absolute()  # not resolve(): the venv's python is a symlink
    mapping = ensure_mlflow_store(mlflow_python, mlflow_db, db, marker["seed"],
                                  BENCH_DIR / f"{mlflow_db}-map.json", args.reuse)
    if args.seed_only:
        return 0
    from django.contrib.auth import get_user_model
    from django.test import Client

    client = Client()
    client.force_login(get_user_model().objects.get(username=marker["user"]))
    cookie = client.cookies["sessionid"]
    servers = [distillweb_server(), mlflow_server(mlflow_python, mlflow_db)]
    servers[0].headers = {"Cookie": f"sessionid={cookie.value}"}
    try:
        for server in servers:
            server.start()
        cases = measure(args, marker, mapping, servers[0], servers[1], ("sessionid", cookie.value), loads)
    finally:
        for server in servers:
            server.stop()
    failures = [f"{c.label}: {fmt_ratio(c.theirs.p50 / c.ours.p50)}× < {TARGET_RATIO:.0f}×" for c in cases
                if c.theirs.p50 / c.ours.p50 < TARGET_RATIO]
    report = render(args, scale, info, marker, cases, mapping, loads, command, failures)
    print(report)
    (BENCH_DIR / "dashboard_scale.md").write_text(report)
    if args.readme:
        write_readme(report)
    for failure in failures:
        log(f"MISSED: {failure}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
