"""API input → the web's own forms → experiments.services.

A JSON body is turned into the values the web form would receive and validated by that same form, so the API
gives the same field errors as the pages; the service then runs its own checks, and its ValidationError is
mapped onto the form's fields the way the pages do it (``experiments.forms.add_service_errors``). Anything that
fails comes back as a DRF ValidationError: a 400 with ``{field: [messages]}``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Collection, Mapping
from typing import Any, TypeVar

from django import forms as django_forms
from django.conf import settings
from django.core.exceptions import ValidationError as DjangoValidationError
from django.core.validators import MaxLengthValidator
from rest_framework.exceptions import ValidationError

from experiments import forms
from experiments.domain import preflight, sweeps
from experiments.models import DatasetSpec, Experiment, ModelSpec, Recipe, Run
from experiments.services import launch, records

from .exceptions import validation_detail

T = TypeVar("T")

# A name is shown on every page and in every export: markup or control characters in it are refused.
_NAME_FORBIDDEN = re.compile(r"[<>\x00-\x1f\x7f]")
# Terms per recipe: the web's term formset allows this many rows.
MAX_TERMS = 8
TERM_KEYS = frozenset({"name", "weight", "params", "schedule"})


def name_problem(value: Any) -> str | None:
    """Why ``value`` cannot be a record name, or None."""
    if isinstance(value, str) and _NAME_FORBIDDEN.search(value):
        return "Names cannot contain < or > or control characters."
    return None


def _scalar(value: Any) -> bool:
    return isinstance(value, str | int | float) and not isinstance(value, bool)


def _plain_values(value: Any) -> bool:
    """A list of plain values, or a mapping of names to such lists (or single values)."""
    def plain(v: Any) -> bool:
        return isinstance(v, str | int | float | bool)

    if isinstance(value, list):
        return all(plain(v) for v in value)
    return all(isinstance(k, str) and (plain(v) or (isinstance(v, list) and all(plain(x) for x in v)))
               for k, v in value.items())


def _writes_its_own_syntax(field: django_forms.Field) -> bool:
    """A text field that shows a list or mapping in its own syntax (the sweep fields: "1e-4, 3e-4", one
    ``TERM.PARAM = values`` per line)."""
    return isinstance(field, django_forms.CharField) and \
        type(field).prepare_value is not django_forms.Field.prepare_value


# --- sweeps given as JSON / YAML lists -------------------------------------------------------------------
# A swept training setting may be a list (``[1e-4, 3e-4]``, items in the form's syntax too: ``["1e-4",
# "2e-4:1e-3:log3"]``), and term sweeps a mapping ``{"kd.temperature": [2, 4]}`` or a list of lines
# (``["kd.temperature = 2, 4"]``) or of ``{"param": "kd.temperature", "values": [2, 4]}``. They are written in
# the form's own text syntax and read by the form, so the rules are the form's (``experiments.domain.sweeps``). The
# form's length cap bounds what a person types; a list is bounded by its number of items instead (each item, and
# each line given as text, by a cap of its own), so that an exported sweep of many values imports again.
_SWEEP_ITEM_PROBLEM = "Give one value or range per list item (no commas or line breaks inside an item)."
_ITEM_CAP = 200  # characters of one list item: what the form's field of one training setting takes


def _sweep_item(item: Any, *, choices: bool) -> tuple[str | None, str | None]:
    """One item of a swept list in the form's syntax: a number, or text holding one value or range (``choices``:
    true/false and names too, for term parameters)."""
    if isinstance(item, bool):
        return (sweeps.format_values([item]), None) if choices else (None, "Give numbers, not true/false.")
    if isinstance(item, int | float):
        return sweeps.format_values([item]), None
    if isinstance(item, str):
        text = item.strip()
        if len(text) > _ITEM_CAP:
            return None, f"A list item may be at most {_ITEM_CAP} characters."
        if not text or any(c in text for c in ",\n\r"):
            return None, _SWEEP_ITEM_PROBLEM
        return text, None
    return None, "Give a list of values: numbers, or ranges such as \"1e-4:1e-3:log4\"."


def _sweep_values_text(values: Any, *, choices: bool) -> tuple[str | None, str | None]:
    """A list of values (or one value) as the form's comma-separated syntax."""
    if not isinstance(values, list):
        values = [values]
    limit = settings.MAX_RUNS_PER_EXPERIMENT
    if not values:
        return None, "Give at least one value."
    if len(values) > limit:
        return None, f"This gives {len(values):,} values; at most {limit:,} fit in one experiment."
    items = []
    for item in values:
        text, problem = _sweep_item(item, choices=choices)
        if problem:
            return None, problem
        items.append(text)
    return ", ".join(items), None


