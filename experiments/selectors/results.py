"""Reads for an experiment's Results card: once its runs have finished, the best student of each size with
its KD gain over the hard-label baseline, grouped exactly as the dataset's leaderboard groups them."""

from __future__ import annotations

from dataclasses import dataclass

from experiments.models import Evaluation, Experiment, Run
from experiments.selectors import leaderboard as leaderboard_reads
from experiments.selectors import records as records_reads

FINISHED = ("succeeded", "partly failed")
"""Experiment statuses (see ``records.experiment_status``) whose results are final."""


@dataclass(frozen=True)
class SizeResult:
    """The best row (mean over seeds) among the runs of one student size, and the baseline of that student."""

    params: int | None
    best: leaderboard_reads.LeaderboardRow
    baseline: leaderboard_reads.LeaderboardRow | None
    rows: int
    """How many rows (student × recipe × sweep point) of this size the best was chosen from."""


@dataclass(frozen=True)
class Results:
    metric: leaderboard_reads.PrimaryMetric
    sizes: list[SizeResult]
    teacher: float | None
    """The teacher's score on the same eval split (None when it was not evaluated)."""


def experiment_results(*, experiment: Experiment) -> Results | None:
    """The Results card of a finished experiment, or None while runs are queued or running (or none
    succeeded). Sizes are the students' parameter counts, smallest first; a student whose evaluation holds
    no count is a size of its own. Distilled rows are preferred at equal score to the baseline."""
    if records_reads.experiment_status(experiment) not in FINISHED:
        return None
    dataset = experiment.dataset
    metric = leaderboard_reads.primary_metric(dataset)
    evaluations = Evaluation.objects.filter(
        role=Evaluation.Role.STUDENT, run__status=Run.Status.SUCCEEDED, run__experiment=experiment
    )
    teachers = leaderboard_reads._leaderboard_teachers(dataset=dataset, split_key=None, scope="team",
                                                       metric=metric)
    rows = [r for r in leaderboard_reads._leaderboard_rows(evaluations, teachers, metric) if not r.stage]
    if not rows:
        return None
    by_size: dict[tuple[int, int], list[leaderboard_reads.LeaderboardRow]] = {}
    for row in rows:  # ranked best first
        key = (row.params, 0) if row.params else (0, row.student.pk)
        by_size.setdefault(key, []).append(row)
    sizes = []
    for (params, _), group in sorted(by_size.items()):
        top = group[0]
        best = next((r for r in group if not r.is_baseline and r.mean == top.mean), top)
        baseline = next((r for r in group if r.is_baseline and r.student.pk == best.student.pk), None)
        sizes.append(SizeResult(params or None, best, None if best.is_baseline else baseline, len(group)))
    teacher = next((r.teacher_accuracy for r in rows if r.teacher_accuracy is not None), None)
    return Results(metric=metric, sizes=sizes, teacher=teacher)
