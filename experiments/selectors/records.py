"""Reads of the team's records: models, datasets, recipes, experiments and runs. Every list is scoped to the
teams the user belongs to (staff see everything)."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from django.db import connection
from django.db.models import (
    Count,
    Exists,
    F,
    OuterRef,
    QuerySet,
    Subquery,
)
from django.db.models.functions import Coalesce

from experiments.models import Artifact, DatasetSpec, Evaluation, Experiment, ModelSpec, Recipe, Run
from experiments.selectors import teams as teams_reads


def scoped(qs: QuerySet, user, *, team_field: str = "team") -> QuerySet:
    if (team_id := teams_reads.team_scope(user)) is not None:
        qs = qs.filter(**{f"{team_field}_id": team_id})
    return qs if user.is_staff else qs.filter(**{f"{team_field}__memberships__user": user})


def model_spec_list(*, user) -> QuerySet[ModelSpec]:
    return scoped(ModelSpec.objects.select_related("team", "source_run"), user)


def dataset_spec_list(*, user) -> QuerySet[DatasetSpec]:
    return scoped(DatasetSpec.objects.select_related("team"), user)


def recipe_list(*, user) -> QuerySet[Recipe]:
    return scoped(Recipe.objects.select_related("team"), user)


def recipe_latest_list(*, user) -> QuerySet[Recipe]:
    """The latest version of each of the user's recipes (the recipe page lists the others)."""
    newer = Recipe.objects.filter(
        team=OuterRef("team"), name=OuterRef("name"), version__gt=OuterRef("version")
    )
    return recipe_list(user=user).filter(~Exists(newer))


def recipe_versions(*, recipe: Recipe) -> list[Recipe]:
    """Every version of ``recipe`` (same team and name), the latest first."""
    return list(
        Recipe.objects.filter(team_id=recipe.team_id, name=recipe.name)
        .select_related("team", "created_by")
        .order_by("-version")
    )


RECIPE_USES_SHOWN = 200  # experiments listed per recipe page, newest first


def recipe_experiments(*, user, recipes: Iterable[Recipe]) -> dict[int, list[Experiment]]:
    """The user's experiments that used each of ``recipes`` (by recipe id), newest first."""
    ids = [r.pk for r in recipes]
    uses = scoped(
        Experiment.recipes.through.objects.filter(recipe_id__in=ids), user, team_field="experiment__team"
    ).order_by("-experiment__created_at", "-experiment_id")[:RECIPE_USES_SHOWN]
    experiments: dict[int, Experiment] = {}
    found: dict[int, list[Experiment]] = {pk: [] for pk in ids}
    rows = list(uses.values_list("recipe_id", "experiment_id"))
    for experiment in Experiment.objects.filter(pk__in={e for _, e in rows}).only("pk", "name", "created_at"):
        experiments[experiment.pk] = experiment
    for recipe_id, experiment_id in rows:
        found[recipe_id].append(experiments[experiment_id])
    return found


def _run_count(status: str | None = None) -> Coalesce:
    """The number of runs of the outer experiment (with ``status``), as a correlated subquery."""
    runs = Run.objects.filter(experiment=OuterRef("pk"))
    if status is not None:
        runs = runs.filter(status=status)
    return Coalesce(Subquery(runs.order_by().values("experiment").annotate(n=Count("pk")).values("n")), 0)


def experiment_list(*, user) -> QuerySet[Experiment]:
    """Experiments with their run counts per status, in one query.

    The counts are correlated subqueries (index-only scans of ``run_experiment_status``), not a join grouped
    by experiment: Postgres evaluates them after ORDER BY … LIMIT, for the rows of one page only, where a
    GROUP BY would count every run of every experiment before paging (and a page's COUNT(*) would count them
    again).
    """
    counts = {f"{s}_count": _run_count(s) for s in Run.Status.values}
    return (
        scoped(Experiment.objects.select_related("team", "teacher", "dataset", "created_by"), user)
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
    """The list page's experiments as plain values (``values()`` rows, sortable and pageable like the
    records): names and times, and the total run count (the list sorts by it). :func:`experiment_rows` turns
    one page of them into :class:`ExperimentRow` objects."""
    return (
        scoped(Experiment.objects.all(), user)
        .annotate(run_count=_run_count())
        .order_by("-created_at", "-id")
        .values("pk", "name", "created_at", "run_count", **_EXPERIMENT_ROW_VALUES)
    )


def experiment_rows(values: Iterable[Mapping[str, Any]]) -> list[ExperimentRow]:
    """One page of :func:`experiment_list_rows` as :class:`ExperimentRow` objects with their students, recipes
    and per-status run counts: three queries whatever the page size."""
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
    for experiment_id, name, version in recipes.values_list(
        "experiment_id", "recipe__name", "recipe__version"
    ):
        by_pk[experiment_id].recipes.append(Recipe.label(name, version))
    runs = Run.objects.filter(experiment_id__in=by_pk).order_by()
    for experiment_id, status, n in runs.values_list("experiment_id", "status").annotate(n=Count("pk")):
        setattr(by_pk[experiment_id], f"{status}_count", n)
    return rows


def run_list(*, user) -> QuerySet[Run]:
    return scoped(Run.objects.select_related("experiment", "student", "teacher", "recipe", "team"), user)


def run_is_cancel_requested(*, run_id: int) -> bool:
    return Run.objects.filter(id=run_id, cancel_requested=True).exists()


def database_incarnation() -> str | None:
    """When the database server last started (Postgres), read on this thread's connection; None where every
    commit is durable (SQLite). A restart, a crash's included, changes it: commits confirmed before the disk
    flush on an earlier incarnation may be lost, ones on the current incarnation are flushed by its next
    durable commit."""
    if connection.vendor != "postgresql":
        return None
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_postmaster_start_time()::text")
        return cursor.fetchone()[0]


def teacher_evaluation_exists(*, run: Run) -> bool:
    """Whether the run's teacher was already evaluated on this benchmark (then it is not measured again)."""
    from experiments.domain.engine_config import split_key

    if run.teacher_id is None:
        return False
    return Evaluation.objects.filter(
        role=Evaluation.Role.TEACHER, model_id=run.teacher_id, dataset_id=run.experiment.dataset_id,
        split="eval", split_key=split_key(run.config["dataset"]),
    ).exists()


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


def run_evaluations(*, run: Run) -> list[Evaluation]:
    """The student's evaluation of this run and the teacher's on the same eval split (either may be
    missing)."""
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
            role=Evaluation.Role.STUDENT,
            run__experiment_id=run.experiment_id,
            run__student_id=run.student_id,
            run__seed=run.seed,
            run__is_baseline=True,
            run__status=Run.Status.SUCCEEDED,
        )
        .exclude(run_id=run.pk)
        .order_by("-run_id")
        .first()
    )
