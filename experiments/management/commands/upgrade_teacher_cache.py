"""Rewrite the format-1 causal-LM top-k entries of the worker's teacher-output cache as format 2, in place.

    python manage.py upgrade_teacher_cache            # convert, one progress line per entry
    python manage.py upgrade_teacher_cache --dry-run  # list what would be converted

Format 2 (``workers.engine.topk_store``) holds a position's top-64 in ~149 B instead of ~386 B and is read by
rows from memory-mapped shards. Each entry is converted under its key's lock and atomically (a run reading
it meanwhile sees the old entry or the new one, whole); keys do not change, so runs keep hitting their
entries. Other entries (classification logits, embeddings, generations) stay as they are. Old entries read
as before without this command; it only saves disk space and memory.
"""

from __future__ import annotations

from pathlib import Path

from django.conf import settings
from django.core.management.base import BaseCommand

from experiments.domain.engine_config import TEACHER_CACHE_DIR


class Command(BaseCommand):
    help = "Convert the teacher-output cache's format-1 LM top-k entries to the compact format 2, in place."

    def add_arguments(self, parser) -> None:
        parser.add_argument("--dry-run", action="store_true", help="list the entries, convert nothing")

    def handle(self, *args, dry_run: bool = False, **options) -> None:
        from workers.engine.cache import TeacherCache  # torch: only when the command runs

        root = Path(settings.ARTIFACT_ROOT) / TEACHER_CACHE_DIR
        counts = TeacherCache(root).upgrade(dry_run=dry_run, log=self.stdout.write)
        if dry_run:
            self.stdout.write(f"{counts['to_convert']} of {counts['entries']} entries would be converted.")
            return
        saved = counts["bytes_before"] - counts["bytes_after"]
        self.stdout.write(
            f"Converted {counts['converted']} of {counts['entries']} entries ({saved:,} bytes saved)."
        )
