"""Periodic fleet tasks, sent by celery beat (``CELERY_BEAT_SCHEDULE`` in the settings)."""

from __future__ import annotations

import logging

from celery import shared_task

logger = logging.getLogger(__name__)


@shared_task(name="workers.fleet_sweep", ignore_result=True)
def fleet_sweep() -> int:
    """Mark workers whose last heartbeat is older than WORKER_OFFLINE_AFTER_S offline; returns how many."""
    from experiments.services import fleet

    swept = fleet.fleet_sweep()
    if swept:
        logger.info("marked %d silent worker(s) offline", swept)
    return swept
