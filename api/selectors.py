"""Reads the API needs beyond experiments.selectors; every one starts from a team-scoped selector there."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

from django.db.models import OuterRef, Prefetch, QuerySet, Subquery

from experiments.models import Evaluation, Experiment, Membership, MetricPoint, ModelSpec, Recipe, Run, Team
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


def run_list_rows(*, user) -> QuerySet[Run]:
    """:func:`run_list` for a page of rows: the paged query reads the runs alone (with the team scope) and
    each kind of related record comes by id in one query of its own, with only what a row shows. One query
    joining the seven tables cost Postgres' planner ~60 ms (its join-order search) for 1 ms of execution."""
    names = ("id", "name")
    model_refs = ModelSpec.objects.only(*names)
    return (
        records.run_list(user=user)
        .select_related(None)
        .defer("config", "result")
        .prefetch_related(
            Prefetch("team", queryset=Team.objects.only(*names)),
            Prefetch("student", queryset=model_refs),
            Prefetch("teacher", queryset=model_refs),
            Prefetch("recipe", queryset=Recipe.objects.only(*names, "version")),
            Prefetch(
                "experiment",
                queryset=Experiment.objects.select_related("dataset").only(
                    *names, "dataset__id", "dataset__task"
                ),
            ),
            Prefetch(
                "evaluations",
                queryset=Evaluation.objects.filter(role=Evaluation.Role.STUDENT),
                to_attr="student_evaluations",
            ),
        )
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
