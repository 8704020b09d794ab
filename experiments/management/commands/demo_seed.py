"""Seed a demo team: the digits dataset, a teacher trained here, and a distillation experiment."""

import os
import secrets
from pathlib import Path

from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand
from django.db import transaction

from experiments.models import DatasetSpec, ModelSpec, Recipe, Team
from experiments.services import launch, records, teams

DEMO_TEAM = "Demo team"


def demo_credentials_file() -> Path:
    return Path(settings.VAR_DIR) / "demo-credentials.txt"


class Command(BaseCommand):
    help = "Create the admin user and seed the demo team with a teacher-training run and a KD experiment."

    def add_arguments(self, parser):
        parser.add_argument(
            "--username", default=None, help="Admin user name (env DEMO_ADMIN_USER, default admin)"
        )
        parser.add_argument("--password", default=None, help="Admin password (env DEMO_ADMIN_PASSWORD)")
        parser.add_argument(
            "--teacher-steps", type=int, default=int(os.environ.get("DEMO_TEACHER_STEPS", 600))
        )
        parser.add_argument(
            "--student-steps", type=int, default=int(os.environ.get("DEMO_STUDENT_STEPS", 500))
        )

    def handle(self, *args, username=None, password=None, teacher_steps=600, student_steps=500, **options):
        username = username or os.environ.get("DEMO_ADMIN_USER", "admin")
        password = password or os.environ.get("DEMO_ADMIN_PASSWORD")
        admin = self._admin(username, password)
        if Team.objects.filter(name=DEMO_TEAM).exists():
            self.stdout.write("Demo team already seeded.")
            return
        with transaction.atomic():
            self._seed(admin, teacher_steps=teacher_steps, student_steps=student_steps)
        self.stdout.write(
            self.style.SUCCESS("Seeded the demo team: a teacher-training run and a KD experiment.")
        )

    def _admin(self, username: str, password: str | None):
        users = get_user_model()
        creds = demo_credentials_file()
        if password is None and creds.exists():
            saved_user, _, saved_password = creds.read_text().strip().partition(":")
            if saved_user == username:
                password = saved_password
        if password is None:
            password = secrets.token_urlsafe(12)
        user, created = users.objects.get_or_create(
            username=username, defaults={"email": f"{username}@localhost"}
        )
        if created or not user.check_password(password):
            user.set_password(password)
        user.is_staff = user.is_superuser = True
        user.save()
        creds.parent.mkdir(parents=True, exist_ok=True)
        creds.write_text(f"{username}:{password}\n")
        creds.chmod(0o600)
        self.stdout.write(self.style.SUCCESS(f"Admin login: {username} / {password} (saved in {creds})"))
        return user

    def _seed(self, admin, *, teacher_steps: int, student_steps: int) -> None:
        team = teams.team_create(name=DEMO_TEAM, leads=[admin])
        digits = records.dataset_spec_create(
            team=team,
            created_by=admin,
            name="digits",
            source=DatasetSpec.Source.BUILTIN,
            builtin_name="digits",
            notes="1,797 8×8 handwritten digits (scikit-learn), 10 classes.",
        )

        def mlp(name: str, hidden: list[int]) -> ModelSpec:
            return records.model_spec_create(
                team=team, created_by=admin, name=name, source=ModelSpec.Source.BUILTIN, builtin_arch="mlp",
                config={"hidden_sizes": hidden}, num_labels=10,
            )

        teacher_arch = mlp("mlp-256x2", [256, 256])
        small, medium = mlp("mlp-16", [16]), mlp("mlp-64", [64])
        hard_labels = records.hard_labels_recipe(team=team)
        kd = records.recipe_create(
            team=team, created_by=admin, name="kd-t4", scheme=Recipe.Scheme.OFFLINE,
            terms=[{"name": "ce", "weight": 0.1, "params": {}},
                   {"name": "kd", "weight": 0.9, "params": {"temperature": 4.0}}],
            description="Hinton et al. 2015: 0.1·CE + 0.9·τ²·KL at τ = 4.",
        )
        teacher_training = launch.experiment_create(
            team=team,
            created_by=admin,
            name="Train the digits teacher",
            dataset=digits,
            students=[teacher_arch],
            recipes=[hard_labels],
            seeds=[0],
            train={"max_steps": teacher_steps, "eval_every": 100, "lr": 0.01},
            description="A 2×256 MLP trained on hard labels; its output becomes the teacher below.",
        )
        teacher = records.model_register_from_run(
            run=teacher_training.runs.get(), name="digits-teacher", created_by=admin, allow_pending=True
        )
        launch.experiment_create(
            team=team,
            created_by=admin,
            name="Distill digits into two student sizes",
            dataset=digits,
            teacher=teacher,
            students=[small, medium],
            recipes=[kd],
            seeds=[0, 1, 2],
            train={"max_steps": student_steps, "eval_every": 100, "lr": 0.01, "labelled_fraction": 0.1},
            description=(
                "Labels are kept for 10% of the train rows; the rest are unlabelled inputs. Each student is "
                "distilled with kd (τ = 4) on all inputs and, as the baseline, trained on the labelled 10% "
                "alone, over three seeds."
            ),
        )
