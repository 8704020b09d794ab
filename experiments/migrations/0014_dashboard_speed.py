"""Indexes for dashboard pages and APIs: runs newest first across teams (the run list's order) read from an
index instead of sorting every run; the metrics a leaderboard has, from a GIN index of its summary rows'
means."""

from django.db import migrations, models


def _create_means_index(apps, schema_editor) -> None:
    # Postgres only (the embedded demo's SQLite has no GIN): the metrics a board has are probed with
    # ``means ? name``, which this index answers without reading the board's rows.
    if schema_editor.connection.vendor == "postgresql":
        schema_editor.execute(
            "CREATE INDEX IF NOT EXISTS leaderboard_means_keys ON experiments_leaderboardentry USING gin (means)"
        )


def _drop_means_index(apps, schema_editor) -> None:
    if schema_editor.connection.vendor == "postgresql":
        schema_editor.execute("DROP INDEX IF EXISTS leaderboard_means_keys")


class Migration(migrations.Migration):
    dependencies = [("experiments", "0013_recipe_versions")]

    operations: list = [
        migrations.AddIndex(
            model_name="run",
            index=models.Index(fields=["-created_at", "-id"], name="run_created_id"),
        ),
        migrations.RunPython(_create_means_index, _drop_means_index),
    ]