_LINE = object()  # the axis of a term sweep given as a whole "TERM.PARAM = values" line


def _term_sweep_entries(value: Any) -> tuple[list[tuple[Any, Any]] | None, str | None]:
    """(axis, values) pairs of term sweeps given as a mapping or a list; a line given as text is (_LINE, line)
    (an axis given as "" or null is a mistake to report, not a line)."""
    shape = ('Give term sweeps as {"TERM.PARAM": [values]}, or a list of "TERM.PARAM = values" lines or of '
             '{"param": "TERM.PARAM", "values": [values]}.')
    if isinstance(value, dict):
        return list(value.items()), None
    entries: list[tuple[Any, Any]] = []
    for item in value:
        if isinstance(item, str):
            if "\n" in item or "\r" in item:
                return None, "Give one TERM.PARAM = values line per list item."
            entries.append((_LINE, item))
        elif isinstance(item, dict) and set(item) == {"param", "values"}:
            entries.append((item["param"], item["values"]))
        elif isinstance(item, dict) and item:
            entries.extend(item.items())
        else:
            return None, shape
    return entries, None


def _term_sweeps_text(value: Any, *, cap: int) -> tuple[str | None, str | None]:
    """Term sweeps (a mapping or a list, see above) as the form's syntax: one ``TERM.PARAM = values`` per line;
    a line or values given as text may be ``cap`` characters long, as the form's whole field."""
    entries, problem = _term_sweep_entries(value)
    if problem:
        return None, problem
    lines = []
    for axis, values in entries:
        if isinstance(values, str) and len(values) > cap:
            return None, f"{'A line' if axis is _LINE else str(axis)[:40]}: at most {cap} characters."
        if axis is _LINE:  # a line as written in the form
            lines.append(values)
            continue
        if not isinstance(axis, str) or not axis.strip() or any(c in axis for c in "=\n\r"):
            return None, f"{str(axis)[:40]!r} does not name a term parameter; write TERM.PARAM, e.g. kd.temperature."
        if isinstance(values, str):  # the values in the form's syntax: "2, 4" or "2:8:step2"
            if "\n" in values or "\r" in values:
                return None, f"{axis}: give the values on one line."
            lines.append(f"{axis} = {values}")
            continue
        text, problem = _sweep_values_text(values, choices=True)
        if problem:
            return None, f"{axis}: {problem}"
        lines.append(f"{axis} = {text}")
    return "\n".join(lines), None


def _lift_length_cap(field: django_forms.CharField, length: int) -> None:
    """Let this form's ``field`` take ``length`` characters (text written from a bounded list)."""
    if field.max_length is not None and length > field.max_length:
        field.max_length = length
        field.validators = [v for v in field.validators if not isinstance(v, MaxLengthValidator)]
        field.validators.append(MaxLengthValidator(length))


