"""Warm worker processes: what a run imports is imported when the process starts, not when its first run does.

A fresh worker's first run used to spend seconds before its first step importing torch's compiler stack
(the optimizer's first step loads ``torch._dynamo``), transformers' model classes, peft, scikit-learn's
datasets and the engine. Each pool process now imports them in a background thread as soon as it starts
(Celery's ``worker_process_init``; a ``solo`` or ``threads`` pool, which has no child processes, does it in
the worker at ``worker_ready``), so a run that arrives after the warm-up starts warm, and one that arrives
during it waits only for what is left (the import lock serialises the two). Nothing here touches CUDA: the
prefork parent never imports torch, and importing it in a pool process initialises no device.

``WORKER_WARMUP=0`` turns it off. The worker's log says when a process is warm and how long it took.
"""

from __future__ import annotations

import importlib
import logging
import os
import threading
import time
from typing import Any

from celery.signals import worker_process_init, worker_ready

log = logging.getLogger(__name__)
SETTLE_TIMEOUT_S = 300.0  # a task waits at most this long for the warm-up (its lease renewed meanwhile)

# In import order: the engine first (torch, transformers, peft, safetensors come with it), then what its
# first run loads lazily.
MODULES = (
    "workers.engine.trainer",
    "workers.engine.data",
    "torch._dynamo",
    "sklearn.datasets",
    "transformers.models.auto.modeling_auto",
    "transformers.models.llama.modeling_llama",
    "transformers.models.bert.modeling_bert",
    "transformers.models.qwen2.modeling_qwen2",
    "transformers.models.gpt2.modeling_gpt2",
    "tokenizers",
)
_started, _done = threading.Event(), threading.Event()
_state: dict[str, Any] = {"imported": [], "failed": {}, "seconds": None}


def enabled() -> bool:
    return os.environ.get("WORKER_WARMUP", "1").strip().lower() not in ("0", "false", "no", "off")


def warm() -> dict[str, Any]:
    """Import :data:`MODULES` (a module that fails to import is skipped and logged; the run that needs it
    reports the error as usual). Returns what was imported and how long it took."""
    started = time.perf_counter()
    for name in MODULES:
        try:
            importlib.import_module(name)
            _state["imported"].append(name)
        except Exception as exc:  # an optional model family missing from this transformers, say
            _state["failed"][name] = f"{type(exc).__name__}: {exc}"
    _state["seconds"] = round(time.perf_counter() - started, 2)
    _done.set()
    log.info(
        "Warm-up of process %d done in %.2f s: %d modules imported%s",
        os.getpid(),
        _state["seconds"],
        len(_state["imported"]),
        f", skipped {sorted(_state['failed'])}" if _state["failed"] else "",
    )
    return dict(_state)


def wait(timeout: float | None = None) -> bool:
    """True once this process's warm-up has finished (within ``timeout`` seconds)."""
    return _done.wait(timeout)


def settle(timeout: float = SETTLE_TIMEOUT_S) -> None:
    """Let a warm-up under way finish before a task imports the engine itself: transformers' lazily
    imported modules are not safe to initialise from two threads at once (a class can come out missing). A
    process that never started a warm-up returns at once."""
    if _started.is_set():
        _done.wait(timeout)


def _start() -> None:
    if enabled() and not _started.is_set():
        _started.set()
        threading.Thread(target=warm, name="distillweb-warmup", daemon=True).start()


@worker_process_init.connect
def _on_process_init(**_kwargs: Any) -> None:
    """A prefork pool process has started."""
    _start()


@worker_ready.connect
def _on_worker_ready(sender: Any = None, **_kwargs: Any) -> None:
    """A worker whose pool runs tasks in the worker process itself (solo, threads) warms that process."""
    pool = getattr(sender, "pool_cls", None) if sender is not None else None
    name = pool if isinstance(pool, str) else getattr(pool, "__module__", "") or ""
    if "solo" in name or "thread" in name:
        _start()
