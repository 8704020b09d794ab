"""A row per leaderboard board (team, dataset, eval split) holding what its page shows of the whole board: the
split's label and counts, the metrics present, and per metric the rows ranked, the filter options and the
Pareto frontier with its ranks. Existing boards are computed here."""

import django.db.models.deletion
from django.db import DatabaseError, migrations, models, transaction


def compute_existing_boards(apps, schema_editor) -> None:
    Entry = apps.get_model("experiments", "LeaderboardEntry")
    if not Entry.objects.using(schema_editor.connection.alias).exists():
        return
    # Computed by the current code (as 0011 does): if a later migration changes the models it reads,
    # `manage.py rebuild_leaderboard` computes the boards after migrating.
    from experiments.services.leaderboard_summary import leaderboard_boards_rebuild

    try:
        with transaction.atomic(using=schema_editor.connection.alias):
            leaderboard_boards_rebuild()
    except DatabaseError:
        print("\n  Leaderboard boards not computed here: run `manage.py rebuild_leaderboard` after migrating.")


class Migration(migrations.Migration):
    dependencies = [("experiments", "0015_teacher_stores")]

    operations = [
        migrations.CreateModel(
            name="LeaderboardBoard",
            fields=[
                ("id", models.BigAutoField(auto_created=True, primary_key=True, serialize=False, verbose_name="ID")),
                ("task", models.CharField(max_length=32)),
                ("split_key", models.CharField(max_length=64)),
                ("split", models.CharField(max_length=32)),
                ("split_label", models.CharField(max_length=200)),
                ("evaluations", models.PositiveIntegerField(default=0)),
                ("first_run_id", models.BigIntegerField()),
                ("metrics", models.JSONField(default=list,
                                             help_text="The quality metrics some row of the board holds")),
                ("ranked", models.JSONField(default=dict, help_text="metric → {count, options, frontier}")),
                ("dataset", models.ForeignKey(on_delete=django.db.models.deletion.CASCADE,
                                              related_name="leaderboard_boards", to="experiments.datasetspec")),
                ("team", models.ForeignKey(on_delete=django.db.models.deletion.CASCADE, related_name="+",
                                           to="experiments.team")),
            ],
            options={
                "indexes": [models.Index(fields=["split_key", "task"], name="leaderboardboard_global")],
                "constraints": [models.UniqueConstraint(fields=("team", "dataset", "split_key"),
                                                        name="leaderboardboard_unique")],
            },
        ),
        migrations.RunPython(compute_existing_boards, migrations.RunPython.noop),
    ]