def _sweep_form_value(field: django_forms.CharField, value: Any) -> tuple[Any, str | None]:
    """The form's text for a sweep given as a list (or, for term sweeps, a mapping), the field's length cap
    lifted to fit it."""
    if not value:
        return "", None  # [] or {}: left blank, as an empty field of the form
    if isinstance(field, forms.TermSweepsField):
        text, problem = _term_sweeps_text(value, cap=field.max_length or 2000)
    elif isinstance(value, dict):
        return None, "Give a list of values (or, for term sweeps, {TERM.PARAM: [values]})."
    else:
        text, problem = _sweep_values_text(value, choices=False)
    if problem:
        return None, problem
    _lift_length_cap(field, len(text))
    return text, None


def _form_value(field: django_forms.Field, key: str, value: Any, *, list_fields: Collection[str],
                json_fields: Collection[str]) -> tuple[Any, str | None]:
    """The form value for one JSON value, or an error message when its shape cannot fit the field."""
    if isinstance(value, list | dict) and isinstance(field, forms.SweepField | forms.TermSweepsField):
        return _sweep_form_value(field, value)
    if isinstance(field, django_forms.MultipleChoiceField | django_forms.ModelMultipleChoiceField):
        if isinstance(value, list) and not all(_scalar(v) for v in value):
            return None, "Give a list of ids."
        return value, None
    if isinstance(field, django_forms.BooleanField):
        return (value, None) if isinstance(value, bool) else (None, "Enter true or false.")
    if isinstance(value, list | dict) and _writes_its_own_syntax(field):
        text = field.prepare_value(value) if _plain_values(value) else None
        if not isinstance(text, str):
            return None, "Give a list of values (or, for term sweeps, {TERM.PARAM: [values]})."
        return text, None
    if isinstance(value, list) and key in list_fields:
        if not all(_scalar(v) for v in value):
            return None, "Give a list of numbers or names."
        return ",".join(str(v) for v in value), None
    if isinstance(value, dict) and key in json_fields:
        return json.dumps(value), None
    if isinstance(value, bool):
        return None, "Give a number or text, not true/false."
    if not _scalar(value):
        return None, "Give a single value (text or a number)."
    return value, None


def bind(form_class: type[django_forms.Form], payload: Any, *, list_fields: Collection[str] = (),
         json_fields: Collection[str] = (), extra: Collection[str] = (), **form_kwargs: Any) -> django_forms.Form:
    """A bound ``form_class`` holding ``payload`` (a JSON object) in the shape the web form posts.

    Lists given for ``list_fields`` are joined with commas (the form's text syntax, e.g. seeds "0,1,2"); objects
    given for ``json_fields`` become JSON text. Keys the form does not know are refused, except ``extra`` ones
    (read by the caller). Keys left out take the form's initial values, like the pre-filled fields of the page
    (a TeamScopedForm's team: the user's only team).

    Raises ValidationError (400) for unknown keys and values of the wrong shape.
    """
    if not isinstance(payload, Mapping):
        raise ValidationError({"non_field_errors": ["Send a JSON object."]})
    # The form's fields depend on the user (querysets, training settings), so build it first and hand it the
    # converted values afterwards; a form reads ``data`` only when it is validated.
    form = form_class({}, **form_kwargs)
    data: dict[str, Any] = {}
    errors: dict[str, list[str]] = {}
    for key, value in payload.items():
        if key in extra:
            continue
        field = form.fields.get(key)
        if field is None:
            errors[key] = ["Unknown field."]
            continue
        if value is None:
            continue
        converted, problem = _form_value(field, key, value, list_fields=list_fields, json_fields=json_fields)
        problem = problem or (name_problem(value) if key == "name" else None)
        if problem:
            errors[key] = [problem]
        else:
            data[key] = converted
    # Keys left out take the form's initial values, as a browser posts the pre-filled fields (the team too,
    # when the user has only one); an explicit null is a blank field.
    for key, field in form.fields.items():
        if key not in payload and field.initial is not None and not callable(field.initial):
            data[key] = field.initial
    if errors:
        raise ValidationError(errors)
    form.data = data
    return form


