"""Writes. Services own transactions and hand work to Celery only after the commit."""

from __future__ import annotations

import copy
import hashlib
import logging
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from django.conf import settings
from django.core.exceptions import ValidationError
from django.db import connection, transaction
from django.db.models import F, OuterRef, Q, Subquery
from django.db.models.functions import Coalesce
from django.utils import timezone
from django.utils.text import slugify

from workers.engine.memory import host_memory_bytes, out_of_memory_message

from . import broker, engine_config, rollups, routing, sweeps, validation
from .models import (
    RUN_TRANSITIONS,
    Artifact,
    DatasetSpec,
    Evaluation,
    Experiment,
    Membership,
    MetricPoint,
    ModelSpec,
    Recipe,
    Run,
    RunTransition,
    Team,
    Worker,
)

logger = logging.getLogger(__name__)

HARD_LABELS_RECIPE = "hard_labels"


# --- teams ----------------------------------------------------------------------------------------
@transaction.atomic
def team_create(*, name: str, members: Iterable = (), leads: Iterable = ()) -> Team:
    team = Team.objects.create(name=name, slug=slugify(name)[:100] or "team")
    Membership.objects.bulk_create(
        [Membership(team=team, user=u, role=Membership.Role.MEMBER) for u in members]
        + [Membership(team=team, user=u, role=Membership.Role.LEAD) for u in leads]
    )
    return team


def _save_new(obj):
    obj.full_clean()
    obj.save()
    return obj


def model_spec_create(*, team: Team, created_by, **fields: Any) -> ModelSpec:
    fields = validation.clean_model_fields(fields)
    return _save_new(ModelSpec(team=team, created_by=created_by, **fields))


def dataset_spec_create(*, team: Team, created_by, upload=None, **fields: Any) -> DatasetSpec:
    """Register a dataset; with source ``upload``, ``upload`` is the uploaded file (see the next function)."""
    if fields.get("source") == DatasetSpec.Source.UPLOAD:
        return dataset_spec_create_from_upload(team=team, created_by=created_by, upload=upload, **fields)
    if upload is not None:
        raise ValidationError({"upload": "A file is only used by the “Upload a file” source."})
    fields = validation.clean_dataset_fields(fields)
    return _save_new(DatasetSpec(team=team, created_by=created_by, **fields))


def dataset_spec_create_from_upload(*, team: Team, created_by, upload, **fields: Any) -> DatasetSpec:
    """Store an uploaded data file, check that the engine can read it as this dataset, and register it.

    The file is written to ``ARTIFACT_ROOT/datasets/<team_id>/<uuid4><suffix>``: of the uploaded name only its
    suffix is used, from a whitelist, so no name can place the file anywhere else. The file is then read the way a
    run reads it; an unreadable or empty file, a missing text / label column or too few rows is an error on
    ``upload``. On any failure the stored file is deleted again.
    """
    from .uploads import too_large_message

    fields = {**fields, "source": DatasetSpec.Source.UPLOAD}
    fields.setdefault("task", DatasetSpec._meta.get_field("task").default)
    validation.refuse_upload_paths(fields)
    if upload is None:
        raise ValidationError({"upload": "Choose a file to upload."})
    original_name = Path(str(upload.name or "").replace("\\", "/")).name[:100]
    suffix = validation.upload_suffix(original_name)
    if suffix is None:
        raise ValidationError({"upload": f"Upload a {', '.join(validation.UPLOAD_SUFFIXES)} file."})
    cap = settings.DATASET_UPLOAD_MAX_BYTES
    if upload.size is not None and upload.size > cap:
        raise ValidationError({"upload": too_large_message(cap)})
    folder = validation.upload_dir() / str(team.pk)
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
        fields = validation.clean_dataset_fields(fields, stored_path=path)
        return _save_new(DatasetSpec(team=team, created_by=created_by, **fields))
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
        raise ValidationError({"upload": f"The file could not be read as a {path.suffix[1:]} file."}) from None
    facts: dict[str, Any] = {"splits": {"train": len(data.train), "eval": len(data.eval)}}
    if spec.task == "classification":
        found = data.num_labels
        if found < 2:
            raise ValidationError({"upload": f"The file's column '{spec.label_column}' holds fewer than 2 labels; "
                                             "classification needs at least 2."})
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
    version = (Recipe.objects.filter(team=team, name=name).order_by("-version").values_list("version", flat=True)
               .first() or 0) + 1
    return _save_new(
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
    usable = (Run.Status.SUCCEEDED, Run.Status.QUEUED, Run.Status.RUNNING) if allow_pending else (Run.Status.SUCCEEDED,)
    if run.status not in usable:
        raise ValidationError({"run": f"Run #{run.pk} has not succeeded, so it has no trained model to register."})
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
    return _save_new(spec)


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
    fields = validation.clean_model_fields({"source": ModelSpec.Source.DERIVED, "parent": parent,
                                            "config": params})
    kept = fields["config"]["layers"]
    described = kept.replace("_", " ") if isinstance(kept, str) else "layers " + ", ".join(map(str, kept))
    shape = ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in fields["config"].items() if k != "layers")
    auto_notes = f"Derived from {parent}: {described}" + (f"; {shape}" if shape else "") + "."
    return _save_new(ModelSpec(
        team=parent.team, created_by=created_by, name=name, source=ModelSpec.Source.DERIVED, parent=parent,
        task=parent.task, num_labels=parent.num_labels, tokenizer_id=parent.tokenizer_id,
        config=fields["config"], notes=f"{auto_notes}\n{notes}".strip(),
    ))


def derived_student_preview(*, parent: ModelSpec, layers: str) -> ModelSpec:
    """What :func:`derived_student` would use, without saving anything: the existing derived model, or an unsaved
    one (for counting runs and pre-flight checks before launch). Raises ValidationError for a bad preset."""
    existing = ModelSpec.objects.filter(team=parent.team, parent=parent, source=ModelSpec.Source.DERIVED,
                                        config={"layers": layers}).order_by("id").first()
    if existing is not None:
        return existing
    try:
        fields = validation.clean_model_fields({"source": ModelSpec.Source.DERIVED, "parent": parent,
                                                "config": {"layers": layers}})
    except ValidationError as exc:
        raise ValidationError({"derive_student": " ".join(exc.messages)}) from exc
    return ModelSpec(team=parent.team, name=f"{parent.name} ({layers.replace('_', ' ')} layer)", parent=parent,
                     source=ModelSpec.Source.DERIVED, task=parent.task, num_labels=parent.num_labels,
                     tokenizer_id=parent.tokenizer_id, config=fields["config"])


