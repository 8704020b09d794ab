"""Pre-flight checks shown before an experiment is launched (DESIGN.md §4).

Each check gives a level — ``ok``, ``notice`` (worth knowing, nothing to fix), ``unknown`` (cannot be checked
here), ``warning`` (launch is allowed) or ``error`` (launch is refused) — a one-line summary and details:

- **Runs**: how many runs the grid creates, against ``MAX_RUNS_PER_EXPERIMENT``.
- **Recipes**: each recipe against the dataset's task, by the scheme × term × task rules the engine enforces
  before training (``workers.engine.recipe_rules``, the same function and messages): a recipe that cannot run
  is an error naming it.
- **Label spaces**: on classification data every model predicts the dataset's classes; a teacher trained here
  on other data with other label names is a warning (class 3 may not mean the same thing).
- **Tokenizers**: for text models, teacher and student tokenizers compared by the identity their records keep
  (``tokenizer_id``, a config's named tokenizer, a derived model's parent, a registered run's student). A
  mismatch is an error where tokens must line up (causal-LM logit terms, hidden-state and attention terms) and
  a notice where a cross-tokenizer method carries it (``uld``, alone or with ``ce``, online, offline from the
  cache or on-policy; ``seq_kd`` with ``ce``); classification logits and sentence embeddings do not depend on
  tokens. Unrecorded identities: "cannot check".
- **Served teachers**: a teacher of source ``server`` (issue 14) must be the only teacher of a causal-LM
  experiment, its server must list the model and read rows of the dataset's length (asked here, once, with a
  short timeout: a server that does not answer is a warning, a missing model an error); a served student is an
  error. The worker compares the server's tokenizer with each student's before training.
- **GPU memory**: each distinct run shape estimated per rank and routed like a new run
  (:mod:`experiments.domain.memory_check`, which says what a multi-GPU run needs: "needs 4 GPUs with ≥ 38 GiB
  each").
- **Time**: the median seconds per step of finished runs of the same student on the same dataset with a
  similar number of steps (one query: a window over the runs, whatever their number), times the planned steps;
  a student without such runs is extrapolated by parameter count from the students measured on that dataset,
  or the estimate says it is partial and without whom.

The functions are pure apart from :func:`similar_run_speeds` (one query), the worker table read for routing,
and the few records a tokenizer identity walks through (a derived model's parent, a run's student).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from django.conf import settings
from django.db.models import Count, F, FloatField, Func, Q, Window
from django.db.models.functions import Cast, RowNumber

from experiments.domain import engine_config, routing, sweep_plan, tokenizers, validation
from experiments.domain.memory_check import LARGEST_GPU_BYTES as LARGEST_GPU_BYTES  # the memory check's names
from experiments.domain.memory_check import RunShape as RunShape
from experiments.domain.memory_check import check_memory, run_shapes
from experiments.domain.model_size import model_size
from experiments.domain.specs import model_kind
from experiments.models import DatasetSpec, ModelSpec, Recipe, Run
from workers.engine.memory import ModelShapeReader

LEVELS = ("ok", "notice", "unknown", "warning", "error")  # by severity
# Past runs count as similar when their length is within this factor of the planned one.
SIMILAR_STEPS_FACTOR = 4


@dataclass(frozen=True)
class Check:
    """One pre-flight check. ``field`` is the form field an error belongs to (``__all__``: the whole form)."""

    key: str
    title: str
    level: str
    summary: str
    details: tuple[str, ...] = ()
    field: str = "__all__"

    @property
    def blocks(self) -> bool:
        return self.level == "error"


@dataclass(frozen=True)
class Report:
    """Every check of one experiment set-up, and its run count."""

    count: sweep_plan.RunCount
    checks: tuple[Check, ...] = field(default_factory=tuple)

    @property
    def errors(self) -> list[Check]:
        return [c for c in self.checks if c.blocks]

    @property
    def can_launch(self) -> bool:
        return not self.errors


def worst(levels: Iterable[str]) -> str:
    """The most severe of ``levels`` (``ok`` when there are none)."""
    return max(levels, key=LEVELS.index, default="ok")


# --- runs ---------------------------------------------------------------------------------------------------
def check_run_count(count: sweep_plan.RunCount, *, limit: int) -> Check:
    text = f"{count.total:,} run{'s' if count.total != 1 else ''}: {count.describe()}."
    if count.total > limit:
        swept = count.swept[0] if count.swept else "seeds"
        return Check("runs", "Runs", "error", f"{text} The limit is {limit:,}: sweep fewer values.",
                     field="term_sweeps" if "." in swept else swept)
    details = (f"{count.baselines} of them hard-label baselines.",) if count.baselines else ()
    return Check("runs", "Runs", "ok", text, details)


# --- label spaces -------------------------------------------------------------------------------------------
def _roles(*, teacher: ModelSpec | None, students: Sequence[ModelSpec], assistant: ModelSpec | None,
           extra_teachers: Sequence[ModelSpec]) -> list[tuple[str, str, ModelSpec]]:
    """(form field, role, model) for every model of the experiment."""
    rows = [("teacher", "teacher", teacher), ("assistant", "assistant", assistant)]
    rows += [("extra_teachers", "teacher", m) for m in extra_teachers]
    rows += [("students", "student", m) for m in students]
    return [(f, role, m) for f, role, m in rows if m is not None]


def _trained_on(model: ModelSpec) -> DatasetSpec | None:
    """The dataset a model registered from a run of this site was trained on."""
    if model.source != ModelSpec.Source.RUN or model.source_run_id is None:
        return None
    return DatasetSpec.objects.filter(experiments__runs=model.source_run_id).first()


def check_labels(*, dataset: DatasetSpec, teacher: ModelSpec | None, students: Sequence[ModelSpec],
                 assistant: ModelSpec | None = None, extra_teachers: Sequence[ModelSpec] = ()) -> Check:
    title = "Label spaces"
    if dataset.task != "classification":
        return Check(
            "labels",
            title,
            "notice",
            f"{dataset} is {dataset.get_task_display().lower()} data: there are no classes to match.",
        )
    errors: list[tuple[str, str]] = []
    warnings: list[str] = []
    for form_field, role, model in _roles(teacher=teacher, students=students, assistant=assistant,
                                          extra_teachers=extra_teachers):
        if model.task != "classification":
            errors.append(
                (
                    form_field,
                    f"The {role} {model} is a {model.get_task_display().lower()} model, not a classifier.",
                )
            )
            continue
        if model.num_labels != dataset.num_labels:
            errors.append(
                (
                    form_field,
                    f"The {role} {model} predicts {model.num_labels} classes but {dataset} has "
                    f"{dataset.num_labels}.",
                )
            )
            continue
        source = _trained_on(model)
        if source is not None and source.pk != dataset.pk and source.label_names and dataset.label_names \
                and list(source.label_names) != list(dataset.label_names):
            warnings.append(f"The {role} {model} was trained on {source}, whose classes are "
                            f"{_names(source.label_names)}; {dataset}'s are {_names(dataset.label_names)}. "
                            "Class i may not mean the same thing in both.")
    if errors:
        return Check(
            "labels",
            title,
            "error",
            errors[0][1],
            tuple(m for _, m in errors[1:]) + tuple(warnings),
            field=errors[0][0],
        )
    if warnings:
        return Check("labels", title, "warning", warnings[0], tuple(warnings[1:]))
    return Check(
        "labels", title, "ok", f"Every model predicts the {dataset.num_labels} classes of {dataset}."
    )


def _names(names: Sequence[Any], shown: int = 6) -> str:
    text = ", ".join(str(n) for n in list(names)[:shown])
    return text + (", …" if len(names) > shown else "")


# --- recipes ------------------------------------------------------------------------------------------------
def check_recipes(*, dataset: DatasetSpec, recipes: Sequence[Recipe]) -> Check:
    """Each recipe against the dataset's task, with the engine's own refusals (``recipe_rules``)."""
    title = "Recipes"
    problems = [
        f"Recipe {recipe}: {message}"
        for recipe in recipes
        for message in validation.recipe_task_problems(recipe, task=dataset.task)
    ]
    if problems:
        return Check("recipes", title, "error", problems[0], tuple(problems[1:]), field="recipes")
    if not recipes:
        return Check("recipes", title, "notice", "No recipe chosen.")
    task = dataset.get_task_display().lower()
    return Check("recipes", title, "ok", f"Every recipe can run on {task} data.")


# --- tokenizers ---------------------------------------------------------------------------------------------
def check_tokenizers(*, dataset: DatasetSpec, teacher: ModelSpec | None, students: Sequence[ModelSpec],
                     recipes: Sequence[Recipe], assistant: ModelSpec | None = None,
                     extra_teachers: Sequence[ModelSpec] = ()) -> Check:
    title = "Tokenizers"
    findings: list[tuple[str, str]] = []  # (level, text)
    identities: dict[int, tokenizers.TokenizerIdentity] = {}

    def identity(model: ModelSpec) -> tokenizers.TokenizerIdentity:
        if model.pk not in identities:
            identities[model.pk] = tokenizers.tokenizer_identity(model)
        return identities[model.pk]

    cross_tokenizer_problems = {
        r.pk: validation.recipe_cross_tokenizer_problem(r) for r in recipes if dataset.task == "causal_lm"
    }
    seen: set[tuple[int, int, int]] = set()
    for recipe in recipes:
        rule = tokenizers.tokenizer_rule(
            task=dataset.task, scheme=recipe.scheme, term_names=[t.get("name") for t in recipe.terms]
        )
        for t, s in tokenizers.distilling_pairs(
            recipe, teacher=teacher, students=students, assistant=assistant, extra_teachers=extra_teachers
        ):
            if (t.pk, s.pk, recipe.pk) in seen or model_kind(t) != "text" or model_kind(s) != "text":
                continue
            seen.add((t.pk, s.pk, recipe.pk))
            a, b = identity(t), identity(s)
            same = tokenizers.same_tokenizer(a, b)
            pair = f"{t} → {s} ({recipe})"
            if same:
                findings.append(("ok", f"{pair}: both use {a.label}."))
            elif rule == "free":
                findings.append(
                    (
                        "ok",
                        f"{pair}: each model reads the text with its own tokenizer; "
                        f"{'class logits' if dataset.task == 'classification' else 'embeddings'} "
                        "compare directly.",
                    )
                )
            elif same is None:
                why = (
                    a.why_unknown
                    or b.why_unknown
                    or "their records name different models and no tokenizer id"
                )
                findings.append(("unknown", f"{pair}: cannot check ({why})."))
            elif rule == "cross":
                findings.append(
                    (
                        "notice",
                        f"{pair}: different tokenizers ({a.label} vs {b.label}), carried by the "
                        "recipe's cross-tokenizer method.",
                    )
                )
            elif engine_says := cross_tokenizer_problems.get(recipe.pk):
                # The engine's own refusal (``recipe_rules.cross_tokenizer_problem``), word for word.
                findings.append(
                    ("error", f"{pair}: different tokenizers ({a.label} vs {b.label}). {engine_says}")
                )
            else:
                findings.append(
                    (
                        "error",
                        f"{pair}: different tokenizers ({a.label} vs {b.label}) but the recipe "
                        "compares token positions. Give both models one tokenizer, or use a "
                        "cross-tokenizer recipe: uld (alone or with ce), or seq_kd with ce.",
                    )
                )
    if not findings:
        models = [m for m in (teacher, assistant, *extra_teachers, *students) if m is not None]
        if models and all(model_kind(m) == "tabular" for m in models):
            return Check(
                "tokenizers", title, "notice", "The models read numeric features: no tokenizers to compare."
            )
        return Check("tokenizers", title, "notice", "No teacher and student text models to compare.")
    level = worst(level for level, _ in findings)
    ordered = sorted(findings, key=lambda f: -LEVELS.index(f[0]))
    if level == "ok":
        summary = "Compatible: " + ordered[0][1]
    else:
        summary = ordered[0][1]
    return Check(
        "tokenizers", title, level, summary, tuple(text for _, text in ordered[1:]), field="students"
    )


# --- served teachers ---------------------------------------------------------------------------------------
SERVER_CHECK_TIMEOUT_S = 10.0


def check_served_teachers(*, dataset: DatasetSpec, teacher: ModelSpec | None, students: Sequence[ModelSpec],
                          assistant: ModelSpec | None = None, extra_teachers: Sequence[ModelSpec] = ()
                          ) -> Check | None:
    """A served teacher's server asked for its model (None when no model of the set-up is served)."""
    from workers.engine.config import AllowedPaths, ModelConfig
    from workers.engine.errors import EngineError
    from workers.engine.served_teacher import ServedTeacher, ServerUnavailable

    title, server = "Served teachers", ModelSpec.Source.SERVER
    teachers = [m for m in (teacher, *extra_teachers) if m is not None]
    served = [m for m in teachers if m.source == server]
    findings: list[tuple[str, str]] = [
        ("error", f"{m} is served by an inference server: only a teacher can be; a student trains here.")
        for m in (*students, *([assistant] if assistant else [])) if m.source == server
    ]
    if not served and not findings:
        return None
    if served and len(teachers) > 1:
        findings.append(("error", "A served teacher is the only teacher: multi_teacher cannot mix it."))
    allowed = AllowedPaths(teacher_servers=tuple(f"{n}={u}" for n, u in settings.TEACHER_SERVERS.items()))
    for model in served:
        if dataset.task != "causal_lm":
            findings.append(("error", f"{model} is served: an inference server serves causal language "
                                      f"models, and {dataset} is a {dataset.task} dataset."))
            continue
        try:
            config = ModelConfig(source="server", name=model.hub_id, params=dict(model.config))
            client = ServedTeacher.for_model(config, allowed)
            client.retries, client.timeout = 1, SERVER_CHECK_TIMEOUT_S
            limit = client.max_model_len
        except ServerUnavailable as exc:
            findings.append(("warning", f"{model}: {exc} Runs fail until it answers."))
            continue
        except EngineError as exc:
            findings.append(("error", f"{model}: {exc}"))
            continue
        if limit is not None and limit < dataset.max_length:
            findings.append(("error", f"{model}: server '{client.name}' reads at most {limit} tokens of "
                                      f"'{client.model}', but {dataset} has rows of {dataset.max_length}."))
        else:
            findings.append(("ok", f"{model}: server '{client.name}' serves '{client.model}'; the worker "
                                   "checks its tokenizer against each student's before training."))
    level = worst(level for level, _ in findings)
    ordered = sorted(findings, key=lambda f: -LEVELS.index(f[0]))
    return Check("served", title, level, ordered[0][1], tuple(text for _, text in ordered[1:]),
                 field="teacher")


