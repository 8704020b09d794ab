"""Content address of a run's frozen config, for reusing identical baselines."""

from django.db import migrations


class Migration(migrations.Migration):
    dependencies = [("experiments", "0011_leaderboard_summary")]

    operations: list = []
