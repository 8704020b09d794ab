"""Reads for the leaderboard and benchmarks: each finished run's evaluation beside its teacher's and its
hard-label baseline, per split, ranked by the primary metric of its task."""

from __future__ import annotations

import hashlib
import math
import statistics
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, NamedTuple

from django.db.models import (
    Case,
    Count,
    F,
    FloatField,
    JSONField,
    Max,
    Prefetch,
    Q,
    QuerySet,
    Value,
    ValueRange,
    When,
    Window,
    prefetch_related_objects,
)
from django.db.models.fields.json import KeyTextTransform, KeyTransform
from django.db.models.functions import Cast, Coalesce

from experiments.domain import sweep_plan
from experiments.domain.compare import Latency, Speedup, latency_of
from experiments.domain.compare import speedup as speedup_of
from experiments.domain.leaderboard import pareto_flags, sample_std
from experiments.models import (
    DatasetSpec,
    Evaluation,
    Experiment,
    LeaderboardBoard,
    LeaderboardEntry,
    ModelSpec,
    Recipe,
    Run,
)
from experiments.selectors import footprint
from experiments.selectors import records as records_reads


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
    latency: Latency | None = None
    """The batch-1 latency with its spread and setting (of the row's last seed with one)."""
    teacher_latency: Latency | None = None
    higher_is_better: bool = True
    rank: int = 0
    pareto: bool = False
    lora_r: int = 0
    """The LoRA rank the row's runs trained (0: full fine-tuning); their final models hold it merged."""
    lora_4bit: bool = False
    stores: str = ""
    """The stores of teacher outputs the row's runs trained from (set for a page's rows, see
    ``experiments.selectors.teacher_stores.store_labels_for_runs``)."""

    @property
    def adapter(self) -> str:
        """"LoRA r=8, merged" for a row of LoRA runs; "" for full fine-tuning."""
        return footprint.adapter_text({"lora_r": self.lora_r, "lora_4bit": self.lora_4bit})

    @property
    def family(self) -> str:
        """The student's family (``mlp``, ``bert``, …; see :func:`model_family`)."""
        return records_reads.model_family(self.student)

    @property
    def compression(self) -> float | None:
        """Teacher parameters / student parameters."""
        return self.teacher_params / self.params if self.teacher_params and self.params else None

    @property
    def speedup(self) -> float | None:
        """Teacher latency / student latency (batch 1, on the workers that measured them); pages show
        :attr:`speedup_interval` instead."""
        return (
            self.teacher_latency_ms / self.latency_ms if self.teacher_latency_ms and self.latency_ms else None
        )

    @property
    def speedup_interval(self) -> Speedup | None:
        """The speedup with its interval and setting mark; None unless both latencies carry a spread."""
        return speedup_of(self.teacher_latency, self.latency)

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
        return (
            self.mean / self.teacher_accuracy if self.higher_is_better else self.teacher_accuracy / self.mean
        )

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
    """A score on ``metric`` from an evaluation's accuracy column and the metric's raw JSON value (None when
    it was not measured, or is not a number)."""
    if metric.name == "accuracy" and accuracy is not None:
        return accuracy
    return float(raw) if isinstance(raw, int | float) and not isinstance(raw, bool) else None


def _metric_value(evaluation: Evaluation, metric: PrimaryMetric) -> float | None:
    return _score(evaluation.accuracy, (evaluation.metrics or {}).get(metric.name), metric)


def metric_value(evaluation: Evaluation | None, metric: PrimaryMetric) -> float | None:
    """An evaluation's score on ``metric`` (None when it was not measured)."""
    return _metric_value(evaluation, metric) if evaluation is not None else None


def evaluation_metric_names(
    evaluations: Iterable[Evaluation], *, primary: PrimaryMetric
) -> list[PrimaryMetric]:
    """The quality metrics present in ``evaluations``: the primary one first, then in QUALITY_METRICS
    order."""
    present = {
        name
        for e in evaluations
        for name, metric in QUALITY_METRICS.items()
        if _metric_value(e, metric) is not None
    }
    return [primary] + [m for name, m in QUALITY_METRICS.items() if name in present and name != primary.name]


def _leaderboard_scope(
    *, user, dataset: DatasetSpec, split_key: str | None, scope: str
) -> QuerySet[Evaluation]:
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
    return records_reads.scoped(qs, user, team_field="run__team")


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
    lora_r: Any
    lora_4bit: Any
    latency_p25: Any
    latency_p75: Any
    latency_min: Any
    latency_max: Any
    efficiency_setting: Any
    dataset_id: int
    split: str
    team_id: int

    def value(self, metric: PrimaryMetric) -> float | None:
        return _score(self.accuracy, self.metric_raw, metric)

    @property
    def latency(self) -> Latency | None:
        return _latency(self, self.latency_ms)


_BOARD_FIELDS = ("pk", "run_id", "split_key", "accuracy", "metric_raw", "param_count", "latency_ms",
                 "run__experiment_id", "run__student_id", "run__recipe_id", "run__stage", "run__seed",
                 "run__is_baseline", "lora_r", "lora_4bit", "latency_p25", "latency_p75", "latency_min",
                 "latency_max", "efficiency_setting", "dataset_id", "split", "run__team_id")
