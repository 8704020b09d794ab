"""Writes of the team's records: models, datasets (uploads included), recipes, derived students and models
registered from a run. Services own transactions."""

from __future__ import annotations

import logging
import uuid
from pathlib import Path
from typing import Any

from django.conf import settings
from django.core.exceptions import ValidationError
from django.db import transaction

from experiments.domain import engine_config, specs, validation
from experiments.domain import uploads as uploads_rules
from experiments.models import (
    DatasetSpec,
    ModelSpec,
    Recipe,
    Run,
    Team,
)

logger = logging.getLogger(__name__)


HARD_LABELS_RECIPE = "hard_labels"


def save_new(obj):
    obj.full_clean()
    obj.save()
    return obj


def model_spec_create(*, team: Team, created_by, **fields: Any) -> ModelSpec:
    fields = specs.clean_model_fields(fields)
    return save_new(ModelSpec(team=team, created_by=created_by, **fields))


def dataset_spec_create(*, team: Team, created_by, upload=None, **fields: Any) -> DatasetSpec:
    """Register a dataset; with source ``upload``, ``upload`` is the uploaded file (see the next function)."""
    if fields.get("source") == DatasetSpec.Source.UPLOAD:
        return dataset_spec_create_from_upload(team=team, created_by=created_by, upload=upload, **fields)
    if upload is not None:
        raise ValidationError({"upload": "A file is only used by the “Upload a file” source."})
    fields = specs.clean_dataset_fields(fields)
    return save_new(DatasetSpec(team=team, created_by=created_by, **fields))


def dataset_spec_create_from_upload(*, team: Team, created_by, upload, **fields: Any) -> DatasetSpec:
    """Store an uploaded data file, check that the engine can read it as this dataset, and register it.

    The file is written to ``ARTIFACT_ROOT/datasets/<team_id>/<uuid4><suffix>``: of the uploaded name only its
    suffix is used, from a whitelist, so no name can place the file anywhere else. The file is then read the
    way a run reads it; an unreadable or empty file, a missing text / label column or too few rows is an error
    on ``upload``. On any failure the stored file is deleted again.
    """
    from experiments.domain.uploads import too_large_message

    fields = {**fields, "source": DatasetSpec.Source.UPLOAD}
    fields.setdefault("task", DatasetSpec._meta.get_field("task").default)
    uploads_rules.refuse_upload_paths(fields)
    if upload is None:
        raise ValidationError({"upload": "Choose a file to upload."})
    original_name = Path(str(upload.name or "").replace("\\", "/")).name[:100]
    suffix = uploads_rules.upload_suffix(original_name)
    if suffix is None:
        raise ValidationError({"upload": f"Upload a {', '.join(uploads_rules.UPLOAD_SUFFIXES)} file."})
    cap = settings.DATASET_UPLOAD_MAX_BYTES
    if upload.size is not None and upload.size > cap:
        raise ValidationError({"upload": too_large_message(cap)})
    folder = uploads_rules.upload_dir() / str(team.pk)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{uuid.uuid4().hex}{suffix}"
    try:
        written = 0
        with path.open("xb") as out:
            for chunk in upload.chunks():
                written += len(chunk)
                if written > cap:
                    raise ValidationError({"upload": too_large_message(cap)})
                out.write(chunk)
        if written == 0:
            raise ValidationError({"upload": "The file is empty."})
        fields.update(_uploaded_dataset_facts(fields, path, original_name))
        fields = specs.clean_dataset_fields(fields, stored_path=path)
        return save_new(DatasetSpec(team=team, created_by=created_by, **fields))
    except BaseException:
        path.unlink(missing_ok=True)
        raise


def _uploaded_dataset_facts(fields: dict[str, Any], path: Path, original_name: str) -> dict[str, Any]:
    """Read a stored upload with the engine: its row counts per split, and its labels (classification)."""
    from workers.engine.config import DatasetConfig
    from workers.engine.data import load_dataset
    from workers.engine.errors import DataError

    spec = DatasetSpec(**{**fields, "local_path": str(path)})  # unsaved: only for its engine config
    try:
        data = load_dataset(DatasetConfig(**engine_config.dataset_config(spec)), task=spec.task)
    except DataError as exc:
        message = str(exc).replace(str(path), original_name).replace(path.name, original_name)
        raise ValidationError({"upload": f"The file cannot be used: {message}"}) from None
    except Exception:  # anything else the readers trip over: the content is not what its suffix says
        logger.info("uploaded dataset file %s could not be read", path, exc_info=True)
        raise ValidationError(
            {"upload": f"The file could not be read as a {path.suffix[1:]} file."}
        ) from None
    facts: dict[str, Any] = {"splits": {"train": len(data.train), "eval": len(data.eval)}}
    if spec.task == "classification":
        found = data.num_labels
        if found < 2:
            raise ValidationError(
                {
                    "upload": f"The file's column '{spec.label_column}' holds fewer than 2 labels; "
                    "classification needs at least 2."
                }
            )
        if not fields.get("num_labels"):
            facts["num_labels"] = found
            if not fields.get("label_names"):
                facts["label_names"] = list(data.label_names)
        elif fields["num_labels"] < found:
            raise ValidationError({"num_labels": f"The file's labels need {found} classes, more than "
                                                 f"{fields['num_labels']}."})
    return facts


def recipe_create(*, team: Team, created_by, name: str, scheme: str, terms: list[dict], description: str = "",
                  scheme_params: dict[str, Any] | None = None) -> Recipe:
    terms = validation.clean_terms(terms, scheme=scheme)
    scheme_params = validation.clean_scheme_params(scheme, scheme_params or {})
    version = (
        Recipe.objects.filter(team=team, name=name)
        .order_by("-version")
        .values_list("version", flat=True)
        .first()
        or 0
    ) + 1
    return save_new(
        Recipe(team=team, created_by=created_by, name=name, version=version, scheme=scheme, terms=terms,
               scheme_params=scheme_params, description=description)
    )


