"""Reads. Every list is scoped to the teams the user belongs to (staff see everything)."""

from __future__ import annotations

import json
import math
import statistics
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from functools import cached_property
from pathlib import Path
from typing import Any, NamedTuple

from django.db import connection, connections
from django.db.models import (
    Case,
    Count,
    F,
    JSONField,
    Max,
    Min,
    OuterRef,
    Q,
    QuerySet,
    Subquery,
    Value,
    When,
)
from django.db.models.fields.json import KeyTransform
from django.db.models.functions import Coalesce

from . import rollups, sweeps
from .domain.compare import ConfigKey, SweepGrid, config_diff, sweep_grid
from .domain.leaderboard import sample_std
from .models import (
    Artifact,
    DatasetSpec,
    Evaluation,
    Experiment,
    MetricPoint,
    MetricRollup,
    ModelSpec,
    Recipe,
    Run,
    Team,
    Worker,
)


def team_scope(user) -> int | None:
    """The one team a request is limited to, or None: an API token bound to a team sets ``scope_team_id`` on the
    request's user (api.authentication), and every team-scoped read here honours it, staff included."""
    return getattr(user, "scope_team_id", None)


def team_list(*, user) -> QuerySet[Team]:
    teams = Team.objects.all() if user.is_staff else Team.objects.filter(memberships__user=user)
    if (team_id := team_scope(user)) is not None:
        teams = teams.filter(pk=team_id)
    return teams


def _scoped(qs: QuerySet, user, *, team_field: str = "team") -> QuerySet:
    if (team_id := team_scope(user)) is not None:
        qs = qs.filter(**{f"{team_field}_id": team_id})
    return qs if user.is_staff else qs.filter(**{f"{team_field}__memberships__user": user})


def model_spec_list(*, user) -> QuerySet[ModelSpec]:
    return _scoped(ModelSpec.objects.select_related("team", "source_run"), user)


def dataset_spec_list(*, user) -> QuerySet[DatasetSpec]:
    return _scoped(DatasetSpec.objects.select_related("team"), user)


def recipe_list(*, user) -> QuerySet[Recipe]:
    return _scoped(Recipe.objects.select_related("team"), user)


def _run_count(status: str | None = None) -> Coalesce:
    """The number of runs of the outer experiment (with ``status``), as a correlated subquery."""
    runs = Run.objects.filter(experiment=OuterRef("pk"))
    if status is not None:
        runs = runs.filter(status=status)
    return Coalesce(Subquery(runs.order_by().values("experiment").annotate(n=Count("pk")).values("n")), 0)


def experiment_list(*, user) -> QuerySet[Experiment]:
    """Experiments with their run counts per status, in one query.

    The counts are correlated subqueries (index-only scans of ``run_experiment_status``), not a join grouped by
    experiment: Postgres evaluates them after ORDER BY … LIMIT, for the rows of one page only, where a GROUP BY
    would count every run of every experiment before paging (and a page's COUNT(*) would count them again).
    """
    counts = {f"{s}_count": _run_count(s) for s in Run.Status.values}
    return (
        _scoped(Experiment.objects.select_related("team", "teacher", "dataset", "created_by"), user)
        .annotate(run_count=_run_count(), **counts)
        .order_by("-created_at", "-id")
    )


@dataclass
class ExperimentRow:
    """One line of the experiment list: names, times and run counts only (built from plain values, never model
    instances: the list shows 25 experiments and the records each names, which as objects cost more to build
    than the SQL)."""

    pk: int
    name: str
    team: str
    dataset: str
    teacher: str | None
    created_by: str | None
    created_at: datetime
    run_count: int = 0
    queued_count: int = 0
    running_count: int = 0
    succeeded_count: int = 0
    failed_count: int = 0
    cancelled_count: int = 0
    students: list[str] = field(default_factory=list)
    recipes: list[str] = field(default_factory=list)

    @property
    def status(self) -> str:
        return experiment_status(self)

    @property
    def done(self) -> int:
        return self.succeeded_count + self.failed_count + self.cancelled_count


_EXPERIMENT_ROW_VALUES = {"team_name": F("team__name"), "dataset_name": F("dataset__name"),
                          "teacher_name": F("teacher__name"), "creator": F("created_by__username")}


def experiment_list_rows(*, user) -> QuerySet:
    """The list page's experiments as plain values (``values()`` rows, sortable and pageable like the records):
    names and times, and the total run count (the list sorts by it). :func:`experiment_rows` turns one page of
    them into :class:`ExperimentRow` objects."""
    return (
        _scoped(Experiment.objects.all(), user)
        .annotate(run_count=_run_count())
        .order_by("-created_at", "-id")
        .values("pk", "name", "created_at", "run_count", **_EXPERIMENT_ROW_VALUES)
    )


def experiment_rows(values: Iterable[Mapping[str, Any]]) -> list[ExperimentRow]:
    """One page of :func:`experiment_list_rows` as :class:`ExperimentRow` objects with their students, recipes and
    per-status run counts: three queries whatever the page size."""
    rows = [ExperimentRow(pk=v["pk"], name=v["name"], team=v["team_name"], dataset=v["dataset_name"],
                          teacher=v["teacher_name"], created_by=v["creator"], created_at=v["created_at"],
                          run_count=v["run_count"])
            for v in values]
    by_pk = {row.pk: row for row in rows}
    if not by_pk:
        return rows
    students = Experiment.students.through.objects.filter(experiment_id__in=by_pk).order_by("pk")
    for experiment_id, name in students.values_list("experiment_id", "modelspec__name"):
        by_pk[experiment_id].students.append(name)
    recipes = Experiment.recipes.through.objects.filter(experiment_id__in=by_pk).order_by("pk")
    for experiment_id, name, version in recipes.values_list("experiment_id", "recipe__name", "recipe__version"):
        by_pk[experiment_id].recipes.append(Recipe.label(name, version))
    runs = Run.objects.filter(experiment_id__in=by_pk).order_by()
    for experiment_id, status, n in runs.values_list("experiment_id", "status").annotate(n=Count("pk")):
        setattr(by_pk[experiment_id], f"{status}_count", n)
    return rows


def run_list(*, user) -> QuerySet[Run]:
    return _scoped(Run.objects.select_related("experiment", "student", "teacher", "recipe", "team"), user)


def run_is_cancel_requested(*, run_id: int) -> bool:
    return Run.objects.filter(id=run_id, cancel_requested=True).exists()


def database_incarnation() -> str | None:
    """When the database server last started (Postgres), read on this thread's connection; None where every
    commit is durable (SQLite). A restart, a crash's included, changes it: commits confirmed before the disk
    flush on an earlier incarnation may be lost, ones on the current incarnation are flushed by its next durable
    commit."""
    if connection.vendor != "postgresql":
        return None
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_postmaster_start_time()::text")
        return cursor.fetchone()[0]