# The latency's spread and setting (see experiments.domain.compare.latency_of), read out of the metrics JSON.
_LATENCY_KEYS = {"latency_p25": "latency_ms_p25", "latency_p75": "latency_ms_p75",
                 "latency_min": "latency_ms_min", "latency_max": "latency_ms_max",
                 "efficiency_setting": "efficiency_setting"}
_BOARD_LATENCY = {name: KeyTransform(key, "metrics") for name, key in _LATENCY_KEYS.items()}


def _latency(source: Any, median: float | None) -> Latency | None:
    """The latency of a board evaluation or an annotated teacher evaluation (see :data:`_BOARD_LATENCY`)."""
    return latency_of({key: getattr(source, name, None) for name, key in _LATENCY_KEYS.items()}, median)
# The run's adapter (a LoRA student is exported merged), read from its frozen config in the same query.
_BOARD_ADAPTER = {
    "lora_r": KeyTransform("lora_r", KeyTransform("train", "run__config")),
    "lora_4bit": KeyTransform("lora_4bit", KeyTransform("train", "run__config")),
}


# The parts of a run's frozen config that hold swept values (read only for runs of experiments that sweep).
_LEADERBOARD_SWEEP_PARTS = {
    "sweep_train": KeyTransform("train", "run__config"),
    "sweep_terms": KeyTransform("terms", "run__config"),
    "sweep_labelled_fraction": KeyTransform("labelled_fraction", KeyTransform("dataset", "run__config")),
}


def _board_evaluations(
    qs: QuerySet[Evaluation], metric: PrimaryMetric | None, swept_experiments: Sequence[int]
) -> tuple[list[_BoardEval], dict[int, dict[str, Any]]]:
    """The benchmark's evaluations as :class:`_BoardEval` rows, with ``metric`` read out of the metrics JSON
    in SQL (``metric=None``: ``metric_raw`` holds the whole metrics JSON), and for the runs of
    ``swept_experiments`` the parts of their frozen config that hold swept values
    (evaluation id → config parts shaped like the config for ``sweep_plan.config_value``). One query."""
    raw = KeyTransform(metric.name, "metrics") if metric is not None else F("metrics")
    rows = qs.annotate(metric_raw=raw, **_BOARD_ADAPTER, **_BOARD_LATENCY).order_by("run_id")
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
        value = sweep_plan.config_value(config, axis)
        point.append(
            (axis, value if isinstance(value, int | float | str | bool) or value is None else repr(value))
        )
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
    metric_raw = KeyTransform(metric.name, "metrics")
    annotated = qs.defer("metrics").annotate(metric_raw=metric_raw, **_BOARD_LATENCY)
    return {(e.model_id, e.split_key): e for e in annotated if _teacher_value(e, metric) is not None}


def _teacher_value(evaluation: Evaluation, metric: PrimaryMetric) -> float | None:
    return _score(evaluation.accuracy, getattr(evaluation, "metric_raw", None), metric)


# What a leaderboard never reads of the records its rows name: frozen JSON configs, texts and weights.
_BOARD_EXPERIMENT_DEFERRED = ("description", "teacher_weights", "seeds", "teacher__config", "teacher__notes")


_BOARD_MODEL_DEFERRED = ("notes", "parent__notes", "parent__config")


def _sweep_points(
    evaluations: Sequence[_BoardEval],
    *,
    trains: dict[int, dict],
    axes_of: dict[int, list],
    configs: dict[int, dict],
) -> dict[int, tuple[str, tuple, tuple]]:
    """Evaluation id → (sweep label, point of the experiment's sweep, point of its training-setting sweep)."""
    points: dict[int, tuple[str, tuple, tuple]] = {}
    for e in evaluations:
        train, axes = trains[e.experiment_id], axes_of[e.experiment_id]
        if not axes:
            points[e.pk] = ("", (), ())
            continue
        config = configs.get(e.pk, {})
        points[e.pk] = (sweep_plan.run_label(train=train, config=config), _sweep_point(train, config, axes),
                        _sweep_point(train, config, list(sweep_plan.train_axes(train))))
    return points


def _baselines(
    evaluations: Sequence[_BoardEval],
    *,
    values: dict[int, float | None],
    points: dict[int, tuple[str, tuple, tuple]],
) -> tuple[dict[tuple[int, int, int, tuple], float], dict[tuple[int, int, int], float]]:
    """The baseline values per (experiment, student, seed, training-setting point), and per (experiment,
    student, seed) where that experiment has exactly one baseline value for the student and seed."""
    baseline: dict[tuple[int, int, int, tuple], float] = {}
    by_seed: dict[tuple[int, int, int], set[float]] = defaultdict(set)
    for e in evaluations:
        value = values[e.pk]
        if e.is_baseline and value is not None:
            baseline[(e.experiment_id, e.student_id, e.seed, points[e.pk][2])] = value
            by_seed[(e.experiment_id, e.student_id, e.seed)].add(value)
    sole_baseline = {key: next(iter(found)) for key, found in by_seed.items() if len(found) == 1}
    return baseline, sole_baseline


