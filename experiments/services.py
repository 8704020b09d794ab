"""Writes. Services own transactions and hand work to Celery only after the commit."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from django.conf import settings
from django.core.exceptions import ValidationError
from django.db import transaction
from django.db.models import F, Q
from django.db.models.functions import Coalesce
from django.utils import timezone
from django.utils.text import slugify

from . import engine_config, validation
from .models import (
    Artifact,
    DatasetSpec,
    Evaluation,
    Experiment,
    Membership,
    MetricPoint,
    ModelSpec,
    Recipe,
    Run,
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


def membership_add(*, team: Team, user, role: str = Membership.Role.MEMBER) -> Membership:
    membership, _ = Membership.objects.update_or_create(team=team, user=user, defaults={"role": role})
    return membership


# --- records --------------------------------------------------------------------------------------
def _save_new(obj):
    obj.full_clean()
    obj.save()
    return obj


def model_spec_create(*, team: Team, created_by, **fields: Any) -> ModelSpec:
    fields = validation.clean_model_fields(fields)
    return _save_new(ModelSpec(team=team, created_by=created_by, **fields))


def dataset_spec_create(*, team: Team, created_by, **fields: Any) -> DatasetSpec:
    fields = validation.clean_dataset_fields(fields)
    return _save_new(DatasetSpec(team=team, created_by=created_by, **fields))


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


# --- experiments ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class PlannedRun:
    """One run to create. ``teacher_from`` is the index in the plan of the run whose output is this run's
    teacher (chained recipes); otherwise the teacher is ``teacher`` (a record)."""

    student: ModelSpec
    recipe: Recipe
    seed: int
    is_baseline: bool
    teacher: ModelSpec | None = None
    teacher_from: int | None = None
    stage: str = ""


def experiment_plan(
    *,
    team: Team,
    students: Sequence[ModelSpec],
    recipes: Sequence[Recipe],
    seeds: Sequence[int],
    teacher: ModelSpec | None = None,
    assistant: ModelSpec | None = None,
    with_baseline: bool = True,
) -> list[PlannedRun]:
    """Every run an experiment will create: students × recipes × seeds, plus one hard-label baseline per
    student and seed. Chained recipes add their intermediate runs: ``teacher_assistant`` distils the assistant
    first; ``self_distillation`` chains its generations, each the teacher of the next. Embedding data has no
    labels, so there is no hard-label baseline there (``with_baseline=False``)."""
    chosen = [r for r in recipes if r.scheme != Recipe.Scheme.HARD_LABELS]
    picked_baselines = [r for r in recipes if r.scheme == Recipe.Scheme.HARD_LABELS]
    baseline = picked_baselines[0] if picked_baselines else hard_labels_recipe(team=team)
    plan: list[PlannedRun] = []
    for student in students:
        for seed in seeds:
            for recipe in chosen:
                if recipe.scheme == Recipe.Scheme.TEACHER_ASSISTANT:
                    plan.append(PlannedRun(assistant, recipe, seed, False, teacher=teacher, stage="assistant"))
                    plan.append(PlannedRun(student, recipe, seed, False, teacher_from=len(plan) - 1))
                elif recipe.scheme == Recipe.Scheme.SELF_DISTILLATION:
                    generations = int((recipe.scheme_params or {}).get("generations", 2))
                    for generation in range(1, generations + 1):
                        previous = {"teacher": teacher} if generation == 1 else {"teacher_from": len(plan) - 1}
                        stage = "" if generation == generations else f"generation {generation}"
                        plan.append(PlannedRun(student, recipe, seed, False, stage=stage, **previous))
                else:
                    plan.append(PlannedRun(student, recipe, seed, False, teacher=teacher))
            if with_baseline:
                plan.append(PlannedRun(student, baseline, seed, is_baseline=True))
    return plan


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
    description: str = "",
) -> Experiment:
    """Create the experiment and all its runs in one transaction; each run is enqueued after the commit.

    Raises ValidationError with field keys (teacher, students, recipes, seeds, train, dataset, assistant,
    extra_teachers, teacher_weights) and creates nothing when the combination cannot run.
    """
    train = validation.clean_train(train or {})
    seeds = validation.clean_seeds(seeds)
    teacher_weights = validation.check_experiment(
        team=team, dataset=dataset, teacher=teacher, students=students, recipes=recipes, assistant=assistant,
        extra_teachers=extra_teachers, teacher_weights=teacher_weights,
    )
    plan = experiment_plan(team=team, students=students, recipes=recipes, seeds=seeds, teacher=teacher,
                           assistant=assistant, with_baseline=dataset.task != "embedding")
    if len(plan) > settings.MAX_RUNS_PER_EXPERIMENT:
        raise ValidationError(
            {"seeds": f"This experiment would create {len(plan)} runs; the limit is {settings.MAX_RUNS_PER_EXPERIMENT}."}
        )
    experiment = _save_new(
        Experiment(team=team, created_by=created_by, name=name, description=description, teacher=teacher,
                   assistant=assistant, teacher_weights=list(teacher_weights), dataset=dataset, seeds=list(seeds),
                   train=train)
    )
    experiment.students.set(students)
    experiment.recipes.set(recipes)
    experiment.extra_teachers.set(extra_teachers)
    runs: list[Run] = []
    for p in plan:
        upstream = runs[p.teacher_from] if p.teacher_from is not None else None
        uses_teacher = p.recipe.needs_teacher
        # The config names an upstream run only by its id, which exists already: one INSERT per run.
        run = Run(
            team=team, experiment=experiment, student=p.student, recipe=p.recipe, seed=p.seed,
            is_baseline=p.is_baseline, stage=p.stage, teacher=p.teacher if uses_teacher else None,
            total_steps=train["max_steps"], queue=settings.RUN_QUEUE,
            waiting_for=upstream or (_pending_source_run(p.teacher) if uses_teacher else None)
            or _pending_source_run(p.student),
            config=engine_config.build_run_config(
                experiment=experiment, student=p.student, recipe=p.recipe, seed=p.seed, teacher=p.teacher,
                teacher_run=upstream, extra_teachers=extra_teachers, teacher_weights=teacher_weights,
            ),
        )
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


def _enqueue_on_commit(run: Run) -> None:
    from workers.tasks import run_distillation

    run_id, queue = run.id, run.queue
    transaction.on_commit(lambda: run_distillation.apply_async(args=(run_id,), queue=queue))


# --- the run lifecycle (called by the worker) -------------------------------------------------------
def run_claim(*, run_id: int, task_id: str, worker_name: str) -> Run | None:
    """Claim the run for this delivery with one conditional UPDATE.

    Succeeds for a queued run, or a running one whose heartbeat is stale (its worker died). Returns None when a
    live delivery owns the run, it has finished, or it was cancelled: the caller then does nothing.
    """
    now = timezone.now()
    stale = now - timedelta(seconds=settings.RUN_HEARTBEAT_TIMEOUT_S)
    claimed = Run.objects.filter(
        Q(status=Run.Status.QUEUED) | Q(status=Run.Status.RUNNING, heartbeat_at__lt=stale),
        id=run_id,
        cancel_requested=False,
    ).update(
        status=Run.Status.RUNNING,
        task_id=task_id,
        worker_name=worker_name,
        heartbeat_at=now,
        started_at=Coalesce("started_at", now),
        attempt=F("attempt") + 1,
    )
    return Run.objects.select_related("experiment", "student", "teacher", "recipe").get(id=run_id) if claimed else None


def _owned(run_id: int, task_id: str):
    """The run row, only while this delivery still owns it (a taken-over or cancelled run matches nothing)."""
    return Run.objects.filter(id=run_id, task_id=task_id, status=Run.Status.RUNNING)


def run_record_metrics(*, run_id: int, task_id: str, points: Sequence[tuple[str, int, float, datetime]]) -> bool:
    """Write a batch of (name, step, value, wall_time) points and renew the heartbeat.

    A resumed run re-logs the steps after its last checkpoint: the upsert on (run, name, step) keeps exactly one
    point per step. Returns False when this delivery no longer owns the run.
    """
    with transaction.atomic():
        owned = _owned(run_id, task_id).update(heartbeat_at=timezone.now())
        if not owned:
            return False
        MetricPoint.objects.bulk_create(
            [MetricPoint(run_id=run_id, name=n, step=s, value=v, wall_time=t) for n, s, v, t in points],
            update_conflicts=True,
            unique_fields=["run", "name", "step"],
            update_fields=["value", "wall_time"],
            batch_size=1000,
        )
    return True


def run_report_progress(*, run_id: int, task_id: str, step: int, total: int, samples_per_s: float | None) -> bool:
    """Store progress and renew the heartbeat. Returns False when this delivery no longer owns the run."""
    return bool(
        _owned(run_id, task_id).update(
            step=min(step, total), total_steps=total, samples_per_s=samples_per_s, heartbeat_at=timezone.now()
        )
    )


def run_record_checkpoint(*, run_id: int, task_id: str, step: int, path: Path) -> None:
    rel = _relative_artifact_path(path)
    with transaction.atomic():
        if not _owned(run_id, task_id).update(checkpoint_path=rel, heartbeat_at=timezone.now()):
            return
        Artifact.objects.update_or_create(
            run_id=run_id, path=rel, defaults={"kind": Artifact.Kind.CHECKPOINT, "step": step, "size_bytes": _du(path)}
        )
        # The engine keeps only its newest checkpoints on disk; drop records of the ones it deleted.
        stale = [a.pk for a in Artifact.objects.filter(run_id=run_id, kind=Artifact.Kind.CHECKPOINT)
                 if not (settings.ARTIFACT_ROOT / a.path).exists()]
        Artifact.objects.filter(pk__in=stale).delete()


@transaction.atomic
def run_finish(*, run_id: int, task_id: str, result: dict[str, Any]) -> Run | None:
    """Mark the run succeeded with its evaluations and final model; start runs that waited for it."""
    run = (Run.objects.select_for_update().filter(id=run_id, task_id=task_id, status=Run.Status.RUNNING).first())
    if run is None:
        return None
    now = timezone.now()
    student_metrics = result.get("student") or {}
    run.status = Run.Status.SUCCEEDED
    run.finished_at = now
    run.heartbeat_at = now
    run.step = run.total_steps = result.get("steps", run.total_steps)
    run.result = result
    run.error = ""
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
    final_dir = result.get("final_dir")
    if final_dir:
        path = Path(final_dir)
        Artifact.objects.update_or_create(
            run=run, path=_relative_artifact_path(path),
            defaults={"kind": Artifact.Kind.MODEL, "size_bytes": _du(path), "sha256": _sha256_tree(path)},
        )
    for entry in result.get("teacher_cache") or []:
        path = Path(entry.get("path") or "")
        if entry.get("path") and path.resolve().is_relative_to(Path(settings.ARTIFACT_ROOT).resolve()):
            Artifact.objects.update_or_create(
                run=run, path=_relative_artifact_path(path),
                defaults={"kind": Artifact.Kind.TEACHER_CACHE, "size_bytes": entry.get("bytes") or _du(path)},
            )
    if result.get("last_checkpoint"):
        run.checkpoint_path = _relative_artifact_path(Path(result["last_checkpoint"]))
    run.save()
    for dependent in Run.objects.filter(waiting_for=run, status=Run.Status.QUEUED):
        _enqueue_on_commit(dependent)
    return run


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
    """Mark the run failed with a readable message; metrics and checkpoints already written stay."""
    now = timezone.now()
    failed = _owned(run_id, task_id).update(status=Run.Status.FAILED, error=error[:5000], finished_at=now,
                                            heartbeat_at=now)
    if failed:
        _fail_dependents(run_id, reason=f"Run #{run_id}, which trains this run's teacher, failed: {error[:500]}")
    return bool(failed)


def run_mark_cancelled(*, run_id: int, task_id: str) -> bool:
    """The worker stopped a run whose cancellation was requested."""
    now = timezone.now()
    with transaction.atomic():
        done = _owned(run_id, task_id).update(status=Run.Status.CANCELLED, finished_at=now, heartbeat_at=now)
        if done:
            _fail_dependents(run_id, reason=f"Run #{run_id}, which trains this run's teacher, was cancelled.",
                             status=Run.Status.CANCELLED)
    return bool(done)


def _fail_dependents(run_id: int, *, reason: str, status: str = Run.Status.FAILED) -> None:
    pending = list(Run.objects.filter(waiting_for_id=run_id, status=Run.Status.QUEUED).values_list("id", flat=True))
    if pending:
        Run.objects.filter(id__in=pending, status=Run.Status.QUEUED).update(
            status=status, error=reason, finished_at=timezone.now()
        )
        for dependent_id in pending:
            _fail_dependents(dependent_id, reason=reason, status=status)


@transaction.atomic
def run_cancel(*, run: Run) -> Run:
    """Cancel a run: a queued one at once, a running one at its next cancellation poll (within a few steps)."""
    now = timezone.now()
    Run.objects.filter(pk=run.pk, status=Run.Status.QUEUED).update(
        status=Run.Status.CANCELLED, cancel_requested=True, finished_at=now
    )
    Run.objects.filter(pk=run.pk, status=Run.Status.RUNNING).update(cancel_requested=True)
    _fail_dependents(run.pk, reason=f"Run #{run.pk}, which trains this run's teacher, was cancelled.",
                     status=Run.Status.CANCELLED)
    run.refresh_from_db()
    return run


@transaction.atomic
def experiment_cancel(*, experiment: Experiment) -> int:
    runs = list(experiment.runs.exclude(status__in=Run.TERMINAL))
    for run in runs:
        run_cancel(run=run)
    return len(runs)


# --- workers --------------------------------------------------------------------------------------
def worker_register(*, name: str, hostname: str, pid: int, queues: list[str], versions: dict[str, str]) -> Worker:
    now = timezone.now()
    worker, _ = Worker.objects.update_or_create(
        name=name,
        defaults={"hostname": hostname, "pid": pid, "queues": queues, "versions": versions,
                  "state": Worker.State.ONLINE, "started_at": now, "last_heartbeat": now},
    )
    return worker


def worker_heartbeat(*, name: str, gpus: list[dict] | None = None) -> bool:
    fields: dict[str, Any] = {"last_heartbeat": timezone.now()}
    if gpus is not None:
        fields["gpus"] = gpus
    return bool(Worker.objects.filter(name=name).exclude(state=Worker.State.OFFLINE).update(**fields))


def worker_mark_offline(*, name: str) -> None:
    Worker.objects.filter(name=name).update(state=Worker.State.OFFLINE)


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
