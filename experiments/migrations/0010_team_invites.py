"""Team invitations (one-time links) and staff-created teams."""

import django.db.models.deletion
from django.conf import settings
from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [
        ("experiments", "0009_run_phase"),
        migrations.swappable_dependency(settings.AUTH_USER_MODEL),
    ]

    operations = [
        migrations.CreateModel(
            name="TeamInvite",
            fields=[
                ("id", models.BigAutoField(auto_created=True, primary_key=True, serialize=False, verbose_name="ID")),
                (
                    "role",
                    models.CharField(
                        choices=[("member", "Member"), ("lead", "Lead")], default="member", max_length=16
                    ),
                ),
                ("token_hash", models.CharField(max_length=64, unique=True)),
                ("note", models.CharField(blank=True, max_length=200)),
                ("created_at", models.DateTimeField(auto_now_add=True)),
                ("expires_at", models.DateTimeField()),
                ("accepted_at", models.DateTimeField(blank=True, null=True)),
                ("revoked_at", models.DateTimeField(blank=True, null=True)),
                (
                    "accepted_by",
                    models.ForeignKey(
                        blank=True,
                        null=True,
                        on_delete=django.db.models.deletion.SET_NULL,
                        related_name="+",
                        to=settings.AUTH_USER_MODEL,
                    ),
                ),
                (
                    "created_by",
                    models.ForeignKey(
                        blank=True,
                        null=True,
                        on_delete=django.db.models.deletion.SET_NULL,
                        related_name="+",
                        to=settings.AUTH_USER_MODEL,
                    ),
                ),
                (
                    "team",
                    models.ForeignKey(
                        on_delete=django.db.models.deletion.CASCADE,
                        related_name="invites",
                        to="experiments.team",
                    ),
                ),
            ],
            options={
                "indexes": [models.Index(fields=["team", "-created_at"], name="teaminvite_team_created")],
                "constraints": [
                    models.CheckConstraint(
                        condition=models.Q(("role__in", ["member", "lead"])), name="teaminvite_role_valid"
                    ),
                    models.CheckConstraint(
                        condition=models.Q(("accepted_at__isnull", True), ("revoked_at__isnull", True),
                                           _connector="OR"),
                        name="teaminvite_accepted_or_revoked",
                    ),
                ],
            },
        ),
    ]