def _leaderboard_rows(qs: QuerySet[Evaluation], teachers: dict[tuple[int, str], Evaluation],
                      metric: PrimaryMetric) -> list[LeaderboardRow]:
    """Group the student evaluations of ``qs`` into rows per (experiment, student, recipe, stage, point of the
    experiment's sweep) and rank them: the seeds of one point are averaged, different points are different
    rows.

    KD gain pairs each distilled run with the hard-label baseline of the same experiment, student and seed
    trained with the same training settings (baselines follow the training-setting sweep, not the term
    sweeps); when there is none, with the experiment's baseline for that student and seed if it has exactly
    one.

    Four queries whatever the row count: the experiments of the board (whose ``train`` names what they
    sweep), the evaluations as plain values (with the swept parts of their runs' configs), then the students
    and recipes they name.
    """
    experiments = {
        x.pk: x
        for x in Experiment.objects.filter(pk__in=qs.order_by().values("run__experiment_id"))
        .select_related("team", "teacher")
        .defer(*_BOARD_EXPERIMENT_DEFERRED)
    }
    trains = {pk: x.train if isinstance(x.train, dict) else {} for pk, x in experiments.items()}
    axes_of = {pk: sweep_plan.experiment_axes(train) for pk, train in trains.items()}
    evaluations, configs = _board_evaluations(qs, metric, {pk for pk, axes in axes_of.items() if axes})
    if not evaluations:
        return []
    students = ModelSpec.objects.select_related("parent").defer(*_BOARD_MODEL_DEFERRED) \
        .in_bulk({e.student_id for e in evaluations})
    recipes = Recipe.objects.defer("description", "terms", "scheme_params") \
        .in_bulk({e.recipe_id for e in evaluations})
    points = _sweep_points(evaluations, trains=trains, axes_of=axes_of, configs=configs)
    values = {e.pk: e.value(metric) for e in evaluations}
    baseline, sole_baseline = _baselines(evaluations, values=values, points=points)
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
                lora_r=footprint.lora_rank({"lora_r": e.lora_r}), lora_4bit=bool(e.lora_4bit),
            )
        row.run_ids.append(e.run_id)
        row.accuracies.append(value)
        row.params = e.params or row.params
        if e.latency_ms is not None:
            row.latency_ms, row.latency = e.latency_ms, e.latency
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
            row.teacher_latency = _latency(teacher_eval, teacher_eval.latency_ms)
    ranked = sorted(rows.values(), key=lambda r: (-sign * r.mean, r.params or 0))
    for i, row in enumerate(ranked, 1):
        row.rank = i
    return ranked


# --- summary rows (LeaderboardEntry): what the leaderboard page reads ------------------------------------
def leaderboard_entry_values(*, experiment_ids: Iterable[int]) -> list[dict[str, Any]]:
    """The field values of the summary rows of these experiments: their finished student evaluations grouped
    as :func:`_leaderboard_rows` groups them, per dataset and eval split, scored on every quality metric at
    once (values, KD gains and run ids per metric; the KD gain pairs runs with baselines exactly as the full
    computation does). Rows hold a row's size and latency from its last evaluation that has them; a score
    that is not a finite number is left out (JSON cannot hold it).
    """
    ids = sorted(set(experiment_ids))
    qs = Evaluation.objects.filter(role=Evaluation.Role.STUDENT, run__status=Run.Status.SUCCEEDED,
                                   run__experiment_id__in=ids)
    trains = {pk: train if isinstance(train, dict) else {}
              for pk, train in Experiment.objects.filter(pk__in=ids).values_list("pk", "train")}
    axes_of = {pk: sweep_plan.experiment_axes(train) for pk, train in trains.items()}
    evaluations, configs = _board_evaluations(qs, None, [pk for pk, axes in axes_of.items() if axes])
    if not evaluations:
        return []
    points = _sweep_points(evaluations, trains=trains, axes_of=axes_of, configs=configs)
    # Families as the page names them (a derived student takes its parent's).
    students = ModelSpec.objects.select_related("parent").defer(*_BOARD_MODEL_DEFERRED) \
        .in_bulk({e.student_id for e in evaluations})
    tasks = dict(DatasetSpec.objects.filter(pk__in={e.dataset_id for e in evaluations})
                 .values_list("pk", "task"))
    trainers = set(ModelSpec.objects.filter(source_run__experiment_id__in=ids,
                                            teacher_experiments__isnull=False)
                   .values_list("source_run_id", flat=True))
    boards: dict[tuple[int, str], list[_BoardEval]] = defaultdict(list)
    for e in evaluations:
        boards[(e.dataset_id, e.split_key)].append(e)
    entries: list[dict[str, Any]] = []
    for (dataset_id, split_key), board in boards.items():
        task = tasks[dataset_id]
        groups = _entry_groups(board, points=points, students=students, trainers=trainers,
                               dataset_id=dataset_id, split_key=split_key, task=task)
        for metric in QUALITY_METRICS.values():
            _entry_scores(board, groups, points=points, metric=metric)
        primary = PRIMARY_METRICS.get(task, PRIMARY_METRICS["classification"])
        for group in groups.values():
            group["means"] = {name: statistics.fmean(s["values"]) for name, s in group["stats"].items()}
            group["score"] = group["means"].get(primary.name)
            entries.append(group)
    return entries