# --- time ---------------------------------------------------------------------------------------------------
class ElapsedSeconds(Func):
    """Seconds between two timestamps, ``ElapsedSeconds(end, start)``, on Postgres and SQLite."""

    arity = 2
    output_field = FloatField()

    def as_sql(self, compiler, connection, **extra_context):  # Postgres (and any database with EXTRACT EPOCH)
        return super().as_sql(compiler, connection, template="EXTRACT(EPOCH FROM (%(expressions)s))",
                              arg_joiner=" - ", **extra_context)

    def as_sqlite(self, compiler, connection, **extra_context):
        return super().as_sql(compiler, connection, template="((julianday(%(expressions)s)) * 86400.0)",
                              arg_joiner=") - julianday(", **extra_context)


def similar_run_speeds(*, students: Sequence[ModelSpec] | None, dataset: DatasetSpec, min_steps: int,
                       max_steps: int) -> dict[int, tuple[float, int]]:
    """Median seconds per step of the succeeded runs of each student on ``dataset`` (every student that
    trained on it when ``students`` is None) that trained between ``min_steps`` and ``max_steps`` steps:
    ``{student id: (median, number of runs)}``.

    One query whatever the number of runs: each student's runs are ranked by seconds per step in a window and
    only the one or two middle rows come back.
    """
    per_step = ElapsedSeconds(F("finished_at"), F("started_at")) / Cast(F("total_steps"), FloatField())
    rows = (
        # Saved students only: one derived at launch has no runs yet.
        Run.objects.filter(
            *([] if students is None else [Q(student_id__in=[s.pk for s in students if s.pk is not None])]),
            experiment__dataset=dataset,
            status=Run.Status.SUCCEEDED,
            started_at__isnull=False,
            finished_at__isnull=False,
            total_steps__gte=max(min_steps, 1),
            total_steps__lte=max_steps,
        )
        .order_by()
        .annotate(per_step=per_step)
        .annotate(
            rank=Window(
                RowNumber(), partition_by=[F("student_id")], order_by=[F("per_step").asc(), F("id").asc()]
            ),
            n=Window(Count("id"), partition_by=[F("student_id")]),
        )
        .filter(rank__gte=(F("n") + 1) / 2, rank__lte=(F("n") + 2) / 2)
        .values_list("student_id", "per_step", "n")
    )
    middles: dict[int, list[float]] = {}
    counts: dict[int, int] = {}
    for student_id, value, n in rows:
        middles.setdefault(student_id, []).append(max(float(value), 0.0))
        counts[student_id] = n
    return {sid: (sum(values) / len(values), counts[sid]) for sid, values in middles.items()}


