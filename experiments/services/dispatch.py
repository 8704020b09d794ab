"""Handing runs to Celery after the commit: publishing with a bounded wait and a backoff while the broker is
down, revoking, and publishing again the runs a broker outage left unsent."""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable
from datetime import timedelta

from django.conf import settings
from django.db import transaction
from django.db.models import OuterRef, Q, Subquery
from django.db.models.functions import Coalesce
from django.utils import timezone

from experiments import broker
from experiments.models import (
    ModelSpec,
    Run,
    RunTransition,
)

logger = logging.getLogger(__name__)


def pending_source_run(spec: ModelSpec | None) -> Run | None:
    """The run that still has to produce this model's weights, if any."""
    if spec is None or spec.source != ModelSpec.Source.RUN:
        return None
    source_run = spec.source_run
    return None if source_run.status == Run.Status.SUCCEEDED else source_run


def enqueue_on_commit(run: Run, *, task_id: str | None = None) -> None:
    """Send the run's task to its queue once the transaction commits. ``task_id``: the delivery the run
    expects (already recorded on the run); None records a new one first."""
    _send_on_commit(run_id=run.id, queue=run.queue, task_id=task_id)


def _send_on_commit(*, run_id: int, queue: str, task_id: str | None) -> None:
    transaction.on_commit(lambda: _dispatch(run_id=run_id, queue=queue, task_id=task_id))


# After a failed send, skip sends for this long: a request that launches 200 runs while the broker is down
# must not wait for 200 timeouts. The lifecycle sweep sends every queued run whose message never arrived.
_BROKER_BACKOFF_S = 10.0


_broker_down_until = 0.0


def _dispatch(*, run_id: int, queue: str, task_id: str | None) -> None:
    from kombu.exceptions import OperationalError as BrokerError
    from redis.exceptions import RedisError  # a timeout kombu did not wrap

    from workers.tasks import run_distillation

    global _broker_down_until
    if time.monotonic() < _broker_down_until:
        logger.warning("broker unreachable: run %s stays queued until the lifecycle sweep sends it", run_id)
        return
    if task_id is None:
        # Record the id first, so the run can be revoked while queued and only this message claims it.
        task_id = str(uuid.uuid4())
        if not Run.objects.filter(id=run_id, status=Run.Status.QUEUED, task_id="").update(task_id=task_id):
            return  # cancelled meanwhile, or already expecting another message
    try:
        # In the web process this gives up within about 2 × BROKER_PUBLISH_TIMEOUT_S (experiments/broker.py).
        run_distillation.apply_async(args=(run_id,), queue=queue, task_id=task_id)
    except (BrokerError, OSError, RedisError):
        _broker_down_until = time.monotonic() + _BROKER_BACKOFF_S
        logger.exception("could not send run %s to the broker; the lifecycle sweep sends it again", run_id)


def run_yield_turn(*, run_id: int, task_id: str) -> bool:
    """A hard-label baseline whose message reached a worker gives its turn to the distilled runs of its
    experiment that became ready after it was sent (experiments.domain.queue_order says why): its message is
    sent again, to the end of its queue, and True is returned (the delivery then ends without claiming).

    It yields at most once per distilled run that became ready after it (each yield moves its ``ready_at``
    past theirs), so it cannot cycle. False when the run is not a ready queued baseline expecting this
    delivery, or no such distilled run waits."""
    with transaction.atomic():
        run = (Run.objects.filter(id=run_id, status=Run.Status.QUEUED, is_baseline=True,
                                  waiting_for__isnull=True, cancel_requested=False)
               .filter(Q(task_id=task_id) | Q(task_id=""))
               .values("experiment_id", "queue", "ready_at").first())
        if run is None:
            return False
        later = (Run.objects.filter(experiment_id=run["experiment_id"], queue=run["queue"],
                                    status=Run.Status.QUEUED, is_baseline=False, waiting_for__isnull=True,
                                    cancel_requested=False)
                 .filter(ready_at__gt=run["ready_at"]))
        if not later.exists():
            return False
        if not Run.objects.filter(id=run_id, status=Run.Status.QUEUED, ready_at=run["ready_at"]).update(
            ready_at=timezone.now(), task_id=task_id
        ):
            return False  # changed meanwhile: let the claim decide
        logger.info("run %s gives its turn on %s to the distilled runs of its experiment", run_id,
                    run["queue"])
        _send_on_commit(run_id=run_id, queue=run["queue"], task_id=task_id)
    return True


def revoke_on_commit(task_id: str) -> None:
    """Tell the workers to drop the task's message (a cancelled queued run); the claim refuses it anyway."""

    def revoke() -> None:
        from celery import current_app

        try:
            current_app.control.revoke(task_id)
        except Exception:  # best effort: a cancelled run is never claimed, revoked or not
            logger.warning("could not revoke task %s", task_id, exc_info=True)

    # Never on a request's thread in the web process: a hung broker would hold it (experiments/broker.py).
    transaction.on_commit(lambda: broker.off_the_request(revoke, what="revoke"))


def run_redispatch_lost(*, queue_size: Callable[[str], int | None]) -> int:
    """Send again the queued runs whose message seems lost (a broker that restarted without persistence, or a
    send that failed): ready to start, queued for longer than RUN_REDISPATCH_AFTER_S, on a queue the broker
    reports empty (``queue_size``: messages waiting in a queue, None when unknown). A duplicate is harmless:
    one conditional update claims the run, once. Returns how many runs were sent."""
    cutoff = timezone.now() - timedelta(seconds=settings.RUN_REDISPATCH_AFTER_S)
    last_queued = (RunTransition.objects.filter(run=OuterRef("pk"), to_status=Run.Status.QUEUED)
                   .order_by("-id").values("at")[:1])
    waiting = (Run.objects.filter(status=Run.Status.QUEUED, cancel_requested=False)
               .filter(Q(waiting_for__isnull=True) | Q(waiting_for__status=Run.Status.SUCCEEDED))
               .annotate(queued_since=Coalesce(Subquery(last_queued), "created_at"))
               .filter(queued_since__lt=cutoff).values_list("id", "queue"))
    by_queue: dict[str, list[int]] = {}
    for run_id, queue in waiting:
        by_queue.setdefault(queue, []).append(run_id)
    sent = 0
    for queue, run_ids in by_queue.items():
        if queue_size(queue) != 0:
            continue  # messages are waiting: these runs may simply be behind them
        for run_id in run_ids:
            task_id = str(uuid.uuid4())
            with transaction.atomic():
                if Run.objects.filter(id=run_id, status=Run.Status.QUEUED).update(
                    task_id=task_id, ready_at=timezone.now()
                ):
                    logger.warning(
                        "run %s has been queued without a message on %s; sending it again", run_id, queue
                    )
                    _send_on_commit(run_id=run_id, queue=queue, task_id=task_id)
                    sent += 1
    return sent
