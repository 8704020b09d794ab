"""The leaderboard's summary rows (``LeaderboardEntry``): one per leaderboard row, recomputed for an
experiment in the same transaction as any write that changes its rows; and the board rows
(``LeaderboardBoard``), recomputed for every board whose rows changed, in that transaction too.

Evaluations are written by the run lifecycle (a run's success), and also by the admin, imports and fixtures;
a model registered from a run becomes a teacher when an experiment names it. So the summary follows the model
rows it is computed from (their post_save / post_delete signals), not one service: whichever code writes
them, the board stays equal to the full computation (``experiments.selectors.leaderboard``). Bulk loads
that bypass the ORM rebuild it with ``manage.py rebuild_leaderboard``.
"""

from __future__ import annotations

from collections.abc import Iterable

from django.db import transaction
from django.db.models.signals import post_delete, post_save
from django.dispatch import receiver

from experiments.models import Evaluation, Experiment, LeaderboardBoard, LeaderboardEntry, ModelSpec, Run
from experiments.selectors import leaderboard as leaderboard_reads

REBUILD_CHUNK = 200


def leaderboard_summary_refresh(*, experiment_ids: Iterable[int]) -> int:
    """Recompute the summary rows of these experiments; the number of rows written. The experiments' rows
    are locked first, so two runs of one experiment finishing together refresh it one after the other (the
    second sees the first's evaluation)."""
    ids = sorted({i for i in experiment_ids if i is not None})
    if not ids:
        return 0
    with transaction.atomic():
        ids = list(Experiment.objects.select_for_update().filter(pk__in=ids).order_by("pk")
                   .values_list("pk", flat=True))
        old = LeaderboardEntry.objects.filter(experiment_id__in=ids)
        boards = set(old.values_list("team_id", "dataset_id", "split_key").distinct())
        old.delete()
        values = leaderboard_reads.leaderboard_entry_values(experiment_ids=ids)
        LeaderboardEntry.objects.bulk_create(LeaderboardEntry(**v) for v in values)
        _refresh_boards(boards | {(v["team_id"], v["dataset_id"], v["split_key"]) for v in values})
    return len(values)


def _refresh_boards(boards: set[tuple[int, int, str]]) -> None:
    """Recompute these boards' rows from their summary rows. Each board row is locked first (created empty if
    missing), in one order, so two experiments of one board refreshing together do it one after the other and
    the second reads the first's rows."""
    if not boards:
        return
    keys = sorted(boards)
    LeaderboardBoard.objects.bulk_create(
        [LeaderboardBoard(team_id=t, dataset_id=d, split_key=k, first_run_id=0) for t, d, k in keys],
        ignore_conflicts=True,
    )
    for team_id, dataset_id, split_key in keys:
        board = LeaderboardBoard.objects.filter(team_id=team_id, dataset_id=dataset_id, split_key=split_key)
        list(board.select_for_update().values_list("pk", flat=True))  # wait for, then hold, the row's lock
        values = leaderboard_reads.board_values(team_id=team_id, dataset_id=dataset_id, split_key=split_key)
        if values is None:
            board.delete()
        else:
            board.update(**values)


def leaderboard_boards_rebuild() -> int:
    """Recompute every board row from the summary rows; the number of boards."""
    with transaction.atomic():
        LeaderboardBoard.objects.all().delete()
        boards = set(LeaderboardEntry.objects.values_list("team_id", "dataset_id", "split_key").distinct())
        _refresh_boards(boards)
    return len(boards)


def leaderboard_summary_rebuild() -> int:
    """Recompute every summary row (after a bulk load, or to repair); the number of rows written."""
    written = 0
    with transaction.atomic():
        LeaderboardEntry.objects.all().delete()
        ids = list(Experiment.objects.order_by("pk").values_list("pk", flat=True))
        for start in range(0, len(ids), REBUILD_CHUNK):
            chunk = ids[start:start + REBUILD_CHUNK]
            values = leaderboard_reads.leaderboard_entry_values(experiment_ids=chunk)
            LeaderboardEntry.objects.bulk_create((LeaderboardEntry(**v) for v in values), batch_size=1000)
            written += len(values)
        leaderboard_boards_rebuild()
    return written


def _refresh_after_commit(experiment_ids: list[int]) -> None:
    # A deletion may be part of a cascade that deletes the experiment too: refresh once it is committed.
    transaction.on_commit(lambda: leaderboard_summary_refresh(experiment_ids=experiment_ids))


def _run_experiment(run_id: int | None) -> list[int]:
    return list(Run.objects.filter(pk=run_id).values_list("experiment_id", flat=True)) if run_id else []


@receiver(post_save, sender=Evaluation, dispatch_uid="leaderboard_summary_evaluation_saved")
def _evaluation_saved(sender, instance: Evaluation, raw: bool = False, **kwargs) -> None:
    if not raw and instance.role == Evaluation.Role.STUDENT and instance.run_id:
        leaderboard_summary_refresh(experiment_ids=_run_experiment(instance.run_id))


@receiver(post_delete, sender=Evaluation, dispatch_uid="leaderboard_summary_evaluation_deleted")
def _evaluation_deleted(sender, instance: Evaluation, **kwargs) -> None:
    if instance.role == Evaluation.Role.STUDENT and instance.run_id:
        _refresh_after_commit(_run_experiment(instance.run_id))


@receiver(post_save, sender=Run, dispatch_uid="leaderboard_summary_run_saved")
def _run_saved(sender, instance: Run, raw: bool = False, created: bool = False, **kwargs) -> None:
    # A new run has no evaluation yet; a saved one may change status, seed or stage under its evaluation.
    if not raw and not created and Evaluation.objects.filter(run_id=instance.pk,
                                                              role=Evaluation.Role.STUDENT).exists():
        leaderboard_summary_refresh(experiment_ids=[instance.experiment_id])


@receiver(post_delete, sender=Run, dispatch_uid="leaderboard_summary_run_deleted")
def _run_deleted(sender, instance: Run, **kwargs) -> None:
    _refresh_after_commit([instance.experiment_id])


@receiver(post_save, sender=ModelSpec, dispatch_uid="leaderboard_summary_model_saved")
def _model_saved(sender, instance: ModelSpec, raw: bool = False, **kwargs) -> None:
    # A model trained by a run: whether that run trained a teacher changes when an experiment names it.
    if not raw and instance.source_run_id and instance.teacher_experiments.exists():
        leaderboard_summary_refresh(experiment_ids=_run_experiment(instance.source_run_id))


@receiver(post_save, sender=Experiment, dispatch_uid="leaderboard_summary_experiment_saved")
def _experiment_saved(sender, instance: Experiment, raw: bool = False, **kwargs) -> None:
    if raw or not instance.teacher_id:
        return
    source_run = ModelSpec.objects.filter(pk=instance.teacher_id) \
        .values_list("source_run_id", flat=True).first()
    if source_run:
        leaderboard_summary_refresh(experiment_ids=_run_experiment(source_run))
