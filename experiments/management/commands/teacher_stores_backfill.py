"""Make teacher-output stores of the cache entries runs used before stores were records (migration 0015)."""

from django.core.management.base import BaseCommand

from experiments.services.teacher_stores import stores_backfill


class Command(BaseCommand):
    help = ("Record a teacher-output store for every teacher_cache artifact of a finished run whose entry is "
            "still on disk (idempotent).")

    def handle(self, *args, **options) -> None:
        runs, skipped = stores_backfill()
        self.stdout.write(f"Stores recorded from {runs} runs; {skipped} entries no longer readable, skipped.")
