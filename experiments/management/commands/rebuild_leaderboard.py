"""Recompute the leaderboards' summary rows from the evaluations (after a bulk load, or to repair)."""

from django.core.management.base import BaseCommand

from experiments.services.leaderboard_summary import leaderboard_summary_rebuild


class Command(BaseCommand):
    help = "Recompute every leaderboard summary row from the finished runs' evaluations."

    def handle(self, *args, **options) -> None:
        written = leaderboard_summary_rebuild()
        self.stdout.write(f"{written} leaderboard rows written.")
