"""The order in which a queue's workers take its ready runs, and each queued run's place in it.

A queue is served first come, first served: runs in the order their messages were sent (``Run.ready_at``),
with one exception. A hard-label baseline gives its turn to a distilled run of its own experiment that became
ready after it (``dispatch.run_yield_turn``): its message goes back to the end of the queue.

Why distilled runs first: they are what an experiment is launched for, and a distilled run whose teacher is
trained by another run becomes ready only when that run finishes, long after the experiment's baselines were
sent. Served in sending order, one worker would train every baseline before the first distilled run. The
baselines still run as soon as no distilled run of their experiment is ready (at once on an idle worker), and
each student's KD gain appears as soon as its baseline finishes: a gain needs both runs, so no order shows it
before the later of the two, and distilled-first delays only the gains while the distilled results come
first. At launch the runs are sent in the same order, distilled runs first (``sending_order``).

Places are ranked in the database (one query, whatever the number of runs asked about; ``serve_order`` is the
same rule in Python).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from django.db import connection
from django.db.models import Case, F, Max, When, Window

from experiments.models import Run


def sending_order(runs: Sequence[Any]) -> list[int]:
    """Indexes of ``runs`` (anything with ``is_baseline``) in the order they are sent: distilled runs first,
    then the baselines, each group in its given order."""
    return sorted(range(len(runs)), key=lambda i: (bool(runs[i].is_baseline), i))


def serve_order(ready: Iterable[tuple[int, int, bool, Any]]) -> list[int]:
    """The run ids of one queue in the order its workers take them.

    ``ready``: (id, experiment id, is baseline, ready_at) of every ready queued run of the queue. Sorted by
    sending time (then id); then every baseline with a distilled run of its experiment sent strictly later
    moves to the end, in its order, as its yielded message does.
    """
    rows = sorted(ready, key=lambda r: (r[3], r[0]))
    last_distilled: dict[int, Any] = {}
    for _, experiment_id, is_baseline, ready_at in rows:
        if not is_baseline:
            last_distilled[experiment_id] = ready_at
    stays, yields = [], []
    for run_id, experiment_id, is_baseline, ready_at in rows:
        later = last_distilled.get(experiment_id)
        (yields if is_baseline and later is not None and later > ready_at else stays).append(run_id)
    return stays + yields


def _ready_queued():
    return Run.objects.filter(status=Run.Status.QUEUED, waiting_for__isnull=True, cancel_requested=False)


def annotate_positions(runs: Sequence[Run]) -> None:
    """Set ``_queue_position`` on each run (read through ``Run.queue_position``): its 1-based place in its
    queue when it is queued and waits for no other run, else None.

    One query for all the runs: ``serve_order``'s rule as two window passes over the ready runs of their
    queues (the last distilled run of each experiment, then the rank), narrowed to the runs asked about only
    after ranking."""
    wanted = {run.pk: run.queue for run in runs
              if run.status == Run.Status.QUEUED and run.waiting_for_id is None}
    places: dict[int, int] = {}
    if wanted:
        ready = _ready_queued().filter(queue__in=set(wanted.values())).annotate(
            last_distilled=Window(Max(Case(When(is_baseline=False, then=F("ready_at")))),
                                  partition_by=[F("experiment_id"), F("queue")]),
        ).values("id", "queue", "ready_at", "is_baseline", "last_distilled")
        sql, params = ready.query.sql_with_params()
        ids = list(wanted)
        marks = ", ".join(["%s"] * len(ids))
        # A baseline with a distilled run of its experiment sent strictly after it goes behind the others.
        gives_turn = ("CASE WHEN r.is_baseline AND r.last_distilled IS NOT NULL "
                      "AND r.ready_at < r.last_distilled THEN 1 ELSE 0 END")
        ranked = (f"SELECT r.id, ROW_NUMBER() OVER (PARTITION BY r.queue ORDER BY {gives_turn}, r.ready_at, "
                  f"r.id) AS place FROM ({sql}) r")
        with connection.cursor() as cursor:
            cursor.execute(f"SELECT ranked.id, ranked.place FROM ({ranked}) ranked "
                           f"WHERE ranked.id IN ({marks})", [*params, *ids])
            places = dict(cursor.fetchall())
    for run in runs:
        run._queue_position = places.get(run.pk)


def ordinal(n: int) -> str:
    """1st, 2nd, 3rd, 4th, 11th, 12th, 13th, 21st…"""
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"