def teacher_evaluation_exists(*, run: Run) -> bool:
    """Whether the run's teacher was already evaluated on this benchmark (then it is not measured again)."""
    from .engine_config import split_key

    if run.teacher_id is None:
        return False
    return Evaluation.objects.filter(
        role=Evaluation.Role.TEACHER, model_id=run.teacher_id, dataset_id=run.experiment.dataset_id,
        split="eval", split_key=split_key(run.config["dataset"]),
    ).exists()


LIVE_METRICS = ("tokens_per_s", "gpu_memory_bytes")


def run_live_telemetry(*, run: Run) -> dict[str, float]:
    """The newest value of each of ``LIVE_METRICS`` the run has logged (tokens/s for causal LMs, peak GPU memory
    on CUDA), in one query."""
    latest = {
        name: Subquery(MetricPoint.objects.filter(run_id=OuterRef("pk"), name=name).order_by("-step")
                       .values("value")[:1])
        for name in LIVE_METRICS
    }
    row = Run.objects.filter(pk=run.pk).annotate(**{f"latest_{n}": q for n, q in latest.items()}).values(
        *(f"latest_{n}" for n in LIVE_METRICS)).first() or {}
    return {name: row[f"latest_{name}"] for name in LIVE_METRICS if row.get(f"latest_{name}") is not None}


def run_metric_series(*, run: Run, max_points: int = 2000) -> dict[str, tuple[list[int], list[float | None]]]:
    """All metric curves of a run: name → (steps, values), ordered by step, each at most ``max_points`` long.

    On Postgres a curve with more steps is downsampled on the database as :func:`metric_curves` does (min/max
    buckets over the curve's steps, first and last point kept; non-finite values become None), in two queries
    whatever the number of points: a run page never reads a 100,000-point curve into Python. Other databases
    return every point (the plots downsample them).
    """
    connection = connections[MetricPoint.objects.db]
    if connection.vendor == "postgresql":
        return _run_metric_series_downsampled(run_id=run.pk, max_points=max_points)
    series: dict[str, tuple[list[int], list[float | None]]] = defaultdict(lambda: ([], []))
    rows = MetricPoint.objects.filter(run=run).order_by("name", "step").values_list("name", "step", "value")
    for name, step, value in rows.iterator(chunk_size=5000):
        steps, values = series[name]
        steps.append(step)
        values.append(value)
    return dict(series)


def _run_metric_series_downsampled(*, run_id: int, max_points: int) -> dict[str, tuple[list[int], list[float | None]]]:
    """:func:`run_metric_series` on Postgres, in two queries: each name's first and last point (a loose index
    scan over the names, then two index lookups per name); then one aggregate over the run's points into
    buckets, whose widths go into the query as constants (a CASE on the name)."""
    connection = connections[MetricPoint.objects.db]
    table, run_col, name_col, step_col, value_col = _curve_table()
    ends_sql = f"""
        WITH RECURSIVE walk(name) AS (
            SELECT (SELECT min(m.{name_col}) FROM {table} m WHERE m.{run_col} = %(run)s)
            UNION ALL
            SELECT (SELECT min(m.{name_col}) FROM {table} m WHERE m.{run_col} = %(run)s AND m.{name_col} > w.name)
            FROM walk w WHERE w.name IS NOT NULL
        )
        SELECT w.name,
            (SELECT ARRAY[m.{step_col}::float8, m.{value_col}] FROM {table} m
              WHERE m.{run_col} = %(run)s AND m.{name_col} = w.name ORDER BY m.{step_col} LIMIT 1),
            (SELECT ARRAY[m.{step_col}::float8, m.{value_col}] FROM {table} m
              WHERE m.{run_col} = %(run)s AND m.{name_col} = w.name ORDER BY m.{step_col} DESC LIMIT 1)
        FROM walk w WHERE w.name IS NOT NULL"""
    with connection.cursor() as cursor:
        cursor.execute(ends_sql, {"run": run_id})
        ends = {
            name: ((int(first[0]), first[1]), (int(last[0]), last[1]))
            for name, first, last in cursor.fetchall() if first is not None
        }
        if not ends:
            return {}
        widths = _bucket_widths({n: (f[0], la[0]) for n, (f, la) in ends.items()}, max_points)
        long = sorted(n for n, (_, width) in widths.items() if width > 1)
        # Short curves keep every point (a bucket per step); each long one gets its own constant bucket width.
        bucket, params = f"m.{step_col}", []
        if long:
            cases = " ".join(f"WHEN %s THEN (m.{step_col} - %s::integer) / %s::integer" for _ in long)
            bucket = f"CASE m.{name_col} {cases} ELSE m.{step_col} END"
            params = [v for n in long for v in (n, *widths[n])]
        # ARRAY[value, step] compares by value first, so min/max return each extreme with its step. Each extreme
        # comes back as two plain columns (Postgres computes a repeated aggregate once): parsing arrays costs more.
        low, high = (f"{agg}(ARRAY[m.{value_col}, m.{step_col}::float8])" for agg in ("min", "max"))
        source = table
        if rollups.rolled_up([run_id]):  # a long run: merge its stored bucket extremes instead of every point
            low, high = "min(ARRAY[m.min_value, m.min_step::float8])", "max(ARRAY[m.max_value, m.max_step::float8])"
            source = connection.ops.quote_name(MetricRollup._meta.db_table)
            bucket = bucket.replace(f"m.{step_col}", "(m.bucket * m.width)")
            run_col, name_col = "run_id", "name"
        cursor.execute(f"""
            SELECT m.{name_col}, ({low})[2]::integer, ({low})[1], ({high})[2]::integer, ({high})[1]
            FROM {source} m WHERE m.{run_col} = %s
            GROUP BY m.{name_col}, {bucket}""", [run_id, *params])
        extremes = cursor.fetchall()
    return dict(sorted(_assemble(ends, extremes).items()))


def experiment_status(experiment: Experiment) -> str:
    """Overall status from the per-status counts annotated by experiment_list (or counted here)."""
    counts = {s: getattr(experiment, f"{s}_count", None) for s in Run.Status.values}
    if any(v is None for v in counts.values()):
        counts = {s: 0 for s in Run.Status.values}
        for status, n in experiment.runs.values_list("status").annotate(n=Count("id")):
            counts[status] = n
    if counts["running"]:
        return "running"
    if counts["queued"]:
        return "queued"
    if counts["failed"]:
        return "failed" if not counts["succeeded"] else "partly failed"
    if counts["cancelled"] and not counts["succeeded"]:
        return "cancelled"
    return "succeeded" if counts["succeeded"] else "empty"


