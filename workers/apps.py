from django.apps import AppConfig


class WorkersConfig(AppConfig):
    name = "workers"
    verbose_name = "Workers"

    def ready(self) -> None:
        from . import (
            fleet,  # noqa: F401  (connects the worker registration signals)
            sessions,  # noqa: F401  (bounds idle transactions in worker processes)
            warmup,  # noqa: F401  (imports what a run needs when a worker process starts)
        )
