"""Team invitations (one-time links) and staff-created teams."""

from django.db import migrations


class Migration(migrations.Migration):
    dependencies = [("experiments", "0009_run_phase")]

    operations: list = []
