"""distillweb at 10,000 runs and 5,000,000 metric points, side by side with MLflow's tracking server.

1. Seeds a dedicated Postgres database (``distillweb_scale``): 2 teams, 500 experiments of 20 runs (2 students
   × (4 recipes + the hard-label baseline) × 2 seeds) with a realistic mix of statuses, frozen configs built
   by ``engine_config.build_run_config``, transitions, artifacts, student and teacher evaluations, and
   5,000,000 metric points: 10 runs × 100,000 points of ``loss`` (the compare case) and the rest spread over
   every run that started (loss, ce, kd, lr every few steps, eval/accuracy less often). Records go in with
   COPY (psycopg 3) and the points with one server-side INSERT … SELECT over generate_series per chunk of
   runs.
2. Times server time in-process (Django's test ``Client`` against that database, DEBUG off, logged in as a
   member of both teams): the experiment list, the leaderboard of the dataset with most finished runs, the
   page of a run with 100,000 points, and compare of the 10 runs × 100,000 points
   (``/compare/?runs=…&metric=loss``). Asserts that every curve trace on those pages holds at most 2,000
   points, counts SQL queries per page, and for a page over the target prints EXPLAIN ANALYZE of its slowest
   query and a profile.
3. Ingestion through the worker path: ``workers.reporting.RunReporter`` (its default 500-point batches, with
   the progress writes and cancellation polls a worker makes) writing 500,000 points into a running run.
4. MLflow: its own venv (``--mlflow-python``), its own database (``mlflow_scale``) and ``mlflow server``; the
   same experiments and runs (params, tags, final metrics, the 10 × 100,000-point curves and the other runs'
   histories) are logged through its REST API by a child process running in MLflow's venv, which reads them
   from the distillweb database. Then ``search_runs`` (100 per page), ``get_metric_history`` and MLflow's own
   downsampled endpoint (``get-history-bulk-interval``) are timed, interleaved with the distillweb pages, and
   ``log_batch`` ingestion is measured. The server is stopped (SIGTERM to its PID) at the end.

    .venv/bin/python benchmarks/dashboard_scale.py --mlflow-python var/bench/mlflow-venv/bin/python
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
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
BENCH_DIR = REPO / "var" / "bench"
PG = {"host": "127.0.0.1", "port": 5432, "user": "postgres"}

TARGET_P95_MS = 150.0
MAX_TRACE_POINTS = 2000
TARGET_INGEST = 50_000
TARGET_RATIO = 5.0

RUNS_PER_EXPERIMENT = 20  # 2 students × (4 recipes + baseline) × 2 seeds
CURVE_RUNS = 10  # seed 0 of the curve experiment: 2 students × 5
TRAIN_NAMES = ("loss", "ce", "kd", "lr")
EVAL_NAME = "eval/accuracy"
INGEST_NAMES = ("loss", "ce", "kd", "lr", "grad_norm")


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
# distillweb timing
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


@dataclass
class PageCase:
    key: str
    label: str
    url: str
    figures: tuple[str, ...] = ()
    samples: list[float] = field(default_factory=list)
    queries: int = 0
    sql_ms: float = 0.0
    bytes: int = 0
    traces: list[tuple[str, int]] = field(default_factory=list)


def check_page(case: PageCase, response) -> None:
    if response.status_code != 200:
        raise AssertionError(f"{case.url} answered {response.status_code}")
    if case.figures:
        html = response.content.decode()
        traces = [t for element in case.figures for t in figure_traces(html, element)]
        too_long = [t for t in traces if t[1] > MAX_TRACE_POINTS]
        if too_long:
            raise AssertionError(f"{case.url}: traces over {MAX_TRACE_POINTS} points: {too_long}")
        case.traces = traces


def count_queries(client, case: PageCase) -> list[dict[str, str]]:
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    with CaptureQueriesContext(connection) as captured:
        response = client.get(case.url)
    check_page(case, response)
    case.queries = len(captured.captured_queries)
    case.sql_ms = 1000 * sum(float(q["time"]) for q in captured.captured_queries)
    case.bytes = len(response.content)
    return captured.captured_queries


def explain_slow(client, case: PageCase, out: list[str]) -> None:
    """EXPLAIN ANALYZE the slowest query of a page over the target, and profile the page once."""
    import cProfile
    import io
    import pstats

    from django.db import connection

    queries = count_queries(client, case)
    slowest = sorted(queries, key=lambda q: -float(q["time"]))[:2]
    out.append(f"## {case.label} ({case.url}): {case.queries} queries, {case.sql_ms:.1f} ms in SQL\n")
    for q in slowest:
        out.append(f"-- {1000 * float(q['time']):.1f} ms\n{q['sql']}\n")
        if q["sql"].lstrip().upper().startswith(("SELECT", "WITH")):
            with connection.cursor() as cursor:
                cursor.execute("EXPLAIN (ANALYZE, BUFFERS) " + q["sql"])
                out.append("\n".join(r[0] for r in cursor.fetchall()) + "\n")
    profiler = cProfile.Profile()
    profiler.enable()
    client.get(case.url)
    profiler.disable()
    stream = io.StringIO()
    pstats.Stats(profiler, stream=stream).sort_stats("cumulative").print_stats(30)
    out.append("Profile (cumulative):\n" + stream.getvalue())


def time_request(client, case: PageCase) -> float:
    start = time.perf_counter()
    response = client.get(case.url)
    elapsed = time.perf_counter() - start
    if response.status_code != 200:
        raise AssertionError(f"{case.url} answered {response.status_code}")
    return elapsed


# =====================================================================================================
# distillweb ingestion
# =====================================================================================================
class DistillwebIngest:
    """A running run fed through ``workers.reporting.RunReporter`` the way ``workers.tasks`` drives it: the
    reporter as a context manager (its writer thread, where it has one), its schedule set, then per step
    ``on_metrics`` (5 metrics), ``on_progress`` and ``should_stop``; a final ``flush``. The reporter batches
    as it does in a worker; the writes are counted (by wrapping ``services.run_record_metrics``) to report
    their mean size."""

    def __init__(self, marker: dict[str, Any]) -> None:
        from experiments.models import Run

        template = Run.objects.get(pk=marker["curve_runs"][0])
        self.task_id = f"bench-ingest-{secrets.token_hex(6)}"
        now = datetime.now(UTC)
        self.run = Run.objects.create(
            team_id=template.team_id, experiment_id=template.experiment_id, student_id=template.student_id,
            recipe_id=template.recipe_id, teacher_id=template.teacher_id, seed=99, config=template.config,
            status=Run.Status.RUNNING, task_id=self.task_id, worker_name="bench@ingest", attempt=1,
            started_at=now, heartbeat_at=now, total_steps=10_000_000,
        )
        self.next_step = 0
        self.samples: list[tuple[int, float]] = []
        self.writes: list[int] = []

    def ingest(self, points: int) -> tuple[int, float]:
        import contextlib

        from experiments.services import telemetry
        from workers.reporting import RunReporter

        write = telemetry.run_record_metrics

        def counted(*args: Any, **kwargs: Any) -> Any:
            self.writes.append(len(kwargs.get("points") or ()))
            return write(*args, **kwargs)

        reporter = RunReporter(run_id=self.run.pk, task_id=self.task_id)
        reporter.set_batch_size(64)
        if hasattr(reporter, "set_schedule"):
            reporter.set_schedule(save_every=0, log_every=1)
        total = 10_000_000
        steps = points // len(INGEST_NAMES)
        first = self.next_step
        telemetry.run_record_metrics = counted
        try:
            start = time.perf_counter()
            with reporter if hasattr(reporter, "__enter__") else contextlib.nullcontext():
                for step in range(first, first + steps):
                    x = step / 50_000
                    reporter.on_metrics(
                        step,
                        {
                            "loss": 2.3 * math.exp(-x) + 0.1,
                            "ce": 0.9 * math.exp(-x) + 0.05,
                            "kd": 1.4 * math.exp(-x) + 0.05,
                            "lr": 1e-3 * (1 - x / 100),
                            "grad_norm": 1.0 + 0.1 * math.sin(step),
                        },
                    )
                    reporter.on_progress(step, total)
                    if reporter.should_stop():
                        raise RuntimeError("the ingest run was taken over")
                reporter.flush()
            elapsed = time.perf_counter() - start
        finally:
            telemetry.run_record_metrics = write
        self.next_step = first + steps
        self.samples.append((steps * len(INGEST_NAMES), elapsed))
        return steps * len(INGEST_NAMES), elapsed

    @property
    def mean_batch(self) -> float:
        batches = [n for n in self.writes if n]
        return statistics.fmean(batches) if batches else 0.0

    def stored(self) -> int:
        from experiments.models import MetricPoint

        return MetricPoint.objects.filter(run_id=self.run.pk).count()

    def cleanup(self) -> None:
        delete_runs([self.run.pk])


def delete_runs(run_ids: list[int]) -> None:
    """Delete benchmark runs (the ingest runs) with everything that hangs off them; their points first, in one
    statement, then the run through the ORM so that every cascade (rollups, transitions, …) follows."""
    from django.db import connection

    from experiments.models import MetricPoint, Run

    with connection.cursor() as cursor:
        cursor.execute(f"DELETE FROM {connection.ops.quote_name(MetricPoint._meta.db_table)} "
                       "WHERE run_id = ANY(%s::bigint[])", [run_ids])
    Run.objects.filter(pk__in=run_ids).delete()
    with connection.cursor() as cursor:
        cursor.execute(f"VACUUM (ANALYZE) {connection.ops.quote_name(MetricPoint._meta.db_table)}")


# =====================================================================================================
# MLflow: server and child process (the child runs in MLflow's venv)
# =====================================================================================================
class MlflowServer:
    def __init__(self, mlflow_python: Path, db: str) -> None:
        self.mlflow_bin = mlflow_python.parent / "mlflow"
        self.db = db
        self.port = free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        artifacts = BENCH_DIR / "mlflow-scale-artifacts"
        artifacts.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, **mlflow_env(), "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        env.pop("DATABASE_URL", None)
        cmd = [
            str(self.mlflow_bin),
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--workers",
            "1",
            "--backend-store-uri",
            f"postgresql+psycopg2://{PG['user']}@{PG['host']}:{PG['port']}/{self.db}",
            "--default-artifact-root",
            str(artifacts),
        ]
        self.log_path = BENCH_DIR / "mlflow-scale-server.log"
        self.proc = subprocess.Popen(cmd, cwd=BENCH_DIR, env=env, stdout=self.log_path.open("wb"),
                                     stderr=subprocess.STDOUT, start_new_session=True)
        import urllib.request

        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited ({self.proc.returncode}); see {self.log_path}")
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as r:
                    if r.status == 200:
                        log(f"mlflow server ready on {self.uri} (pid {self.proc.pid})")
                        return
            except OSError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"mlflow server did not answer /health in 180 s; see {self.log_path}")

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)  # its own session: only the processes it started
            self.proc.wait(timeout=10)
        log(f"mlflow server (pid {self.proc.pid}) stopped")


def mlflow_env() -> dict[str, str]:
    # The last one: set_terminated would otherwise print the run's address, after one more get_run request.
    return {
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "DO_NOT_TRACK": "true",
        "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true",
    }


class MlflowChild:
    """The MLflow client side: this file run by MLflow's python with --mlflow-child, one JSON request per line
    on its stdin, one JSON answer per line on its stdout (progress goes to stderr)."""

    def __init__(self, mlflow_python: Path, uri: str, source_db: str, map_file: Path) -> None:
        env = {**os.environ, **mlflow_env()}
        env.pop("DJANGO_SETTINGS_MODULE", None)
        self.proc = subprocess.Popen(
            [str(mlflow_python), str(Path(__file__).resolve()), "--mlflow-child", "--tracking-uri", uri,
             "--source-dsn", pg_dsn(source_db), "--map-file", str(map_file)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env, cwd=BENCH_DIR,
        )

    def call(self, op: str, **kwargs: Any) -> dict[str, Any]:
        assert self.proc.stdin and self.proc.stdout
        self.proc.stdin.write(json.dumps({"op": op, **kwargs}) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the MLflow child exited ({self.proc.wait()}) during {op}")
        answer = json.loads(line)
        if "error" in answer:
            raise RuntimeError(f"MLflow child, {op}: {answer['error']}")
        return answer

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.call("quit")
            except (RuntimeError, BrokenPipeError):
                pass
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()


# --- code that runs inside MLflow's venv ------------------------------------------------------------------
MLFLOW_STATUS = {"queued": "SCHEDULED", "running": "RUNNING", "succeeded": "FINISHED", "failed": "FAILED",
                 "cancelled": "KILLED"}


def _ms(value: datetime | None) -> int | None:
    return int(value.timestamp() * 1000) if value is not None else None


def _formula(terms: list[dict[str, Any]]) -> str:
    return " + ".join(f"{t.get('weight', 1)}·{t['name']}"
                      + (f"({', '.join(f'{k}={v}' for k, v in sorted(t.get('params', {}).items()))})"
                         if t.get("params") else "") for t in terms)


class ChildState:
    def __init__(self, uri: str, dsn: str, map_file: Path) -> None:
        import mlflow
        from mlflow.tracking import MlflowClient

        mlflow.set_tracking_uri(uri)
        self.uri = uri
        self.dsn = dsn
        self.map_file = map_file
        self.client = MlflowClient(tracking_uri=uri)
        self.local = threading.local()
        self.mapping: dict[str, Any] = {}
        if map_file.exists():
            self.mapping = json.loads(map_file.read_text())
        import requests

        self.http = requests.Session()
        self.ingest_run: str | None = None

    def thread_client(self):
        from mlflow.tracking import MlflowClient

        if not hasattr(self.local, "client"):
            self.local.client = MlflowClient(tracking_uri=self.uri)
        return self.local.client

    # --- seeding -------------------------------------------------------------------------------------
    def seed(self, *, seed_token: str, threads: int, history: str) -> dict[str, Any]:
        if self.mapping.get("seed") == seed_token and self.mapping.get("complete") and \
                self.mapping.get("history") == history:
            return {"reused": True, **self.mapping["summary"]}
        import psycopg2
        import psycopg2.extras

        t_all = time.monotonic()
        conn = psycopg2.connect(self.dsn)
        cur = conn.cursor(cursor_factory=psycopg2.extras.RealDictCursor)
        cur.execute("""
            SELECT e.id, e.name, t.name AS team FROM experiments_experiment e
            JOIN experiments_team t ON t.id = e.team_id ORDER BY e.id""")
        experiments = cur.fetchall()
        exp_map: dict[int, str] = {}
        progress = Progress("MLflow experiments", len(experiments))
        for n, e in enumerate(experiments, 1):
            exp_map[e["id"]] = self.client.create_experiment(
                f"{e['team']} / {e['name']}",
                tags={"team": e["team"], "distillweb_experiment_id": str(e["id"])},
            )
            progress.update(n)
        progress.done()
        cur.execute("""
            SELECT r.id, r.experiment_id, r.seed, r.is_baseline, r.status, r.step, r.total_steps, r.config,
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
            ORDER BY r.id""")
        runs = cur.fetchall()
        curve_ids = set(json.loads(self.mapping_marker(cur))["curve_runs"])
        history_for = self._history_runs(runs, curve_ids, history)
        run_map: dict[int, str] = {}
        lock = threading.Lock()
        logged = {"points": 0, "runs": 0}

        def log_run(run: dict[str, Any], points: list[tuple[str, int, float, int]]) -> None:
            from mlflow.entities import Metric, Param

            client = self.thread_client()
            cfg = run["config"] or {}
            train = cfg.get("train") or {}
            created = client.create_run(
                exp_map[run["experiment_id"]],
                start_time=_ms(run["started_at"] or run["created_at"]),
                run_name=f"{run['student']} · {'baseline' if run['is_baseline'] else run['recipe']} · "
                         f"s{run['seed']}",
                tags={"team": run["team"], "distillweb_run_id": str(run["id"])},
            )
            rid = created.info.run_id
            params = {
                "student": run["student"],
                "teacher": run["teacher"] or "",
                "recipe": run["recipe"],
                "dataset": run["dataset"],
                "seed": run["seed"],
                "is_baseline": run["is_baseline"],
                "scheme": cfg.get("scheme", ""),
                "terms": _formula(run["terms"] or []),
                "lr": train.get("lr"),
                "batch_size": train.get("batch_size"),
                "max_steps": train.get("max_steps"),
            }
            stamp = _ms(run["finished_at"] or run["started_at"] or run["created_at"]) or 0
            metrics = [Metric(key, float(value), ts, step) for key, step, value, ts in points]
            final = {"accuracy": run["accuracy"], "macro_f1": run["macro_f1"], "params": run["param_count"],
                     "latency_ms": run["latency_ms"]}
            metrics += [
                Metric(f"final/{k}", float(v), stamp, run["step"]) for k, v in final.items() if v is not None
            ]
            client.log_batch(rid, metrics=metrics, params=[Param(k, str(v)) for k, v in params.items()])
            status = MLFLOW_STATUS[run["status"]]
            if status in ("FINISHED", "FAILED", "KILLED"):
                client.set_terminated(rid, status=status, end_time=_ms(run["finished_at"]))
            elif status == "SCHEDULED":
                client.update_run(rid, status="SCHEDULED")
            with lock:
                run_map[run["id"]] = rid
                logged["points"] += len(points)
                logged["runs"] += 1

        # 1. The curve runs, one client, in order: MLflow's log_batch ingestion rate (1,000 metrics a
        #    request).
        by_id = {r["id"]: r for r in runs}
        curve_points = 0
        t_curves = time.monotonic()
        for rid in sorted(curve_ids):
            points_cur = conn.cursor()
            points_cur.execute("SELECT name, step, value, (extract(epoch FROM wall_time) * 1000)::bigint "
                               "FROM experiments_metricpoint WHERE run_id = %s ORDER BY name, step", [rid])
            pts = points_cur.fetchall()
            log(f"  MLflow: logging run #{rid} with {len(pts):,} points…")
            log_run(by_id[rid], pts)
            curve_points += len(pts)
        curve_seconds = time.monotonic() - t_curves

        # 2. Every other run (params, tags, final metrics and, for history runs, their points), several
        #    clients.
        from concurrent.futures import ThreadPoolExecutor, wait

        rest = [r for r in runs if r["id"] not in curve_ids]
        total_points_expected = sum(r["id"] in history_for for r in rest)
        progress = Progress(f"MLflow runs ({total_points_expected:,} with history)", len(rest))
        stream = conn.cursor(name="history_stream")
        stream.itersize = 50_000
        wanted = sorted(history_for - curve_ids)
        if wanted:
            stream.execute("SELECT run_id, name, step, value, (extract(epoch FROM wall_time) * 1000)::bigint "
                           "FROM experiments_metricpoint WHERE run_id = ANY(%s) ORDER BY run_id, name, step",
                           [wanted])
        history_iter = iter(stream) if wanted else iter(())
        pending: tuple | None = next(history_iter, None)
        errors: list[BaseException] = []
        with ThreadPoolExecutor(max_workers=threads) as pool:
            futures = set()
            for n, run in enumerate(rest, 1):
                pts: list[tuple[str, int, float, int]] = []
                if run["id"] in history_for:
                    while pending is not None and pending[0] < run["id"]:
                        pending = next(history_iter, None)
                    while pending is not None and pending[0] == run["id"]:
                        pts.append(tuple(pending[1:]))
                        pending = next(history_iter, None)
                futures.add(pool.submit(log_run, run, pts))
                if len(futures) >= threads * 4:
                    done, futures = wait(futures, return_when="FIRST_COMPLETED")
                    errors += [f.exception() for f in done if f.exception()]
                    if errors:
                        raise errors[0]
                progress.update(n - len(futures))
            done, _ = wait(futures)
            errors += [f.exception() for f in done if f.exception()]
            if errors:
                raise errors[0]
        rest_seconds = progress.done()
        conn.close()
        summary = {
            "experiments": len(exp_map), "runs": len(run_map), "points": logged["points"],
            "curve_points": curve_points, "curve_seconds": curve_seconds,
            "curve_rate": curve_points / curve_seconds if curve_seconds else None,
            "rest_seconds": rest_seconds, "threads": threads, "history": history,
            "history_runs": len(history_for), "seconds": time.monotonic() - t_all,
        }
        self.mapping = {"seed": seed_token, "complete": True, "history": history,
                        "experiments": {str(k): v for k, v in exp_map.items()},
                        "runs": {str(k): v for k, v in run_map.items()}, "summary": summary}
        self.map_file.write_text(json.dumps(self.mapping))
        return {"reused": False, **summary}

    @staticmethod
    def mapping_marker(cur) -> str:
        cur.execute("SELECT shobj_description(oid, 'pg_database') AS c FROM pg_database "
                    "WHERE datname = current_database()")
        return cur.fetchone()["c"]

    @staticmethod
    def _history_runs(runs: list[dict[str, Any]], curve_ids: set[int], history: str) -> set[int]:
        """Runs whose metric histories are logged: ``all``, ``curves`` (only the 10 curve runs) or a number N
        (the curve runs plus every k-th started run, N in all)."""
        started = [r["id"] for r in runs if r["status"] != "queued"]
        if history == "all":
            return set(started)
        if history == "curves":
            return set(curve_ids)
        n = int(history)
        step = max(1, len(started) // max(n, 1))
        return set(curve_ids) | set(started[::step][:n])

    # --- timing ------------------------------------------------------------------------------------------
    def timed(self, case: str, **kw: Any) -> dict[str, Any]:
        exp_ids = list(self.mapping["experiments"].values())
        curve = [self.mapping["runs"][str(i)] for i in kw.get("curve_runs", [])]
        start = time.perf_counter()
        if case == "search_runs":
            result = self.client.search_runs(exp_ids, max_results=kw.get("max_results", 100),
                                             order_by=["attributes.start_time DESC"])
            count = len(result)
        elif case == "search_runs_rest":
            r = self.http.post(f"{self.uri}/api/2.0/mlflow/runs/search",
                               json={"experiment_ids": exp_ids, "max_results": kw.get("max_results", 100),
                                     "order_by": ["attributes.start_time DESC"]})
            r.raise_for_status()
            count = len(r.json().get("runs", []))
        elif case == "history":
            count = len(self.client.get_metric_history(curve[0], "loss"))
        elif case == "history_rest":
            r = self.http.get(f"{self.uri}/api/2.0/mlflow/metrics/get-history",
                              params={"run_id": curve[0], "metric_key": "loss"})
            r.raise_for_status()
            count = len(r.json().get("metrics", []))
        elif case == "history_all":
            count = sum(len(self.client.get_metric_history(rid, "loss")) for rid in curve)
        elif case == "sampled":
            r = self.http.get(
                f"{self.uri}/ajax-api/2.0/mlflow/metrics/get-history-bulk-interval",
                params={"run_ids": curve, "metric_key": "loss", "max_results": MAX_TRACE_POINTS},
            )
            r.raise_for_status()
            count = len(r.json().get("metrics", []))
        else:
            raise ValueError(case)
        return {"seconds": time.perf_counter() - start, "count": count}

    def ingest(self, points: int) -> dict[str, Any]:
        """log_batch from one client into one running run, 1,000 metrics a request (MLflow's own limit)."""
        from mlflow.entities import Metric

        if self.ingest_run is None:
            name = f"distillweb-scale ingest {secrets.token_hex(4)}"
            exp = self.client.create_experiment(name)
            self.ingest_run = self.client.create_run(exp).info.run_id
            self.ingest_step = 0
        steps = points // len(INGEST_NAMES)
        first = self.ingest_step
        stamp = int(time.time() * 1000)
        start = time.perf_counter()
        batch: list[Any] = []
        for step in range(first, first + steps):
            x = step / 50_000
            values = {
                "loss": 2.3 * math.exp(-x) + 0.1,
                "ce": 0.9 * math.exp(-x) + 0.05,
                "kd": 1.4 * math.exp(-x) + 0.05,
                "lr": 1e-3 * (1 - x / 100),
                "grad_norm": 1.0 + 0.1 * math.sin(step),
            }
            batch += [Metric(k, v, stamp, step) for k, v in values.items()]
            if len(batch) >= 1000:
                self.client.log_batch(self.ingest_run, metrics=batch)
                batch = []
        if batch:
            self.client.log_batch(self.ingest_run, metrics=batch)
        self.ingest_step = first + steps
        return {"points": steps * len(INGEST_NAMES), "seconds": time.perf_counter() - start}


def child_main(args: argparse.Namespace) -> int:
    """Serve JSON-line requests from the parent; stdout carries only the answers."""
    answers = os.fdopen(os.dup(sys.stdout.fileno()), "w", buffering=1)
    sys.stdout = sys.stderr  # whatever MLflow prints goes to stderr
    state = ChildState(args.tracking_uri, args.source_dsn, Path(args.map_file))
    for line in sys.stdin:
        request = json.loads(line)
        op = request.pop("op")
        try:
            if op == "quit":
                answers.write(json.dumps({"ok": True}) + "\n")
                return 0
            if op == "seed":
                answer = state.seed(**request)
            elif op == "time":
                answer = state.timed(**request)
            elif op == "ingest":
                answer = state.ingest(**request)
            elif op == "finish_ingest":
                if state.ingest_run:
                    state.client.set_terminated(state.ingest_run)
                answer = {"ok": True}
            elif op == "version":
                import mlflow

                answer = {"version": mlflow.__version__}
            else:
                raise ValueError(f"unknown op {op!r}")
        except Exception as exc:  # report to the parent, which stops
            import traceback

            traceback.print_exc()
            answer = {"error": f"{type(exc).__name__}: {exc}"}
        answers.write(json.dumps(answer, default=str) + "\n")
    return 0


# =====================================================================================================
# Orchestration
# =====================================================================================================
@dataclass
class Sampled:
    label: str
    samples: list[float] = field(default_factory=list)
    count: int = 0

    @property
    def p50(self) -> float:
        return 1000 * statistics.median(self.samples) if self.samples else math.nan

    @property
    def p95(self) -> float:
        return 1000 * percentile(self.samples, 95) if self.samples else math.nan


def ensure_mlflow_database(db: str, seed_token: str, map_file: Path, reuse: bool, history: str) -> None:
    """Recreate MLflow's database unless it holds exactly this distillweb seed (per the map file)."""
    mapping = json.loads(map_file.read_text()) if map_file.exists() else {}
    exists = database_comment(db) is not None
    if reuse and exists and mapping.get("seed") == seed_token and mapping.get("complete") and \
            mapping.get("history") == history:
        log(f"Reusing MLflow's database {db}.")
        return
    recreate_database(db)
    if map_file.exists():
        map_file.unlink()


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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--db", default="distillweb_scale")
    parser.add_argument("--mlflow-db", default="mlflow_scale")
    parser.add_argument("--reuse", action="store_true", help="keep seeded databases that match this scale")
    parser.add_argument("--scale", type=float, default=1.0, help="1.0 = 10,000 runs and 5,000,000 points")
    parser.add_argument("--requests", type=int, default=30, help="timed requests per page (after warm-up)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--ingest-points", type=int, default=500_000)
    parser.add_argument("--mlflow-python", type=Path, default=None)
    parser.add_argument(
        "--mlflow-threads", type=int, default=4, help="clients logging runs to MLflow in parallel"
    )
    parser.add_argument(
        "--mlflow-history",
        default="1000",
        help="metric histories logged to MLflow besides the 10 curves: all, curves, or N runs",
    )
    parser.add_argument("--mlflow-ingest-points", type=int, default=100_000)
    parser.add_argument("--mlflow-full-compare-rounds", type=int, default=5,
                        help="rounds that fetch the 10 full 100k-point histories from MLflow (slow)")
    parser.add_argument("--readme", action="store_true", help="write the results into benchmarks/README.md")
    parser.add_argument("--seed-only", action="store_true", help="seed (or check) the databases and stop")
    parser.add_argument("--mlflow-child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--tracking-uri", help=argparse.SUPPRESS)
    parser.add_argument("--source-dsn", help=argparse.SUPPRESS)
    parser.add_argument("--map-file", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.mlflow_child:
        return child_main(args)
    signal.signal(signal.SIGTERM, _terminate)  # run the finally blocks: stop MLflow's server

    BENCH_DIR.mkdir(parents=True, exist_ok=True)
    if args.mlflow_python:
        args.mlflow_python = args.mlflow_python.absolute()  # not resolve(): the venv's python is a symlink
    scale = Scale.of(args.scale)
    db = args.db if args.scale == 1.0 else f"{args.db}_{str(args.scale).replace('.', '_')}"
    mlflow_db = (
        args.mlflow_db if args.scale == 1.0 else f"{args.mlflow_db}_{str(args.scale).replace('.', '_')}"
    )
    command = "$ .venv/bin/python benchmarks/dashboard_scale.py " + " ".join(argv or sys.argv[1:])
    loads: list[float] = [os.getloadavg()[0]]
    info = ensure_seeded(scale, db, args.reuse)
    marker = info.marker
    if args.seed_only and not args.mlflow_python:
        return 0

    server = child = None
    mlflow_seed: dict[str, Any] | None = None
    mlflow_version = ""
    if args.mlflow_python:
        map_file = BENCH_DIR / f"{mlflow_db}-map.json"
        ensure_mlflow_database(mlflow_db, marker["seed"], map_file, args.reuse, args.mlflow_history)
        server = MlflowServer(args.mlflow_python, mlflow_db)
    try:
        if server is not None:
            server.start()
            child = MlflowChild(args.mlflow_python, server.uri, db, BENCH_DIR / f"{mlflow_db}-map.json")
            mlflow_version = child.call("version")["version"]
            log(f"Logging the same runs to MLflow {mlflow_version} ({args.mlflow_threads} clients; history: "
                f"{args.mlflow_history})…")
            mlflow_seed = child.call("seed", seed_token=marker["seed"], threads=args.mlflow_threads,
                                     history=args.mlflow_history)
            log(f"MLflow seeded: {json.dumps(mlflow_seed)}")
            if args.seed_only:
                return 0
        results = measure(args, marker, child, loads)
    finally:
        if child is not None:
            child.close()
        if server is not None:
            server.stop()
    report = render(args, scale, info, marker, results, mlflow_seed, mlflow_version, loads, command)
    print(report)
    (BENCH_DIR / "dashboard_scale.md").write_text(report)
    if args.readme:
        write_readme(report)
    failures = results["failures"]
    for failure in failures:
        log(f"MISSED: {failure}")
    return 0


def measure(args: argparse.Namespace, marker: dict[str, Any], child: MlflowChild | None,
            loads: list[float]) -> dict[str, Any]:
    from django.contrib.auth import get_user_model
    from django.test import Client

    import distillweb.wsgi  # noqa: F401  the serving entry point: its start-up (gc.freeze) applies here too

    user = get_user_model().objects.get(username=marker["user"])
    client = Client()
    client.force_login(user)
    curve_runs = marker["curve_runs"]
    n_exp, _, n_curve = marker["scale"]
    from experiments.models import Evaluation

    board = Evaluation.objects.filter(dataset_id=marker["leaderboard_dataset"], role="student",
                                      run__status="succeeded").count()
    pages = [
        PageCase("list", f"Experiment list (page 1 of {n_exp} experiments, 25 a page)", "/experiments/"),
        PageCase(
            "leaderboard",
            "Leaderboard (team A's bbc-news" + (f", {board:,} finished runs)" if board else ")"),
            f"/leaderboard/{marker['leaderboard_dataset']}/",
        ),
        PageCase(
            "run",
            f"Run page (a run with {n_curve:,} loss points)",
            f"/runs/{curve_runs[0]}/",
            ("loss-figure-data", "eval-figure-data"),
        ),
        PageCase(
            "compare",
            f"Compare {len(curve_runs)} runs × {n_curve:,} points (loss)",
            f"/compare/?runs={','.join(map(str, curve_runs))}&metric=loss",
            ("curves-figure-data",),
        ),
    ]
    ml: dict[str, Sampled] = {}
    ml_cases: dict[str, list[tuple[str, str, dict[str, Any]]]] = {
        "list": [
            ("search_runs", f"search_runs ({n_exp} experiments, 100 a page), client", {"max_results": 100}),
            ("search_runs_rest", "runs/search (100 a page), raw HTTP", {"max_results": 100}),
        ],
        "run": [
            ("history", f"get_metric_history ({n_curve:,} points), client", {"curve_runs": curve_runs[:1]}),
            ("history_rest", "metrics/get-history, raw HTTP", {"curve_runs": curve_runs[:1]}),
            (
                "sampled1",
                "get-history-bulk-interval (1 run, ≤2,000 points), raw HTTP",
                {"curve_runs": curve_runs[:1]},
            ),
        ],
        "compare": [
            (
                "sampled10",
                "get-history-bulk-interval (10 runs, ≤2,000 points each), raw HTTP",
                {"curve_runs": curve_runs},
            ),
            ("history_all", "get_metric_history × 10 runs, client", {"curve_runs": curve_runs}),
        ],
    }
    for cases in ml_cases.values():
        for key, label, _ in cases:
            ml[key] = Sampled(label)

    # Correctness and query counts first (also the first warm-up).
    for case in pages:
        count_queries(client, case)
        log(f"  {case.key}: {case.queries} queries, {case.sql_ms:.1f} ms in SQL, {case.bytes:,} bytes"
            + (f", traces {case.traces}" if case.traces else ""))
    rounds = args.warmup + args.requests
    progress = Progress("timing rounds (distillweb and MLflow interleaved)", rounds)
    for r in range(rounds):
        record = r >= args.warmup
        for case in pages:
            elapsed = time_request(client, case)
            if record:
                case.samples.append(elapsed)
            if child is None:
                continue
            for key, _, kw in ml_cases.get(case.key, []):
                if key == "history_all" and (
                    not record or len(ml[key].samples) >= args.mlflow_full_compare_rounds
                ):
                    continue
                op = "sampled" if key.startswith("sampled") else key
                answer = child.call("time", case=op, **kw)
                if record:
                    ml[key].samples.append(answer["seconds"])
                    ml[key].count = answer["count"]
        loads.append(os.getloadavg()[0])
        progress.update(r + 1, force=True)
    progress.done()

    explain: list[str] = []
    failures: list[str] = []
    for case in pages:
        p95 = 1000 * percentile(case.samples, 95)
        if p95 > TARGET_P95_MS:
            failures.append(f"{case.label}: p95 {p95:.0f} ms > {TARGET_P95_MS:.0f} ms")
            explain_slow(client, case, explain)
    if explain:
        path = BENCH_DIR / "dashboard_scale_explain.txt"
        path.write_text("\n".join(explain))
        log(f"EXPLAIN ANALYZE and profiles of the pages over target: {path}")

    # Ingestion, interleaved: distillweb half, MLflow half, distillweb half, MLflow half.
    ingest = DistillwebIngest(marker)
    ml_ingest: list[tuple[int, float]] = []
    try:
        for half in range(2):
            points = args.ingest_points // 2 if half == 0 else args.ingest_points - args.ingest_points // 2
            n, seconds = ingest.ingest(points)
            log(f"  distillweb RunReporter: {n:,} points in {seconds:.1f} s = {n / seconds:,.0f} points/s")
            loads.append(os.getloadavg()[0])
            if child is not None:
                answer = child.call("ingest", points=args.mlflow_ingest_points // 2)
                ml_ingest.append((answer["points"], answer["seconds"]))
                log(f"  MLflow log_batch: {answer['points']:,} points in {answer['seconds']:.1f} s = "
                    f"{answer['points'] / answer['seconds']:,.0f} points/s")
                loads.append(os.getloadavg()[0])
        stored = ingest.stored()
        if stored != sum(n for n, _ in ingest.samples):
            failures.append(f"ingestion stored {stored} points, expected {sum(n for n, _ in ingest.samples)}")
        if child is not None:
            child.call("finish_ingest")
    finally:
        ingest.cleanup()
    dw_points = sum(n for n, _ in ingest.samples)
    dw_rate = dw_points / sum(s for _, s in ingest.samples)
    if dw_rate < TARGET_INGEST:
        failures.append(f"ingestion {dw_rate:,.0f} points/s < {TARGET_INGEST:,}")
    ml_rate = (sum(n for n, _ in ml_ingest) / sum(s for _, s in ml_ingest)) if ml_ingest else None
    return {
        "pages": pages,
        "mlflow": ml,
        "ml_cases": ml_cases,
        "dw_ingest": (dw_points, dw_rate, ingest.mean_batch),
        "ml_ingest": (sum(n for n, _ in ml_ingest), ml_rate),
        "failures": failures,
    }


def render(args, scale: Scale, info: SeedInfo, marker: dict[str, Any], results: dict[str, Any],
           mlflow_seed: dict[str, Any] | None, mlflow_version: str, loads: list[float], command: str) -> str:
    pages: list[PageCase] = results["pages"]
    ml: dict[str, Sampled] = results["mlflow"]
    ml_cases = results["ml_cases"]
    out = []
    seeded = marker.get("seed_seconds", {})
    statuses = ", ".join(f"{n:,} {s}" for s, n in marker.get("statuses", {}).items())
    out.append(
        f"Data: {marker['runs']:,} runs ({statuses}) in {scale.experiments} experiments of 2 teams, "
        f"{marker.get('evaluations', 0):,} evaluations, {marker['points']:,} metric points "
        f"({CURVE_RUNS} runs × {scale.curve_points:,} `loss` points, "
        "the rest spread over every started run). "
        f"Seeding (COPY + INSERT … SELECT generate_series, `rollups.rebuild()`, then VACUUM ANALYZE): "
        f"{seeded.get('total', 0):.0f} s in all, of which metric points {seeded.get('metric points', 0):.0f} "
        f"s"
        + (f" and their rollups {seeded['rollups']:.0f} s" if "rollups" in seeded else "")
        + (" (reused this run)." if not info.seconds else ".")
    )
    out.append("")
    out.append(
        f"Server time in-process (Django test `Client`, DEBUG off, logged in as a member of both teams), "
        f"{args.requests} requests per page after {args.warmup} warm-up rounds, interleaved with the MLflow "
        f"calls; MLflow times are the client's wall time around each call (server + HTTP + parsing)."
    )
    out.append("")
    out.append("| page | p50 ms | p95 ms | SQL queries (ms) | points per trace (max) | MLflow equivalent "
               "| MLflow p50 ms | MLflow p95 ms | MLflow / distillweb (p50) |")
    out.append("|---|---|---|---|---|---|---|---|---|")
    for case in pages:
        p50 = 1000 * statistics.median(case.samples)
        p95 = 1000 * percentile(case.samples, 95)
        traces = f"{max(n for _, n in case.traces):,} ({len(case.traces)} traces)" if case.traces else "—"
        mark = "" if p95 <= TARGET_P95_MS else " ✗"
        cases = ml_cases.get(case.key) or [(None, "—", {})]
        for k, (key, label, _) in enumerate(cases):
            sample = ml.get(key) if key else None
            ratio = f"{sample.p50 / p50:.1f}×" if sample and sample.samples else "—"
            mp50 = fmt_ms(sample.p50) if sample and sample.samples else "—"
            mp95 = fmt_ms(sample.p95) if sample and sample.samples else "—"
            n = (
                f" (n={len(sample.samples)})"
                if sample and sample.samples and len(sample.samples) != args.requests
                else ""
            )
            if sample and sample.samples:
                n += f" → {sample.count:,} {'runs' if key.startswith('search') else 'points'}"
            if k == 0:
                out.append(f"| {case.label} | {fmt_ms(p50)} | {fmt_ms(p95)}{mark} | {case.queries} "
                           f"({case.sql_ms:.0f}) | {traces} "
                           f"| {label}{n} | {mp50} | {mp95} | {ratio} |")
            else:
                out.append(f"| | | | | | {label}{n} | {mp50} | {mp95} | {ratio} |")
    out.append("")
    dw_points, dw_rate, dw_batch = results["dw_ingest"]
    ml_points, ml_rate = results["ml_ingest"]
    out.append("| ingestion | points | points/s |")
    out.append("|---|---|---|")
    out.append(f"| distillweb `RunReporter` as `workers.tasks` drives it (5 metrics a step; its writes held "
               f"{dw_batch:,.0f} points on average) | {dw_points:,} | {dw_rate:,.0f} |")
    if ml_rate:
        out.append(
            f"| MLflow `log_batch` (1,000 metrics a request, one client) | {ml_points:,} | {ml_rate:,.0f} |"
        )
    if mlflow_seed:
        out.append("")
        hist = mlflow_seed.get("history")
        out.append(
            f"MLflow {mlflow_version} (`mlflow server --workers 1`, its own Postgres database): "
            f"{mlflow_seed['experiments']} experiments, {mlflow_seed['runs']:,} runs with 11 params, 2 tags "
            f"and their final metrics, {mlflow_seed['points']:,} history points "
            f"(histories: {hist}, {mlflow_seed['history_runs']:,} runs), logged through its REST API in "
            f"{mlflow_seed['seconds']:.0f} s ({mlflow_seed['threads']} clients); the 10 curves "
            f"({mlflow_seed['curve_points']:,} points) by one client at "
            f"{mlflow_seed['curve_rate']:,.0f} points/s"
            + (" (reused this run)." if mlflow_seed.get("reused") else ".")
        )
    out.append("")
    out.append(f"Machine: {machine_line(loads)}.")
    out.append("")
    out.append("```")
    out.append(command)
    out.append("```")
    if results["failures"]:
        out.append("")
        out.append("Missed targets: " + "; ".join(results["failures"]) + ".")
    return "\n".join(out) + "\n"


def _terminate(signum: int, _frame: Any) -> None:
    raise SystemExit(128 + signum)


BEGIN, END = "<!-- dashboard_scale:begin -->", "<!-- dashboard_scale:end -->"


def write_readme(report: str) -> None:
    """Put the generated block between the markers of the dashboard-at-scale section (created at the end of
    benchmarks/README.md if missing); the text around the markers is kept."""
    path = REPO / "benchmarks" / "README.md"
    text = path.read_text()
    block = f"{BEGIN}\n{report}{END}"
    if BEGIN in text and END in text:
        text = text[:text.index(BEGIN)] + block + text[text.index(END) + len(END):]
    else:
        text = (
            text.rstrip("\n")
            + "\n\n## Dashboard at scale: 10,000 runs, 5,000,000 points, vs MLflow\n\n"
            + block
            + "\n"
        )
    path.write_text(text)


if __name__ == "__main__":
    sys.exit(main())
