"""One input field's rules, shared by the web forms and the API: its Django field checks (required, length,
bounds, choices), its initial value, and the parsing of its value into what the services take.

A form renders a :class:`Rule` (``rule.field(widget=..., help_text=...)``) and reads its text with
:meth:`Rule.from_text`; the API cleans a JSON value with the same checks (:meth:`Rule.clean`) and reads a
list or an object with :meth:`Rule.from_value`, never writing it back as text. Either way the messages are
the same. The parsers here take values (a list of layer widths, a config object); the text helpers turn
what a person typed into such values first.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Container, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from django import forms
from django.conf import settings
from django.core.exceptions import ValidationError
from django.db.models import QuerySet

from experiments.domain import inputs, sweeps
from experiments.domain.validation import (
    MAX_SEEDS,
    MULTI_HOST_MESSAGE,
    SWEPT_CHOICES,
    TRAIN_FIELDS,
    clean_choice_sweep,
)

Parser = Callable[[Any], Any]
AddError = Callable[[str | None, str], None]
# The checks across an input's fields: (cleaned data, the fields with errors, add_error).
Checks = Callable[[dict[str, Any], Container[str], AddError], None]


def _identity(value: Any) -> Any:
    return value


@dataclass(frozen=True)
class Rule:
    """One input field: a Django field class with its checks and initial value (``options``), how its text is
    read (``text``: the cleaned string → the value the services take) and, for fields that take a list or an
    object as a value, how that value is read (``value``, for the JSON types in ``takes``; ``shape`` checks
    such a value's shape alone, before any field is cleaned)."""

    kind: type[forms.Field]
    options: Mapping[str, Any] = field(default_factory=dict)
    text: Parser = _identity
    value: Parser | None = None
    takes: tuple[type, ...] = ()
    shape: Parser | None = None

    def field(self, cls: type[forms.Field] | None = None, **ui: Any) -> forms.Field:
        """The form field: these checks, plus the page's widget, label and help text (``cls``: a subclass of
        ``kind`` that renders the value its own way)."""
        return (cls or self.kind)(**{**self.options, **ui})

    def clean(self, value: Any, **context: Any) -> Any:
        """``value`` (a single value) through the field's checks and its text parser; ``context``: what the
        field needs from the request, e.g. the queryset of a record choice."""
        return self.from_text(self.field(**context).clean(value))

    def from_text(self, text: Any) -> Any:
        return self.text(text)

    def from_value(self, value: Any) -> Any:
        """A list or an object given for this field, read as a value (see ``takes``)."""
        assert self.value is not None
        return self.value(value)

    @property
    def initial(self) -> Any:
        return self.options.get("initial")


def rule(
    kind: type[forms.Field],
    *,
    text: Parser = _identity,
    value: Parser | None = None,
    takes: tuple[type, ...] = (list,),
    shape: Parser | None = None,
    **options: Any,
) -> Rule:
    return Rule(kind, options, text, value, takes if value is not None else (), shape)


# --- text helpers: what a person typed → values ---------------------------------------------------------
def comma_items(text: str) -> list[str]:
    """``"256, 256"`` → ``["256", "256"]`` (spaces removed, empty items dropped)."""
    return [part for part in text.replace(" ", "").split(",") if part]


def json_object_text(text: str) -> dict[str, Any]:
    """A JSON object typed into a text area (blank: an empty object)."""
    raw = text.strip()
    if not raw:
        return {}
    try:
        value = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ValidationError(f"Not valid JSON: {exc.msg} (line {exc.lineno}, column {exc.colno}).") from None
    except RecursionError:
        raise ValidationError(f"Nested deeper than {inputs.MAX_NESTING} levels.") from None
    return model_config(value)


# --- values ----------------------------------------------------------------------------------------------
def _scalar(value: Any) -> bool:
    return isinstance(value, str | int | float) and not isinstance(value, bool)


def scalar_items(values: list[Any]) -> list[Any]:
    """A list of numbers or names, as given (anything else in it is refused)."""
    if not all(_scalar(v) for v in values):
        raise ValidationError("Give a list of numbers or names.")
    return values


def _whole(item: Any) -> int:
    """A whole number given as a number or as its digits (ValueError otherwise)."""
    if isinstance(item, int) and not isinstance(item, bool):
        return item
    if isinstance(item, str):
        return int(item.replace(" ", ""))
    raise ValueError(item)


def hidden_sizes(values: list[Any]) -> list[int]:
    """A builtin net's hidden layer widths."""
    try:
        sizes = [_whole(item) for item in scalar_items(values) if item != ""]
    except ValueError:
        raise ValidationError(
            'Enter layer widths as whole numbers separated by commas, e.g. "256,256".'
        ) from None
    if any(not 1 <= s <= 65536 for s in sizes):
        raise ValidationError("Each layer width must be between 1 and 65536.")
    return sizes


def model_config(value: Any) -> dict[str, Any]:
    """A transformers config: an object whose values can be stored."""
    if not isinstance(value, dict):
        raise ValidationError("The config must be a JSON object.")
    if problem := inputs.data_problem(value):  # "\u0000" escapes, NaN: not storable
        raise ValidationError(problem)
    return value


LAYER_PRESETS = ("every_other", "every_third", "all")


def derive_layers(value: str | list[Any]) -> str | list[int]:
    """The layers a derived student keeps: a preset (``"every_other"``) or layer ids (a list, or
    ``"0,2,4"``)."""
    problem = 'Enter "every_other", "every_third", "all", or layer ids such as "0,2,4".'
    if isinstance(value, str):
        raw = value.strip().lower().replace(" ", "")
        if raw in LAYER_PRESETS:
            return raw
        value = [p for p in raw.split(",") if p]
    ids = [
        str(item).replace(" ", "") if isinstance(item, int | str) and not isinstance(item, bool) else ""
        for item in scalar_items(value)
    ]
    if not ids or not all(p.isdigit() for p in ids):
        raise ValidationError(problem)
    return [int(p) for p in ids]


def label_names(values: list[Any]) -> list[str]:
    """A dataset's class names in label-id order (blank ones dropped)."""
    return [str(name).strip() for name in scalar_items(values) if str(name).strip()]


def label_names_text(text: str) -> list[str]:
    return label_names(text.split(","))


def parse_seeds(items: Iterable[Any]) -> list[int]:
    """Seeds given one by one or as ranges (``"0-4"``)."""
    seeds: list[int] = []
    for item in items:
        part = item.replace(" ", "") if isinstance(item, str) else item
        if isinstance(part, int) and not isinstance(part, bool) and part >= 0:
            seeds.append(part)
            continue
        part = part if isinstance(part, str) else ""
        if not part:
            if isinstance(item, str):
                continue
            raise ValidationError('Enter whole numbers (0 or more) separated by commas, e.g. "0,1,2".')
        if "-" in part[1:]:
            lo, hi = part.split("-", 1)
            if not (lo.isdigit() and hi.isdigit()) or int(hi) < int(lo):
                raise ValidationError(f'"{part}" is not a range like "0-4".')
            if int(hi) - int(lo) >= MAX_SEEDS:  # refused before it is expanded: "0-1000000000" costs nothing
                raise ValidationError(f"At most {MAX_SEEDS} seeds.")
            seeds += range(int(lo), int(hi) + 1)
        elif part.isdigit():
            seeds.append(int(part))
        else:
            raise ValidationError('Enter whole numbers (0 or more) separated by commas, e.g. "0,1,2".')
    return seeds


def seeds(items: list[Any]) -> list[int]:
    """An experiment's seeds: at least one, at most ``MAX_SEEDS``, all different."""
    found = parse_seeds(scalar_items(items))
    if not found:
        raise ValidationError("Give at least one seed.")
    if len(found) > MAX_SEEDS:
        raise ValidationError(f"At most {MAX_SEEDS} seeds.")
    if len(set(found)) != len(found):
        raise ValidationError("Seeds must be different from each other.")
    return found


def seeds_text(text: str) -> list[int]:
    return seeds(text.replace(" ", "").split(","))


def teacher_weights(values: list[Any]) -> list[float]:
    """Multi-teacher weights, the main teacher first."""
    try:
        return [
            float(item.replace(" ", "") if isinstance(item, str) else item)
            for item in scalar_items(values)
            if item != ""
        ]
    except ValueError:
        raise ValidationError('Enter numbers separated by commas, e.g. "0.5,0.5".') from None


# --- sweeps -----------------------------------------------------------------------------------------------
TERM_SWEEPS_CAP = 2000  # characters of the term sweeps field, and of one line or text value given in a list
SWEEP_SHAPE = "Give a list of values (or, for term sweeps, {TERM.PARAM: [values]})."


def _sweep(parse: Callable[[], Any]) -> Any:
    try:
        return parse()
    except sweeps.SweepError as exc:
        raise ValidationError(str(exc)) from None


def train_sweep_shape(values: Any) -> None:
    """A training setting's list of values: at most as many items as runs, each a number or one value or
    range."""
    if isinstance(values, dict):
        raise ValidationError(SWEEP_SHAPE)
    _sweep(lambda: sweeps.list_items(values, choices=False, limit=settings.MAX_RUNS_PER_EXPERIMENT))


def term_sweeps_shape(value: Any) -> None:
    """Term sweeps given as a mapping or a list: each axis named, each list of values within its caps."""
    _sweep(lambda: sweeps.term_sweep_rows(value, cap=TERM_SWEEPS_CAP, limit=settings.MAX_RUNS_PER_EXPERIMENT))


def train_sweep_text(name: str, text: str) -> list[int | float]:
    """A training setting typed as one value or a sweep (``sweeps.SYNTAX_HELP``); blank: no values."""
    if not text:
        return []
    return _train_values(
        name, lambda kind, lo, hi: sweeps.parse_values(
            text, kind=kind, lo=lo, hi=hi, limit=settings.MAX_RUNS_PER_EXPERIMENT)
    )


def train_sweep_value(name: str, values: Any) -> list[int | float]:
    """A training setting given as a list of values (numbers, or text items holding one value or range)."""
    if isinstance(values, dict):
        raise ValidationError(SWEEP_SHAPE)
    return _train_values(
        name, lambda kind, lo, hi: sweeps.value_list(
            values, kind=kind, lo=lo, hi=hi, limit=settings.MAX_RUNS_PER_EXPERIMENT)
    )


def _train_values(name: str, parse: Callable[[type, float, float | None], list[Any]]) -> list[Any]:
    """``parse(kind, lo, hi)`` within the setting's bounds; more GPUs than one host has get their own
    message (``validation.MULTI_HOST_MESSAGE``)."""
    kind, lo, hi, _ = TRAIN_FIELDS[name]
    if name != "gpus":
        return _sweep(lambda: parse(kind, lo, hi))
    values = _sweep(lambda: parse(kind, lo, None))
    if any(v > hi for v in values):
        raise ValidationError(MULTI_HOST_MESSAGE)
    return values


def choice_sweep_text(name: str, text: Any) -> Any:
    """A resource choice typed or picked on the page: one name (``"fsdp"``), several (a sweep: ``"ddp, fsdp"``
    or the boxes ticked), or for a yes/no setting "on", "off" or "both"; blank: none."""
    items = [text] if isinstance(text, bool) else text if isinstance(text, list) else comma_items(str(text))
    if not items:
        return None
    if SWEPT_CHOICES[name] == (False, True):
        words = {"true": [True], "on": [True], "false": [False], "off": [False], "both": [False, True]}
        found = [v for item in items for v in words.get(str(item).strip().lower(), [item])]
    else:
        found = [str(item).strip().lower() if isinstance(item, str) else item for item in items]
    return choice_sweep_value(name, found)


def choice_sweep_value(name: str, values: Any) -> Any:
    """A resource choice given as a value: one choice, or a list of them (a sweep)."""
    try:
        return clean_choice_sweep(name, values, limit=settings.MAX_RUNS_PER_EXPERIMENT)
    except ValidationError as exc:
        raise ValidationError(exc.message_dict[name]) from None


def term_sweeps_text(text: str) -> dict[str, list[Any]]:
    """Term sweeps typed one ``TERM.PARAM = values`` per line; blank: none."""
    if not text:
        return {}
    return _sweep(lambda: sweeps.parse_term_sweeps(text, limit=settings.MAX_RUNS_PER_EXPERIMENT))


def term_sweeps_value(value: Any) -> dict[str, list[Any]]:
    """Term sweeps given as a mapping or a list (``sweeps.term_sweeps_value``)."""
    return _sweep(
        lambda: sweeps.term_sweeps_value(value, cap=TERM_SWEEPS_CAP, limit=settings.MAX_RUNS_PER_EXPERIMENT)
    )


# --- recipes ----------------------------------------------------------------------------------------------
MAX_TERMS = 8  # loss terms per recipe: the rows of the page's term formset
TERM_KEYS = frozenset({"name", "weight", "params", "schedule"})


def term_shape_problems(terms: Any) -> list[str]:
    """Shape problems of a recipe's ``terms`` given as values (their contents are the engine's to check)."""
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
            problems.append(
                f"Term {i}: unknown key {', '.join(map(str, unknown))} (use {', '.join(sorted(TERM_KEYS))})."
            )
        if not isinstance(term.get("name"), str):
            problems.append(f"Term {i} needs a name (text).")
        weight = term.get("weight", 1.0)
        if not isinstance(weight, int | float) or isinstance(weight, bool):
            problems.append(f"Term {i}: the weight must be a number.")
        for key in ("params", "schedule"):
            if term.get(key) is not None and not isinstance(term[key], dict):
                problems.append(f"Term {i}: {key} must be an object.")
    return problems


# --- teams and service errors -------------------------------------------------------------------------------
def default_team(teams: Any) -> Any | None:
    """The pk of the team an input takes when left out: the user's only team (None with several)."""
    if teams.count() > 1:
        return None
    first = teams.first()
    return None if first is None else first.pk


def team_problems(cleaned: Mapping[str, Any], team_fields: Iterable[str]) -> list[tuple[str, str]]:
    """(field, message) for each chosen record that belongs to another team than the chosen one."""
    team = cleaned.get("team")
    if team is None:
        return []
    problems = []
    for name in team_fields:
        value = cleaned.get(name)
        records = list(value) if isinstance(value, list | tuple | QuerySet) else [value]
        wrong = [r for r in records if r is not None and r.team_id != team.pk]
        if wrong:
            problems.append(
                (name, f"{', '.join(str(r) for r in wrong)} belongs to another team than {team}.")
            )
    return problems


def service_error_targets(
    exc: ValidationError, fields: Container[str], aliases: Mapping[str, str] | None = None
) -> list[tuple[str | None, str]]:
    """Where each message of a service's ValidationError goes: (field, message) for a key among ``fields``
    (through ``aliases``: service key → field), else (None, message) prefixed with the key in words."""
    aliases = aliases or {}
    if not hasattr(exc, "error_dict"):
        return [(None, message) for message in exc.messages]
    targets: list[tuple[str | None, str]] = []
    for key, messages in exc.message_dict.items():
        name = aliases.get(key, key)
        for message in messages:
            if name in fields:
                targets.append((name, message))
            else:
                prefix = "" if key == "__all__" else f"{key.replace('_', ' ').capitalize()}: "
                targets.append((None, prefix + message))
    return targets


# A name is shown on every page and in every export: markup or control characters in it are refused.
_NAME_FORBIDDEN = re.compile(r"[<>\x00-\x1f\x7f]")


def name_problem(value: Any) -> str | None:
    """Why ``value`` cannot be a record name given as a value (JSON, YAML), or None."""
    if isinstance(value, str) and _NAME_FORBIDDEN.search(value):
        return "Names cannot contain < or > or control characters."
    return None


def value_shape_problem(rule: Rule, value: Any) -> str | None:
    """Why a value (JSON, YAML) cannot be given for this field at all, or None: a list or an object only where
    the field reads one (``rule.takes``) or takes several records, true/false only for a yes/no field."""
    if rule.value is not None and isinstance(value, rule.takes):
        if rule.takes == (list,) and not all(_scalar(v) for v in value):
            return "Give a list of numbers or names."
        if rule.shape is not None and value:
            try:
                rule.shape(value)
            except ValidationError as exc:
                return " ".join(exc.messages)
        return None  # read as a value by the field's parser
    if issubclass(rule.kind, forms.MultipleChoiceField | forms.ModelMultipleChoiceField):
        if isinstance(value, list) and not all(_scalar(v) for v in value):
            return "Give a list of ids."
        return None
    if issubclass(rule.kind, forms.BooleanField):
        return None if isinstance(value, bool) else "Enter true or false."
    if isinstance(value, bool):
        return "Give a number or text, not true/false."
    if not _scalar(value):
        return "Give a single value (text or a number)."
    return None


class CleanedValues:
    """An input given as values (a JSON object) cleaned by its rules, as a form cleans what a page posts:
    ``data`` holds the valid fields, ``errors`` the messages by field (``"__all__"``: the whole input).

    A list or an object given for a field that takes one is read as a value (``Rule.from_value``; an empty one
    is a blank field), any other value goes through the field's checks (``context``: what a field needs, e.g.
    its queryset); then the records' teams (``team_fields``) and the ``checks`` across fields.
    """

    def __init__(
        self,
        rules: Mapping[str, Rule],
        data: Mapping[str, Any],
        *,
        context: Mapping[str, Mapping[str, Any]] | None = None,
        team_fields: Iterable[str] = (),
        checks: Checks | None = None,
    ) -> None:
        self.rules = rules
        self.data: dict[str, Any] = {}
        self.errors: dict[str, list[str]] = {}
        context = context or {}
        for name, rule in rules.items():
            # Values never hold a file: an upload comes with the request's files.
            value = None if issubclass(rule.kind, forms.FileField) else data.get(name)
            try:
                if rule.value is not None and isinstance(value, rule.takes) and value:
                    self.data[name] = rule.from_value(value)
                else:  # a single value, or an empty list: a blank field
                    blank = isinstance(value, list | dict) and rule.value is not None
                    self.data[name] = rule.clean("" if blank else value, **context.get(name, {}))
            except ValidationError as exc:
                self.errors[name] = list(exc.messages)
        for name, message in team_problems(self.data, team_fields):
            self.add_error(name, message)
        if checks is not None:
            checks(self.data, self.errors, self.add_error)

    def add_error(self, name: str | None, message: str) -> None:
        """Like a form's add_error: the message under its field (None: the whole input), the field dropped."""
        self.errors.setdefault(name or "__all__", []).append(message)
        if name is not None:
            self.data.pop(name, None)

    def add_service_errors(self, exc: ValidationError, aliases: Mapping[str, str] | None = None) -> None:
        """A service's ValidationError on these fields (see :func:`service_error_targets`)."""
        for name, message in service_error_targets(exc, self.rules, aliases):
            self.add_error(name, message)