def duration_text(seconds: float) -> str:
    """``42`` → "< 1 min", ``600`` → "10 min", ``7560`` → "2.1 h", ``300000`` → "3.5 days"."""
    if seconds < 60:
        return "< 1 min"
    if seconds < 3600:
        return f"{round(seconds / 60)} min"
    if seconds < 48 * 3600:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


@dataclass(frozen=True)
class StepTime:
    """A student's seconds per step: measured (``reference`` None) or extrapolated from ``reference``."""

    seconds: float
    detail: str
    reference: ModelSpec | None = None


def extrapolated_step_time(*, params: int, references: Sequence[tuple[ModelSpec, int, float]]
                           ) -> tuple[ModelSpec, int, float] | None:
    """Seconds per step for a student of ``params`` parameters without runs of its own, from
    ``references``: ``(student, its parameters, its median seconds per step)`` measured on the same dataset
    (so on the workers that trained there, with similar run lengths).

    The rule is first-order: at a fixed batch and sequence length a step's work (forward and backward) grows
    with the parameter count, so the reference nearest in size (by the ratio of parameter counts) is scaled
    by ``params / its parameters``. Fixed per-step costs (data loading, the teacher's forward, logging) do
    not scale, so a much larger student is overestimated and a much smaller one underestimated; the page
    says which students were extrapolated and from what. Returns ``(reference, its parameters, seconds)``,
    or None without references.
    """
    usable = [(m, n, sec) for m, n, sec in references if n > 0]
    if params <= 0 or not usable:
        return None
    model, n, seconds = min(usable, key=lambda r: (abs(math.log(params / r[1])), r[1], r[0].pk or 0))
    return model, n, seconds * params / n


