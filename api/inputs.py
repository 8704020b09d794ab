"""API input → the domain's input rules → experiments.services.

A JSON body is validated with the rules the web forms render (``experiments.domain.input_rules``): each
value's shape first (``fields.value_shape_problem``), then ``fields.CleanedValues``: a single value goes
through the field's own checks, a list or an object is read as a value by the field's parser (a sweep's list
stays a list), and the checks across fields are the pages' own. The service then runs its checks; its
ValidationError is mapped onto the fields as the pages do it (``fields.service_error_targets``). Anything that
fails comes back as a DRF ValidationError: a 400 with ``{field: [messages]}``.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from typing import Any, TypeVar

from django.core.exceptions import ValidationError as DjangoValidationError
from rest_framework.exceptions import ValidationError

from experiments.domain import fields, input_rules, preflight
from experiments.domain.fields import CleanedValues, Rule
from experiments.models import DatasetSpec, Experiment, ModelSpec, Recipe, Run
from experiments.selectors import records as records_reads
from experiments.selectors import teams as teams_reads
from experiments.services import launch, records

from .exceptions import validation_detail

T = TypeVar("T")
Rules = Mapping[str, Rule]

NON_FIELD = "non_field_errors"


def _given(
    rules: Rules, payload: Any, *, extra: Collection[str] = (), initial: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """The values of ``payload`` (a JSON object) for ``rules``: keys left out take the field's initial value,
    as a browser posts a page's pre-filled fields (``initial``: ones that depend on the user, e.g. the team);
    an explicit null is a blank field. Keys the input does not know are refused, except ``extra`` ones (read
    by the caller).

    Raises ValidationError (400) for unknown keys and values of the wrong shape.
    """
    if not isinstance(payload, Mapping):
        raise ValidationError({NON_FIELD: ["Send a JSON object."]})
    data: dict[str, Any] = {}
    errors: dict[str, list[str]] = {}
    for key, value in payload.items():
        if key in extra:
            continue
        rule = rules.get(key)
        if rule is None:
            errors[key] = ["Unknown field."]
            continue
        if value is None:
            continue
        problem = fields.value_shape_problem(rule, value) or (
            fields.name_problem(value) if key == "name" else None
        )
        if problem:
            errors[key] = [problem]
        else:
            data[key] = value
    initial = {**{k: r.initial for k, r in rules.items()}, **(initial or {})}
    for key, value in initial.items():
        if key not in payload and value is not None:
            data[key] = value
    if errors:
        raise ValidationError(errors)
    return data


def _body(errors: Mapping[str, list[str]]) -> dict[str, list[str]]:
    """Errors as DRF's body: ``{field: [messages]}``, the whole input's under ``non_field_errors``."""
    return {(NON_FIELD if key == "__all__" else key): messages for key, messages in errors.items()}


def _submit(
    cleaned: CleanedValues,
    create: Callable[[dict[str, Any]], T],
    aliases: Mapping[str, str] | None = None,
    extra: Collection[str] = (),
) -> T:
    """``create(data)`` (a service call) when the input is valid; either's errors become one 400.

    ``aliases`` maps the service's error keys to the fields; errors keyed by an ``extra`` input (one the API
    reads besides the rules' fields) stay under that key.
    """
    extra_errors: dict[str, list[str]] = {}
    if not cleaned.errors:
        try:
            return create(cleaned.data)
        except DjangoValidationError as exc:
            rest: DjangoValidationError | None = exc
            if hasattr(exc, "error_dict"):
                messages = exc.message_dict
                extra_errors = {k: v for k, v in messages.items() if k in extra}
                others = {k: v for k, v in messages.items() if k not in extra}
                rest = DjangoValidationError(others) if others else None
            if rest is not None:
                cleaned.add_service_errors(rest, aliases)
    raise ValidationError({**_body(cleaned.errors), **extra_errors})


def _team_scoped(
    rules: Rules,
    *,
    user,
    payload: Any,
    extra: Collection[str] = (),
    context: Mapping[str, Mapping[str, Any]] | None = None,
    team_fields: Collection[str] = (),
    checks: fields.Checks | None = None,
) -> CleanedValues:
    """An input whose team is one of the user's teams (their only one when left out)."""
    teams = teams_reads.team_list(user=user)
    data = _given(rules, payload, extra=extra, initial={"team": fields.default_team(teams)})
    return CleanedValues(
        rules,
        data,
        context={"team": {"queryset": teams}, **(context or {})},
        team_fields=team_fields,
        checks=checks,
    )


# --- records --------------------------------------------------------------------------------------
def model_create(*, user, payload: Any) -> ModelSpec:
    """Register a model from the fields of the web's model form; ``hidden_sizes`` may be a list and ``config``
    an object."""
    cleaned = _team_scoped(
        input_rules.MODEL_SPEC, user=user, payload=payload, checks=input_rules.model_spec_checks
    )

    def create(data: dict[str, Any]) -> ModelSpec:
        return records.model_spec_create(
            team=data["team"], created_by=user, **input_rules.model_spec_service_fields(data)
        )

    return _submit(cleaned, create, input_rules.model_spec_error_aliases(cleaned.data))


def model_derive(*, user, parent: ModelSpec, payload: Any) -> ModelSpec:
    """A smaller student derived from ``parent``; ``layers`` may be a list of layer ids."""
    rules = input_rules.MODEL_DERIVE
    cleaned = CleanedValues(rules, _given(rules, payload))
    return _submit(
        cleaned,
        lambda data: records.model_derive(
            parent=parent, created_by=user, **input_rules.model_derive_kwargs(data)
        ),
        input_rules.MODEL_DERIVE_ALIASES,
    )


