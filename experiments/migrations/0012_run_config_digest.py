"""Content address of a run's frozen config, for reusing identical baselines; when a queued run's message was
sent, for its place in its queue; a run that reused another's results may be queued to train after all."""

import django.db.models.deletion
import django.utils.timezone
from django.db import migrations, models


def ready_at_from_created_at(apps, schema_editor):
    Run = apps.get_model("experiments", "Run")
    Run.objects.update(ready_at=models.F("created_at"))


class Migration(migrations.Migration):
    dependencies = [("experiments", "0011_leaderboard_summary")]

    operations: list = [
        migrations.AddField(
            model_name="run",
            name="config_digest",
            field=models.CharField(
                blank=True,
                help_text="Content address of the frozen config, its inputs' content and the engine's code "
                "(experiments.domain.config_digest)",
                max_length=64,
            ),
        ),
        migrations.AddField(
            model_name="run",
            name="ready_at",
            field=models.DateTimeField(default=django.utils.timezone.now),
        ),
        migrations.RunPython(ready_at_from_created_at, migrations.RunPython.noop),
        migrations.AddField(
            model_name="run",
            name="reused_from",
            field=models.ForeignKey(
                blank=True,
                help_text="The identical run whose results this run took instead of training",
                null=True,
                on_delete=django.db.models.deletion.SET_NULL,
                related_name="reused_by",
                to="experiments.run",
            ),
        ),
        migrations.AddField(
            model_name="run",
            name="may_reuse",
            field=models.BooleanField(
                default=False,
                help_text="A baseline that takes an identical succeeded run's results instead of training, when "
                "one exists at launch or when a worker receives it",
            ),
        ),
        migrations.AddIndex(
            model_name="run",
            index=models.Index(fields=["team", "config_digest"], name="run_team_config_digest"),
        ),
        migrations.AddIndex(
            model_name="run",
            index=models.Index(
                condition=models.Q(("status", "queued")), fields=["queue", "ready_at"], name="run_queued_ready"
            ),
        ),
        migrations.RemoveConstraint(
            model_name="runtransition",
            name="runtransition_allowed",
        ),
        migrations.AddConstraint(
            model_name="runtransition",
            constraint=models.CheckConstraint(
                condition=models.Q(
                    models.Q(("from_status", "queued"), ("to_status__in", ["cancelled", "failed", "running"])),
                    models.Q(
                        ("from_status", "running"),
                        ("to_status__in", ["cancelled", "failed", "queued", "succeeded"]),
                    ),
                    models.Q(("from_status", "succeeded"), ("to_status__in", ["queued"])),
                    models.Q(("from_status", "failed"), ("to_status__in", ["queued"])),
                    models.Q(("from_status", "cancelled"), ("to_status__in", ["queued"])),
                    _connector="OR",
                ),
                name="runtransition_allowed",
            ),
        ),
    ]
