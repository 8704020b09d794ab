"""Launching an experiment: its plan (runs, baselines, sweeps), its validation, and its creation with every
run queued after the commit."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from django.conf import settings
from django.core.exceptions import ValidationError
from django.db import transaction
from django.utils import timezone

from experiments.domain import (
    config_digest,
    engine_config,
    queue_order,
    routing,
    sweep_plan,
    sweeps,
    validation,
)
from experiments.models import (
    DatasetSpec,
    Experiment,
    ModelSpec,
    Recipe,
    Run,
    Team,
)
from experiments.services import baseline_reuse, dispatch
from experiments.services import records as records_writes


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
    so there is no hard-label baseline there (``with_baseline=False``). ``sweep_plan.count_runs`` gives the
    same number without building the plan."""
    chosen = [r for r in recipes if r.scheme != Recipe.Scheme.HARD_LABELS]
    picked_baselines = [r for r in recipes if r.scheme == Recipe.Scheme.HARD_LABELS]
    baseline = picked_baselines[0] if picked_baselines else records_writes.hard_labels_recipe(team=team)
    term_points = {
        r.pk: sweep_plan.grid_points(sweeps.recipe_axes((t.get("name") for t in r.terms), term_sweeps or {}))
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
                            plan.append(
                                PlannedRun(
                                    assistant,
                                    recipe,
                                    seed,
                                    False,
                                    teacher=teacher,
                                    stage="assistant",
                                    **point,
                                )
                            )
                            plan.append(
                                PlannedRun(student, recipe, seed, False, teacher_from=len(plan) - 1, **point)
                            )
                        elif recipe.scheme == Recipe.Scheme.SELF_DISTILLATION:
                            generations = sweep_plan.chain_length(recipe.scheme, recipe.scheme_params)
                            for generation in range(1, generations + 1):
                                previous = (
                                    {"teacher": teacher}
                                    if generation == 1
                                    else {"teacher_from": len(plan) - 1}
                                )
                                stage = "" if generation == generations else f"generation {generation}"
                                plan.append(
                                    PlannedRun(student, recipe, seed, False, stage=stage, **previous, **point)
                                )
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
    count: sweep_plan.RunCount


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
            team=team,
            dataset=dataset,
            teacher=teacher,
            students=students,
            recipes=recipes,
            assistant=assistant,
            extra_teachers=extra_teachers,
            teacher_weights=teacher_weights,
        ),
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
    count = sweep_plan.count_runs(students=len(students), seeds=len(cleaned["seeds"]), train=cleaned["train"],
                              recipes=recipes, term_sweeps=cleaned["term_sweeps"],
                              with_baseline=dataset.task != "embedding")
    limit = settings.MAX_RUNS_PER_EXPERIMENT
    if count.total > limit:
        message = (f"This experiment would create {count.total:,} runs; the limit is {limit} "
                   f"({count.describe()}).")
        swept_fields = [
            *sweep_plan.train_axes(cleaned["train"]),
            *(["term_sweeps"] if cleaned["term_sweeps"] else []),
        ]
        raise ValidationError({key: message for key in swept_fields or ["seeds"]})
    for recipe in recipes:
        if recipe.scheme != Recipe.Scheme.HARD_LABELS:
            for values in sweep_plan.grid_points(sweeps.recipe_axes((t.get("name") for t in recipe.terms),
                                                                cleaned["term_sweeps"])):
                _swept_terms(recipe, values)  # raises on a combination the engine refuses
    return ExperimentInputs(
        train=cleaned["train"],
        seeds=cleaned["seeds"],
        teacher_weights=cleaned["teacher_weights"],
        term_sweeps=cleaned["term_sweeps"],
        count=count,
    )


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


