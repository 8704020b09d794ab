"""Reads of teacher-output stores: a team's stores with their size, bytes/token, reuse count and runs, one
store's uses, and the stores runs used (the leaderboard, the run page and the model card name them)."""

from __future__ import annotations

from collections.abc import Iterable

from django.db.models import Count, Prefetch, Q, QuerySet

from experiments.models import Run, TeacherStore, TeacherStoreUse
from experiments.selectors.records import scoped

# The runs a list row links to; the detail page lists them all.
RUNS_SHOWN = 6


def store_list(*, user) -> QuerySet[TeacherStore]:
    """The stores of the user's teams (staff: all), each with ``reuse_count`` (uses that read it without
    computing it), ``run_count`` and its first uses (``shown_uses``, newest first)."""
    recent = TeacherStoreUse.objects.only("id", "run_id", "store_id", "filled").order_by("-id")
    return (
        scoped(TeacherStore.objects.select_related("team", "dataset", "teacher"), user)
        .annotate(reuse_count=Count("uses", filter=Q(uses__filled=False)),
                  run_count=Count("uses__run", distinct=True))
        .prefetch_related(Prefetch("uses", queryset=recent[:RUNS_SHOWN], to_attr="shown_uses"))
    )


def store_uses(*, store: TeacherStore) -> QuerySet[TeacherStoreUse]:
    """Every run that filled or reused ``store``, newest first, with its run, experiment and student."""
    return (TeacherStoreUse.objects.filter(store=store)
            .select_related("run__experiment", "run__student", "run__recipe").order_by("-id"))


def run_store_uses(*, run: Run) -> list[TeacherStoreUse]:
    """The stores ``run`` used (a deleted one by its label), train split first."""
    uses = TeacherStoreUse.objects.filter(run=run).select_related("store")
    return sorted(uses, key=lambda use: (use.split != "train", use.id))


def use_label(use: TeacherStoreUse) -> str:
    return use.label + (" (deleted)" if use.store_deleted_at else "")


def store_labels_for_runs(run_ids: Iterable[int]) -> dict[int, str]:
    """Per run, in one query, the store(s) of teacher outputs it trained from (its train split's; the others'
    where it read no train store), as ``teacher · top-64 · format 2``; runs that used none are left out."""
    uses = (TeacherStoreUse.objects.filter(run_id__in=list(run_ids))
            .order_by("run_id", "id").values_list("run_id", "split", "label", "store_deleted_at"))
    per_run: dict[int, list[tuple[str, str]]] = {}
    for run_id, split, label, deleted in uses:
        per_run.setdefault(run_id, []).append((split, label + (" (deleted)" if deleted else "")))
    labels = {}
    for run_id, found in per_run.items():
        train = [label for split, label in found if split == "train"]
        names = list(dict.fromkeys(train or [label for _, label in found]))
        labels[run_id] = "; ".join(names)
    return labels
