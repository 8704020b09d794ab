"""The distillation engine: pure PyTorch and transformers, never Django.

Modules: ``config`` (what a run is), ``data``, ``models``, ``terms`` (the term catalogue, no torch),
``losses``, ``methods``, ``teachers``, ``trainer`` (``train``), ``runtime``, ``evaluate``, ``checkpoint``,
``sources``. This package imports nothing heavy itself, so ``workers.engine.config`` stays cheap to import
(torch must not load in the Celery parent process).

Command line: ``python -m workers.engine run CONFIG.json`` and ``python -m workers.engine methods``.
"""