def derived_student(*, parent: ModelSpec, layers: str, created_by) -> ModelSpec:
    """The student derived from ``parent`` by the layer preset ``layers``: an existing one, or a new one named
    after the parent (``"<parent> (every third layer)"``, numbered when the name is taken)."""
    preview = derived_student_preview(parent=parent, layers=layers)
    if preview.pk is not None:
        return preview
    base = preview.name[:110]
    taken = set(ModelSpec.objects.filter(team=parent.team, name__startswith=base).values_list("name", flat=True))
    name = next(n for n in (base, *(f"{base} {i}" for i in range(2, len(taken) + 3))) if n not in taken)
    try:
        return model_derive(parent=parent, name=name, created_by=created_by, layers=layers)
    except ValidationError as exc:
        raise ValidationError({"derive_student": " ".join(exc.messages)}) from exc


# --- experiments ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class PlannedRun:
    """One run to create. ``teacher_from`` is the index in the plan of the run whose output is this run's
    teacher (chained recipes); otherwise the teacher is ``teacher`` (a record). ``train`` and ``term_values``
    are the run's point of the sweep (empty when nothing is swept)."""

    student: ModelSpec
    recipe: Recipe
    seed: int
    is_baseline: bool
    teacher: ModelSpec | None = None
    teacher_from: int | None = None
    stage: str = ""
    train: dict[str, Any] = field(default_factory=dict)
    term_values: dict[str, Any] = field(default_factory=dict)


def experiment_plan(
    *,
    team: Team,
    students: Sequence[ModelSpec],
    recipes: Sequence[Recipe],
    seeds: Sequence[int],
    teacher: ModelSpec | None = None,
    assistant: ModelSpec | None = None,
    with_baseline: bool = True,
    train_points: Sequence[dict[str, Any]] = ({},),
    term_sweeps: dict[str, list[Any]] | None = None,
) -> list[PlannedRun]:
    """Every run an experiment will create: students × seeds × training-setting points × recipes × the
    recipe's term points, plus one hard-label baseline per student, seed and training-setting point. Chained
    recipes add their intermediate runs: ``teacher_assistant`` distils the assistant first;
    ``self_distillation`` chains its generations, each the teacher of the next. Embedding data has no labels,
    so there is no hard-label baseline there (``with_baseline=False``). ``sweeps.count_runs`` gives the same
    number without building the plan."""
    chosen = [r for r in recipes if r.scheme != Recipe.Scheme.HARD_LABELS]
    picked_baselines = [r for r in recipes if r.scheme == Recipe.Scheme.HARD_LABELS]
    baseline = picked_baselines[0] if picked_baselines else hard_labels_recipe(team=team)
    term_points = {
        r.pk: sweeps.grid_points(sweeps.recipe_axes((t.get("name") for t in r.terms), term_sweeps or {}))
        for r in chosen
    }
    plan: list[PlannedRun] = []
    for student in students:
        for seed in seeds:
            for train in train_points:
                for recipe in chosen:
                    for values in term_points[recipe.pk]:
                        point = {"train": train, "term_values": values}
                        if recipe.scheme == Recipe.Scheme.TEACHER_ASSISTANT:
                            plan.append(PlannedRun(assistant, recipe, seed, False, teacher=teacher, stage="assistant",
                                                   **point))
                            plan.append(PlannedRun(student, recipe, seed, False, teacher_from=len(plan) - 1, **point))
                        elif recipe.scheme == Recipe.Scheme.SELF_DISTILLATION:
                            generations = sweeps.chain_length(recipe.scheme, recipe.scheme_params)
                            for generation in range(1, generations + 1):
                                previous = {"teacher": teacher} if generation == 1 else {"teacher_from": len(plan) - 1}
                                stage = "" if generation == generations else f"generation {generation}"
                                plan.append(PlannedRun(student, recipe, seed, False, stage=stage, **previous, **point))
                        else:
                            plan.append(PlannedRun(student, recipe, seed, False, teacher=teacher, **point))
                if with_baseline:
                    plan.append(PlannedRun(student, baseline, seed, is_baseline=True, train=train))
    return plan


@dataclass(frozen=True)
class ExperimentInputs:
    """An experiment's inputs once validated: what ``experiment_create`` stores and plans from."""

    train: dict[str, Any]              # defaults filled in; a swept setting holds its list of values
    seeds: list[int]
    teacher_weights: list[float]
    term_sweeps: dict[str, list[Any]]
    count: sweeps.RunCount


def experiment_validate(
    *,
    team: Team,
    dataset: DatasetSpec,
    students: Sequence[ModelSpec],
    recipes: Sequence[Recipe],
    seeds: Sequence[int],
    teacher: ModelSpec | None = None,
    assistant: ModelSpec | None = None,
    extra_teachers: Sequence[ModelSpec] = (),
    teacher_weights: Sequence[float] = (),
    train: dict[str, Any] | None = None,
    term_sweeps: dict[str, list[Any]] | None = None,
) -> ExperimentInputs:
    """Check an experiment without creating anything: every field's errors at once, then the size of the grid
    against ``MAX_RUNS_PER_EXPERIMENT`` (counted, never expanded). Raises ValidationError with field keys; the
    run limit is reported on the swept fields (on ``seeds`` when nothing is swept)."""
    errors: dict[str, list[str]] = {}
    cleaned: dict[str, Any] = {}
    checks = {
        "train": lambda: validation.check_selection(validation.clean_train(train or {}), dataset=dataset),
        "seeds": lambda: validation.clean_seeds(seeds),
        "teacher_weights": lambda: validation.check_experiment(
            team=team, dataset=dataset, teacher=teacher, students=students, recipes=recipes, assistant=assistant,
            extra_teachers=extra_teachers, teacher_weights=teacher_weights),
        "term_sweeps": lambda: validation.clean_term_sweeps(term_sweeps or {}, recipes=recipes),
    }
    for name, check in checks.items():
        try:
            cleaned[name] = check()
        except ValidationError as exc:
            for key, messages in exc.message_dict.items():
                errors.setdefault(key, []).extend(m for m in messages if m not in errors.get(key, []))
    if errors:
        raise ValidationError(errors)
    count = sweeps.count_runs(students=len(students), seeds=len(cleaned["seeds"]), train=cleaned["train"],
                              recipes=recipes, term_sweeps=cleaned["term_sweeps"],
                              with_baseline=dataset.task != "embedding")
    limit = settings.MAX_RUNS_PER_EXPERIMENT
    if count.total > limit:
        message = (f"This experiment would create {count.total:,} runs; the limit is {limit} "
                   f"({count.describe()}).")
        swept_fields = [*sweeps.train_axes(cleaned["train"]), *(["term_sweeps"] if cleaned["term_sweeps"] else [])]
        raise ValidationError({key: message for key in swept_fields or ["seeds"]})
    for recipe in recipes:
        if recipe.scheme != Recipe.Scheme.HARD_LABELS:
            for values in sweeps.grid_points(sweeps.recipe_axes((t.get("name") for t in recipe.terms),
                                                                cleaned["term_sweeps"])):
                _swept_terms(recipe, values)  # raises on a combination the engine refuses
    return ExperimentInputs(train=cleaned["train"], seeds=cleaned["seeds"], teacher_weights=cleaned["teacher_weights"],
                            term_sweeps=cleaned["term_sweeps"], count=count)


