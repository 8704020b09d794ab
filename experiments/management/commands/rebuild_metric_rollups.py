"""``manage.py rebuild_metric_rollups [--run ID ...]``: recompute long runs' metric rollups from their points
(after importing points in bulk, e.g. with COPY)."""

from __future__ import annotations

from django.core.management.base import BaseCommand, CommandError
from django.db import connection

from experiments import rollups


class Command(BaseCommand):
    help = "Recompute the per-bucket extremes of long runs' metric curves from their points (Postgres)."

    def add_arguments(self, parser) -> None:
        parser.add_argument(
            "--run", type=int, action="append", dest="runs", help="only this run (repeatable)"
        )

    def handle(self, *args, runs: list[int] | None = None, **options) -> None:
        if connection.vendor != "postgresql":
            raise CommandError("Metric rollups are kept on Postgres only; other databases read the points.")
        written = rollups.rebuild(runs)
        self.stdout.write(f"{written} rollup rows written.")