def board_values(*, team_id: int, dataset_id: int, split_key: str) -> dict[str, Any] | None:
    """The field values of one board's ``LeaderboardBoard`` row, from its summary rows (None when it has
    none): the split's label and counts, the metrics present and, per metric, the rows ranked on it, their
    (recipe, family) pairs and the Pareto frontier with each frontier row's rank — exactly what
    :func:`leaderboard_benchmark` would compute over every row of the board. Reads the board's rows once."""
    rows = list(LeaderboardEntry.objects.filter(team_id=team_id, dataset_id=dataset_id, split_key=split_key)
                .order_by("first_run_id", "pk")
                .values_list("pk", "task", "split", "first_run_id", "evaluations", "params", "means",
                             "recipe_id", "family", "trains_teacher"))
    if not rows:
        return None
    first_run_id = rows[0][3]
    split = min(r[2] for r in rows)
    config = Run.objects.filter(pk=first_run_id).values_list("config__dataset", flat=True).first()
    present = {name for r in rows for name in (r[6] or {})}
    ranked = {}
    for name, metric in QUALITY_METRICS.items():
        if name not in present:
            continue
        sign = 1.0 if metric.higher_is_better else -1.0
        # (id, params, mean, first run, recipe, family) of the rows ranked on the metric, in rank order.
        scored = sorted(((r[0], r[5], r[6][name], r[3], r[7], r[8]) for r in rows
                         if not r[9] and r[6] and name in r[6]),
                        key=lambda t: (-sign * t[2], t[1] or 0, t[3]))
        flags = pareto_flags([(t[1], t[2]) for t in scored], higher_is_better=metric.higher_is_better)
        ranked[name] = {
            "count": len(scored),
            "options": sorted({(t[4], t[5]) for t in scored}),
            "frontier": [[t[0], t[1], t[2], rank] for rank, (t, flag) in enumerate(zip(scored, flags,
                                                                                        strict=True), 1)
                         if flag],
        }
    return {
        "team_id": team_id, "dataset_id": dataset_id, "split_key": split_key, "task": rows[0][1],
        "split": split, "split_label": _split_label(split, split_key, config)[:200],
        "evaluations": sum(r[4] for r in rows), "first_run_id": first_run_id,
        "metrics": [name for name in QUALITY_METRICS if name in present], "ranked": ranked,
    }


def _row_key(e: _BoardEval, points: dict[int, tuple[str, tuple, tuple]]) -> tuple:
    return (e.experiment_id, e.student_id, e.recipe_id, e.stage, points[e.pk][1])


def _entry_groups(board: Sequence[_BoardEval], *, points: dict[int, tuple[str, tuple, tuple]],
                  students: dict[int, ModelSpec], trainers: set[int], dataset_id: int, split_key: str,
                  task: str) -> dict[tuple, dict[str, Any]]:
    """The summary rows of one dataset and split, keyed like the leaderboard's rows, without their scores."""
    groups: dict[tuple, dict[str, Any]] = {}
    for e in board:
        key = _row_key(e, points)
        group = groups.get(key)
        if group is None:
            group = groups[key] = {
                "team_id": e.team_id, "experiment_id": e.experiment_id, "dataset_id": dataset_id,
                "task": task, "split": e.split, "split_key": split_key, "student_id": e.student_id,
                "recipe_id": e.recipe_id,
                "stage": e.stage, "sweep": points[e.pk][0],
                "point_key": hashlib.sha256(repr(key[4]).encode()).hexdigest(),
                "is_baseline": e.is_baseline, "trains_teacher": False,
                "family": records_reads.model_family(students[e.student_id]),
                "lora_r": footprint.lora_rank({"lora_r": e.lora_r}), "lora_4bit": bool(e.lora_4bit),
                "first_run_id": e.run_id, "evaluations": 0, "params": None, "latency_ms": None, "latency": {},
                "stats": {},
            }
        group["evaluations"] += 1
        group["split"] = min(group["split"], e.split)
        group["trains_teacher"] = group["trains_teacher"] or e.run_id in trainers
        group["params"] = e.params or group["params"]
        if e.latency_ms is not None:
            group["latency_ms"] = e.latency_ms
            group["latency"] = {key: getattr(e, name) for name, key in _LATENCY_KEYS.items()
                                if getattr(e, name) is not None}
    return groups