def _swept_terms(recipe: Recipe, values: dict[str, Any]) -> list[dict[str, Any]]:
    """The recipe's terms with this run's swept values set, validated like a recipe's own terms."""
    if not values:
        return recipe.terms
    terms = sweeps.apply_term_values(recipe.terms, values)
    try:
        return validation.clean_terms(terms, scheme=recipe.scheme)
    except ValidationError as exc:
        point = ", ".join(f"{axis}={sweeps.format_number(v)}" for axis, v in values.items())
        problems = " ".join(m for ms in exc.message_dict.values() for m in ms)
        raise ValidationError({"term_sweeps": f"Recipe {recipe} with {point}: {problems}"}) from None


def _run_config(p: PlannedRun, *, experiment: Experiment, upstream: Run | None, extra_teachers: Sequence[ModelSpec],
                teacher_weights: Sequence[float], base_train: dict[str, Any]) -> dict[str, Any]:
    """The frozen config of a planned run, with its concrete point of the sweep.

    ``build_run_config`` reads the training settings from the experiment and the terms from the recipe, so it is
    handed unsaved copies holding this run's concrete values (the records themselves keep the sweep).
    """
    concrete = copy.copy(experiment)
    concrete.train = {**base_train, **p.train}
    recipe = p.recipe
    if p.term_values:
        recipe = copy.copy(p.recipe)
        recipe.terms = _swept_terms(p.recipe, p.term_values)
    return engine_config.build_run_config(
        experiment=concrete, student=p.student, recipe=recipe, seed=p.seed, teacher=p.teacher,
        teacher_run=upstream, extra_teachers=extra_teachers, teacher_weights=teacher_weights,
    )


@transaction.atomic
def experiment_create(
    *,
    team: Team,
    created_by,
    name: str,
    dataset: DatasetSpec,
    students: Sequence[ModelSpec],
    recipes: Sequence[Recipe],
    seeds: Sequence[int],
    teacher: ModelSpec | None = None,
    assistant: ModelSpec | None = None,
    extra_teachers: Sequence[ModelSpec] = (),
    teacher_weights: Sequence[float] = (),
    train: dict[str, Any] | None = None,
    term_sweeps: dict[str, list[Any]] | None = None,
    description: str = "",
    derive_student: str = "",
) -> Experiment:
    """Create the experiment and all its runs in one transaction; each run is enqueued after the commit.

    ``derive_student`` (``every_other`` / ``every_third``) adds a student derived from the teacher (the model
    already registered for it, or a new one created in the same transaction: it disappears if the experiment
    is refused).

    A training setting given as a list, and each entry of ``term_sweeps`` (``{"kd.temperature": [2, 4]}``), is
    swept: one run per point of the grid (see ``experiment_plan``), each run's frozen config holding its
    concrete values. The sweep is kept in ``Experiment.train`` (swept settings as lists, term sweeps under
    ``"term_sweeps"``).

    Raises ValidationError with field keys (teacher, students, recipes, seeds, the training settings,
    term_sweeps, dataset, assistant, extra_teachers, teacher_weights) and creates nothing when the combination
    cannot run, is over the run limit, or fails a blocking pre-flight check (``preflight.launch_errors``).
    """
    from . import preflight

    if derive_student:
        if teacher is None:
            raise ValidationError({"derive_student": "Choose a teacher to derive a student from."})
        students = [*students, derived_student(parent=teacher, layers=derive_student, created_by=created_by)]
    inputs = experiment_validate(
        team=team, dataset=dataset, students=students, recipes=recipes, seeds=seeds, teacher=teacher,
        assistant=assistant, extra_teachers=extra_teachers, teacher_weights=teacher_weights, train=train,
        term_sweeps=term_sweeps,
    )
    blocking = preflight.launch_errors(
        dataset=dataset, teacher=teacher, students=students, recipes=recipes, assistant=assistant,
        extra_teachers=extra_teachers, train=inputs.train,
    )
    if blocking:
        raise ValidationError(blocking)
    axes = sweeps.train_axes(inputs.train)
    base_train = {k: v for k, v in inputs.train.items() if k not in axes}
    stored_train = {**inputs.train, **({"term_sweeps": inputs.term_sweeps} if inputs.term_sweeps else {})}
    plan = experiment_plan(team=team, students=students, recipes=recipes, seeds=inputs.seeds, teacher=teacher,
                           assistant=assistant, with_baseline=dataset.task != "embedding",
                           train_points=sweeps.grid_points(axes), term_sweeps=inputs.term_sweeps)
    experiment = _save_new(
        Experiment(team=team, created_by=created_by, name=name, description=description, teacher=teacher,
                   assistant=assistant, teacher_weights=list(inputs.teacher_weights), dataset=dataset,
                   seeds=list(inputs.seeds), train=stored_train)
    )
    experiment.students.set(students)
    experiment.recipes.set(recipes)
    experiment.extra_teachers.set(extra_teachers)
    runs: list[Run] = []
    router = routing.RunRouter()  # one read of the worker table for all the runs
    for p in plan:
        upstream = runs[p.teacher_from] if p.teacher_from is not None else None
        uses_teacher = p.recipe.needs_teacher
        config = _run_config(p, experiment=experiment, upstream=upstream, extra_teachers=extra_teachers,
                             teacher_weights=inputs.teacher_weights, base_train=base_train)
        # The config names an upstream run only by its id, which exists already: one INSERT per run.
        run = Run(
            team=team, experiment=experiment, student=p.student, recipe=p.recipe, seed=p.seed,
            is_baseline=p.is_baseline, stage=p.stage, teacher=p.teacher if uses_teacher else None,
            total_steps=config["train"]["max_steps"],
            waiting_for=upstream or (_pending_source_run(p.teacher) if uses_teacher else None)
            or _pending_source_run(p.student),
            config=config,
        )
        run.queue = router.queue_for(run.config)
        run.save()
        runs.append(run)
    for run in runs:
        if run.waiting_for_id is None:
            _enqueue_on_commit(run)
    return experiment


