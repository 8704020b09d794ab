"""Recipes and experiments as YAML documents, and back.

An export is self-contained: it names the records it uses (dataset, models, recipes with their version)
instead of giving database ids, so it can be imported into another team or server that has records of those
names. Imports go through the same forms and services as the API's JSON bodies (api.inputs), so they follow
the same rules. Documents are parsed with ``yaml.safe_load`` only (no Python tags), after a pass over the
parser's events that refuses anchors and aliases (exponential "billion laughs" expansion) and deep nesting.
"""

from __future__ import annotations

from typing import Any

import yaml
from django.db.models import Q
from rest_framework.exceptions import ValidationError

from experiments.domain import inputs as inputs_rules
from experiments.domain.engine_config import TRAIN_DEFAULTS
from experiments.domain.validation import TRAIN_CHOICES, TRAIN_FIELDS
from experiments.models import DatasetSpec, Experiment, ModelSpec, Recipe, Team
from experiments.selectors import teams as teams_reads

from . import inputs
from .parsers import YAML_MAX_BYTES

FORMAT = "distillweb/v1"
MAX_DEPTH = 20
RECIPE_KEYS = ("format", "kind", "team", "name", "scheme", "description", "terms", "scheme_params")
EXPERIMENT_KEYS = (
    "format",
    "kind",
    "team",
    "name",
    "description",
    "dataset",
    "teacher",
    "students",
    "recipes",
    "assistant",
    "extra_teachers",
    "teacher_weights",
    "seeds",
    "train",
    "term_sweeps",
)
TRAIN_KEYS = frozenset(TRAIN_FIELDS) | frozenset(TRAIN_CHOICES)


# --- documents ------------------------------------------------------------------------------------
def _problem(exc: yaml.YAMLError) -> str:
    if isinstance(exc, yaml.MarkedYAMLError) and exc.problem_mark is not None:
        where = f" (line {exc.problem_mark.line + 1}, column {exc.problem_mark.column + 1})"
        return f"{exc.context + ': ' if exc.context else ''}{exc.problem}{where}"
    return str(exc)


def _check_events(text: str) -> None:
    """Refuse aliases and deep nesting before anything is built (the parser's events only)."""
    depth = 0
    for event in yaml.parse(text, Loader=yaml.SafeLoader):
        if isinstance(event, yaml.AliasEvent):
            raise ValidationError(
                {"yaml": ["Anchors and aliases (&name, *name) are not accepted: write the values out."]}
            )
        if isinstance(event, yaml.CollectionStartEvent):
            depth += 1
            if depth > MAX_DEPTH:
                raise ValidationError({"yaml": [f"The document nests deeper than {MAX_DEPTH} levels."]})
        elif isinstance(event, yaml.CollectionEndEvent):
            depth -= 1


def load(text: str, *, kind: str, keys: tuple[str, ...]) -> dict[str, Any]:
    """Parse one YAML document of ``kind`` ("recipe", "experiment") with only ``keys``.

    Raises ValidationError (a 400) for invalid YAML, Python tags, aliases, other kinds and unknown keys.
    """
    if len(text.encode("utf-8", "surrogatepass")) > YAML_MAX_BYTES:
        raise ValidationError({"yaml": [f"A YAML document may be at most {YAML_MAX_BYTES} bytes."]})
    try:
        _check_events(text)
        spec = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ValidationError({"yaml": [f"Not valid YAML: {_problem(exc)}"]}) from None
    if not isinstance(spec, dict):
        raise ValidationError({"yaml": [f"Give a {kind} as a mapping (key: value lines)."]})
    errors: dict[str, list[str]] = {}
    for key in spec:
        if key not in keys:
            errors[str(key)] = [f"Unknown key; a {kind} has: {', '.join(keys)}."]
    if spec.get("kind", kind) != kind:
        errors["kind"] = [f"This document is a {spec['kind']!r}, not a {kind}."]
    if spec.get("format", FORMAT) != FORMAT:
        errors["format"] = [f"Unknown format {spec['format']!r}; this server reads {FORMAT}."]
    if errors:
        raise ValidationError(errors)
    # YAML has values JSON lacks (dates, binary, sets, .nan) and "\0" escapes: refused like a JSON body's.
    if errors := inputs_rules.data_errors(spec):
        raise ValidationError(errors)
    return spec


def dump(spec: dict[str, Any], *, header: str) -> str:
    body = yaml.safe_dump(spec, sort_keys=False, allow_unicode=True, default_flow_style=False, width=100)
    return f"# {header}\n{body}"