def worker_list() -> QuerySet[Worker]:
    return Worker.objects.all()


def worker_current_runs() -> dict[str, list[Run]]:
    runs: dict[str, list[Run]] = defaultdict(list)
    for run in Run.objects.filter(status=Run.Status.RUNNING).select_related("experiment"):
        runs[run.worker_name].append(run)
    return runs


# --- leaderboard ------------------------------------------------------------------------------------
@dataclass
class LeaderboardRow:
    experiment: Experiment
    student: ModelSpec
    recipe: Recipe
    teacher: ModelSpec | None
    is_baseline: bool
    stage: str = ""
    sweep: str = ""
    """The row's point of its experiment's sweep, e.g. ``"lr=3e-4 τ=4"`` (empty when nothing is swept)."""
    run_ids: list[int] = field(default_factory=list)
    accuracies: list[float] = field(default_factory=list)
    gains: list[float] = field(default_factory=list)
    params: int | None = None
    latency_ms: float | None = None
    teacher_accuracy: float | None = None
    teacher_params: int | None = None
    teacher_latency_ms: float | None = None
    higher_is_better: bool = True
    rank: int = 0
    pareto: bool = False

    @property
    def family(self) -> str:
        """The student's family (``mlp``, ``bert``, …; see :func:`model_family`)."""
        return model_family(self.student)

    @property
    def compression(self) -> float | None:
        """Teacher parameters / student parameters."""
        return self.teacher_params / self.params if self.teacher_params and self.params else None

    @property
    def speedup(self) -> float | None:
        """Teacher latency / student latency (batch 1, on the workers that measured them)."""
        return self.teacher_latency_ms / self.latency_ms if self.teacher_latency_ms and self.latency_ms else None

    # Mean and spread are read many times per row (ranking, filters, plot, table) and only once the row holds
    # all its seeds: computed once.
    @cached_property
    def mean(self) -> float:
        return statistics.fmean(self.accuracies)

    @cached_property
    def std(self) -> float:
        return sample_std(self.accuracies)

    @property
    def seeds(self) -> int:
        return len(self.accuracies)

    @property
    def retention(self) -> float | None:
        """Student score / teacher score (inverted for lower-is-better metrics such as perplexity)."""
        if not self.teacher_accuracy or not self.mean:
            return None
        return self.mean / self.teacher_accuracy if self.higher_is_better else self.teacher_accuracy / self.mean

    @property
    def kd_gain(self) -> float | None:
        return statistics.fmean(self.gains) if self.gains and not self.is_baseline else None

    @property
    def kd_gain_std(self) -> float | None:
        return sample_std(self.gains) if len(self.gains) > 1 and not self.is_baseline else None


@dataclass(frozen=True)
class PrimaryMetric:
    """What a dataset's leaderboard ranks by."""

    name: str
    label: str
    higher_is_better: bool
    percent: bool


QUALITY_METRICS: dict[str, PrimaryMetric] = {
    m.name: m
    for m in (
        PrimaryMetric("accuracy", "Accuracy", True, True),
        PrimaryMetric("macro_f1", "Macro F1", True, True),
        PrimaryMetric("agreement", "Agreement with teacher", True, True),
        PrimaryMetric("nll", "NLL", False, False),
        PrimaryMetric("ece", "Calibration error (ECE)", False, False),
        PrimaryMetric("kl_to_teacher", "KL to teacher", False, False),
        PrimaryMetric("perplexity", "Perplexity", False, False),
        PrimaryMetric("bits_per_token", "Bits per token", False, False),
        PrimaryMetric("cosine_to_teacher", "Cosine to teacher", True, False),
    )
}
"""Eval metrics a leaderboard or a comparison can rank by, with their direction. Efficiency numbers (params,
latency, throughput, memory) are not quality metrics: they are the other axis."""

PRIMARY_METRICS = {
    "classification": QUALITY_METRICS["accuracy"],
    "causal_lm": QUALITY_METRICS["perplexity"],
    "embedding": QUALITY_METRICS["cosine_to_teacher"],
}


def primary_metric(dataset: DatasetSpec) -> PrimaryMetric:
    return PRIMARY_METRICS.get(dataset.task, PRIMARY_METRICS["classification"])


def _score(accuracy: float | None, raw: Any, metric: PrimaryMetric) -> float | None:
    """A score on ``metric`` from an evaluation's accuracy column and the metric's raw JSON value (None when it
    was not measured, or is not a number)."""
    if metric.name == "accuracy" and accuracy is not None:
        return accuracy
    return float(raw) if isinstance(raw, int | float) and not isinstance(raw, bool) else None


def _metric_value(evaluation: Evaluation, metric: PrimaryMetric) -> float | None:
    return _score(evaluation.accuracy, (evaluation.metrics or {}).get(metric.name), metric)


def metric_value(evaluation: Evaluation | None, metric: PrimaryMetric) -> float | None:
    """An evaluation's score on ``metric`` (None when it was not measured)."""
    return _metric_value(evaluation, metric) if evaluation is not None else None


def evaluation_metric_names(evaluations: Iterable[Evaluation], *, primary: PrimaryMetric) -> list[PrimaryMetric]:
    """The quality metrics present in ``evaluations``: the primary one first, then in QUALITY_METRICS order."""
    present = {
        name for e in evaluations for name, metric in QUALITY_METRICS.items() if _metric_value(e, metric) is not None
    }
    return [primary] + [m for name, m in QUALITY_METRICS.items() if name in present and name != primary.name]


def _leaderboard_scope(*, user, dataset: DatasetSpec, split_key: str | None, scope: str) -> QuerySet[Evaluation]:
    """Finished student evaluations of the benchmark, scoped to the user's teams (staff: all).

    ``scope="team"``: evaluations on this dataset record. ``scope="global"`` (needs ``split_key``): every
    evaluation on the same eval split of the same data — the split key hashes the data source and the split
    settings — whichever team's dataset record it was registered under.
    """
    qs = Evaluation.objects.filter(role=Evaluation.Role.STUDENT, run__status=Run.Status.SUCCEEDED)
    if scope == "global" and split_key:
        qs = qs.filter(split_key=split_key, dataset__task=dataset.task)
    else:
        qs = qs.filter(dataset=dataset)
        if split_key:
            qs = qs.filter(split_key=split_key)
    return _scoped(qs, user, team_field="run__team")