def _pending_source_run(spec: ModelSpec | None) -> Run | None:
    """The run that still has to produce this model's weights, if any."""
    if spec is None or spec.source != ModelSpec.Source.RUN:
        return None
    source_run = spec.source_run
    return None if source_run.status == Run.Status.SUCCEEDED else source_run


def _enqueue_on_commit(run: Run, *, task_id: str | None = None) -> None:
    """Send the run's task to its queue once the transaction commits. ``task_id``: the delivery the run expects
    (already recorded on the run); None records a new one first."""
    _send_on_commit(run_id=run.id, queue=run.queue, task_id=task_id)


def _send_on_commit(*, run_id: int, queue: str, task_id: str | None) -> None:
    transaction.on_commit(lambda: _dispatch(run_id=run_id, queue=queue, task_id=task_id))


# After a failed send, skip sends for this long: a request that launches 200 runs while the broker is down
# must not wait for 200 timeouts. The lifecycle sweep sends every queued run whose message never arrived.
_BROKER_BACKOFF_S = 10.0
_broker_down_until = 0.0


def _dispatch(*, run_id: int, queue: str, task_id: str | None) -> None:
    from kombu.exceptions import OperationalError as BrokerError
    from redis.exceptions import RedisError  # a timeout kombu did not wrap

    from workers.tasks import run_distillation

    global _broker_down_until
    if time.monotonic() < _broker_down_until:
        logger.warning("broker unreachable: run %s stays queued until the lifecycle sweep sends it", run_id)
        return
    if task_id is None:
        # Record the id first, so the run can be revoked while queued and only this message claims it.
        task_id = str(uuid.uuid4())
        if not Run.objects.filter(id=run_id, status=Run.Status.QUEUED, task_id="").update(task_id=task_id):
            return  # cancelled meanwhile, or already expecting another message
    try:
        # In the web process this gives up within about 2 × BROKER_PUBLISH_TIMEOUT_S (experiments/broker.py).
        run_distillation.apply_async(args=(run_id,), queue=queue, task_id=task_id)
    except (BrokerError, OSError, RedisError):
        _broker_down_until = time.monotonic() + _BROKER_BACKOFF_S
        logger.exception("could not send run %s to the broker; the lifecycle sweep sends it again", run_id)


def _revoke_on_commit(task_id: str) -> None:
    """Tell the workers to drop the task's message (a cancelled queued run); the claim refuses it anyway."""

    def revoke() -> None:
        from celery import current_app

        try:
            current_app.control.revoke(task_id)
        except Exception:  # best effort: a cancelled run is never claimed, revoked or not
            logger.warning("could not revoke task %s", task_id, exc_info=True)

    # Never on a request's thread in the web process: a hung broker would hold it (experiments/broker.py).
    transaction.on_commit(lambda: broker.off_the_request(revoke, what="revoke"))


# --- the run lifecycle ------------------------------------------------------------------------------
# RUN_TRANSITIONS (experiments.models) is the state machine and _transition the only code that changes a run's
# status. The heartbeat is the run's lease: the worker renews it with every metric, progress and checkpoint
# write; a running run whose lease expired lost its worker and is requeued (run_requeue_stale, run by celery
# beat) or taken over by the next delivery, up to RUN_MAX_ATTEMPTS attempts.
def _transition(
    *,
    run_id: int,
    to: str,
    sources: Sequence[str],
    reason: str,
    where: Q | None = None,
    values: dict[str, Any] | None = None,
    worker_name: str | None = None,
    related: Sequence[str] = (),
) -> Run | None:
    """Move the run from one of ``sources`` to ``to`` and record the RunTransition, in one transaction.

    Each source gets one conditional UPDATE (``status = source AND where``), so of two concurrent changes exactly
    one applies. Returns the updated run, or None when it was in none of ``sources`` or ``where`` did not hold.
    """
    for source in sources:
        if to not in RUN_TRANSITIONS[source]:
            raise ValueError(f"A run cannot go from {source} to {to}.")
    now = timezone.now()
    fields: dict[str, Any] = {"status": to}
    if to in Run.TERMINAL:
        fields |= {"finished_at": now, "heartbeat_at": now}
    else:
        fields["finished_at"] = None
    if to == Run.Status.RUNNING:
        fields |= {"started_at": Coalesce("started_at", now), "heartbeat_at": now}
    fields |= values or {}
    with transaction.atomic():
        for source in sources:
            if Run.objects.filter(where or Q(), id=run_id, status=source).update(**fields):
                run = Run.objects.select_related(*related).get(id=run_id)
                RunTransition.objects.create(
                    run=run, from_status=source, to_status=to, at=now, reason=reason[:2000], attempt=run.attempt,
                    worker_name=run.worker_name if worker_name is None else worker_name,
                )
                return run
    return None


def _lease_cutoff() -> datetime:
    return timezone.now() - timedelta(seconds=settings.RUN_HEARTBEAT_TIMEOUT_S)


def _attempts_since_requeue(run_id: int, attempt: int) -> int:
    """Attempts made since the run was last requeued by a user (each user requeue starts a fresh budget)."""
    base = (RunTransition.objects.filter(run_id=run_id, to_status=Run.Status.QUEUED,
                                         from_status__in=[Run.Status.FAILED, Run.Status.CANCELLED])
            .order_by("-id").values_list("attempt", flat=True).first())
    return attempt - (base or 0)


def _expire_lease(run_id: int, *, next_task_id: str) -> Run | None:
    """A running run whose lease expired: requeue it for ``next_task_id``, cancel it when cancellation had been
    requested, or fail it once RUN_MAX_ATTEMPTS attempts have lost their worker. None if its lease is alive."""
    cutoff = _lease_cutoff()
    stale = (Run.objects.filter(id=run_id, status=Run.Status.RUNNING, heartbeat_at__lt=cutoff)
             .values("worker_name", "attempt", "cancel_requested", "heartbeat_at").first())
    if stale is None:
        return None
    worker = stale["worker_name"] or "its worker"
    silent = int((timezone.now() - stale["heartbeat_at"]).total_seconds())
    still_stale = Q(heartbeat_at__lt=cutoff)  # a worker that renewed in the meantime keeps its run
    if stale["cancel_requested"]:
        reason = f"Cancelled: {worker} stopped responding ({silent} s) after cancellation was requested."
        return _transition(run_id=run_id, to=Run.Status.CANCELLED, sources=[Run.Status.RUNNING], where=still_stale,
                           reason=reason)
    attempts = _attempts_since_requeue(run_id, stale["attempt"])
    if attempts >= settings.RUN_MAX_ATTEMPTS:
        error = f"The worker running this run stopped responding {attempts} times; giving up."
        run = _transition(run_id=run_id, to=Run.Status.FAILED, sources=[Run.Status.RUNNING], where=still_stale,
                          values={"error": error}, reason=f"{error} (last: {worker}, silent {silent} s)")
        if run is not None:
            _fail_dependents(run_id, reason=f"Run #{run_id}, which trains this run's teacher, failed: {error}")
        return run
    return _transition(
        run_id=run_id, to=Run.Status.QUEUED, sources=[Run.Status.RUNNING], where=still_stale,
        values={"task_id": next_task_id},
        reason=f"Worker lost: {worker} stopped renewing the lease ({silent} s without a heartbeat); "
               f"requeued for attempt {attempts + 1} of {settings.RUN_MAX_ATTEMPTS}.",
    )


