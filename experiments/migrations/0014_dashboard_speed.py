"""Indexes for dashboard pages and APIs: runs newest first across teams (the run list's order) read from an
index instead of sorting every run."""

from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [("experiments", "0013_recipe_versions")]

    operations: list = [
        migrations.AddIndex(
            model_name="run",
            index=models.Index(fields=["-created_at", "-id"], name="run_created_id"),
        ),
    ]