def form_errors(form: django_forms.Form) -> dict[str, list[str]]:
    """The form's errors as DRF's body: ``{field: [messages]}``, form-wide ones under ``non_field_errors``."""
    return {("non_field_errors" if key == "__all__" else key): [e["message"] for e in errs]
            for key, errs in form.errors.get_json_data().items()}


def submit(form: django_forms.Form, create: Callable[[django_forms.Form], T],
           aliases: dict[str, str] | Callable[[], dict[str, str]] | None = None, extra: Collection[str] = ()) -> T:
    """Validate ``form``, then ``create(form)`` (a service call); either's errors become one 400.

    ``aliases`` maps the service's error keys to the form's fields (a callable is asked after validation);
    errors keyed by an ``extra`` input (one the API reads besides the form's fields) stay under that key.
    """
    extra_errors: dict[str, list[str]] = {}
    if form.is_valid():
        try:
            return create(form)
        except DjangoValidationError as exc:
            rest: DjangoValidationError | None = exc
            if hasattr(exc, "error_dict"):
                messages = exc.message_dict
                extra_errors = {k: v for k, v in messages.items() if k in extra}
                others = {k: v for k, v in messages.items() if k not in extra}
                rest = DjangoValidationError(others) if others else None
            if rest is not None:
                forms.add_service_errors(form, rest, aliases() if callable(aliases) else aliases)
    raise ValidationError({**form_errors(form), **extra_errors})


# --- records --------------------------------------------------------------------------------------
def model_create(*, user, payload: Any) -> ModelSpec:
    """Register a model from the fields of the web's model form; ``hidden_sizes`` may be a list and ``config``
    an object."""
    form = bind(forms.ModelSpecForm, payload, user=user, list_fields=("hidden_sizes",), json_fields=("config",))

    def create(f: forms.ModelSpecForm) -> ModelSpec:
        return records.model_spec_create(team=f.cleaned_data["team"], created_by=user, **f.service_fields())

    return submit(form, create, form.error_aliases)


def model_derive(*, user, parent: ModelSpec, payload: Any) -> ModelSpec:
    """A smaller student derived from ``parent``; ``layers`` may be a list of layer ids."""
    form = bind(forms.ModelDeriveForm, payload, list_fields=("layers",))
    return submit(form, lambda f: records.model_derive(parent=parent, created_by=user, **f.service_kwargs()),
                  {"__all__": "name", "config": "layers", "parent": "__all__"})


def dataset_create(*, user, payload: Any) -> DatasetSpec:
    """Register a dataset from the fields of the web's dataset form; ``label_names`` may be a list."""
    form = bind(forms.DatasetSpecForm, payload, user=user, list_fields=("label_names",))
    return submit(form, lambda f: records.dataset_spec_create(team=f.cleaned_data["team"], created_by=user,
                                                               **f.service_fields()))


def _term_shape_errors(terms: Any) -> list[str]:
    """Shape problems of a recipe's ``terms`` (their values are the engine's to check)."""
    if not isinstance(terms, list) or not terms:
        return ["Give a list of loss terms, e.g. [{name: kd, weight: 0.9, params: {temperature: 4}}]."]
    if len(terms) > MAX_TERMS:
        return [f"At most {MAX_TERMS} loss terms."]
    problems = []
    for i, term in enumerate(terms, 1):
        if not isinstance(term, dict):
            problems.append(f"Term {i} must be an object with a name, a weight and params.")
            continue
        unknown = sorted(set(term) - TERM_KEYS)
        if unknown:
            problems.append(f"Term {i}: unknown key {', '.join(map(str, unknown))} (use {', '.join(sorted(TERM_KEYS))}).")
        if not isinstance(term.get("name"), str):
            problems.append(f"Term {i} needs a name (text).")
        weight = term.get("weight", 1.0)
        if not isinstance(weight, int | float) or isinstance(weight, bool):
            problems.append(f"Term {i}: the weight must be a number.")
        for key in ("params", "schedule"):
            if term.get(key) is not None and not isinstance(term[key], dict):
                problems.append(f"Term {i}: {key} must be an object.")
    return problems