def import_team(*, user, team_id: int | None, spec: dict[str, Any]) -> Team:
    """The team an import goes to: ``team_id`` (the request's), else the document's ``team`` (a name or slug),
    else the user's only team."""
    teams = teams_reads.team_list(user=user)
    if team_id is not None:
        team = teams.filter(pk=team_id).first()
        if team is None:
            raise ValidationError({"team": ["Not one of your teams."]})
        return team
    named = spec.get("team")
    if named is not None:
        if not isinstance(named, str):
            raise ValidationError({"team": ["Give the team's name or slug."]})
        team = teams.filter(Q(name=named) | Q(slug=named)).first()
        if team is None:
            raise ValidationError({"team": [f"You are in no team named {named!r}."]})
        return team
    candidates = list(teams.order_by("pk")[:2])
    if len(candidates) != 1:
        message = (
            "You are in no team."
            if not candidates
            else "You are in several teams: choose one (?team=ID, or `team:` in the YAML)."
        )
        raise ValidationError({"team": [message]})
    return candidates[0]


# --- recipes --------------------------------------------------------------------------------------
def recipe_spec(recipe: Recipe) -> dict[str, Any]:
    spec: dict[str, Any] = {"format": FORMAT, "kind": "recipe", "name": recipe.name, "scheme": recipe.scheme}
    if recipe.description:
        spec["description"] = recipe.description
    spec["terms"] = recipe.terms
    if recipe.scheme_params:
        spec["scheme_params"] = recipe.scheme_params
    return spec


def recipe_export(recipe: Recipe) -> str:
    return dump(
        recipe_spec(recipe),
        header="A distillweb recipe: `distillweb import-recipe FILE` or "
        "POST /api/recipes/import (a name that exists gets its next version).",
    )


def recipe_import(text: str, *, user, team_id: int | None = None, name: str | None = None) -> Recipe:
    """Save the recipe in a YAML document (validated like POST /api/recipes/). ``name`` replaces the
    document's, so the document becomes the next version of that recipe."""
    spec = load(text, kind="recipe", keys=RECIPE_KEYS)
    team = import_team(user=user, team_id=team_id, spec=spec)
    payload = {k: v for k, v in spec.items() if k not in ("format", "kind", "team")}
    if name is not None:
        payload["name"] = name
    return inputs.recipe_create(user=user, payload={**payload, "team": team.pk})


# --- experiments ----------------------------------------------------------------------------------
def experiment_spec(experiment: Experiment) -> dict[str, Any]:
    spec: dict[str, Any] = {"format": FORMAT, "kind": "experiment", "name": experiment.name}
    if experiment.description:
        spec["description"] = experiment.description
    spec["dataset"] = experiment.dataset.name
    if experiment.teacher is not None:
        spec["teacher"] = experiment.teacher.name
    spec["students"] = sorted(s.name for s in experiment.students.all())
    spec["recipes"] = [
        {"name": r.name, "version": r.version} for r in experiment.recipes.order_by("name", "version")
    ]
    if experiment.assistant is not None:
        spec["assistant"] = experiment.assistant.name
    extra = sorted(m.name for m in experiment.extra_teachers.all())
    if extra:
        spec["extra_teachers"] = extra
    if experiment.teacher_weights:
        spec["teacher_weights"] = list(experiment.teacher_weights)
    spec["seeds"] = list(experiment.seeds)
    train = {**TRAIN_DEFAULTS, **experiment.train}
    term_sweeps = train.pop("term_sweeps", None)  # kept with the training settings; its own key here
    spec["train"] = train
    if term_sweeps:
        spec["term_sweeps"] = term_sweeps
    return spec


def experiment_export(experiment: Experiment) -> str:
    return dump(
        experiment_spec(experiment),
        header="A distillweb experiment: `distillweb submit FILE` or "
        "POST /api/experiments/import launches it.",
    )