def run_claim(*, run_id: int, task_id: str, worker_name: str) -> Run | None:
    """Claim the run for this delivery with one conditional UPDATE.

    A run that ran before is claimed only by the delivery it expects (its recorded ``task_id``), so the old
    message of a requeued run claims nothing; one that never ran, by any delivery. A running run whose lease
    expired is requeued first (its restart budget permitting) and then claimed: it resumes from its last
    checkpoint. Returns None when a live delivery owns the run, it has finished or been cancelled, or it waits
    for another run.
    """
    with transaction.atomic():
        _expire_lease(run_id, next_task_id=task_id)
        return _transition(
            run_id=run_id, to=Run.Status.RUNNING, sources=[Run.Status.QUEUED],
            where=(Q(attempt=0) | Q(task_id="") | Q(task_id=task_id)) & Q(cancel_requested=False)
            & (Q(waiting_for__isnull=True) | Q(waiting_for__status=Run.Status.SUCCEEDED)),
            values={"task_id": task_id, "worker_name": worker_name, "attempt": F("attempt") + 1, "error": ""},
            reason=f"Claimed by {worker_name or 'a worker'}.",
            related=("experiment", "student", "teacher", "recipe"),
        )


def run_requeue_stale() -> dict[str, int]:
    """Requeue every running run whose lease expired (a fresh task on the run's queue), or fail it when its
    restart budget is spent. Returns how many runs went to each status."""
    counts: dict[str, int] = {}
    stale = Run.objects.filter(status=Run.Status.RUNNING, heartbeat_at__lt=_lease_cutoff())
    for run_id in stale.values_list("id", flat=True):
        with transaction.atomic():
            run = _expire_lease(run_id, next_task_id=str(uuid.uuid4()))
            if run is None:
                continue
            if run.status == Run.Status.QUEUED:
                logger.warning("run %s lost its worker %s; requeued as task %s", run_id, run.worker_name, run.task_id)
                _enqueue_on_commit(run, task_id=run.task_id)
            counts[run.status] = counts.get(run.status, 0) + 1
    return counts


def run_worker_process_lost(*, run_id: int, task_id: str, worker_name: str, status: str) -> Run | None:
    """The pool process running this delivery of the run died under its worker (Celery's WorkerLostError, seen by
    the worker's main process): requeue the run at once (it resumes from its last checkpoint), cancel it when
    cancellation had been requested, or fail it once RUN_MAX_ATTEMPTS attempts have lost their worker.

    ``status`` is how the process ended, as Celery words it ("signal 9 (SIGKILL)", "exitcode 1"). A SIGKILL is how
    the kernel's out-of-memory killer ends a process, so the reason (and the error, once the budget is spent) says
    so, with the run's memory estimate, this machine's RAM and what to change. Returns the updated run, or None
    when this delivery no longer owns it (it finished or was taken over in the meantime).
    """
    with transaction.atomic():
        run = Run.objects.filter(id=run_id, status=Run.Status.RUNNING, task_id=task_id).first()
        if run is None:
            return None
        owned = Q(task_id=task_id)
        worker = worker_name or run.worker_name or "its worker"
        at = f" at step {run.step}" if run.step else ""
        if "SIGKILL" in status:
            what = out_of_memory_message(
                run.config, gpu=False, estimate=routing.run_memory_estimate(run=run),
                available_bytes=host_memory_bytes(),
                headline=f"The worker process running this run on {worker} was killed (SIGKILL){at}, most likely "
                         f"by the kernel's out-of-memory killer")
        else:
            what = f"The worker process running this run on {worker} exited prematurely ({status}){at}."
        if run.cancel_requested:
            return _transition(run_id=run_id, to=Run.Status.CANCELLED, sources=[Run.Status.RUNNING], where=owned,
                               reason=f"Cancelled: {what}")
        attempts = _attempts_since_requeue(run_id, run.attempt)
        if attempts >= settings.RUN_MAX_ATTEMPTS:
            error = f"{what} That was attempt {attempts} of {settings.RUN_MAX_ATTEMPTS}; giving up."
            failed = _transition(run_id=run_id, to=Run.Status.FAILED, sources=[Run.Status.RUNNING], where=owned,
                                 values={"error": error[:5000]}, reason=error)
            if failed is not None:
                _fail_dependents(run_id, reason=f"Run #{run_id}, which trains this run's teacher, failed: {error[:500]}")
            return failed
        next_task_id = str(uuid.uuid4())
        requeued = _transition(run_id=run_id, to=Run.Status.QUEUED, sources=[Run.Status.RUNNING], where=owned,
                               values={"task_id": next_task_id},
                               reason=f"{what} Requeued for attempt {attempts + 1} of {settings.RUN_MAX_ATTEMPTS}.")
        if requeued is not None:
            logger.warning("run %s: its worker process died (%s); requeued as task %s", run_id, status, next_task_id)
            _enqueue_on_commit(requeued, task_id=next_task_id)
        return requeued


