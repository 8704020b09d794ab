"""The run-lifecycle sweep, sent by celery beat (``CELERY_BEAT_SCHEDULE`` in the settings).

It keeps runs from being lost when their worker or the broker is: a running run whose lease (its heartbeat)
expired is requeued for another worker, which resumes it from its last checkpoint; a queued run whose broker
message vanished is sent again. Every step is a conditional update, so two sweeps at once do the work once.
"""

from __future__ import annotations

import logging

from celery import current_app, shared_task

logger = logging.getLogger(__name__)


@shared_task(name="workers.requeue_stale_runs", ignore_result=True)
def requeue_stale_runs() -> dict[str, int]:
    """Requeue (or, past RUN_MAX_ATTEMPTS, fail) runs whose worker stopped renewing their lease, and re-send
    queued runs whose message was lost. Returns how many runs went to each status, and ``redispatched``."""
    from experiments.services import dispatch, lifecycle

    counts = lifecycle.run_requeue_stale()
    redispatched = dispatch.run_redispatch_lost(queue_size=broker_queue_size)
    if redispatched:
        counts["redispatched"] = redispatched
    if counts:
        logger.info("lifecycle sweep: %s", ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    return counts


def broker_queue_size(queue: str) -> int | None:
    """Messages waiting in ``queue`` on the broker (0 when it does not exist), or None when it cannot be
    read."""
    from kombu.exceptions import ChannelError

    try:
        with current_app.connection_for_read() as connection:
            channel = connection.default_channel
            try:
                return channel.queue_declare(queue=queue, passive=True).message_count
            except ChannelError:  # the broker does not know the queue: nothing waits in it
                return 0
    except Exception:  # the broker is down: do not guess, the next sweep looks again
        logger.warning("could not read the size of queue %s", queue, exc_info=True)
        return None