def _step_times(*, dataset: DatasetSpec, students: Sequence[ModelSpec], speeds: dict[int, tuple[float, int]],
                window: str) -> dict[int, StepTime]:
    """{index in ``students``: its step time} for every student that has one, measured or extrapolated."""
    found: dict[int, StepTime] = {}
    for i, student in enumerate(students):
        if student.pk in speeds:
            seconds, n = speeds[student.pk]
            found[i] = StepTime(seconds, f"{student}: median {seconds:.3g} s/step over {n} finished "
                                         f"run{'s' if n != 1 else ''} on {dataset} ({window}).")
    if len(found) == len(students):
        return found
    mine = {s.pk: s for s in students if s.pk is not None}
    others = ModelSpec.objects.filter(pk__in=[pk for pk in speeds if pk not in mine]).select_related("parent")
    reader = routing.model_shape_reader()
    references = []
    for model in [*(m for pk, m in mine.items() if pk in speeds), *others]:
        params = _param_count(model, dataset=dataset, reader=reader)
        if params:
            references.append((model, params, speeds[model.pk][0]))
    for i, student in enumerate(students):
        if i in found:
            continue
        params = _param_count(student, dataset=dataset, reader=reader)
        guess = extrapolated_step_time(params=params, references=references) if params else None
        if guess is None:
            continue
        reference, ref_params, seconds = guess
        found[i] = StepTime(
            seconds,
            f"No similar runs yet for {student}: ~{seconds:.3g} s/step extrapolated from {reference} "
            f"({speeds[reference.pk][0]:.3g} s/step measured on {dataset}) by parameter count "
            f"({params:,} vs {ref_params:,}).",
            reference,
        )
    return found