def run_redispatch_lost(*, queue_size: Callable[[str], int | None]) -> int:
    """Send again the queued runs whose message seems lost (a broker that restarted without persistence, or a
    send that failed): ready to start, queued for longer than RUN_REDISPATCH_AFTER_S, on a queue the broker
    reports empty (``queue_size``: messages waiting in a queue, None when unknown). A duplicate is harmless: one
    conditional update claims the run, once. Returns how many runs were sent."""
    cutoff = timezone.now() - timedelta(seconds=settings.RUN_REDISPATCH_AFTER_S)
    last_queued = (RunTransition.objects.filter(run=OuterRef("pk"), to_status=Run.Status.QUEUED)
                   .order_by("-id").values("at")[:1])
    waiting = (Run.objects.filter(status=Run.Status.QUEUED, cancel_requested=False)
               .filter(Q(waiting_for__isnull=True) | Q(waiting_for__status=Run.Status.SUCCEEDED))
               .annotate(queued_since=Coalesce(Subquery(last_queued), "created_at"))
               .filter(queued_since__lt=cutoff).values_list("id", "queue"))
    by_queue: dict[str, list[int]] = {}
    for run_id, queue in waiting:
        by_queue.setdefault(queue, []).append(run_id)
    sent = 0
    for queue, run_ids in by_queue.items():
        if queue_size(queue) != 0:
            continue  # messages are waiting: these runs may simply be behind them
        for run_id in run_ids:
            task_id = str(uuid.uuid4())
            with transaction.atomic():
                if Run.objects.filter(id=run_id, status=Run.Status.QUEUED).update(task_id=task_id):
                    logger.warning("run %s has been queued without a message on %s; sending it again", run_id, queue)
                    _send_on_commit(run_id=run_id, queue=queue, task_id=task_id)
                    sent += 1
    return sent


def _owned(run_id: int, task_id: str):
    """The run row, only while this delivery still owns it (a taken-over or cancelled run matches nothing)."""
    return Run.objects.filter(id=run_id, task_id=task_id, status=Run.Status.RUNNING)


def _telemetry_commit() -> None:
    """Inside a transaction: let Postgres confirm its commit before the WAL is on disk (saves a disk flush, about
    4 ms here, per write). Heartbeats and progress are rewritten within seconds, so losing the last ones in a
    crash of the database server costs nothing; the rest of the database stays consistent.
    https://www.postgresql.org/docs/current/wal-async-commit.html"""
    if connection.vendor == "postgresql":
        with connection.cursor() as cursor:
            cursor.execute("SET LOCAL synchronous_commit TO OFF")


def run_record_metrics(*, run_id: int, task_id: str, points: Sequence[tuple[str, int, float, datetime]],
                       durable: bool = True, progress: tuple[int, int, float | None] | None = None) -> bool:
    """Write a batch of (name, step, value, wall_time) points and renew the lease, with the progress (step,
    total, samples/s) when given: one transaction.

    A resumed run re-logs the steps after its last checkpoint: the upsert on (run, name, step) keeps exactly one
    point per step. ``durable=False`` (routine batches) confirms the commit before the disk flush; the next
    durable write, the one before each checkpoint, flushes them too. Returns False when this delivery no longer
    owns the run.
    """
    fields: dict[str, Any] = {"heartbeat_at": timezone.now()}
    if progress is not None:
        step, total, samples_per_s = progress
        fields |= {"step": min(step, total), "total_steps": total, "samples_per_s": samples_per_s}
    with transaction.atomic():
        if not durable:
            _telemetry_commit()
        owned = _owned(run_id, task_id).update(**fields)
        if not owned:
            return False
        _upsert_points(run_id, points)
    return True


def _upsert_points(run_id: int, points: Sequence[tuple[str, int, float, datetime]]) -> None:
    latest = {(name, step): (value, wall_time) for name, step, value, wall_time in points}  # one row per key
    if not latest:
        return
    if connection.vendor != "postgresql":
        MetricPoint.objects.bulk_create(
            [MetricPoint(run_id=run_id, name=n, step=s, value=v, wall_time=t) for (n, s), (v, t) in latest.items()],
            update_conflicts=True, unique_fields=["run", "name", "step"], update_fields=["value", "wall_time"],
            batch_size=1000,
        )
        return
    # One statement over arrays: Django's bulk_create compiles SQL per row, which costs more than the write.
    names, steps = zip(*latest.keys(), strict=True)
    values, times = zip(*latest.values(), strict=True)
    table = connection.ops.quote_name(MetricPoint._meta.db_table)
    with connection.cursor() as cursor:
        # Wall times travel as epoch seconds: adapting a float8 array costs a fraction of a timestamptz one.
        cursor.execute(
            f"INSERT INTO {table} (run_id, name, step, value, wall_time) "
            "SELECT %s, n, s, v, to_timestamp(e) FROM unnest(%s::varchar[], %s::integer[], %s::double precision[], "
            "%s::double precision[]) AS u(n, s, v, e) "
            "ON CONFLICT (run_id, name, step) DO UPDATE SET value = EXCLUDED.value, wall_time = EXCLUDED.wall_time",
            [run_id, list(names), list(steps), list(values), [t.timestamp() for t in times]],
        )
        rollups.record(cursor, run_id, names, steps, values)


def run_record_checkpoint(*, run_id: int, task_id: str, step: int, path: Path) -> bool:
    """Register a complete checkpoint folder as the one the run resumes from, only while this delivery owns the
    run (one conditional UPDATE). Returns False when it does not: the caller deletes the folder and stops."""
    rel, size = _relative_artifact_path(path), _du(path)
    with transaction.atomic():
        if not _owned(run_id, task_id).update(checkpoint_path=rel, heartbeat_at=timezone.now()):
            return False
        Artifact.objects.update_or_create(
            run_id=run_id, path=rel, defaults={"kind": Artifact.Kind.CHECKPOINT, "step": step, "size_bytes": size}
        )
        # The engine keeps only its newest checkpoints on disk; drop records of the ones it deleted.
        stale = [a.pk for a in Artifact.objects.filter(run_id=run_id, kind=Artifact.Kind.CHECKPOINT)
                 if not (settings.ARTIFACT_ROOT / a.path).exists()]
        Artifact.objects.filter(pk__in=stale).delete()
    return True


def run_finish(*, run_id: int, task_id: str, result: dict[str, Any]) -> Run | None:
    """Mark the run succeeded with its evaluations and final model, only while this delivery owns the run; start
    runs that waited for it. The files' sizes and digests are read before the transaction, so a worker never holds
    the run's row while it reads gigabytes."""
    final_dir = result.get("final_dir")
    model = None
    if final_dir:
        path = Path(final_dir)
        model = (_relative_artifact_path(path), _du(path), _sha256_tree(path))
    caches = [(_relative_artifact_path(path), entry.get("bytes") or _du(path))
              for entry in result.get("teacher_cache") or [] if entry.get("path")
              for path in [Path(entry["path"])]
              if path.resolve().is_relative_to(Path(settings.ARTIFACT_ROOT).resolve())]
    with transaction.atomic():
        return _record_finish(run_id=run_id, task_id=task_id, result=result, model=model, caches=caches)