class _BoardEval(NamedTuple):
    """What a leaderboard reads of one student evaluation: plain values from one query, never model instances
    (a benchmark holds thousands of evaluations; building and joining objects for each cost far more than the
    SQL)."""

    pk: int
    run_id: int
    split_key: str
    accuracy: float | None
    metric_raw: Any
    params: int | None
    latency_ms: float | None
    experiment_id: int
    student_id: int
    recipe_id: int
    stage: str
    seed: int
    is_baseline: bool

    def value(self, metric: PrimaryMetric) -> float | None:
        return _score(self.accuracy, self.metric_raw, metric)


_BOARD_FIELDS = ("pk", "run_id", "split_key", "accuracy", "metric_raw", "param_count", "latency_ms",
                 "run__experiment_id", "run__student_id", "run__recipe_id", "run__stage", "run__seed",
                 "run__is_baseline")

# The parts of a run's frozen config that hold swept values (read only for runs of experiments that sweep).
_LEADERBOARD_SWEEP_PARTS = {
    "sweep_train": KeyTransform("train", "run__config"),
    "sweep_terms": KeyTransform("terms", "run__config"),
    "sweep_labelled_fraction": KeyTransform("labelled_fraction", KeyTransform("dataset", "run__config")),
}


def _board_evaluations(qs: QuerySet[Evaluation], metric: PrimaryMetric,
                       swept_experiments: Sequence[int]) -> tuple[list[_BoardEval], dict[int, dict[str, Any]]]:
    """The benchmark's evaluations as :class:`_BoardEval` rows, with ``metric`` read out of the metrics JSON in
    SQL, and for the runs of ``swept_experiments`` the parts of their frozen config that hold swept values
    (evaluation id → config parts shaped like the config for ``sweeps.config_value``). One query."""
    rows = qs.annotate(metric_raw=KeyTransform(metric.name, "metrics")).order_by("run_id")
    if not swept_experiments:
        return [_BoardEval(*values) for values in rows.values_list(*_BOARD_FIELDS)], {}
    swept = Q(run__experiment_id__in=list(swept_experiments))
    rows = rows.annotate(**{
        name: Case(When(swept, then=part), default=Value(None), output_field=JSONField())
        for name, part in _LEADERBOARD_SWEEP_PARTS.items()
    })
    evaluations, configs = [], {}
    for values in rows.values_list(*_BOARD_FIELDS, *_LEADERBOARD_SWEEP_PARTS):
        evaluation = _BoardEval(*values[:len(_BOARD_FIELDS)])
        evaluations.append(evaluation)
        if evaluation.experiment_id in swept_experiments:
            train, terms, fraction = values[len(_BOARD_FIELDS):]
            configs[evaluation.pk] = {
                "train": train if isinstance(train, dict) else {},
                "terms": [t for t in terms if isinstance(t, dict)] if isinstance(terms, list) else [],
                "dataset": {"labelled_fraction": fraction} if fraction is not None else {},
            }
    return evaluations, configs


def _sweep_point(train: Mapping[str, Any], config: Mapping[str, Any], axes: Sequence[str]) -> tuple:
    """The run's values of ``axes`` (a hashable key; None where the run does not have one)."""
    point = []
    for axis in axes:
        value = sweeps.config_value(config, axis)
        point.append((axis, value if isinstance(value, int | float | str | bool) or value is None else repr(value)))
    return tuple(point)


def _leaderboard_teachers(*, dataset: DatasetSpec, split_key: str | None, scope: str,
                          metric: PrimaryMetric) -> dict[tuple[int, str], Evaluation]:
    qs = Evaluation.objects.filter(role=Evaluation.Role.TEACHER)
    if scope == "global" and split_key:
        qs = qs.filter(split_key=split_key, dataset__task=dataset.task)
    else:
        qs = qs.filter(dataset=dataset)
        if split_key:
            qs = qs.filter(split_key=split_key)
    return {(e.model_id, e.split_key): e for e in qs.defer("metrics").annotate(
        metric_raw=KeyTransform(metric.name, "metrics")) if _teacher_value(e, metric) is not None}


def _teacher_value(evaluation: Evaluation, metric: PrimaryMetric) -> float | None:
    return _score(evaluation.accuracy, getattr(evaluation, "metric_raw", None), metric)


# What a leaderboard never reads of the records its rows name: frozen JSON configs, texts and weights.
_BOARD_EXPERIMENT_DEFERRED = ("description", "teacher_weights", "seeds", "teacher__config", "teacher__notes")
_BOARD_MODEL_DEFERRED = ("notes", "parent__notes", "parent__config")


def _leaderboard_rows(qs: QuerySet[Evaluation], teachers: dict[tuple[int, str], Evaluation],
                      metric: PrimaryMetric) -> list[LeaderboardRow]:
    """Group the student evaluations of ``qs`` into rows per (experiment, student, recipe, stage, point of the
    experiment's sweep) and rank them: the seeds of one point are averaged, different points are different rows.

    KD gain pairs each distilled run with the hard-label baseline of the same experiment, student and seed
    trained with the same training settings (baselines follow the training-setting sweep, not the term sweeps);
    when there is none, with the experiment's baseline for that student and seed if it has exactly one.

    Four queries whatever the row count: the experiments of the board (whose ``train`` names what they
    sweep), the evaluations as plain values (with the swept parts of their runs' configs), then the students
    and recipes they name.
    """
    experiments = {x.pk: x for x in Experiment.objects.filter(pk__in=qs.order_by().values("run__experiment_id"))
                   .select_related("team", "teacher").defer(*_BOARD_EXPERIMENT_DEFERRED)}
    trains = {pk: x.train if isinstance(x.train, dict) else {} for pk, x in experiments.items()}
    axes_of = {pk: sweeps.experiment_axes(train) for pk, train in trains.items()}
    evaluations, configs = _board_evaluations(qs, metric, {pk for pk, axes in axes_of.items() if axes})
    if not evaluations:
        return []
    students = ModelSpec.objects.select_related("parent").defer(*_BOARD_MODEL_DEFERRED) \
        .in_bulk({e.student_id for e in evaluations})
    recipes = Recipe.objects.defer("description", "terms", "scheme_params") \
        .in_bulk({e.recipe_id for e in evaluations})
    points: dict[int, tuple[str, tuple, tuple]] = {}  # evaluation id → (label, point, training-setting point)
    for e in evaluations:
        train, axes = trains[e.experiment_id], axes_of[e.experiment_id]
        if not axes:
            points[e.pk] = ("", (), ())
            continue
        config = configs.get(e.pk, {})
        points[e.pk] = (sweeps.run_label(train=train, config=config), _sweep_point(train, config, axes),
                        _sweep_point(train, config, list(sweeps.train_axes(train))))
    values = {e.pk: e.value(metric) for e in evaluations}
    baseline: dict[tuple[int, int, int, tuple], float] = {}
    by_seed: dict[tuple[int, int, int], set[float]] = defaultdict(set)
    for e in evaluations:
        value = values[e.pk]
        if e.is_baseline and value is not None:
            baseline[(e.experiment_id, e.student_id, e.seed, points[e.pk][2])] = value
            by_seed[(e.experiment_id, e.student_id, e.seed)].add(value)
    sole_baseline = {key: next(iter(found)) for key, found in by_seed.items() if len(found) == 1}
    sign = 1.0 if metric.higher_is_better else -1.0
    rows: dict[tuple[int, int, int, str, tuple], LeaderboardRow] = {}
    for e in evaluations:
        value = values[e.pk]
        if value is None:
            continue
        label, point, train_point = points[e.pk]
        key = (e.experiment_id, e.student_id, e.recipe_id, e.stage, point)
        row = rows.get(key)
        if row is None:
            experiment = experiments[e.experiment_id]
            row = rows[key] = LeaderboardRow(
                experiment, students[e.student_id], recipes[e.recipe_id], experiment.teacher, e.is_baseline,
                e.stage, sweep=label, higher_is_better=metric.higher_is_better,
            )
        row.run_ids.append(e.run_id)
        row.accuracies.append(value)
        row.params = e.params or row.params
        row.latency_ms = e.latency_ms if e.latency_ms is not None else row.latency_ms
        if not e.is_baseline:
            base = baseline.get((e.experiment_id, e.student_id, e.seed, train_point))
            if base is None:
                base = sole_baseline.get((e.experiment_id, e.student_id, e.seed))
            if base is not None:
                row.gains.append(sign * (value - base))
        teacher_id = row.experiment.teacher_id
        teacher_eval = teachers.get((teacher_id, e.split_key)) if teacher_id else None
        if teacher_eval is not None and row.teacher_accuracy is None:
            row.teacher_accuracy = _teacher_value(teacher_eval, metric)
            row.teacher_params = teacher_eval.param_count
            row.teacher_latency_ms = teacher_eval.latency_ms
    ranked = sorted(rows.values(), key=lambda r: (-sign * r.mean, r.params or 0))
    for i, row in enumerate(ranked, 1):
        row.rank = i
    return ranked


