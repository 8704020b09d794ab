"""Teacher-output stores as records."""

from django.db import migrations


class Migration(migrations.Migration):
    dependencies = [("experiments", "0014_dashboard_speed")]

    operations: list = []