def _run_config(
    p: PlannedRun,
    *,
    experiment: Experiment,
    upstream: Run | None,
    extra_teachers: Sequence[ModelSpec],
    teacher_weights: Sequence[float],
    base_train: dict[str, Any],
) -> dict[str, Any]:
    """The frozen config of a planned run, with its concrete point of the sweep.

    ``build_run_config`` reads the training settings from the experiment and the terms from the recipe, so it
    is handed unsaved copies holding this run's concrete values (the records themselves keep the sweep).
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
    reuse_baselines: bool = True,
) -> Experiment:
    """Create the experiment and all its runs in one transaction; each run is enqueued after the commit.

    ``derive_student`` (``every_other`` / ``every_third``) adds a student derived from the teacher (the model
    already registered for it, or a new one created in the same transaction: it disappears if the experiment
    is refused).

    A hard-label baseline whose content address (``Run.config_digest``) matches a run that succeeded in the
    team, at launch or when a worker receives it, takes that run's results instead of training
    (``baseline_reuse``), unless ``reuse_baselines`` is False.

    A training setting given as a list, and each entry of ``term_sweeps`` (``{"kd.temperature": [2, 4]}``), is
    swept: one run per point of the grid (see ``experiment_plan``), each run's frozen config holding its
    concrete values. The sweep is kept in ``Experiment.train`` (swept settings as lists, term sweeps under
    ``"term_sweeps"``).

    Raises ValidationError with field keys (teacher, students, recipes, seeds, the training settings,
    term_sweeps, dataset, assistant, extra_teachers, teacher_weights) and creates nothing when the combination
    cannot run, is over the run limit, or fails a blocking pre-flight check (``preflight.launch_errors``).
    """
    from experiments.domain import preflight

    if derive_student:
        students = _with_derived_student(
            students, teacher=teacher, layers=derive_student, created_by=created_by
        )
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
    axes = sweep_plan.train_axes(inputs.train)
    plan = experiment_plan(team=team, students=students, recipes=recipes, seeds=inputs.seeds, teacher=teacher,
                           assistant=assistant, with_baseline=dataset.task != "embedding",
                           train_points=sweep_plan.grid_points(axes), term_sweeps=inputs.term_sweeps)
    experiment = _record_experiment(
        inputs, team=team, created_by=created_by, name=name, description=description, dataset=dataset,
        teacher=teacher, assistant=assistant, students=students, recipes=recipes,
        extra_teachers=extra_teachers,
    )
    base_train = {k: v for k, v in inputs.train.items() if k not in axes}
    runs = _record_runs(plan, experiment=experiment, extra_teachers=extra_teachers,
                        teacher_weights=inputs.teacher_weights, base_train=base_train,
                        reuse_baselines=reuse_baselines)
    _queue_ready(runs)
    return experiment


def _with_derived_student(
    students: Sequence[ModelSpec], *, teacher: ModelSpec | None, layers: str, created_by
) -> list[ModelSpec]:
    """The students plus one derived from the teacher (registered already, or created in this transaction)."""
    if teacher is None:
        raise ValidationError({"derive_student": "Choose a teacher to derive a student from."})
    return [
        *students,
        records_writes.derived_student(parent=teacher, layers=layers, created_by=created_by),
    ]


def _record_experiment(
    inputs: ExperimentInputs,
    *,
    team: Team,
    created_by,
    name: str,
    description: str,
    dataset: DatasetSpec,
    teacher: ModelSpec | None,
    assistant: ModelSpec | None,
    students: Sequence[ModelSpec],
    recipes: Sequence[Recipe],
    extra_teachers: Sequence[ModelSpec],
) -> Experiment:
    """The experiment row and its model and recipe links; the sweep is kept in ``train``."""
    stored_train = {**inputs.train, **({"term_sweeps": inputs.term_sweeps} if inputs.term_sweeps else {})}
    experiment = records_writes.save_new(
        Experiment(team=team, created_by=created_by, name=name, description=description, teacher=teacher,
                   assistant=assistant, teacher_weights=list(inputs.teacher_weights), dataset=dataset,
                   seeds=list(inputs.seeds), train=stored_train)
    )
    experiment.students.set(students)
    experiment.recipes.set(recipes)
    experiment.extra_teachers.set(extra_teachers)
    return experiment


def _record_runs(
    plan: Sequence[PlannedRun],
    *,
    experiment: Experiment,
    extra_teachers: Sequence[ModelSpec],
    teacher_weights: Sequence[float],
    base_train: dict[str, Any],
    reuse_baselines: bool = True,
) -> list[Run]:
    """One run per planned run, in plan order, each with its frozen config, content address and queue. Their
    ``ready_at`` follows ``queue_order.sending_order`` (distilled runs first), one microsecond apart, so
    their places in the queue match the order ``_queue_ready`` sends them in."""
    runs: list[Run] = []
    router = routing.RunRouter()  # one read of the worker table for all the runs
    launched_at = timezone.now()
    fingerprints: dict[str, str] = {}  # each input's content is read once for all the runs
    sent_as = {index: rank for rank, index in enumerate(queue_order.sending_order(plan))}
    for index, p in enumerate(plan):
        upstream = runs[p.teacher_from] if p.teacher_from is not None else None
        uses_teacher = p.recipe.needs_teacher
        config = _run_config(p, experiment=experiment, upstream=upstream, extra_teachers=extra_teachers,
                             teacher_weights=teacher_weights, base_train=base_train)
        # The config names an upstream run only by its id, which exists already: one INSERT per run.
        run = Run(
            team=experiment.team, experiment=experiment, student=p.student, recipe=p.recipe, seed=p.seed,
            is_baseline=p.is_baseline, stage=p.stage, teacher=p.teacher if uses_teacher else None,
            total_steps=config["train"]["max_steps"],
            waiting_for=upstream or (dispatch.pending_source_run(p.teacher) if uses_teacher else None)
            or dispatch.pending_source_run(p.student),
            config=config,
            config_digest=config_digest.config_digest(config, memo=fingerprints),
            ready_at=launched_at + timedelta(microseconds=sent_as[index]),
            may_reuse=reuse_baselines and p.is_baseline,
        )
        run.queue = router.queue_for(run.config)
        run.save()
        source = baseline_reuse.reusable_source(team=experiment.team, digest=run.config_digest) \
            if reuse_baselines and p.is_baseline and run.waiting_for_id is None else None
        runs.append(baseline_reuse.run_take_results(run=run, source=source) if source else run)
    return runs


def _queue_ready(runs: Sequence[Run]) -> None:
    """Enqueue, after the commit, every run that waits for no other run and has not reused another run's
    results, in ``queue_order.sending_order``."""
    for index in queue_order.sending_order(runs):
        run = runs[index]
        if run.status == Run.Status.QUEUED and run.waiting_for_id is None:
            dispatch.enqueue_on_commit(run)