def _entry_scores(board: Sequence[_BoardEval], groups: dict[tuple, dict[str, Any]], *,
                  points: dict[int, tuple[str, tuple, tuple]], metric: PrimaryMetric) -> None:
    """Add each row's values, KD gains and run ids on ``metric`` (as :func:`_leaderboard_rows` computes
    them) to ``groups``."""
    values: dict[int, float | None] = {}
    for e in board:
        value = _score(e.accuracy, (e.metric_raw or {}).get(metric.name), metric)
        values[e.pk] = value if value is not None and math.isfinite(value) else None
    if all(v is None for v in values.values()):
        return
    baseline, sole_baseline = _baselines(board, values=values, points=points)
    sign = 1.0 if metric.higher_is_better else -1.0
    for e in board:
        value = values[e.pk]
        if value is None:
            continue
        stats = groups[_row_key(e, points)]["stats"].setdefault(
            metric.name, {"values": [], "gains": [], "run_ids": []}
        )
        stats["values"].append(value)
        stats["run_ids"].append(e.run_id)
        if not e.is_baseline:
            base = baseline.get((e.experiment_id, e.student_id, e.seed, points[e.pk][2]))
            if base is None:
                base = sole_baseline.get((e.experiment_id, e.student_id, e.seed))
            if base is not None:
                stats["gains"].append(sign * (value - base))


