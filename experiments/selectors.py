"""Reads. Every list is scoped to the teams the user belongs to (staff see everything)."""

from __future__ import annotations

import statistics
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from django.db.models import Count, Q, QuerySet

from .models import DatasetSpec, Evaluation, Experiment, MetricPoint, ModelSpec, Recipe, Run, Team, Worker


def team_list(*, user) -> QuerySet[Team]:
    return Team.objects.all() if user.is_staff else Team.objects.filter(memberships__user=user)


def _scoped(qs: QuerySet, user) -> QuerySet:
    return qs if user.is_staff else qs.filter(team__memberships__user=user)


def model_spec_list(*, user) -> QuerySet[ModelSpec]:
    return _scoped(ModelSpec.objects.select_related("team", "source_run"), user)


def dataset_spec_list(*, user) -> QuerySet[DatasetSpec]:
    return _scoped(DatasetSpec.objects.select_related("team"), user)


def recipe_list(*, user) -> QuerySet[Recipe]:
    return _scoped(Recipe.objects.select_related("team"), user)


def experiment_list(*, user) -> QuerySet[Experiment]:
    """Experiments with their run counts per status, in one query."""
    counts = {s: Count("runs", filter=Q(runs__status=s)) for s in Run.Status.values}
    return _scoped(Experiment.objects.select_related("team", "teacher", "dataset", "created_by"), user).annotate(
        run_count=Count("runs"), **{f"{s}_count": c for s, c in counts.items()}
    )


def run_list(*, user) -> QuerySet[Run]:
    return _scoped(Run.objects.select_related("experiment", "student", "teacher", "recipe", "team"), user)


def run_is_cancel_requested(*, run_id: int) -> bool:
    return Run.objects.filter(id=run_id, cancel_requested=True).exists()


def run_metric_series(*, run: Run) -> dict[str, tuple[list[int], list[float]]]:
    """All metric curves of a run: name → (steps, values), ordered by step."""
    series: dict[str, tuple[list[int], list[float]]] = defaultdict(lambda: ([], []))
    rows = MetricPoint.objects.filter(run=run).order_by("name", "step").values_list("name", "step", "value")
    for name, step, value in rows.iterator(chunk_size=5000):
        steps, values = series[name]
        steps.append(step)
        values.append(value)
    return dict(series)


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
    run_ids: list[int] = field(default_factory=list)
    accuracies: list[float] = field(default_factory=list)
    gains: list[float] = field(default_factory=list)
    params: int | None = None
    latency_ms: float | None = None
    teacher_accuracy: float | None = None
    rank: int = 0

    @property
    def mean(self) -> float:
        return statistics.fmean(self.accuracies)

    @property
    def std(self) -> float:
        return statistics.stdev(self.accuracies) if len(self.accuracies) > 1 else 0.0

    @property
    def seeds(self) -> int:
        return len(self.accuracies)

    @property
    def retention(self) -> float | None:
        return self.mean / self.teacher_accuracy if self.teacher_accuracy else None

    @property
    def kd_gain(self) -> float | None:
        return statistics.fmean(self.gains) if self.gains and not self.is_baseline else None

    @property
    def kd_gain_std(self) -> float | None:
        return statistics.stdev(self.gains) if len(self.gains) > 1 and not self.is_baseline else None


def leaderboard(*, user, dataset: DatasetSpec) -> list[LeaderboardRow]:
    """Rows per (experiment, student, recipe), ranked by mean accuracy over seeds.

    KD gain pairs each distilled run with the hard-label baseline of the same experiment, student and seed;
    retention divides by the teacher's accuracy on the same eval split. Three queries whatever the row count.
    """
    evaluations = list(
        Evaluation.objects.filter(dataset=dataset, role=Evaluation.Role.STUDENT, run__status=Run.Status.SUCCEEDED)
        .filter(Q(run__team__memberships__user=user) if not user.is_staff else Q())
        .select_related("run__experiment__teacher", "run__student", "run__recipe")
        .order_by("run_id")
    )
    teacher_acc: dict[tuple[int, str], float] = {
        (e.model_id, e.split_key): e.accuracy
        for e in Evaluation.objects.filter(dataset=dataset, role=Evaluation.Role.TEACHER, accuracy__isnull=False)
    }
    baseline: dict[tuple[int, int, int], float] = {
        (e.run.experiment_id, e.run.student_id, e.run.seed): e.accuracy
        for e in evaluations
        if e.run.is_baseline and e.accuracy is not None
    }
    rows: dict[tuple[int, int, int], LeaderboardRow] = {}
    for e in evaluations:
        if e.accuracy is None:
            continue
        run = e.run
        key = (run.experiment_id, run.student_id, run.recipe_id)
        row = rows.get(key)
        if row is None:
            row = rows[key] = LeaderboardRow(
                run.experiment, run.student, run.recipe, run.experiment.teacher, run.is_baseline
            )
        row.run_ids.append(run.id)
        row.accuracies.append(e.accuracy)
        row.params = e.param_count or row.params
        row.latency_ms = e.latency_ms if e.latency_ms is not None else row.latency_ms
        base = baseline.get((run.experiment_id, run.student_id, run.seed))
        if base is not None and not run.is_baseline:
            row.gains.append(e.accuracy - base)
        teacher_id = run.experiment.teacher_id
        if teacher_id and row.teacher_accuracy is None:
            row.teacher_accuracy = teacher_acc.get((teacher_id, e.split_key))
    ranked = sorted(rows.values(), key=lambda r: (-r.mean, r.params or 0))
    for i, row in enumerate(ranked, 1):
        row.rank = i
    return ranked


def home_summary(*, user) -> dict[str, Any]:
    runs = run_list(user=user)
    return {
        "experiments": experiment_list(user=user)[:8],
        "runs": runs[:10],
        "active_runs": runs.filter(status__in=[Run.Status.QUEUED, Run.Status.RUNNING]).count(),
    }
