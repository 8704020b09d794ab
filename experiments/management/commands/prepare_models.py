"""Prepare the real pretrained models shipped in Python packages and register them for a team.

    python manage.py prepare_models                     # write the folders only
    python manage.py prepare_models --team "Demo team"  # … and register them as that team's models

The folders go under the models root: ``$DISTILLWEB_MODELS_DIR``, else ``<DISTILLWEB_VAR_DIR>/models``
(``var/models``). Registering needs that root inside ``MODEL_ROOTS`` (comma-separated env var of the folders
local models may be registered from), e.g. ``MODEL_ROOTS=/srv/distillweb/var/models``. Running it again
prepares nothing new and registers nothing twice.
"""

from __future__ import annotations

from pathlib import Path

from django.conf import settings
from django.core.exceptions import ValidationError
from django.core.management.base import BaseCommand, CommandError

from experiments.models import ModelSpec, Task, Team
from experiments.services import records

# (registered name, packaged model, task). A BERT encoder registered for classification gets a fresh head: a
# teacher on a topic dataset is fine-tuned from it first (a run here), students can be derived from it.
REGISTRATIONS = (
    ("all-MiniLM-L6-v2 ({n} classes)", "all-MiniLM-L6-v2", "classification"),
    ("paraphrase-MiniLM-L3-v2 ({n} classes)", "paraphrase-MiniLM-L3-v2", "classification"),
    ("all-MiniLM-L6-v2 (embedding)", "all-MiniLM-L6-v2", "embedding"),
    ("paraphrase-MiniLM-L3-v2 (embedding)", "paraphrase-MiniLM-L3-v2", "embedding"),
    ("SmolLM2-135M-Instruct", "SmolLM2-135M-Instruct", "causal_lm"),
)


def default_models_root() -> Path:
    return Path(settings.MODELS_DIR)


class Command(BaseCommand):
    help = "Write the packaged pretrained models as Hugging Face folders and (with --team) register them."

    def add_arguments(self, parser):
        from workers.engine.pretrained import PACKAGED

        parser.add_argument("--team", help="register the models for this team (its name or slug)")
        parser.add_argument("--root", type=Path,
                            help="models root (default: $DISTILLWEB_MODELS_DIR or var/models)")
        parser.add_argument("--only", nargs="+", choices=list(PACKAGED), help="only these models")
        parser.add_argument("--force", action="store_true", help="rebuild folders even if up to date")
        parser.add_argument("--num-labels", type=int, default=5,
                            help="classes of the classification registrations (default 5: BBC news topics)")

    def handle(self, *args, team=None, root=None, only=None, force=False, num_labels=5, **options):
        from transformers.utils import logging as hf_logging

        from workers.engine import pretrained
        from workers.engine.errors import ModelLoadError

        root = (root or default_models_root()).expanduser().resolve()
        target = self._team(team) if team else None
        if target is not None:
            self._check_root(root)
        if num_labels < 2:
            raise CommandError("--num-labels must be at least 2.")
        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
        try:
            prepared = pretrained.prepare_models(root, names=only, force=force, log=self.stdout.write)
        except ModelLoadError as exc:
            raise CommandError(str(exc)) from exc
        if target is None:
            self.stdout.write("Not registered (no --team given).")
            return
        for result in prepared:
            for name_pattern, model, task in REGISTRATIONS:
                if model == result.name:
                    self._register(target, name_pattern.format(n=num_labels), result, task, num_labels)

    def _team(self, name: str) -> Team:
        team = Team.objects.filter(name=name).first() or Team.objects.filter(slug=name).first()
        if team is None:
            known = ", ".join(Team.objects.values_list("name", flat=True)) or "none yet"
            raise CommandError(f"No team named '{name}' (teams: {known}).")
        return team

    def _check_root(self, root: Path) -> None:
        roots = [Path(r).expanduser().resolve() for r in settings.MODEL_ROOTS]
        if not any(root.is_relative_to(r) for r in roots):
            allowed = ", ".join(map(str, roots)) or "empty"
            raise CommandError(
                f"The models root {root} is not inside MODEL_ROOTS ({allowed}), so models there cannot be "
                f"registered. Set MODEL_ROOTS={root} (comma-separated folders) and run again, or pass --root "
                "with a folder inside MODEL_ROOTS."
            )

    def _register(self, team: Team, name: str, result, task: str, num_labels: int) -> None:
        if task not in Task.values:
            self.stdout.write(f"{name}: not registered (this server has no {task} task).")
            return
        existing = ModelSpec.objects.filter(team=team, name=name).first()
        if existing is not None:
            same_folder = Path(existing.local_path) == result.path.resolve()
            if existing.source == ModelSpec.Source.HF and same_folder:
                self.stdout.write(f"{name}: already registered for {team}.")
            else:
                self.stdout.write(self.style.WARNING(
                    f"{name}: {team} already has a different model with this name; left unchanged."))
            return
        manifest = result.manifest
        notes = manifest.get("description", "")
        if task == "classification":
            notes += (f" Registered as a {num_labels}-class classifier: the classification head is new, so "
                      "fine-tune it (a hard-label run) before using it as a teacher.")
        try:
            records.model_spec_create(
                team=team, created_by=None, name=name, source=ModelSpec.Source.HF,
                local_path=str(result.path), task=task,
                num_labels=num_labels if task == "classification" else 0,
                tokenizer_id=manifest.get("tokenizer_id", ""), param_count=manifest.get("parameters"),
                disk_size_bytes=manifest.get("size_bytes"), notes=notes.strip(),
            )
        except ValidationError as exc:
            raise CommandError(f"{name}: {'; '.join(exc.messages)}") from exc
        self.stdout.write(self.style.SUCCESS(f"{name}: registered for {team} ({task})."))
