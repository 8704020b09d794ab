"""A leaderboard summary row per (experiment, student, recipe, stage, sweep point) and eval split, kept when
its evaluations are written; existing results are summarised here."""

import django.db.models.deletion
from django.db import DatabaseError, migrations, models, transaction


def summarise_existing_results(apps, schema_editor) -> None:
    Evaluation = apps.get_model("experiments", "Evaluation")
    if not Evaluation.objects.using(schema_editor.connection.alias).filter(role="student").exists():
        return
    # The summary is computed by the current code, which reads the current models: if a later migration
    # changes them, computing it here fails, and `manage.py rebuild_leaderboard` computes it after migrating.
    from experiments.services.leaderboard_summary import leaderboard_summary_rebuild

    try:
        with transaction.atomic(using=schema_editor.connection.alias):
            leaderboard_summary_rebuild()
    except DatabaseError:
        print("\n  Leaderboard summaries not computed here: run `manage.py rebuild_leaderboard` after migrating.")


class Migration(migrations.Migration):
    dependencies = [("experiments", "0010_team_invites")]

    operations = [
        migrations.CreateModel(
            name="LeaderboardEntry",
            fields=[
                ("id", models.BigAutoField(auto_created=True, primary_key=True, serialize=False, verbose_name="ID")),
                ("task", models.CharField(max_length=32)),
                ("split", models.CharField(max_length=32)),
                ("split_key", models.CharField(max_length=64)),
                ("stage", models.CharField(blank=True, max_length=32)),
                ("sweep", models.CharField(blank=True, help_text="The row's point of its sweep", max_length=500)),
                ("point_key", models.CharField(help_text="Hash of the sweep point (the row's identity)",
                                               max_length=64)),
                ("is_baseline", models.BooleanField(default=False)),
                ("trains_teacher", models.BooleanField(
                    default=False, help_text="A run of the row trained a model that is the teacher of an experiment")),
                ("family", models.CharField(blank=True, max_length=64)),
                ("lora_r", models.PositiveIntegerField(default=0)),
                ("lora_4bit", models.BooleanField(default=False)),
                ("first_run_id", models.BigIntegerField(help_text="Ties rank in run order")),
                ("evaluations", models.PositiveIntegerField(default=0)),
                ("params", models.BigIntegerField(blank=True, null=True)),
                ("latency_ms", models.FloatField(blank=True, null=True)),
                ("latency", models.JSONField(blank=True, default=dict, help_text="The latency's spread and setting")),
                ("stats", models.JSONField(default=dict, help_text="metric → {values, gains, run_ids} over the seeds")),
                ("means", models.JSONField(default=dict, help_text="metric → mean over the seeds")),
                ("score", models.FloatField(blank=True, help_text="Mean of the dataset's primary metric", null=True)),
                ("dataset", models.ForeignKey(on_delete=django.db.models.deletion.CASCADE,
                                              related_name="leaderboard_entries", to="experiments.datasetspec")),
                ("experiment", models.ForeignKey(on_delete=django.db.models.deletion.CASCADE,
                                                 related_name="leaderboard_entries", to="experiments.experiment")),
                ("recipe", models.ForeignKey(on_delete=django.db.models.deletion.CASCADE, related_name="+",
                                             to="experiments.recipe")),
                ("student", models.ForeignKey(on_delete=django.db.models.deletion.CASCADE, related_name="+",
                                              to="experiments.modelspec")),
                ("team", models.ForeignKey(on_delete=django.db.models.deletion.CASCADE, related_name="+",
                                           to="experiments.team")),
            ],
            options={
                "indexes": [
                    models.Index(fields=["dataset", "split_key", "score"], name="leaderboard_board_score"),
                    models.Index(fields=["split_key", "task", "score"], name="leaderboard_global_score"),
                ],
                "constraints": [
                    models.UniqueConstraint(
                        fields=("experiment", "dataset", "split_key", "student", "recipe", "stage", "point_key"),
                        name="leaderboardentry_unique_row",
                    ),
                ],
            },
        ),
        migrations.RunPython(summarise_existing_results, migrations.RunPython.noop, elidable=True),
    ]