def _param_count(model: ModelSpec, *, dataset: DatasetSpec, reader: ModelShapeReader) -> int | None:
    """The model's parameters on ``dataset``: its record or the formulas (:mod:`model_size`), else its shape
    as the memory check reads it (a derived model from its parent's config, a model folder's config)."""
    size = model_size(model, dataset=dataset)
    if size is not None:
        return size.low if size.exact else None
    try:
        shape = reader.shape(engine_config.model_config(model), task=dataset.task)
    except (ValueError, TypeError, KeyError, OSError):  # advice only: an unreadable model has no size
        return None
    return shape.params if shape is not None and shape.params > 0 else None


def check_time(*, dataset: DatasetSpec, students: Sequence[ModelSpec], train: dict[str, Any],
               count: sweep_plan.RunCount) -> Check:
    """Training time: each student's median seconds per step over its similar finished runs on ``dataset``;
    a student without such runs is extrapolated from the others measured there
    (:func:`extrapolated_step_time`) or, when its size is unknown, left out of a total the summary then calls
    partial."""
    title = "Time"
    steps_values = train.get("max_steps", engine_config.TRAIN_DEFAULTS["max_steps"])
    steps_values = list(steps_values) if isinstance(steps_values, list) else [steps_values]
    lo, hi = min(steps_values), max(steps_values)
    lo_similar, hi_similar = math.ceil(lo / SIMILAR_STEPS_FACTOR), hi * SIMILAR_STEPS_FACTOR
    window = f"{lo_similar:,}–{hi_similar:,} steps"
    speeds = similar_run_speeds(students=None, dataset=dataset, min_steps=lo_similar, max_steps=hi_similar)
    times = _step_times(dataset=dataset, students=students, speeds=speeds, window=window) if speeds else {}
    if not times:
        names = ", ".join(str(s) for s in students)
        return Check("time", title, "unknown", "No similar runs yet.",
                     (f"No finished run of {names} on {dataset} with {window} to time from.",))
    runs_per_student = count.total / max(len(students), 1)
    mean_steps = sum(steps_values) / len(steps_values)
    total = sum(t.seconds * mean_steps * runs_per_student for t in times.values())
    per_run = [t.seconds * steps for t in times.values() for steps in steps_values]
    details = [t.detail for _, t in sorted(times.items())]
    guessed = [str(students[i]) for i, t in sorted(times.items()) if t.reference is not None]
    missing = [str(s) for i, s in enumerate(students) if i not in times]
    shortest, longest = min(per_run), max(per_run)
    each = duration_text(longest) if duration_text(shortest) == duration_text(longest) else \
        f"{duration_text(shortest)} to {duration_text(longest)}"
    summary = f"About {each} per run; ~{duration_text(total)} of training in all, on one worker."
    if guessed:
        summary += f" Extrapolated by parameter count for {', '.join(guessed)}."
    if missing:
        details.append(f"No similar runs yet for {', '.join(missing)}, and no parameter count to extrapolate "
                       "from; not counted in the total.")
        return Check("time", title, "notice", f"Partial estimate, without {', '.join(missing)}: {summary}",
                     tuple(details))
    return Check("time", title, "ok", summary, tuple(details))