def leaderboard(*, user, dataset: DatasetSpec, metric: PrimaryMetric | None = None, split_key: str | None = None,
                scope: str = "team") -> list[LeaderboardRow]:
    """Rows per (experiment, student, recipe, stage, sweep point), ranked by ``metric`` (mean over seeds;
    default the dataset's primary metric): accuracy for classification, perplexity (lower is better) for causal
    LMs, cosine to the teacher for embeddings. ``accuracies`` then hold that metric; gains and retention are
    oriented so that positive / above 100% means better.

    KD gain pairs each distilled run with the hard-label baseline of the same experiment, student, seed and
    training settings (see :func:`_leaderboard_rows`); retention divides by the teacher's score on the same eval
    split. ``split_key`` keeps one eval split (all when None); ``scope`` is "team" (this dataset record) or
    "global" (see :func:`_leaderboard_scope`). A constant number of queries whatever the row count.
    """
    metric = metric or primary_metric(dataset)
    qs = _leaderboard_scope(user=user, dataset=dataset, split_key=split_key, scope=scope)
    teachers = _leaderboard_teachers(dataset=dataset, split_key=split_key, scope=scope, metric=metric)
    return _leaderboard_rows(qs, teachers, metric)


@dataclass(frozen=True)
class SplitOption:
    """One eval split of a dataset that has results: its key, a readable label and the number of results."""

    key: str
    label: str
    count: int


@dataclass
class Benchmark:
    """One leaderboard: a dataset's eval split and a metric, with the options its page offers."""

    dataset: DatasetSpec
    metric: PrimaryMetric
    metrics: list[PrimaryMetric]
    split_key: str | None
    splits: list[SplitOption]
    scope: str
    rows: list[LeaderboardRow]

    @property
    def recipes(self) -> list[str]:
        return sorted({r.recipe.name for r in self.rows})

    @property
    def families(self) -> list[str]:
        return sorted({r.family for r in self.rows if r.family})


def _split_options(qs: QuerySet[Evaluation]) -> list[SplitOption]:
    """The eval splits of ``qs`` with their result counts, most results first, each labelled from the frozen
    dataset config of one run evaluated on it (two queries whatever the number of splits)."""
    groups = list(qs.order_by().values("split_key").annotate(n=Count("pk"), split=Min("split"),
                                                              run_id=Min("run_id")))
    run_ids = [g["run_id"] for g in groups if g["run_id"]]
    configs = dict(Run.objects.filter(pk__in=run_ids).values_list("pk", "config__dataset")) if run_ids else {}
    options = [SplitOption(g["split_key"], _split_label(g["split"], g["split_key"], configs.get(g["run_id"])),
                           g["n"]) for g in groups]
    return sorted(options, key=lambda o: (-o.count, o.key))


def _split_label(split: str, split_key: str, dataset_config: Mapping[str, Any] | None) -> str:
    """What distinguishes an eval split, read from the frozen dataset config of a run evaluated on it."""
    cfg = dataset_config if isinstance(dataset_config, Mapping) else {}
    parts = []
    if isinstance(cfg.get("eval_fraction"), int | float):
        parts.append(f"{100 * cfg['eval_fraction']:g}% eval")
    for key, label in (("split_seed", "seed"), ("max_length", "max length")):
        if cfg.get(key) is not None:
            parts.append(f"{label} {cfg[key]}")
    return f"{split} · " + (", ".join(parts) or split_key[:8])


def _board_metrics(qs: QuerySet[Evaluation], *, primary: PrimaryMetric) -> list[PrimaryMetric]:
    """The quality metrics measured by the evaluations of ``qs``: the primary one first, then in QUALITY_METRICS
    order (one aggregate query; the metrics JSON is never sent to Python)."""
    counts = qs.order_by().aggregate(
        _accuracy_column=Count("accuracy"),
        **{name: Count("pk", filter=Q(metrics__has_key=name) & ~Q(**{f"metrics__{name}": None}))
           for name in QUALITY_METRICS},
    )
    counts["accuracy"] += counts.pop("_accuracy_column")
    return [primary] + [m for name, m in QUALITY_METRICS.items() if counts[name] and name != primary.name]


