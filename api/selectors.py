"""Reads the API needs beyond experiments.selectors; every one starts from a team-scoped selector there."""

from __future__ import annotations

import functools
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from types import SimpleNamespace

from django.db.models import (
    CharField,
    FloatField,
    IntegerField,
    JSONField,
    OuterRef,
    Prefetch,
    QuerySet,
    Subquery,
)
from django.db.models.expressions import RawSQL

from experiments.models import (
    DatasetSpec,
    Evaluation,
    Experiment,
    Membership,
    MetricPoint,
    ModelSpec,
    Recipe,
    Run,
    Team,
)
from experiments.selectors import leaderboard, records, teams

from .models import ApiToken


def team_list(*, user) -> QuerySet[Team]:
    """The user's teams (staff: all), each with the user's ``role`` in it (None where staff is no member)."""
    role = Membership.objects.filter(team=OuterRef("pk"), user=user).values("role")[:1]
    return teams.team_list(user=user).annotate(role=Subquery(role)).order_by("name")


def run_list(*, user) -> QuerySet[Run]:
    """Runs with what their rows show: dataset (for the primary metric) and the student's evaluation
    (``student_evaluations``, zero or one), in a constant number of queries."""
    student = Evaluation.objects.filter(role=Evaluation.Role.STUDENT)
    return (
        records.run_list(user=user)
        .select_related("experiment__dataset")
        .prefetch_related(Prefetch("evaluations", queryset=student, to_attr="student_evaluations"))
    )


# A listed run's own columns (``RunSerializer``'s fields that are not related records or computed).
RUN_ROW_COLUMNS = (
    "id", "team_id", "experiment_id", "student_id", "teacher_id", "recipe_id", "seed", "is_baseline", "stage",
    "status", "queue", "worker_name", "attempt", "step", "total_steps", "samples_per_s", "cancel_requested",
    "error", "waiting_for_id", "created_at", "started_at", "heartbeat_at", "finished_at",
)


def run_list_rows(*, user) -> QuerySet:
    """:func:`run_list` as plain rows (``values()``) for a page of the run list: :data:`RUN_ROW_COLUMNS` and
    the names the row shows (``team_name``, ``experiment_name``, ``student_name``, ``teacher_name``,
    ``recipe_name``, ``recipe_version``) with the dataset's task and the newest student evaluation's
    ``accuracy`` and ``metrics`` for the run's score, each one an index lookup per row of the page, in one
    query. Joining the seven tables instead cost Postgres' planner ~60 ms (its join-order search) for 1 ms of
    execution, and model instances cost more than the rows they carry."""

    return records.scoped(_run_rows().all(), user)


@functools.cache
def _run_rows() -> QuerySet:
    """Every run as :func:`run_list_rows`' plain rows, unscoped and never evaluated: a request clones it
    (``.all()``) and narrows the clone. Resolving the nine per-row lookups into a query cost more than
    running the page's query (~3 ms of CPU of a ~10 ms request), and they depend on no request, so that is
    done once per process."""
    return Run.objects.values(*RUN_ROW_COLUMNS, **_run_row_lookups())