def hard_labels_recipe(*, team: Team) -> Recipe:
    """The team's hard-label baseline recipe (``ce`` only, no teacher), created on first use."""
    recipe, _ = Recipe.objects.get_or_create(
        team=team,
        name=HARD_LABELS_RECIPE,
        version=1,
        defaults={
            "scheme": Recipe.Scheme.HARD_LABELS,
            "terms": engine_config.HARD_LABELS_TERMS,
            "description": "Baseline: the student trained on hard labels only, added to every experiment.",
        },
    )
    return recipe


@transaction.atomic
def model_register_from_run(*, run: Run, name: str, created_by, allow_pending: bool = False) -> ModelSpec:
    """Register a run's output as a model, usable as a teacher or a student.

    With ``allow_pending`` a queued or running run may be registered: experiments that use the model wait for
    the run to succeed (and fail with a clear reason if it does not).
    """
    run = Run.objects.select_for_update().select_related("student", "experiment__dataset").get(pk=run.pk)
    usable = (
        (Run.Status.SUCCEEDED, Run.Status.QUEUED, Run.Status.RUNNING)
        if allow_pending
        else (Run.Status.SUCCEEDED,)
    )
    if run.status not in usable:
        raise ValidationError(
            {"run": f"Run #{run.pk} has not succeeded, so it has no trained model to register."}
        )
    student = run.student
    spec = ModelSpec(
        team=run.team,
        created_by=created_by,
        name=name,
        source=ModelSpec.Source.RUN,
        task=student.task,
        source_run=run,
        num_labels=student.num_labels,
        tokenizer_id=student.tokenizer_id,
        builtin_arch=student.builtin_arch,
        config=student.config,
        param_count=(run.result.get("student") or {}).get("params") or student.param_count,
        disk_size_bytes=(run.result.get("student") or {}).get("size_bytes"),
        notes=f"Trained by run #{run.pk} ({run.recipe}) on {run.experiment.dataset}.",
    )
    return save_new(spec)


def model_derive(*, parent: ModelSpec, name: str, created_by, layers: str | list[int],
                 hidden_size: int | None = None, intermediate_size: int | None = None,
                 num_attention_heads: int | None = None, notes: str = "") -> ModelSpec:
    """A smaller student built from ``parent`` (a layer subset and/or narrower widths), in the parent's team.

    Its weights are copied from the parent when a run loads it (``workers.engine.derive``); the tokenizer,
    task and labels are the parent's. Raises ValidationError keyed by the derive parameter at fault.
    """
    params: dict[str, Any] = {"layers": layers}
    widths = {"hidden_size": hidden_size, "intermediate_size": intermediate_size,
              "num_attention_heads": num_attention_heads}
    params |= {k: v for k, v in widths.items() if v is not None}
    fields = specs.clean_model_fields({"source": ModelSpec.Source.DERIVED, "parent": parent,
                                            "config": params})
    kept = fields["config"]["layers"]
    described = kept.replace("_", " ") if isinstance(kept, str) else "layers " + ", ".join(map(str, kept))
    shape = ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in fields["config"].items() if k != "layers")
    auto_notes = f"Derived from {parent}: {described}" + (f"; {shape}" if shape else "") + "."
    return save_new(ModelSpec(
        team=parent.team, created_by=created_by, name=name, source=ModelSpec.Source.DERIVED, parent=parent,
        task=parent.task, num_labels=parent.num_labels, tokenizer_id=parent.tokenizer_id,
        config=fields["config"], notes=f"{auto_notes}\n{notes}".strip(),
    ))


def derived_student_preview(*, parent: ModelSpec, layers: str) -> ModelSpec:
    """What :func:`derived_student` would use, without saving anything: the existing derived model, or an
    unsaved one (for counting runs and pre-flight checks before launch). Raises ValidationError for a bad
    preset."""
    existing = ModelSpec.objects.filter(team=parent.team, parent=parent, source=ModelSpec.Source.DERIVED,
                                        config={"layers": layers}).order_by("id").first()
    if existing is not None:
        return existing
    try:
        fields = specs.clean_model_fields({"source": ModelSpec.Source.DERIVED, "parent": parent,
                                                "config": {"layers": layers}})
    except ValidationError as exc:
        raise ValidationError({"derive_student": " ".join(exc.messages)}) from exc
    return ModelSpec(
        team=parent.team,
        name=f"{parent.name} ({layers.replace('_', ' ')} layer)",
        parent=parent,
        source=ModelSpec.Source.DERIVED,
        task=parent.task,
        num_labels=parent.num_labels,
        tokenizer_id=parent.tokenizer_id,
        config=fields["config"],
    )


def derived_student(*, parent: ModelSpec, layers: str, created_by) -> ModelSpec:
    """The student derived from ``parent`` by the layer preset ``layers``: an existing one, or a new one named
    after the parent (``"<parent> (every third layer)"``, numbered when the name is taken)."""
    preview = derived_student_preview(parent=parent, layers=layers)
    if preview.pk is not None:
        return preview
    base = preview.name[:110]
    taken = set(
        ModelSpec.objects.filter(team=parent.team, name__startswith=base).values_list("name", flat=True)
    )
    name = next(n for n in (base, *(f"{base} {i}" for i in range(2, len(taken) + 3))) if n not in taken)
    try:
        return model_derive(parent=parent, name=name, created_by=created_by, layers=layers)
    except ValidationError as exc:
        raise ValidationError({"derive_student": " ".join(exc.messages)}) from exc