def leaderboard_benchmark(*, user, dataset: DatasetSpec, metric_name: str = "", split_key: str = "",
                          scope: str = "team") -> Benchmark:
    """The leaderboard of one benchmark of ``dataset``: an eval split (default: the one with most results) and
    a quality metric (default: the dataset's primary metric), in the team or the global scope.

    A constant number of queries whatever the row count: the splits and their labels, the metrics present, the
    teachers' scores, then the rows (:func:`_leaderboard_rows`).
    """
    scope = "global" if scope == "global" else "team"
    splits = _split_options(_leaderboard_scope(user=user, dataset=dataset, split_key=None, scope="team"))
    keys = {o.key for o in splits}
    chosen = split_key if split_key in keys else (splits[0].key if splits else None)
    primary = primary_metric(dataset)
    if chosen is None:
        return Benchmark(dataset=dataset, metric=primary, metrics=[primary], split_key=None, splits=[],
                         scope=scope, rows=[])
    qs = _leaderboard_scope(user=user, dataset=dataset, split_key=chosen, scope=scope)
    metrics = _board_metrics(qs, primary=primary)
    metric = next((m for m in metrics if m.name == metric_name), primary)
    teachers = _leaderboard_teachers(dataset=dataset, split_key=chosen, scope=scope, metric=metric)
    return Benchmark(dataset=dataset, metric=metric, metrics=metrics, split_key=chosen, splits=splits, scope=scope,
                     rows=_leaderboard_rows(qs, teachers, metric))


_HF_MODEL_TYPES: dict[str, str] = {}


def _local_model_type(folder: str) -> str:
    """``model_type`` from a local transformers folder's config.json (read once per folder and process)."""
    if folder not in _HF_MODEL_TYPES:
        try:
            data = json.loads((Path(folder) / "config.json").read_text())
            _HF_MODEL_TYPES[folder] = str(data.get("model_type") or "") if isinstance(data, dict) else ""
        except (OSError, ValueError):
            _HF_MODEL_TYPES[folder] = ""
    return _HF_MODEL_TYPES[folder]


def model_family(spec: ModelSpec) -> str:
    """A student's family for filtering: the builtin architecture (``mlp``) or the transformers ``model_type``
    (``bert``, ``llama``, …); derived models and models trained here take their parent's / source run
    student's family when it is already loaded (never a query). "" when unknown."""
    if spec.source == ModelSpec.Source.BUILTIN:
        return spec.builtin_arch
    model_type = (spec.config or {}).get("model_type") if isinstance(spec.config, dict) else None
    if model_type:
        return str(model_type)
    if spec.source == ModelSpec.Source.HF and spec.local_path:
        return _local_model_type(spec.local_path)
    if spec.source == ModelSpec.Source.DERIVED and ModelSpec.parent.is_cached(spec) and spec.parent:
        return model_family(spec.parent)
    if spec.source == ModelSpec.Source.RUN and ModelSpec.source_run.is_cached(spec) and spec.source_run:
        run = spec.source_run
        return model_family(run.student) if Run.student.is_cached(run) else ""
    return ""


def home_summary(*, user) -> dict[str, Any]:
    runs = run_list(user=user)
    return {
        "experiments": experiment_list(user=user)[:8],
        "runs": runs[:10],
        "active_runs": runs.filter(status__in=[Run.Status.QUEUED, Run.Status.RUNNING]).count(),
    }


# --- web UI reads -----------------------------------------------------------------------------------
def experiment_runs(*, experiment: Experiment) -> QuerySet[Run]:
    """The runs of one experiment for its runs table, each annotated with its student ``accuracy``."""
    student_accuracy = Evaluation.objects.filter(run=OuterRef("pk"), role=Evaluation.Role.STUDENT).values(
        "accuracy"
    )[:1]
    return (
        Run.objects.filter(experiment=experiment)
        .select_related("experiment", "student", "recipe", "waiting_for")
        .annotate(accuracy=Subquery(student_accuracy))
        .order_by("student__name", "-is_baseline", "recipe__name", "seed", "id")
    )


def experiment_metric_series(*, experiment: Experiment, name: str) -> dict[int, tuple[list[int], list[float]]]:
    """One metric's curve for every run of an experiment: run id → (steps, values), in one query."""
    series: dict[int, tuple[list[int], list[float]]] = defaultdict(lambda: ([], []))
    rows = (
        MetricPoint.objects.filter(run__experiment=experiment, name=name)
        .order_by("run_id", "step")
        .values_list("run_id", "step", "value")
    )
    for run_id, step, value in rows.iterator(chunk_size=5000):
        steps, values = series[run_id]
        steps.append(step)
        values.append(value)
    return dict(series)


def run_evaluations(*, run: Run) -> list[Evaluation]:
    """The student's evaluation of this run and the teacher's on the same eval split (either may be missing)."""
    student = list(run.evaluations.filter(role=Evaluation.Role.STUDENT).select_related("model"))
    teacher: list[Evaluation] = []
    if run.teacher_id:
        teacher_evals = Evaluation.objects.filter(
            role=Evaluation.Role.TEACHER, model_id=run.teacher_id, dataset_id=run.experiment.dataset_id
        ).select_related("model")
        if student:
            teacher_evals = teacher_evals.filter(split_key=student[0].split_key)
        teacher = list(teacher_evals[:1])
    return student + teacher


def run_model_artifact(*, run: Run) -> Artifact | None:
    """The run's final model (the latest ``model`` artifact), or None."""
    return run.artifacts.filter(kind=Artifact.Kind.MODEL).order_by("-created_at", "-id").first()


def run_baseline_evaluation(*, run: Run) -> Evaluation | None:
    """The student evaluation of the hard-label baseline paired with ``run`` (same experiment, student and
    seed), the reference for its KD gain; None when there is no finished one."""
    return (
        Evaluation.objects.filter(
            role=Evaluation.Role.STUDENT, run__experiment_id=run.experiment_id, run__student_id=run.student_id,
            run__seed=run.seed, run__is_baseline=True, run__status=Run.Status.SUCCEEDED,
        ).exclude(run_id=run.pk).order_by("-run_id").first()
    )


def leaderboard_datasets(*, user) -> QuerySet[DatasetSpec]:
    """The user's datasets with the number of finished student evaluations on each (rows on its leaderboard)."""
    finished = Q(evaluations__role=Evaluation.Role.STUDENT, evaluations__run__status=Run.Status.SUCCEEDED)
    return dataset_spec_list(user=user).annotate(result_count=Count("evaluations", filter=finished))


# --- compare ----------------------------------------------------------------------------------------
def compare_run_list(*, user, run_ids: Sequence[int]) -> list[Run]:
    """The runs among ``run_ids`` the user may see, in the order asked for, with what a comparison shows
    (experiment, dataset, teacher, student, recipe) in one query. Fewer runs than ids means some are not
    visible (or do not exist)."""
    runs = {
        r.pk: r
        for r in run_list(user=user).filter(pk__in=run_ids).select_related("experiment__dataset", "student__parent")
    }
    return [runs[i] for i in run_ids if i in runs]


