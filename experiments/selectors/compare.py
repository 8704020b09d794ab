"""Reads for comparing runs side by side: their configs, metrics and the differences between them."""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from django.db.models import (
    Q,
)

from experiments.domain import sweep_plan
from experiments.domain.compare import (
    MISSING,
    ConfigKey,
    Latency,
    Speedup,
    SweepGrid,
    config_diff,
    flatten_config,
    latency_of,
    speedup,
    sweep_grid,
)
from experiments.models import (
    Evaluation,
    Run,
)
from experiments.selectors import leaderboard as leaderboard_reads
from experiments.selectors import records


def compare_run_list(*, user, run_ids: Sequence[int]) -> list[Run]:
    """The runs among ``run_ids`` the user may see, in the order asked for, with what a comparison shows
    (experiment, dataset, teacher, student, recipe) in one query. Fewer runs than ids means some are not
    visible (or do not exist)."""
    runs = {
        r.pk: r
        for r in records.run_list(user=user)
        .filter(pk__in=run_ids)
        .select_related("experiment__dataset", "student__parent")
    }
    return [runs[i] for i in run_ids if i in runs]


@dataclass
class CompareRow:
    """One compared run with its final student evaluation and its teacher's on the same eval split."""

    run: Run
    evaluation: Evaluation | None
    teacher_evaluation: Evaluation | None
    metric: leaderboard_reads.PrimaryMetric

    @property
    def quality(self) -> float | None:
        return leaderboard_reads.metric_value(self.evaluation, self.metric) if self.evaluation else None

    @property
    def teacher_quality(self) -> float | None:
        return (
            leaderboard_reads.metric_value(self.teacher_evaluation, self.metric)
            if self.teacher_evaluation
            else None
        )

    @property
    def params(self) -> int | None:
        return self.evaluation.param_count if self.evaluation else None

    @property
    def latency_ms(self) -> float | None:
        return self.evaluation.latency_ms if self.evaluation else None

    @property
    def latency(self) -> Latency | None:
        """The batch-1 latency with its spread and the setting it was measured in."""
        return latency_of(self.evaluation.metrics, self.evaluation.latency_ms) if self.evaluation else None

    @property
    def speedup(self) -> Speedup | None:
        """Teacher latency / this run's, with its interval; None unless both carry a spread."""
        teacher = self.teacher_evaluation
        return speedup(latency_of(teacher.metrics, teacher.latency_ms) if teacher else None, self.latency)

    @property
    def retention(self) -> float | None:
        """Student score / teacher score, inverted for lower-is-better metrics."""
        student, teacher = self.quality, self.teacher_quality
        if not student or not teacher:
            return None
        return student / teacher if self.metric.higher_is_better else teacher / student

    def value(self, metric: leaderboard_reads.PrimaryMetric) -> float | None:
        return leaderboard_reads.metric_value(self.evaluation, metric) if self.evaluation else None


@dataclass
class Comparison:
    """What the compare page shows besides the curves."""

    rows: list[CompareRow]
    metric: leaderboard_reads.PrimaryMetric
    columns: list[leaderboard_reads.PrimaryMetric]
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
    def table(self) -> list[tuple[CompareRow, list[tuple[leaderboard_reads.PrimaryMetric, float | None]]]]:
        """Each run with its (column, value) cells."""
        return [(row, [(c, row.value(c)) for c in self.columns]) for row in self.rows]

    @property
    def teacher_table(
        self,
    ) -> list[tuple[Evaluation, list[tuple[leaderboard_reads.PrimaryMetric, float | None]]]]:
        return [(e, [(c, leaderboard_reads.metric_value(e, c)) for c in self.columns]) for e in self.teachers]


def run_comparison(*, runs: Sequence[Run]) -> Comparison:
    """Final evaluations, the config diff and the sweep grid of ``runs`` (from :func:`compare_run_list`), in
    one query. Quality is the primary metric of the task most of the runs share."""
    runs = list(runs)
    tasks: dict[str, int] = defaultdict(int)
    for run in runs:
        tasks[run.experiment.dataset.task] += 1
    task = max(tasks, key=lambda t: (tasks[t], t)) if tasks else "classification"
    metric = leaderboard_reads.PRIMARY_METRICS.get(task, leaderboard_reads.PRIMARY_METRICS["classification"])
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
    columns = leaderboard_reads.evaluation_metric_names(
        [r.evaluation for r in rows if r.evaluation], primary=metric
    )
    return Comparison(rows=rows, metric=metric, columns=columns, teachers=shown_teachers,
                      config=config_diff([r.config for r in runs]),
                      grid=sweep_grid([r.config for r in runs], [row.quality for row in rows]))


@dataclass(frozen=True)
class HeatmapAxes:
    """A sweep grid as the heatmap shows it: axes named for people (``student``, ``recipe``, ``lr``, ``τ``),
    levels by the students' and recipes' names rather than their JSON configs."""

    x_label: str
    y_label: str
    x_levels: list[str]
    y_levels: list[str]
    z: list[list[float | None]]


def _run_method(run: Run) -> str:
    return "baseline" if run.is_baseline else str(run.recipe)


# What a level of a grid axis can stand for, tried in order: the runs' students, then their recipes.
_NAMED_AXES: tuple[tuple[str, Callable[[Run], str]], ...] = (("student", lambda r: str(r.student)),
                                                             ("recipe", _run_method))


def _key_label(key: str) -> str:
    """A flattened config key as a short name: ``train.lr`` → ``lr``, ``terms.kd.params.temperature`` → ``τ``,
    ``terms.kd.weight`` → ``w_kd``."""
    parts = key.split(".")
    if parts[0] == "train" and len(parts) == 2:
        return parts[1]
    if parts[0] == "terms" and len(parts) == 4 and parts[2] == "params":
        return sweep_plan.axis_label(f"{parts[1]}.{parts[3]}", [])
    if parts[0] == "terms" and len(parts) == 3 and parts[2] == "weight":
        return sweep_plan.axis_label(f"{parts[1]}.weight", [])
    if parts[0] == "dataset" and len(parts) == 2:
        return parts[1].replace("_", " ")
    return key


def _level_text(level: str) -> str:
    """A JSON leaf as plain text (strings without their quotes)."""
    try:
        value = json.loads(level)
    except ValueError:
        return level
    return value if isinstance(value, str) else level


def _axis(key: str, levels: list[str], runs: Sequence[Run]) -> tuple[str, list[str]]:
    """The name and level labels of one grid axis. When each level holds exactly one student (or recipe)
    and different levels different ones, the axis is that: named ``student`` (``recipe``), its levels by
    name."""
    at = [flatten_config(r.config).get(key, MISSING) for r in runs]
    for label, name_of in _NAMED_AXES:
        names: dict[str, set[str]] = {level: set() for level in levels}
        for level, run in zip(at, runs, strict=True):
            names[level].add(name_of(run))
        if all(len(found) == 1 for found in names.values()):
            shown = [next(iter(names[level])) for level in levels]
            if len(set(shown)) == len(shown):
                return label, shown
    return _key_label(key), [_level_text(level) for level in levels]


def heatmap_axes(comparison: Comparison) -> HeatmapAxes | None:
    """The comparison's sweep grid with readable axes, or None when the runs do not form a grid."""
    grid = comparison.grid
    if grid is None:
        return None
    runs = [row.run for row in comparison.rows]
    x_label, x_levels = _axis(grid.x_key, grid.x_levels, runs)
    y_label, y_levels = _axis(grid.y_key, grid.y_levels, runs)
    return HeatmapAxes(x_label, y_label, x_levels, y_levels, grid.z)