def _record_finish(*, run_id: int, task_id: str, result: dict[str, Any], model: tuple[str, int, str] | None,
                   caches: list[tuple[str, int]]) -> Run | None:
    values: dict[str, Any] = {"result": result, "error": ""}
    values |= {"step": result["steps"], "total_steps": result["steps"]} if "steps" in result \
        else {"step": F("total_steps")}
    if result.get("last_checkpoint"):
        values["checkpoint_path"] = _relative_artifact_path(Path(result["last_checkpoint"]))
    run = _transition(run_id=run_id, to=Run.Status.SUCCEEDED, sources=[Run.Status.RUNNING],
                      where=Q(task_id=task_id), values=values, reason=_finished_reason(result),
                      related=("team", "experiment__dataset"))
    if run is None:
        return None
    student_metrics = result.get("student") or {}
    dataset = run.experiment.dataset
    key = engine_config.split_key(run.config["dataset"])
    Evaluation.objects.create(
        team=run.team, role=Evaluation.Role.STUDENT, run=run, model=run.student, dataset=dataset, split_key=key,
        **_evaluation_columns(student_metrics),
    )
    teacher_metrics = result.get("teacher")
    if run.teacher_id and teacher_metrics:
        Evaluation.objects.get_or_create(
            role=Evaluation.Role.TEACHER, model_id=run.teacher_id, dataset=dataset, split="eval", split_key=key,
            defaults={"team": run.team, "run": run, **_evaluation_columns(teacher_metrics)},
        )
    if model is not None:
        rel, size, digest = model
        Artifact.objects.update_or_create(
            run=run, path=rel, defaults={"kind": Artifact.Kind.MODEL, "size_bytes": size, "sha256": digest})
    for rel, size in caches:
        Artifact.objects.update_or_create(run=run, path=rel,
                                          defaults={"kind": Artifact.Kind.TEACHER_CACHE, "size_bytes": size})
    for dependent in Run.objects.filter(waiting_for=run, status=Run.Status.QUEUED):
        _enqueue_on_commit(dependent)
    return run


def _finished_reason(result: dict[str, Any]) -> str:
    steps = result.get("steps")
    early = " (stopped early)" if result.get("stopped_early") else ""
    return f"Trained {steps} steps{early} and evaluated." if steps is not None else "Trained and evaluated."


def _evaluation_columns(metrics: dict[str, Any]) -> dict[str, Any]:
    return {
        "accuracy": metrics.get("accuracy"),
        "macro_f1": metrics.get("macro_f1"),
        "param_count": metrics.get("params"),
        "latency_ms": metrics.get("latency_ms_p50"),
        "metrics": metrics,
    }


@transaction.atomic
def run_fail(*, run_id: int, task_id: str, error: str) -> bool:
    """Mark the run failed with a readable message; metrics and checkpoints already written stay. The message shows
    no absolute path of the machine (``ARTIFACT_ROOT/...`` for the artifact root)."""
    error = engine_config.public_message(error)
    failed = _transition(run_id=run_id, to=Run.Status.FAILED, sources=[Run.Status.RUNNING], where=Q(task_id=task_id),
                         values={"error": error[:5000]}, reason=error)
    if failed:
        _fail_dependents(run_id, reason=f"Run #{run_id}, which trains this run's teacher, failed: {error[:500]}")
    return failed is not None


def run_mark_cancelled(*, run_id: int, task_id: str, step: int | None = None) -> bool:
    """The worker stopped a run whose cancellation was requested; its metrics and checkpoint stay."""
    at = f" at step {step}" if step is not None else ""
    with transaction.atomic():
        done = _transition(run_id=run_id, to=Run.Status.CANCELLED, sources=[Run.Status.RUNNING],
                           where=Q(task_id=task_id), reason=f"Stopped{at} after cancellation was requested.")
        if done:
            _fail_dependents(run_id, reason=f"Run #{run_id}, which trains this run's teacher, was cancelled.",
                             status=Run.Status.CANCELLED)
    return done is not None


def _fail_dependents(run_id: int, *, reason: str, status: str = Run.Status.FAILED) -> None:
    """Runs still queued behind ``run_id`` cannot start: fail (or cancel) them, and the runs behind those."""
    for dependent_id in Run.objects.filter(waiting_for_id=run_id, status=Run.Status.QUEUED).values_list("id", flat=True):
        if _transition(run_id=dependent_id, to=status, sources=[Run.Status.QUEUED], values={"error": reason},
                       reason=reason):
            _fail_dependents(dependent_id, reason=reason, status=status)


@transaction.atomic
def run_cancel(*, run: Run, reason: str = "Cancelled by a user.") -> Run:
    """Cancel a run: a queued one at once (its message is revoked), a running one at its next cancellation poll
    (within a few steps; it keeps its metrics and checkpoint), a running one whose worker died at once."""
    cancelled = _transition(run_id=run.pk, to=Run.Status.CANCELLED, sources=[Run.Status.QUEUED], reason=reason,
                            values={"cancel_requested": True})
    if cancelled is not None and cancelled.task_id:
        _revoke_on_commit(cancelled.task_id)
    if cancelled is None:
        Run.objects.filter(pk=run.pk, status=Run.Status.RUNNING).update(cancel_requested=True)
        _transition(run_id=run.pk, to=Run.Status.CANCELLED, sources=[Run.Status.RUNNING],
                    where=Q(heartbeat_at__lt=_lease_cutoff()), reason=f"{reason} Its worker had stopped responding.")
    _fail_dependents(run.pk, reason=f"Run #{run.pk}, which trains this run's teacher, was cancelled.",
                     status=Run.Status.CANCELLED)
    run.refresh_from_db()
    return run


@transaction.atomic
def run_requeue(*, run: Run, reason: str) -> Run:
    """Queue a failed, cancelled or stale (lease expired) run again as a new attempt, with a fresh restart budget;
    it resumes from its last checkpoint. Runs that were failed or cancelled only because they waited for it are
    queued again behind it.

    Raises ValidationError when the run is queued, live or succeeded, or waits for a run that did not succeed.
    """
    run = Run.objects.select_related("waiting_for").get(pk=run.pk)
    upstream = run.waiting_for
    if upstream is not None and upstream.status in (Run.Status.FAILED, Run.Status.CANCELLED):
        raise ValidationError(f"Run #{run.pk} waits for run #{upstream.pk}, which {upstream.status}; "
                              f"requeue that one first.")
    task_id = str(uuid.uuid4())
    values = {"task_id": task_id, "cancel_requested": False, "error": ""}
    if run.status in (Run.Status.FAILED, Run.Status.CANCELLED):
        requeued = _transition(run_id=run.pk, to=Run.Status.QUEUED, sources=[run.status], values=values, reason=reason)
    elif run.status == Run.Status.RUNNING and run.lease_expired:
        requeued = _transition(run_id=run.pk, to=Run.Status.QUEUED, sources=[Run.Status.RUNNING], values=values,
                               where=Q(heartbeat_at__lt=_lease_cutoff()), reason=f"{reason} (its worker had stopped "
                               f"responding)")
    else:
        requeued = None
    if requeued is None:
        raise ValidationError(_not_requeueable(run))
    _requeue_dependents(run.pk)
    if upstream is None or upstream.status == Run.Status.SUCCEEDED:
        _enqueue_on_commit(requeued, task_id=task_id)
    return requeued