def recipe_create(*, user, payload: Any) -> Recipe:
    """Save a recipe (the next version when the name exists): the web's recipe form for team, name, scheme and
    description; ``terms`` (a list of ``{name, weight, params, schedule}``) and ``scheme_params`` are validated
    by the service against the engine's schemas."""
    form = bind(forms.RecipeForm, payload, user=user, extra=("terms", "scheme_params"))
    terms, scheme_params = payload.get("terms"), payload.get("scheme_params")
    shape: dict[str, list[str]] = {}
    if problems := _term_shape_errors(terms):
        shape["terms"] = problems
    if scheme_params is not None and not isinstance(scheme_params, dict):
        shape["scheme_params"] = ["Give an object of scheme parameters, e.g. {generations: 2}."]
    if shape:
        form.is_valid()
        raise ValidationError({**form_errors(form), **shape})

    def create(f: forms.RecipeForm) -> Recipe:
        data = f.cleaned_data
        return records.recipe_create(team=data["team"], created_by=user, name=data["name"], scheme=data["scheme"],
                                      terms=terms, description=data["description"], scheme_params=scheme_params)

    return submit(form, create, extra=("terms", "scheme_params"))


# --- experiments ----------------------------------------------------------------------------------
def experiment_create(*, user, payload: Any) -> Experiment:
    """Launch an experiment from the fields of the web's experiment form (training settings flat, as there).

    ``seeds`` and ``teacher_weights`` may be lists; a training setting may be a list of values or a sweep in the
    form's syntax ("1e-4:1e-3:log4"), and ``term_sweeps`` a mapping ``{"kd.temperature": [2, 4]}``, a list of
    ``"TERM.PARAM = values"`` lines or a list of ``{"param": "kd.temperature", "values": [2, 4]}`` (the form's
    rules apply to each; see the sweep section above). Creates the runs and enqueues them after the commit.
    """
    form = bind(forms.ExperimentForm, payload, user=user, list_fields=("seeds", "teacher_weights"))
    return submit(form, lambda f: launch.experiment_create(created_by=user, **f.service_kwargs()))


def experiment_check(*, user, payload: Any) -> dict[str, Any]:
    """What launching would do, without creating anything: the run count, the pre-flight checks (labels,
    tokenizers, GPU memory against the queues, time from similar runs) and the errors launching would give, as
    the web's check step shows them. Field errors of the input itself are a 400, as for a launch."""
    form = bind(forms.ExperimentForm, payload, user=user, list_fields=("seeds", "teacher_weights"))
    if not form.is_valid():
        raise ValidationError(form_errors(form))
    kwargs = form.preflight_kwargs()
    report = preflight.experiment_preflight(**kwargs)
    try:
        launch.experiment_validate(team=form.cleaned_data["team"],
                                     teacher_weights=form.cleaned_data.get("teacher_weights") or [], **kwargs)
    except DjangoValidationError as exc:
        errors = validation_detail(exc)
    else:
        errors = {}
    return {
        "runs": report.count.total,
        "runs_described": report.count.describe(),
        "baselines": report.count.baselines,
        "can_launch": report.can_launch and not errors,
        "errors": errors,
        "checks": [{"key": c.key, "title": c.title, "level": c.level, "summary": c.summary,
                    "details": list(c.details), "field": "non_field_errors" if c.field == "__all__" else c.field}
                   for c in report.checks],
    }


def run_register_model(*, user, run: Run, payload: Any) -> ModelSpec:
    """Register a succeeded run's student as a model of the run's team."""
    form = bind(forms.RegisterModelForm, payload)
    return submit(form, lambda f: records.model_register_from_run(run=run, name=f.cleaned_data["name"],
                                                                   created_by=user), {"__all__": "name"})