class _Resolver:
    """Names in a document → ids of the team's records, collecting an error per field."""

    def __init__(self, team: Team) -> None:
        self.team = team
        self.errors: dict[str, list[str]] = {}

    def error(self, field: str, message: str) -> None:
        self.errors.setdefault(field, []).append(message)

    def names(self, field: str, value: Any, *, many: bool) -> list[str]:
        if value is None:
            return []
        values = value if many and isinstance(value, list) else [value]
        if many and not isinstance(value, list):
            self.error(field, "Give a list of names.")
            return []
        if not all(isinstance(v, str) and v for v in values):
            self.error(field, "Give records by name (text).")
            return []
        return values

    def models(self, spec: dict[str, Any]) -> dict[str, Any]:
        fields = {"teacher": False, "assistant": False, "students": True, "extra_teachers": True}
        wanted = {f: self.names(f, spec.get(f), many=many) for f, many in fields.items()}
        found = dict(
            ModelSpec.objects.filter(
                team=self.team, name__in={n for ns in wanted.values() for n in ns}
            ).values_list("name", "pk")
        )
        resolved: dict[str, Any] = {}
        for field, names in wanted.items():
            missing = [n for n in names if n not in found]
            if missing:
                self.error(field, f"No model named {', '.join(map(repr, missing))} in team {self.team}.")
            ids = [found[n] for n in names if n in found]
            resolved[field] = ids if fields[field] else (ids[0] if ids else None)
        return resolved

    def dataset(self, value: Any) -> int | None:
        names = self.names("dataset", value, many=False)
        if not names:
            if value is None:
                self.error("dataset", "Name the dataset.")
            return None
        pk = DatasetSpec.objects.filter(team=self.team, name=names[0]).values_list("pk", flat=True).first()
        if pk is None:
            self.error("dataset", f"No dataset named {names[0]!r} in team {self.team}.")
        return pk

    def recipes(self, value: Any) -> list[int]:
        if not isinstance(value, list):
            self.error("recipes", "Give a list of recipes: names, or {name: NAME, version: N}.")
            return []
        refs: list[tuple[str, int | None]] = []
        for ref in value:
            if isinstance(ref, str) and ref:
                refs.append((ref, None))
            elif (
                isinstance(ref, dict)
                and isinstance(ref.get("name"), str)
                and set(ref) <= {"name", "version"}
                and (
                    ref.get("version") is None
                    or (isinstance(ref["version"], int) and not isinstance(ref["version"], bool))
                )
            ):
                refs.append((ref["name"], ref.get("version")))
            else:
                self.error(
                    "recipes", f"Not a recipe reference: {ref!r} (a name, or {{name: NAME, version: N}})."
                )
                return []
        versions: dict[tuple[str, int], int] = {}
        latest: dict[str, int] = {}
        for pk, name, version in (
            Recipe.objects.filter(team=self.team, name__in={n for n, _ in refs})
            .order_by("name", "version")
            .values_list("pk", "name", "version")
        ):
            versions[(name, version)] = pk
            latest[name] = pk
        ids = []
        for name, version in refs:
            pk = latest.get(name) if version is None else versions.get((name, version))
            if pk is None:
                label = repr(name) if version is None else f"{name!r} version {version}"
                self.error("recipes", f"No recipe {label} in team {self.team}.")
            else:
                ids.append(pk)
        return ids


def experiment_import(text: str, *, user, team_id: int | None = None, check: bool = False) -> Any:
    """Launch the experiment in a YAML document (validated like POST /api/experiments/): its runs are created
    and enqueued. With ``check``, create nothing and return what launching would do
    (``inputs.experiment_check``).
    """
    spec = load(text, kind="experiment", keys=EXPERIMENT_KEYS)
    team = import_team(user=user, team_id=team_id, spec=spec)
    resolver = _Resolver(team)
    payload: dict[str, Any] = {
        "team": team.pk,
        **resolver.models(spec),
        "dataset": resolver.dataset(spec.get("dataset")),
        "recipes": resolver.recipes(spec.get("recipes")),
    }
    for key in ("name", "description", "seeds", "teacher_weights", "term_sweeps"):
        if key in spec:
            payload[key] = spec[key]
    train = spec.get("train") or {}
    if not isinstance(train, dict):
        resolver.error("train", "Give training settings as a mapping, e.g. {max_steps: 500, lr: 0.001}.")
    else:
        if (
            "term_sweeps" in train
        ):  # where Experiment.train keeps them (the API shows it so): take them from there
            train = dict(train)
            nested = train.pop("term_sweeps")
            if "term_sweeps" in spec and spec["term_sweeps"] != nested:
                resolver.error(
                    "term_sweeps", "Give term sweeps once: at the top level or under train, not both."
                )
            payload.setdefault("term_sweeps", nested)
        unknown = sorted(str(k) for k in train if k not in TRAIN_KEYS)
        if unknown:
            resolver.error(
                "train",
                f"Unknown training setting {', '.join(unknown)}; known: {', '.join(sorted(TRAIN_KEYS))}.",
            )
        payload.update({k: v for k, v in train.items() if k in TRAIN_KEYS})
    if resolver.errors:
        raise ValidationError(resolver.errors)
    if check:
        return inputs.experiment_check(user=user, payload=payload)
    return inputs.experiment_create(user=user, payload=payload)