def leaderboard(
    *,
    user,
    dataset: DatasetSpec,
    metric: PrimaryMetric | None = None,
    split_key: str | None = None,
    scope: str = "team",
) -> list[LeaderboardRow]:
    """Rows per (experiment, student, recipe, stage, sweep point), ranked by ``metric`` (mean over seeds;
    default the dataset's primary metric): accuracy for classification, perplexity (lower is better) for
    causal LMs, cosine to the teacher for embeddings. ``accuracies`` then hold that metric; gains and
    retention are oriented so that positive / above 100% means better.

    KD gain pairs each distilled run with the hard-label baseline of the same experiment, student, seed and
    training settings (see :func:`_leaderboard_rows`); retention divides by the teacher's score on the same
    eval split. ``split_key`` keeps one eval split (all when None); ``scope`` is "team" (this dataset record)
    or "global" (see :func:`_leaderboard_scope`). A constant number of queries whatever the row count.
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


class RankedRows(Sequence[LeaderboardRow]):
    """The rows of a leaderboard that fit its filters, ranked, read from the summary rows one slice at a time:
    ``len()`` is one COUNT and ``rows[a:b]`` one indexed ORDER BY … LIMIT (Django's and the API's paginators
    read a page that way), so a page costs the same whatever the number of rows on the board. Iterating reads
    every row (the CSV export), in chunks."""

    CHUNK = 500

    def __init__(self, entries: QuerySet[LeaderboardEntry], *, metric: PrimaryMetric,
                 teachers: dict[tuple[int, str], Evaluation], optimal: QuerySet | set[int] | None = None,
                 ranks: dict[int, int] | None = None, count: int | None = None) -> None:
        self._entries = entries
        self._metric = metric
        self._teachers = teachers
        self._optimal = optimal
        self._optimal_ids: set[int] | None = set(optimal) if isinstance(optimal, set) else None
        self._ranks_known = ranks
        self._count = count
        self._loaded: dict[int, LeaderboardEntry] = {}  # the rows the pages read, by id

    def optimal_ids(self) -> set[int]:
        """The ids of the summary rows on the Pareto frontier of the rows that fit (given, or one narrow
        query)."""
        if self._optimal_ids is None:
            self._optimal_ids = set(self._optimal) if self._optimal is not None else set()
        return self._optimal_ids

    def count(self) -> int:
        if self._count is None:
            self._count = self._entries.order_by().count()
        return self._count

    def __len__(self) -> int:
        return self.count()

    def __bool__(self) -> bool:
        return self.count() > 0

    def __getitem__(self, index):  # type: ignore[override]
        if not isinstance(index, slice):
            index = index + self.count() if index < 0 else index
            rows = self[index:index + 1]
            if not rows:
                raise IndexError(index)
            return rows[0]
        if index.step not in (None, 1):
            raise ValueError("RankedRows slices take no step")
        start, stop = index.start or 0, index.stop
        if start < 0 or (stop is not None and stop < 0):
            start, stop, _ = index.indices(self.count())
        if stop is not None and stop <= start:
            return []
        entries = list(self._entries[start:stop])
        self._loaded.update((entry.pk, entry) for entry in entries)
        return self._rows(entries, start)

    def frontier(self) -> list[LeaderboardRow]:
        """The rows on the Pareto frontier of the rows that fit, best first (their rank is their place on the
        board: the number of better-ranked rows that fit, plus one)."""
        ids = self.optimal_ids()
        if not ids:
            return []
        entries = [self._loaded[pk] for pk in ids if pk in self._loaded]
        if missing := ids - self._loaded.keys():
            entries += self._with_records(list(self._entries.prefetch_related(None).filter(pk__in=missing)))
        ranks = self._ranks_known if self._ranks_known is not None else self._ranks(entries)
        rows = []
        for entry in sorted(entries, key=lambda e: ranks[e.pk]):
            row = _entry_row(entry, self._metric, self._teachers, pareto=True)
            row.rank = ranks[entry.pk]
            rows.append(row)
        return rows

    def _with_records(self, entries: list[LeaderboardEntry]) -> list[LeaderboardEntry]:
        """``entries`` with the records they name: those a page already read, the others fetched."""
        read = {(name, getattr(e, f"{name}_id")): getattr(e, name)
                for e in self._loaded.values() for name in ("experiment", "student", "recipe")}
        for entry in entries:
            for name in ("experiment", "student", "recipe"):
                if (record := read.get((name, getattr(entry, f"{name}_id")))) is not None:
                    setattr(entry, name, record)
        prefetch_related_objects(entries, *_row_records())  # what is still missing
        return entries

    def _ranks(self, entries: list[LeaderboardEntry]) -> dict[int, int]:
        """The places of a few rows among the rows that fit: one query counting the rows ranked above each."""
        above = {}
        for entry in entries:
            mean, params = entry.means[self._metric.name], entry.params or 0
            better = Q(ranked_mean__gt=mean) if self._metric.higher_is_better else Q(ranked_mean__lt=mean)
            tied = Q(ranked_mean=mean) & (Q(ranked_params__lt=params)
                                          | Q(ranked_params=params, first_run_id__lt=entry.first_run_id))
            above[f"above_{entry.pk}"] = Count("pk", filter=better | tied)
        counts = self._entries.order_by().aggregate(**above) if above else {}
        return {entry.pk: counts[f"above_{entry.pk}"] + 1 for entry in entries}

    def __iter__(self):
        start = 0
        while True:
            chunk = self[start:start + self.CHUNK]
            yield from chunk
            if len(chunk) < self.CHUNK:
                return
            start += self.CHUNK

    def _rows(self, entries: list[LeaderboardEntry], offset: int) -> list[LeaderboardRow]:
        optimal = self.optimal_ids() if entries else set()
        rows = []
        for rank, entry in enumerate(entries, offset + 1):
            row = _entry_row(entry, self._metric, self._teachers, pareto=entry.pk in optimal)
            row.rank = rank
            rows.append(row)
        return rows


def _entry_row(entry: LeaderboardEntry, metric: PrimaryMetric, teachers: dict[tuple[int, str], Evaluation],
               *, pareto: bool) -> LeaderboardRow:
    """A leaderboard row from a summary row."""
    stats = entry.stats.get(metric.name) or {}
    experiment = entry.experiment
    row = LeaderboardRow(
        experiment, entry.student, entry.recipe, experiment.teacher, entry.is_baseline, entry.stage,
        sweep=entry.sweep, run_ids=list(stats.get("run_ids", [])), accuracies=list(stats.get("values", [])),
        gains=list(stats.get("gains", [])), params=entry.params, higher_is_better=metric.higher_is_better,
        lora_r=entry.lora_r, lora_4bit=entry.lora_4bit,
    )
    if entry.latency_ms is not None:
        row.latency_ms, row.latency = entry.latency_ms, latency_of(entry.latency, entry.latency_ms)
    row.pareto = pareto
    teacher_eval = teachers.get((experiment.teacher_id, entry.split_key)) if experiment.teacher_id else None
    if teacher_eval is not None:
        row.teacher_accuracy = _teacher_value(teacher_eval, metric)
        row.teacher_params = teacher_eval.param_count
        row.teacher_latency_ms = teacher_eval.latency_ms
        row.teacher_latency = _latency(teacher_eval, teacher_eval.latency_ms)
    return row


@dataclass
class Benchmark:
    """One leaderboard: a dataset's eval split and a metric, with the options its page offers. ``rows`` are
    the ranked rows that fit the filters (a lazy :class:`RankedRows`); ``total`` counts the board's rows
    before the filters."""

    dataset: DatasetSpec
    metric: PrimaryMetric
    metrics: list[PrimaryMetric]
    split_key: str | None
    splits: list[SplitOption]
    scope: str
    rows: Sequence[LeaderboardRow]
    total: int = 0
    recipes: list[str] = field(default_factory=list)
    families: list[str] = field(default_factory=list)

    def frontier(self) -> list[LeaderboardRow]:
        """The rows on the Pareto frontier (quality vs parameters) of the rows that fit the filters."""
        if isinstance(self.rows, RankedRows):
            return self.rows.frontier()
        return [r for r in self.rows if r.pareto]


def _on_benchmark(qs: QuerySet, *, user, dataset: DatasetSpec, split_key: str | None, scope: str) -> QuerySet:
    """The rows of ``qs`` (summary rows or board rows) on the benchmark, scoped to the user's teams (staff:
    all); ``scope`` as in :func:`_leaderboard_scope`."""
    if scope == "global" and split_key:
        qs = qs.filter(split_key=split_key, task=dataset.task)
    else:
        qs = qs.filter(dataset=dataset)
        if split_key:
            qs = qs.filter(split_key=split_key)
    return records_reads.scoped(qs, user, team_field="team")


def _board_entries(*, user, dataset: DatasetSpec, split_key: str | None,
                   scope: str) -> QuerySet[LeaderboardEntry]:
    return _on_benchmark(LeaderboardEntry.objects.all(), user=user, dataset=dataset, split_key=split_key,
                         scope=scope)


def _boards(*, user, dataset: DatasetSpec, split_key: str | None, scope: str) -> QuerySet[LeaderboardBoard]:
    return _on_benchmark(LeaderboardBoard.objects.all(), user=user, dataset=dataset, split_key=split_key,
                         scope=scope)


def _split_options(boards: Sequence[LeaderboardBoard]) -> list[SplitOption]:
    """The eval splits of ``boards`` with their result counts, most results first, each labelled from the
    frozen dataset config of the first run evaluated on it."""
    merged: dict[str, LeaderboardBoard] = {}
    counts: dict[str, int] = defaultdict(int)
    for board in sorted(boards, key=lambda b: b.first_run_id):
        merged.setdefault(board.split_key, board)
        counts[board.split_key] += board.evaluations
    options = [SplitOption(key, board.split_label, counts[key]) for key, board in merged.items()]
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


def _board_metrics(boards: Sequence[LeaderboardBoard], *, primary: PrimaryMetric) -> list[PrimaryMetric]:
    """The quality metrics measured on the board (the primary one first, then in QUALITY_METRICS order)."""
    present = {name for board in boards for name in board.metrics}
    return [primary] + [m for name, m in QUALITY_METRICS.items() if name in present and name != primary.name]


def _board_frontier(boards: Sequence[LeaderboardBoard],
                    metric: PrimaryMetric) -> tuple[set[int], dict[int, int] | None]:
    """The ids of the Pareto-optimal rows of the boards on ``metric`` (no filters), with their ranks when one
    board holds them all (None: the rows of several teams' boards rank among each other, counted live). The
    frontier of several boards is the frontier of their frontiers: a row dominated on its own board is
    dominated on the union."""
    frontiers = [(board.ranked.get(metric.name) or {}).get("frontier", []) for board in boards]
    if len(boards) == 1:
        return {f[0] for f in frontiers[0]}, {f[0]: f[3] for f in frontiers[0]}
    points = [f for frontier in frontiers for f in frontier]
    flags = pareto_flags([(f[1], f[2]) for f in points], higher_is_better=metric.higher_is_better)
    return {f[0] for f, flag in zip(points, flags, strict=True) if flag}, None


def _has_metric(metric: PrimaryMetric, primary: PrimaryMetric) -> Q:
    """Summary rows scored on ``metric``: for the primary metric, those with a ``score`` (set exactly when its
    mean is, and indexed), else those whose ``means`` hold it."""
    return Q(score__isnull=False) if metric.name == primary.name else Q(means__has_key=metric.name)


def _mean_of(metric: PrimaryMetric, primary: PrimaryMetric):
    """The SQL expression of a summary row's mean on ``metric`` (the indexed ``score`` column for the
    dataset's primary metric)."""
    if metric.name == primary.name:
        return F("score")
    return Cast(KeyTextTransform(metric.name, "means"), FloatField())


class _SmallerRows(ValueRange):
    """The window frame of the rows strictly smaller than the current one: ``RANGE BETWEEN UNBOUNDED
    PRECEDING AND 1 PRECEDING`` over the whole-number parameter counts (Django builds only whole-row
    offsets)."""

    def window_frame_start_end(self, connection, start, end):
        return connection.ops.UNBOUNDED_PRECEDING, "1 PRECEDING"


def _fitting_entries(entries: QuerySet[LeaderboardEntry], *, metric: PrimaryMetric, primary: PrimaryMetric,
                     filters: Mapping[str, Any]) -> QuerySet[LeaderboardEntry]:
    """The summary rows scored on ``metric`` that fit ``filters`` (max_params, max_latency_ms, recipe,
    family), annotated with the mean they rank by and the size they tie-break on."""
    if filters.get("max_params") is not None:
        entries = entries.filter(params__isnull=False, params__lte=filters["max_params"])
    if filters.get("max_latency_ms") is not None:
        entries = entries.filter(latency_ms__isnull=False, latency_ms__lte=filters["max_latency_ms"])
    if filters.get("recipe"):
        entries = entries.filter(recipe__name=filters["recipe"])
    if filters.get("family"):
        entries = entries.filter(family=filters["family"])
    return entries.annotate(ranked_mean=_mean_of(metric, primary), ranked_params=Coalesce("params", 0))


def _ranked_entries(fitting: QuerySet[LeaderboardEntry], *,
                    metric: PrimaryMetric) -> QuerySet[LeaderboardEntry]:
    """The rows that fit, ranked best first (smaller first on ties, then in run order), with what a page shows
    of the records they name: an ORDER BY … LIMIT the (dataset, split, score) index serves."""
    mean = F("ranked_mean")
    return (
        fitting
        .prefetch_related(*_row_records())
        .order_by(mean.desc() if metric.higher_is_better else mean.asc(), "ranked_params", "first_run_id")
    )


def _row_records() -> tuple[Prefetch, ...]:
    """The records a row names, by id in three small queries: joining them in made Postgres spend ~10 ms
    choosing a join order for a query that runs in 1 ms."""
    return (
        Prefetch("experiment", queryset=Experiment.objects.select_related("team", "teacher")
                 .defer(*_BOARD_EXPERIMENT_DEFERRED)),
        Prefetch("student", queryset=ModelSpec.objects.select_related("parent")
                 .defer(*_BOARD_MODEL_DEFERRED)),
        Prefetch("recipe", queryset=Recipe.objects.defer("description", "terms", "scheme_params")),
    )


def _optimal_ids(fitting: QuerySet[LeaderboardEntry], *, metric: PrimaryMetric) -> QuerySet:
    """The ids of the rows that fit and are Pareto-optimal (quality vs parameters; as
    ``experiments.domain.leaderboard.pareto_flags``): the best at their size, and better than every strictly
    smaller row. Two window functions over the narrow (id, size, mean) of the rows that fit, in SQL."""
    sign = 1.0 if metric.higher_is_better else -1.0
    oriented = F("ranked_mean") * Value(sign)
    return (
        fitting.filter(params__isnull=False)
        .annotate(
            oriented=oriented,
            group_best=Window(Max(oriented), partition_by=[F("params")]),
            # -inf where no row is smaller (filters on window functions cannot use OR).
            cheaper_best=Coalesce(
                Window(Max(oriented), order_by=F("params").asc(), frame=_SmallerRows()),
                Value(float("-inf")), output_field=FloatField(),
            ),
        )
        .filter(oriented=F("group_best"), oriented__gt=F("cheaper_best"))
        .order_by()
        .values_list("pk", flat=True)
    )


def leaderboard_benchmark(*, user, dataset: DatasetSpec, metric_name: str = "", split_key: str = "",
                          scope: str = "team", filters: Mapping[str, Any] | None = None) -> Benchmark:
    """The leaderboard of one benchmark of ``dataset``: an eval split (default: the one with most results) and
    a quality metric (default: the dataset's primary metric), in the team or the global scope, its rows
    narrowed by ``filters`` (``max_params``, ``max_latency_ms``: an unknown size or latency does not fit;
    ``recipe``: a recipe name; ``family``: a student family) and ranked among themselves.

    Reads the board rows (``LeaderboardBoard``: the splits, the metrics present, the count, the recipe and
    family options, the Pareto frontier with its ranks) and the summary rows (``LeaderboardEntry``: one query
    per page), never the evaluations nor an aggregate over the board's rows: the cost does not grow with the
    rows beyond the page read. With filters, the rows that fit are counted and their frontier found over
    them. A run that trained the teacher of an experiment is the reference, not a competitor: its row is not
    ranked.
    """
    scope = "global" if scope == "global" else "team"
    team_boards = list(_boards(user=user, dataset=dataset, split_key=None, scope="team"))
    splits = _split_options(team_boards)
    keys = {o.key for o in splits}
    chosen = split_key if split_key in keys else (splits[0].key if splits else None)
    primary = primary_metric(dataset)
    if chosen is None:
        return Benchmark(dataset=dataset, metric=primary, metrics=[primary], split_key=None, splits=[],
                         scope=scope, rows=[])
    boards = list(_boards(user=user, dataset=dataset, split_key=chosen, scope=scope)) if scope == "global" \
        else [b for b in team_boards if b.split_key == chosen]
    metrics = _board_metrics(boards, primary=primary)
    metric = next((m for m in metrics if m.name == metric_name), primary)
    entries = _board_entries(user=user, dataset=dataset, split_key=chosen, scope=scope)
    board = entries.filter(_has_metric(metric, primary), trains_teacher=False)
    teachers = _leaderboard_teachers(dataset=dataset, split_key=chosen, scope=scope, metric=metric)
    filters = {k: v for k, v in (filters or {}).items()
               if k in ("max_params", "max_latency_ms", "recipe", "family") and v not in (None, "")}
    fitting = _fitting_entries(board, metric=metric, primary=primary, filters=filters)
    ranked = [b.ranked.get(metric.name) or {} for b in boards]
    total = sum(r.get("count", 0) for r in ranked)
    # The filter options: the board's (recipe, family) pairs by recipe id, then the names.
    pairs = {(recipe_id, family) for r in ranked for recipe_id, family in r.get("options", [])}
    names = dict(Recipe.objects.filter(pk__in={r for r, _ in pairs}).values_list("pk", "name"))
    options = {(names[r], family) for r, family in pairs if r in names}
    if filters:  # the frontier and the count of the rows that fit, over those rows
        optimal, ranks = _optimal_ids(fitting, metric=metric), None
    else:
        optimal, ranks = _board_frontier(boards, metric)
    rows = RankedRows(_ranked_entries(fitting, metric=metric), metric=metric, teachers=teachers,
                      optimal=optimal, ranks=ranks, count=None if filters else total)
    return Benchmark(
        dataset=dataset,
        metric=metric,
        metrics=metrics,
        split_key=chosen,
        splits=splits,
        scope=scope,
        rows=rows,
        total=total,
        recipes=sorted({recipe for recipe, _ in options}),
        families=sorted({family for _, family in options if family}),
    )


def leaderboard_datasets(*, user) -> QuerySet[DatasetSpec]:
    """The user's datasets with the number of finished student evaluations on each (rows on its
    leaderboard)."""
    finished = Q(evaluations__role=Evaluation.Role.STUDENT, evaluations__run__status=Run.Status.SUCCEEDED)
    return records_reads.dataset_spec_list(user=user).annotate(
        result_count=Count("evaluations", filter=finished)
    )