def dataset_create(*, user, payload: Any) -> DatasetSpec:
    """Register a dataset from the fields of the web's dataset form; ``label_names`` may be a list."""
    cleaned = _team_scoped(
        input_rules.DATASET_SPEC, user=user, payload=payload, checks=input_rules.dataset_spec_checks
    )
    return _submit(
        cleaned,
        lambda data: records.dataset_spec_create(
            team=data["team"], created_by=user, **input_rules.dataset_spec_service_fields(data)
        ),
    )


def recipe_create(*, user, payload: Any) -> Recipe:
    """Save a recipe (the next version when the name exists): the web's recipe fields for team, name, scheme
    and description; ``terms`` (a list of ``{name, weight, params, schedule}``) and ``scheme_params`` are
    validated by the service against the engine's schemas."""
    extra = ("terms", "scheme_params")
    cleaned = _team_scoped(input_rules.RECIPE, user=user, payload=payload, extra=extra)
    terms, scheme_params = payload.get("terms"), payload.get("scheme_params")
    shape: dict[str, list[str]] = {}
    if problems := fields.term_shape_problems(terms):
        shape["terms"] = problems
    if scheme_params is not None and not isinstance(scheme_params, dict):
        shape["scheme_params"] = ["Give an object of scheme parameters, e.g. {generations: 2}."]
    if shape:
        raise ValidationError({**_body(cleaned.errors), **shape})

    def create(data: dict[str, Any]) -> Recipe:
        return records.recipe_create(
            team=data["team"],
            created_by=user,
            name=data["name"],
            scheme=data["scheme"],
            terms=terms,
            description=data["description"],
            scheme_params=scheme_params,
        )

    return _submit(cleaned, create, extra=extra)


# --- experiments ----------------------------------------------------------------------------------
def experiment_input(*, user, payload: Any) -> CleanedValues:
    """An experiment's fields, cleaned against the user's records (training settings flat, as on the page).

    ``seeds`` and ``teacher_weights`` may be lists; a training setting may be a list of values or a sweep in
    the page's syntax ("1e-4:1e-3:log4"), and ``term_sweeps`` a mapping ``{"kd.temperature": [2, 4]}``, a list
    of ``"TERM.PARAM = values"`` lines or a list of ``{"param": "kd.temperature", "values": [2, 4]}``
    (``experiments.domain.sweeps``).
    """
    models = records_reads.model_spec_list(user=user).order_by("team__name", "name")
    records_of = {
        "dataset": records_reads.dataset_spec_list(user=user).order_by("team__name", "name"),
        "teacher": models,
        "students": models,
        "assistant": models,
        "extra_teachers": models,
        "recipes": records_reads.recipe_list(user=user).order_by("team__name", "name", "-version"),
    }
    return _team_scoped(
        input_rules.EXPERIMENT,
        user=user,
        payload=payload,
        context={k: {"queryset": qs} for k, qs in records_of.items()},
        team_fields=input_rules.EXPERIMENT_TEAM_FIELDS,
        checks=input_rules.experiment_checks,
    )


def experiment_create(*, user, payload: Any) -> Experiment:
    """Launch an experiment (see :func:`experiment_input`): creates the runs and enqueues them after the
    commit."""
    cleaned = experiment_input(user=user, payload=payload)
    return _submit(
        cleaned,
        lambda data: launch.experiment_create(created_by=user, **input_rules.experiment_service_kwargs(data)),
    )


def experiment_check(*, user, payload: Any) -> dict[str, Any]:
    """What launching would do, without creating anything: the run count, the pre-flight checks (labels,
    tokenizers, GPU memory against the queues, time from similar runs) and the errors launching would give, as
    the web's check step shows them. Field errors of the input itself are a 400, as for a launch."""
    cleaned = experiment_input(user=user, payload=payload)
    if cleaned.errors:
        raise ValidationError(_body(cleaned.errors))
    data = cleaned.data
    kwargs = input_rules.experiment_preflight_kwargs(data)
    report = preflight.experiment_preflight(**kwargs)
    try:
        launch.experiment_validate(
            team=data["team"], teacher_weights=data.get("teacher_weights") or [], **kwargs
        )
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
        "checks": [
            {
                "key": c.key,
                "title": c.title,
                "level": c.level,
                "summary": c.summary,
                "details": list(c.details),
                "field": NON_FIELD if c.field == "__all__" else c.field,
            }
            for c in report.checks
        ],
    }


def run_register_model(*, user, run: Run, payload: Any) -> ModelSpec:
    """Register a succeeded run's student as a model of the run's team."""
    rules = input_rules.REGISTER_MODEL
    cleaned = CleanedValues(rules, _given(rules, payload))
    return _submit(
        cleaned,
        lambda data: records.model_register_from_run(run=run, name=data["name"], created_by=user),
        input_rules.REGISTER_MODEL_ALIASES,
    )


# --- leaderboards ---------------------------------------------------------------------------------
def leaderboard_query(params: Mapping[str, Any]) -> dict[str, Any]:
    """The leaderboard's query parameters (budget, benchmark, scope, row filters) that were given; 400 on a
    bad one. Other parameters (paging) are left to their readers."""
    rules = input_rules.LEADERBOARD_QUERY
    cleaned = CleanedValues(rules, {k: params.get(k) for k in rules})
    if cleaned.errors:
        raise ValidationError(_body(cleaned.errors))
    return {k: v for k, v in cleaned.data.items() if v not in (None, "")}
