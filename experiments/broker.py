"""Sends from the web process fail fast when the broker is down or hung; workers keep Celery's defaults.

A request that launches runs stores them queued and sends their messages after the commit
(``services._dispatch``). With Celery's defaults that send can hold the request for seconds (kombu retries the
connection for ``broker_connection_timeout``, 4 s, then the publish retry policy retries) or for ever (a
broker that accepts connections but does not answer, e.g. a stopped or overloaded one: redis-py and py-amqp
have no read timeout by default). The web's entry points (``distillweb/wsgi.py``, ``asgi.py``) call
:func:`configure_web_process`: its task messages go through connections whose every socket operation gives up
after ``BROKER_PUBLISH_TIMEOUT_S``, with one immediate retry, and the revoke of a cancelled run's message is
sent from a thread of its own (:func:`off_the_request`)
(enough to replace a connection that went stale when the broker restarted). When that fails, ``_dispatch``
logs it and the run stays queued; the lifecycle sweep on a worker sends it once the broker is back
(``services.run_redispatch_lost``). Worker processes never call this: they keep Celery's connection and
publish retry settings, and their consumers are untouched here.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

from django.conf import settings

logger = logging.getLogger(__name__)

# Set by configure_web_process: this process serves requests.
_web_process = False


def timeout_options(url: str, timeout: float) -> dict[str, Any]:
    """Transport options that bound each socket operation, and the connection attempts, by ``timeout``."""
    scheme = (url or "").split("://", 1)[0].split("+")[-1].lower()
    # https://docs.celeryq.dev/projects/kombu/en/stable/reference/kombu.transport.redis.html
    if scheme in ("redis", "rediss", "sentinel"):
        return {"socket_timeout": timeout, "socket_connect_timeout": timeout, "max_retries": 1}
    # py-amqp's Connection takes these keyword arguments (kombu hands it the transport options).
    if scheme in ("amqp", "amqps", "pyamqp"):
        return {"read_timeout": timeout, "write_timeout": timeout, "max_retries": 1}
    return {}  # the filesystem and memory transports never wait on a server


def configure_web_process(app: Any = None) -> None:
    """Make this process's publishes give up within about two ``BROKER_PUBLISH_TIMEOUT_S`` on a broker that is
    down or hung. Call it once, in a process that serves requests, before its first send."""
    from kombu import pools

    if app is None:
        from distillweb.celery import app
    timeout = settings.BROKER_PUBLISH_TIMEOUT_S
    # https://docs.celeryq.dev/en/stable/userguide/calling.html#message-sending-retry
    app.conf.task_publish_retry_policy = {"max_retries": 1, "interval_start": 0, "interval_step": 0,
                                          "interval_max": 0}
    url = app.conf.broker_write_url or app.conf.broker_url
    connection = app.connection_for_write(
        connect_timeout=timeout, transport_options=timeout_options(url, timeout)
    )
    # Celery publishes task messages through ``app.amqp.producer_pool`` (built on first use from the app's
    # default connection): build it from the bounded connection instead. The app's own pool (``app.pool``:
    # remote control, the fleet console's replies) keeps the defaults.
    producer_pool = pools.producers[connection]
    producer_pool.limit = app.pool.limit
    app.amqp._producer_pool = producer_pool
    global _web_process
    _web_process = True


def off_the_request(send: Callable[[], None], *, what: str) -> None:
    """Run ``send`` (a best-effort remote-control message, such as the revoke of a cancelled run's task) on a
    thread of its own in the web process, so that no request waits for it; at once in any other process.

    Remote control publishes with kombu's unbounded retries, so on a hung broker the thread waits until the
    broker answers again (or the process ends: the thread is a daemon)."""
    if not _web_process:
        send()
        return
    threading.Thread(target=send, name=f"broker-{what}", daemon=True).start()
