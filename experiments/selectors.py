"""Reads. Every list is scoped to the teams the user belongs to (staff see everything)."""

from __future__ import annotations

import statistics
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from django.db.models import Count, OuterRef, Q, QuerySet, Subquery
from django.utils import timezone

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
    # Meta.ordering is dropped from GROUP BY queries, so order explicitly (newest first).
    return (
        _scoped(Experiment.objects.select_related("team", "teacher", "dataset", "created_by"), user)
        .annotate(run_count=Count("runs"), **{f"{s}_count": c for s, c in counts.items()})
        .order_by("-created_at", "-id")
    )


def run_list(*, user) -> QuerySet[Run]:
    return _scoped(Run.objects.select_related("experiment", "student", "teacher", "recipe", "team"), user)


def run_is_cancel_requested(*, run_id: int) -> bool:
    return Run.objects.filter(id=run_id, cancel_requested=True).exists()


def teacher_evaluation_exists(*, run: Run) -> bool:
    """Whether the run's teacher was already evaluated on this benchmark (then it is not measured again)."""
    from .engine_config import split_key

    if run.teacher_id is None:
        return False
    return Evaluation.objects.filter(
        role=Evaluation.Role.TEACHER, model_id=run.teacher_id, dataset_id=run.experiment.dataset_id,
        split="eval", split_key=split_key(run.config["dataset"]),
    ).exists()


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
    stage: str = ""
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

    @property
    def compression(self) -> float | None:
        """Teacher parameters / student parameters."""
        return self.teacher_params / self.params if self.teacher_params and self.params else None

    @property
    def speedup(self) -> float | None:
        """Teacher latency / student latency (batch 1, on the workers that measured them)."""
        return self.teacher_latency_ms / self.latency_ms if self.teacher_latency_ms and self.latency_ms else None

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
        """Student score / teacher score (inverted for lower-is-better metrics such as perplexity)."""
        if not self.teacher_accuracy or not self.mean:
            return None
        return self.mean / self.teacher_accuracy if self.higher_is_better else self.teacher_accuracy / self.mean

    @property
    def kd_gain(self) -> float | None:
        return statistics.fmean(self.gains) if self.gains and not self.is_baseline else None

    @property
    def kd_gain_std(self) -> float | None:
        return statistics.stdev(self.gains) if len(self.gains) > 1 and not self.is_baseline else None


@dataclass(frozen=True)
class PrimaryMetric:
    """What a dataset's leaderboard ranks by."""

    name: str
    label: str
    higher_is_better: bool
    percent: bool


PRIMARY_METRICS = {
    "classification": PrimaryMetric("accuracy", "Accuracy", True, True),
    "causal_lm": PrimaryMetric("perplexity", "Perplexity", False, False),
    "embedding": PrimaryMetric("cosine_to_teacher", "Cosine to teacher", True, False),
}


def primary_metric(dataset: DatasetSpec) -> PrimaryMetric:
    return PRIMARY_METRICS.get(dataset.task, PRIMARY_METRICS["classification"])


def _metric_value(evaluation: Evaluation, metric: PrimaryMetric) -> float | None:
    if metric.name == "accuracy":
        return evaluation.accuracy
    value = (evaluation.metrics or {}).get(metric.name)
    return float(value) if isinstance(value, int | float) else None


def leaderboard(*, user, dataset: DatasetSpec) -> list[LeaderboardRow]:
    """Rows per (experiment, student, recipe, stage), ranked by the dataset's primary metric (mean over seeds):
    accuracy for classification, perplexity (lower is better) for causal LMs, cosine to the teacher for
    embeddings. ``accuracies`` then hold that metric; gains and retention are oriented so that positive /
    above 100% means better.

    KD gain pairs each distilled run with the hard-label baseline of the same experiment, student and seed;
    retention divides by the teacher's accuracy on the same eval split. Three queries whatever the row count.
    """
    evaluations = list(
        Evaluation.objects.filter(dataset=dataset, role=Evaluation.Role.STUDENT, run__status=Run.Status.SUCCEEDED)
        .filter(Q(run__team__memberships__user=user) if not user.is_staff else Q())
        .select_related("run__experiment__teacher", "run__student", "run__recipe")
        .order_by("run_id")
    )
    metric = primary_metric(dataset)
    teachers: dict[tuple[int, str], Evaluation] = {
        (e.model_id, e.split_key): e
        for e in Evaluation.objects.filter(dataset=dataset, role=Evaluation.Role.TEACHER)
        if _metric_value(e, metric) is not None
    }
    baseline: dict[tuple[int, int, int], float] = {
        (e.run.experiment_id, e.run.student_id, e.run.seed): _metric_value(e, metric)
        for e in evaluations
        if e.run.is_baseline and _metric_value(e, metric) is not None
    }
    sign = 1.0 if metric.higher_is_better else -1.0
    rows: dict[tuple[int, int, int, str], LeaderboardRow] = {}
    for e in evaluations:
        value = _metric_value(e, metric)
        if value is None:
            continue
        run = e.run
        key = (run.experiment_id, run.student_id, run.recipe_id, run.stage)
        row = rows.get(key)
        if row is None:
            row = rows[key] = LeaderboardRow(
                run.experiment, run.student, run.recipe, run.experiment.teacher, run.is_baseline, run.stage
            )
        row.run_ids.append(run.id)
        row.accuracies.append(value)
        row.params = e.param_count or row.params
        row.latency_ms = e.latency_ms if e.latency_ms is not None else row.latency_ms
        base = baseline.get((run.experiment_id, run.student_id, run.seed))
        if base is not None and not run.is_baseline:
            row.gains.append(sign * (value - base))
        teacher_id = run.experiment.teacher_id
        teacher_eval = teachers.get((teacher_id, e.split_key)) if teacher_id else None
        if teacher_eval is not None and row.teacher_accuracy is None:
            row.teacher_accuracy = _metric_value(teacher_eval, metric)
            row.higher_is_better = metric.higher_is_better
            row.teacher_params = teacher_eval.param_count
            row.teacher_latency_ms = teacher_eval.latency_ms
    ranked = sorted(rows.values(), key=lambda r: (-sign * r.mean, r.params or 0))
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


# --- web UI reads -----------------------------------------------------------------------------------
def experiment_runs(*, experiment: Experiment) -> QuerySet[Run]:
    """The runs of one experiment for its runs table, each annotated with its student ``accuracy``."""
    student_accuracy = Evaluation.objects.filter(run=OuterRef("pk"), role=Evaluation.Role.STUDENT).values(
        "accuracy"
    )[:1]
    return (
        Run.objects.filter(experiment=experiment)
        .select_related("student", "recipe", "waiting_for")
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


def worker_online_count(*, offline_after_s: int) -> int:
    """Workers that are online and sent a heartbeat recently."""
    fresh = timezone.now() - timedelta(seconds=offline_after_s)
    return Worker.objects.filter(state=Worker.State.ONLINE, last_heartbeat__gte=fresh).count()


def leaderboard_datasets(*, user) -> QuerySet[DatasetSpec]:
    """The user's datasets with the number of finished student evaluations on each (rows on its leaderboard)."""
    finished = Q(evaluations__role=Evaluation.Role.STUDENT, evaluations__run__status=Run.Status.SUCCEEDED)
    return dataset_spec_list(user=user).annotate(result_count=Count("evaluations", filter=finished))