def _curve_table() -> tuple[str, str, str, str, str]:
    opts, quote = MetricPoint._meta, connections[MetricPoint.objects.db].ops.quote_name
    return (quote(opts.db_table), *(quote(opts.get_field(f).column) for f in ("run", "name", "step", "value")))


def metric_names(*, run_ids: Sequence[int]) -> list[str]:
    """The metric names logged by any of the runs, sorted, in one query.

    On Postgres a recursive query walks the (run, name, step) index from one name to the next (a "loose index
    scan"), so the cost grows with runs × names, not with the number of points.
    """
    run_ids = list(run_ids)
    if not run_ids:
        return []
    connection = connections[MetricPoint.objects.db]
    if connection.vendor != "postgresql":
        return metric_names_portable(run_ids=run_ids)
    table, run_col, name_col, _, _ = _curve_table()
    sql = f"""
        WITH RECURSIVE walk(run_id, name) AS (
            SELECT r.id, (SELECT min(m.{name_col}) FROM {table} m WHERE m.{run_col} = r.id)
            FROM unnest(%s::bigint[]) AS r(id)
            UNION ALL
            SELECT w.run_id, (SELECT min(m.{name_col}) FROM {table} m WHERE m.{run_col} = w.run_id
                                                                   AND m.{name_col} > w.name)
            FROM walk w WHERE w.name IS NOT NULL
        )
        SELECT DISTINCT name FROM walk WHERE name IS NOT NULL ORDER BY name"""
    with connection.cursor() as cursor:
        cursor.execute(sql, [run_ids])
        return [name for (name,) in cursor.fetchall()]


def metric_names_portable(*, run_ids: Sequence[int]) -> list[str]:
    """:func:`metric_names` on any database (a DISTINCT over every point of the runs)."""
    names = MetricPoint.objects.filter(run_id__in=list(run_ids)).values_list("name", flat=True)
    return sorted(set(names.order_by().distinct()))


Curves = dict[int, tuple[list[int], list[float | None]]]