def _not_requeueable(run: Run) -> str:
    if run.status == Run.Status.SUCCEEDED:
        return f"Run #{run.pk} succeeded; launch a new experiment to train it again."
    if run.status == Run.Status.QUEUED:
        return f"Run #{run.pk} is already queued."
    return f"Run #{run.pk} is running and its worker is alive; cancel it first, or wait for it to finish."


def _requeue_dependents(run_id: int) -> None:
    """Runs that failed or were cancelled, without ever starting, because they waited for ``run_id`` wait again."""
    behind = Run.objects.filter(waiting_for_id=run_id, status__in=[Run.Status.FAILED, Run.Status.CANCELLED],
                                started_at__isnull=True, cancel_requested=False)
    for dependent in behind.values_list("id", "status"):
        dependent_id, status = dependent
        if _transition(run_id=dependent_id, to=Run.Status.QUEUED, sources=[status], values={"error": "", "task_id": ""},
                       reason=f"Run #{run_id}, which it waits for, was requeued."):
            _requeue_dependents(dependent_id)


@transaction.atomic
def experiment_cancel(*, experiment: Experiment) -> int:
    runs = list(experiment.runs.exclude(status__in=Run.TERMINAL))
    for run in runs:
        run_cancel(run=run)
    return len(runs)


# --- workers --------------------------------------------------------------------------------------
class WorkerNameInUse(Exception):
    """Another live worker process holds this Celery node name."""


def _holds_name(worker: Worker, *, hostname: str, pid: int, now: datetime,
                pid_alive: Callable[[int], bool] | None) -> bool:
    """Whether ``worker`` is a different process that still owns its name (online, with a fresh heartbeat).

    ``pid_alive`` lets a worker on the same host tell that the previous holder of its name has died (a restart
    after a crash), instead of waiting for its heartbeat to go stale.
    """
    if worker.state == Worker.State.OFFLINE or worker.last_heartbeat is None:
        return False
    if (worker.hostname, worker.pid) == (hostname, pid):
        return False
    if now - worker.last_heartbeat > timedelta(seconds=settings.WORKER_OFFLINE_AFTER_S):
        return False
    if worker.hostname == hostname and worker.pid is not None and pid_alive is not None:
        return pid_alive(worker.pid)
    return True


@transaction.atomic
def worker_register(*, name: str, hostname: str, pid: int, queues: list[str], versions: dict[str, str],
                    pid_alive: Callable[[int], bool] | None = None, memory_total_bytes: int | None = None) -> Worker:
    """Register a worker, or raise WorkerNameInUse when another live worker process holds the name.

    ``memory_total_bytes``: the RAM its runs may use (pre-flight checks CPU runs against it)."""
    now = timezone.now()
    current = Worker.objects.select_for_update().filter(name=name).first()
    if current is not None and _holds_name(current, hostname=hostname, pid=pid, now=now, pid_alive=pid_alive):
        logger.error("refused to register worker %s (pid %s on %s): pid %s on %s holds that name and is online",
                     name, pid, hostname, current.pid, current.hostname)
        raise WorkerNameInUse(
            f"Worker {name} is online as pid {current.pid} on {current.hostname}; start this worker with another "
            f"node name (-n)."
        )
    worker, _ = Worker.objects.update_or_create(
        name=name,
        defaults={"hostname": hostname, "pid": pid, "queues": queues, "versions": versions,
                  "state": Worker.State.ONLINE, "started_at": now, "last_heartbeat": now,
                  "memory_total_bytes": memory_total_bytes},
    )
    return worker


def worker_heartbeat(*, name: str, gpus: list[dict] | None = None, hostname: str | None = None,
                     pid: int | None = None) -> bool:
    """Record a heartbeat (and the GPUs). With ``hostname`` and ``pid``, only the process that registered the name
    beats for it. False when there is no such row or it is marked offline (see ``worker_revive``)."""
    fields: dict[str, Any] = {"last_heartbeat": timezone.now()}
    if gpus is not None:
        fields["gpus"] = gpus
    workers = Worker.objects.filter(name=name).exclude(state=Worker.State.OFFLINE)
    if hostname is not None and pid is not None:
        workers = workers.filter(hostname=hostname, pid=pid)
    return bool(workers.update(**fields))


@transaction.atomic
def worker_revive(*, name: str, hostname: str, pid: int, consuming: list[str]) -> bool:
    """Bring back a worker that the offline sweep marked offline while it was only silent (a database outage).

    It comes back ``online`` on the queues it consumes now, or ``draining`` (its queues kept for resume) when it
    consumes none. False when the row belongs to another process or is not offline.
    """
    worker = (Worker.objects.select_for_update()
              .filter(name=name, hostname=hostname, pid=pid, state=Worker.State.OFFLINE).first())
    if worker is None:
        return False
    worker.last_heartbeat = timezone.now()
    if consuming:
        worker.state, worker.queues = Worker.State.ONLINE, sorted(consuming)
    else:
        worker.state = Worker.State.DRAINING
    worker.save(update_fields=["last_heartbeat", "state", "queues"])
    logger.info("worker %s is heartbeating again; back as %s", name, worker.state)
    return True


def worker_mark_offline(*, name: str, hostname: str | None = None, pid: int | None = None) -> None:
    """Mark a worker offline; with ``hostname`` and ``pid``, only if that process still holds the name."""
    workers = Worker.objects.filter(name=name)
    if hostname is not None and pid is not None:
        workers = workers.filter(hostname=hostname, pid=pid)
    workers.update(state=Worker.State.OFFLINE)


# --- helpers --------------------------------------------------------------------------------------
def _relative_artifact_path(path: Path) -> str:
    """Paths are stored relative to ARTIFACT_ROOT; anything outside it is refused."""
    return str(Path(path).resolve().relative_to(Path(settings.ARTIFACT_ROOT).resolve()))


def _du(path: Path) -> int:
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.exists() else 0


def _sha256_tree(path: Path) -> str:
    """sha256 over the files of a folder (names and contents, sorted), or of one file."""
    digest = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for file in files:
        digest.update(str(file.relative_to(path) if path.is_dir() else file.name).encode())
        with file.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()