@functools.cache
def _run_row_lookups() -> dict[str, RawSQL]:
    """:func:`run_list_rows`' per-row lookups: scalar subqueries on the run's own columns, each served by a
    primary key or the evaluations' run index. Written as SQL: compiling them from querysets on every
    request cost ~0.6 ms of CPU, more than Postgres takes to run them. Plain SQL that SQLite runs too."""
    run = Run._meta.db_table

    def one(model, column: str, fk: str, output) -> RawSQL:
        return RawSQL(f'SELECT "{column}" FROM "{model._meta.db_table}" WHERE "id" = "{run}"."{fk}"', (),
                      output_field=output)

    def newest_evaluation(column: str, output) -> RawSQL:
        return RawSQL(f'SELECT "{column}" FROM "{Evaluation._meta.db_table}" WHERE "run_id" = "{run}"."id" '
                      f'AND "role" = %s ORDER BY "created_at" DESC LIMIT 1', (Evaluation.Role.STUDENT.value,),
                      output_field=output)

    experiment, dataset = Experiment._meta.db_table, DatasetSpec._meta.db_table
    return {
        "team_name": one(Team, "name", "team_id", CharField()),
        "experiment_name": one(Experiment, "name", "experiment_id", CharField()),
        "dataset_task": RawSQL(f'SELECT d."task" FROM "{experiment}" x JOIN "{dataset}" d ON d."id" = '
                               f'x."dataset_id" WHERE x."id" = "{run}"."experiment_id"', (),
                               output_field=CharField()),
        "student_name": one(ModelSpec, "name", "student_id", CharField()),
        "teacher_name": one(ModelSpec, "name", "teacher_id", CharField()),
        "recipe_name": one(Recipe, "name", "recipe_id", CharField()),
        "recipe_version": one(Recipe, "version", "recipe_id", IntegerField()),
        "student_accuracy": newest_evaluation("accuracy", FloatField()),
        "student_metrics": newest_evaluation("metrics", JSONField()),
    }


@dataclass(frozen=True)
class RunRowRefs:
    """What a page of run rows names, by id: teams, experiments, models and recipes (id → name, recipes
    (name, version)), and each run's score on its dataset's primary metric (run id → (metric, value))."""

    teams: dict[int, str]
    experiments: dict[int, str]
    models: dict[int, str]
    recipes: dict[int, tuple[str, int]]
    metrics: dict[int, tuple[str, float | None]]


def run_row_refs(*, rows: Sequence[dict]) -> RunRowRefs:
    """The records a page of :func:`run_list_rows` names, and each run's score, from the rows themselves."""
    scores = {}
    for row in rows:
        metric = leaderboard.primary_metric(SimpleNamespace(task=row["dataset_task"]))
        evaluation = (
            SimpleNamespace(accuracy=row["student_accuracy"], metrics=row["student_metrics"])
            if row["student_accuracy"] is not None or row["student_metrics"] is not None
            else None
        )
        scores[row["id"]] = (metric.name, leaderboard.metric_value(evaluation, metric))
    models = {row["student_id"]: row["student_name"] for row in rows}
    models.update({row["teacher_id"]: row["teacher_name"] for row in rows if row["teacher_id"] is not None})
    return RunRowRefs(
        teams={row["team_id"]: row["team_name"] for row in rows},
        experiments={row["experiment_id"]: row["experiment_name"] for row in rows},
        models=models,
        recipes={row["recipe_id"]: (row["recipe_name"], row["recipe_version"]) for row in rows},
        metrics=scores,
    )


def run_primary_metric(run: Run) -> tuple[str, float | None]:
    """The run's score on its dataset's leaderboard metric (accuracy, perplexity, …): (name, value or None).

    Needs ``student_evaluations`` (see :func:`run_list`).
    """
    metric = leaderboard.primary_metric(run.experiment.dataset)
    evaluations = getattr(run, "student_evaluations", None)
    if evaluations is None:
        evaluations = list(run.evaluations.filter(role=Evaluation.Role.STUDENT))
    return metric.name, leaderboard.metric_value(evaluations[0] if evaluations else None, metric)


def run_metric_names(*, run: Run) -> list[str]:
    return list(
        MetricPoint.objects.filter(run=run).order_by("name").values_list("name", flat=True).distinct()
    )


def run_metric_points(*, run: Run, names: Sequence[str] = ()) -> dict[str, tuple[list[int], list[float]]]:
    """The run's curves (all, or only ``names``): name → (steps, values), ordered by step, in one query."""
    points = MetricPoint.objects.filter(run=run)
    if names:
        points = points.filter(name__in=names)
    series: dict[str, tuple[list[int], list[float]]] = defaultdict(lambda: ([], []))
    for name, step, value in (
        points.order_by("name", "step").values_list("name", "step", "value").iterator(chunk_size=5000)
    ):
        steps, values = series[name]
        steps.append(step)
        values.append(value)
    return dict(series)


def api_token_list(*, user) -> QuerySet[ApiToken]:
    return ApiToken.objects.filter(user=user).select_related("team")