def _clean(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None


def _bucket_widths(ends: Mapping[int, tuple[int, int]], max_points: int) -> dict[int, tuple[int, int]]:
    """Each run's (first step, bucket width): its steps cut into at most (max_points - 2) // 2 buckets of equal
    width, so that with its first and last point a curve keeps at most ``max_points`` points; a run with fewer
    steps than buckets keeps every point."""
    if max_points < 4:
        raise ValueError("max_points must be at least 4")
    buckets = (max_points - 2) // 2
    return {run_id: (lo, max(1, -(-(hi - lo + 1) // buckets))) for run_id, (lo, hi) in ends.items()}


def _assemble(ends: Mapping[int, tuple[tuple[int, float], tuple[int, float]]],
              extremes: Iterable[tuple[int, int, float, int, float]]) -> Curves:
    """Curves from each run's first and last points and each bucket's lowest and highest point
    (``run_id, min_step, min_value, max_step, max_value``), in step order, one value per step."""
    points: dict[int, dict[int, float]] = {run_id: {} for run_id in ends}
    for run_id, (first, last) in ends.items():
        points[run_id][first[0]] = first[1]
        points[run_id][last[0]] = last[1]
    for run_id, min_step, min_value, max_step, max_value in extremes:
        points[run_id][min_step] = min_value
        points[run_id][max_step] = max_value
    return {
        run_id: ([s for s in sorted(by_step)], [_clean(by_step[s]) for s in sorted(by_step)])
        for run_id, by_step in points.items()
    }


def metric_curves(*, run_ids: Sequence[int], name: str, max_points: int = 2000) -> Curves:
    """One metric's curve for each run that logged it: run id → (steps, values), downsampled on the database
    to at most ``max_points`` points per run, in two queries whatever the number of points.

    Each run's steps are cut into (max_points - 2) // 2 equal buckets; each bucket keeps its lowest and highest
    point (with their steps), and each run keeps its first and last point, so spikes, dips and the ends of
    every curve survive. Non-finite values become None (a gap); a bucket that holds a NaN or +inf shows
    the gap instead of its highest finite value (Postgres orders NaN above every number).
    """
    run_ids = list(run_ids)
    if not run_ids:
        return {}
    connection = connections[MetricPoint.objects.db]
    if connection.vendor != "postgresql":
        return metric_curves_portable(run_ids=run_ids, name=name, max_points=max_points)
    table, run_col, name_col, step_col, value_col = _curve_table()
    ends_sql = f"""
        SELECT r.id,
            (SELECT ARRAY[m.{step_col}::float8, m.{value_col}] FROM {table} m
              WHERE m.{run_col} = r.id AND m.{name_col} = %s ORDER BY m.{step_col} LIMIT 1),
            (SELECT ARRAY[m.{step_col}::float8, m.{value_col}] FROM {table} m
              WHERE m.{run_col} = r.id AND m.{name_col} = %s ORDER BY m.{step_col} DESC LIMIT 1)
        FROM unnest(%s::bigint[]) AS r(id)"""
    with connection.cursor() as cursor:
        cursor.execute(ends_sql, [name, name, run_ids])
        ends = {
            run_id: ((int(first[0]), first[1]), (int(last[0]), last[1]))
            for run_id, first, last in cursor.fetchall() if first is not None
        }
        if not ends:
            return {}
        widths = _bucket_widths({r: (f[0], la[0]) for r, (f, la) in ends.items()}, max_points)
        rolled = rollups.rolled_up(list(widths), name)
        extremes = []
        for ids, source in (([i for i in widths if i not in rolled], "points"), (sorted(rolled), "rollups")):
            if not ids:
                continue
            cursor.execute(_buckets_sql(source), [ids, [widths[i][0] for i in ids], [widths[i][1] for i in ids],
                                                  ids, name])
            extremes += [(run_id, int(low[1]), low[0], int(high[1]), high[0])
                         for run_id, low, high in cursor.fetchall()]
    return _assemble(ends, extremes)


def _buckets_sql(source: str) -> str:
    """Each run's curve cut into buckets (``b``: run id, first step, bucket width), with each bucket's lowest and
    highest point. ``points`` aggregates every point; ``rollups`` merges the stored extremes of a long run
    (:mod:`.rollups`), each stored bucket going whole into the bucket of its first step. ARRAY[value, step]
    compares by value first, so min/max return each extreme with its step."""
    table, run_col, name_col, step_col, value_col = _curve_table()
    if source == "points":
        low = high = f"ARRAY[m.{value_col}, m.{step_col}::float8]"
        frm, run, name, step = table, f"m.{run_col}", f"m.{name_col}", f"m.{step_col}"
    else:
        low, high = "ARRAY[m.min_value, m.min_step::float8]", "ARRAY[m.max_value, m.max_step::float8]"
        frm = connections[MetricRollup.objects.db].ops.quote_name(MetricRollup._meta.db_table)
        run, name, step = "m.run_id", "m.name", "m.bucket * m.width"
    return f"""
        SELECT {run}, min({low}), max({high})
        FROM {frm} m
        JOIN unnest(%s::bigint[], %s::integer[], %s::integer[]) AS b(run_id, lo, width) ON b.run_id = {run}
        WHERE {run} = ANY(%s::bigint[]) AND {name} = %s
        GROUP BY {run}, ({step} - b.lo) / b.width"""


def _order_key(value: float) -> tuple[int, float]:
    """Postgres' float order: NaN above +inf above every number."""
    return (1, 0.0) if math.isnan(value) else (0, value)


def metric_curves_portable(*, run_ids: Sequence[int], name: str, max_points: int = 2000) -> Curves:
    """:func:`metric_curves` on any database: the same buckets, computed while streaming the points."""
    bounds = {
        row["run_id"]: (row["lo"], row["hi"])
        for row in MetricPoint.objects.filter(run_id__in=list(run_ids), name=name)
        .values("run_id").annotate(lo=Min("step"), hi=Max("step")).order_by()
    }
    if not bounds:
        return {}
    widths = _bucket_widths(bounds, max_points)
    ends: dict[int, list[tuple[int, float]]] = {}
    lows: dict[tuple[int, int], tuple[int, float]] = {}
    highs: dict[tuple[int, int], tuple[int, float]] = {}
    rows = (MetricPoint.objects.filter(run_id__in=list(bounds), name=name)
            .order_by("run_id", "step").values_list("run_id", "step", "value"))
    for run_id, step, value in rows.iterator(chunk_size=10_000):
        first_last = ends.setdefault(run_id, [(step, value), (step, value)])
        first_last[1] = (step, value)
        lo, width = widths[run_id]
        key = (run_id, (step - lo) // width)
        low, high = lows.get(key), highs.get(key)
        # Ties keep the earliest step for the minimum and the latest for the maximum, as ARRAY[value, step] does.
        if low is None or _order_key(value) < _order_key(low[1]):
            lows[key] = (step, value)
        if high is None or _order_key(value) >= _order_key(high[1]):
            highs[key] = (step, value)
    extremes = [(key[0], *lows[key], *highs[key]) for key in lows]
    return _assemble({r: (f, la) for r, (f, la) in ends.items()}, extremes)


@dataclass
class CompareRow:
    """One compared run with its final student evaluation and its teacher's on the same eval split."""

    run: Run
    evaluation: Evaluation | None
    teacher_evaluation: Evaluation | None
    metric: PrimaryMetric

    @property
    def quality(self) -> float | None:
        return _metric_value(self.evaluation, self.metric) if self.evaluation else None

    @property
    def teacher_quality(self) -> float | None:
        return _metric_value(self.teacher_evaluation, self.metric) if self.teacher_evaluation else None

    @property
    def params(self) -> int | None:
        return self.evaluation.param_count if self.evaluation else None

    @property
    def latency_ms(self) -> float | None:
        return self.evaluation.latency_ms if self.evaluation else None

    @property
    def retention(self) -> float | None:
        """Student score / teacher score, inverted for lower-is-better metrics."""
        student, teacher = self.quality, self.teacher_quality
        if not student or not teacher:
            return None
        return student / teacher if self.metric.higher_is_better else teacher / student

    def value(self, metric: PrimaryMetric) -> float | None:
        return _metric_value(self.evaluation, metric) if self.evaluation else None


@dataclass
class Comparison:
    """What the compare page shows besides the curves."""

    rows: list[CompareRow]
    metric: PrimaryMetric
    columns: list[PrimaryMetric]
    teachers: list[Evaluation]
    config: list[ConfigKey]
    grid: SweepGrid | None

    @property
    def differing(self) -> list[ConfigKey]:
        return [k for k in self.config if k.differs]

    @property
    def same(self) -> list[ConfigKey]:
        return [k for k in self.config if not k.differs]

    @property
    def table(self) -> list[tuple[CompareRow, list[tuple[PrimaryMetric, float | None]]]]:
        """Each run with its (column, value) cells."""
        return [(row, [(c, row.value(c)) for c in self.columns]) for row in self.rows]

    @property
    def teacher_table(self) -> list[tuple[Evaluation, list[tuple[PrimaryMetric, float | None]]]]:
        return [(e, [(c, metric_value(e, c)) for c in self.columns]) for e in self.teachers]


def run_comparison(*, runs: Sequence[Run]) -> Comparison:
    """Final evaluations, the config diff and the sweep grid of ``runs`` (from :func:`compare_run_list`), in one
    query. Quality is the primary metric of the task most of the runs share."""
    runs = list(runs)
    tasks: dict[str, int] = defaultdict(int)
    for run in runs:
        tasks[run.experiment.dataset.task] += 1
    task = max(tasks, key=lambda t: (tasks[t], t)) if tasks else "classification"
    metric = PRIMARY_METRICS.get(task, PRIMARY_METRICS["classification"])
    teacher_ids = {r.teacher_id for r in runs if r.teacher_id}
    dataset_ids = {r.experiment.dataset_id for r in runs}
    evaluations = list(
        Evaluation.objects.filter(
            Q(role=Evaluation.Role.STUDENT, run__in=runs)
            | Q(role=Evaluation.Role.TEACHER, model_id__in=teacher_ids, dataset_id__in=dataset_ids)
        ).select_related("model")
    ) if runs else []
    students = {e.run_id: e for e in evaluations if e.role == Evaluation.Role.STUDENT}
    teachers = {
        (e.model_id, e.dataset_id, e.split_key): e for e in evaluations if e.role == Evaluation.Role.TEACHER
    }
    rows = []
    for run in runs:
        student = students.get(run.pk)
        teacher = None
        if run.teacher_id and student is not None:
            teacher = teachers.get((run.teacher_id, run.experiment.dataset_id, student.split_key))
        rows.append(CompareRow(run, student, teacher, metric))
    shown_teachers = list({e.pk: e for e in (r.teacher_evaluation for r in rows) if e is not None}.values())
    columns = evaluation_metric_names([r.evaluation for r in rows if r.evaluation], primary=metric)
    return Comparison(rows=rows, metric=metric, columns=columns, teachers=shown_teachers,
                      config=config_diff([r.config for r in runs]),
                      grid=sweep_grid([r.config for r in runs], [row.quality for row in rows]))