# --- everything ---------------------------------------------------------------------------------------------
def experiment_preflight(*, dataset: DatasetSpec, teacher: ModelSpec | None, students: Sequence[ModelSpec],
                         recipes: Sequence[Recipe], seeds: Sequence[int], train: dict[str, Any],
                         term_sweeps: dict[str, list[Any]] | None = None, assistant: ModelSpec | None = None,
                         extra_teachers: Sequence[ModelSpec] = ()) -> Report:
    """Every check of an experiment set-up, for the page before launch.

    ``train`` holds the training settings as the form gives them (a swept setting as a list of values); the
    inputs need not be valid together (that is what the checks are for). Over the run limit, only the run
    count is reported: nothing else is worth computing for a grid that will be refused.
    """
    train = {**engine_config.TRAIN_DEFAULTS, **train}
    count = sweep_plan.count_runs(students=len(students), seeds=len(seeds), train=train, recipes=recipes,
                              term_sweeps=term_sweeps or {}, with_baseline=dataset.task != "embedding")
    runs = check_run_count(count, limit=settings.MAX_RUNS_PER_EXPERIMENT)
    if runs.blocks:
        return Report(count, (runs,))
    models = {
        "teacher": teacher,
        "students": students,
        "assistant": assistant,
        "extra_teachers": extra_teachers,
    }
    shapes = run_shapes(dataset=dataset, recipes=recipes, train=train, with_baseline=count.baseline, **models)
    served = check_served_teachers(dataset=dataset, **models)
    checks = (
        runs,
        check_recipes(dataset=dataset, recipes=recipes),
        check_labels(dataset=dataset, **models),
        check_tokenizers(dataset=dataset, recipes=recipes, **models),
        *([served] if served else []),
        check_memory(shapes),
        check_time(dataset=dataset, students=students, train=train, count=count),
    )
    return Report(count, checks)


def launch_errors(*, dataset: DatasetSpec, teacher: ModelSpec | None, students: Sequence[ModelSpec],
                  recipes: Sequence[Recipe], train: dict[str, Any], assistant: ModelSpec | None = None,
                  extra_teachers: Sequence[ModelSpec] = ()) -> dict[str, list[str]]:
    """The blocking pre-flight problems of an experiment that passed validation
    (``services.experiment_validate``: labels and the run limit are checked there), by form field: tokenizers
    that cannot line up, and runs larger than any GPU."""
    models = {
        "teacher": teacher,
        "students": students,
        "assistant": assistant,
        "extra_teachers": extra_teachers,
    }
    checks = [check_tokenizers(dataset=dataset, recipes=recipes, **models)]
    if served := check_served_teachers(dataset=dataset, **models):
        checks.append(served)
    shapes = run_shapes(dataset=dataset, recipes=recipes, train=train, with_baseline=False, **models)
    checks.append(check_memory(shapes))
    errors: dict[str, list[str]] = {}
    for check in checks:
        if check.blocks:
            errors.setdefault(check.field, []).append(check.summary)
    return errors
