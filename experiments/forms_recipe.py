"""The recipe form: its fields, one row per loss term, and the engine's term catalogue (no torch)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from django import forms
from django.core.exceptions import ValidationError

from experiments.domain import fields as field_rules
from experiments.domain import input_rules
from experiments.forms import TeamScopedForm


# --- recipes --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ParamInfo:
    name: str
    default: str  # as a user would type it
    help: str  # "description (allowed values)"
    type: str = "float"  # float | int | bool | str (a choice) | list (a layer map)
    choices: tuple[str, ...] = ()


@dataclass(frozen=True)
class TermInfo:
    name: str
    title: str
    description: str
    needs_teacher: bool
    params: list[ParamInfo]
    needs: tuple[str, ...] = ()  # what the term reads besides the student's logits, in words


NEED_LABELS = {
    "teacher_logits": "teacher logits",
    "teacher_topk": "teacher top-k (cache) or logits",
    "hidden_states": "hidden states",
    "attentions": "attention maps",
    "attention_scores": "pre-softmax attention scores",
    "values": "value vectors",
    "embeddings": "sentence embeddings",
}


WEIGHT_SCHEDULES = [("", "constant"), ("linear", "linear"), ("cosine", "cosine")]


def loss_term_catalog() -> list[TermInfo]:
    """The loss terms the engine offers (its catalogue, ``workers.engine.terms.LOSS_TERMS``: no torch)."""
    from workers.engine.terms import LOSS_TERMS

    return [
        TermInfo(
            spec.name,
            spec.title,
            spec.description,
            spec.needs_teacher,
            [
                ParamInfo(
                    p.name,
                    p.default_text(),
                    f"{p.description} ({p.range_text()})",
                    p.type.__name__,
                    tuple(p.choices),
                )
                for p in spec.params.values()
            ],
            tuple(NEED_LABELS.get(n, n) for n in sorted(spec.needs)),
        )
        for spec in LOSS_TERMS.values()
    ]


def term_param_names(catalog: list[TermInfo]) -> list[str]:
    names: list[str] = []
    for term in catalog:
        names += [p.name for p in term.params if p.name not in names]
    return names


SCHEME_PARAM_PREFIX = "scheme_"


def _scheme_param_fields() -> dict[str, forms.Field]:
    """One optional number field per scheme parameter name (``scheme_<name>``), shared by the schemes that
    take it; ``data-schemes`` and ``data-defaults`` let the page show only the chosen scheme's parameters."""
    from workers.engine.schemes import SCHEMES

    users: dict[str, list[tuple[str, Any]]] = {}
    for spec in SCHEMES.values():
        for param in spec.params.values():
            users.setdefault(param.name, []).append((spec.name, param))
    made: dict[str, forms.Field] = {}
    for name, schemes in users.items():
        integer = all(p.integer for _, p in schemes)
        attrs = {
            "data-schemes": " ".join(s for s, _ in schemes),
            "data-defaults": " ".join(f"{s}={p.default:g}" for s, p in schemes),
            "step": "1" if integer else "any",
            "placeholder": "default",
        }
        field_class = forms.IntegerField if integer else forms.FloatField
        made[SCHEME_PARAM_PREFIX + name] = field_class(
            label=name,
            required=False,
            widget=forms.NumberInput(attrs=attrs),
            help_text="; ".join(f"{s}: {p.description} ({p.range_text()})" for s, p in schemes),
        )
    return made


class RecipeForm(TeamScopedForm):
    name = input_rules.RECIPE["name"].field(help_text="Saving a name that exists creates its next version.")
    scheme = input_rules.RECIPE["scheme"].field()
    description = input_rules.RECIPE["description"].field(widget=forms.Textarea(attrs={"rows": 2}))

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.scheme_param_names = []
        for name, field in _scheme_param_fields().items():
            self.fields[name] = field
            self.scheme_param_names.append(name)
        self.valid_scheme_params: dict[str, Any] = {}

    def chosen_scheme(self) -> str:
        """The scheme the page shows: the posted one, else the initial one."""
        if self.is_bound:
            return str(self.data.get(self.add_prefix("scheme")) or "")
        return str(self.initial.get("scheme") or self.fields["scheme"].initial or "")

    def scheme_param_fields(self) -> list[dict[str, Any]]:
        """The scheme parameters' bound fields, each with whether the chosen scheme takes it (the others are
        rendered hidden unless they hold a value or an error) and its default there."""
        scheme = self.chosen_scheme()
        rows = []
        for name in self.scheme_param_names:
            bound = self[name]
            defaults = dict(d.split("=", 1) for d in bound.field.widget.attrs["data-defaults"].split())
            if scheme in defaults:
                bound.field.widget.attrs["placeholder"] = defaults[scheme]
            given = bound.value() not in (None, "")
            shown = scheme in defaults or given or bool(bound.errors)
            rows.append({"field": bound, "shown": shown, "schemes": bound.field.widget.attrs["data-schemes"]})
        return rows

    def clean(self) -> dict[str, Any]:
        from workers.engine.errors import ConfigError
        from workers.engine.schemes import SCHEMES, validate_scheme_params

        cleaned = super().clean()
        scheme = cleaned.get("scheme")
        spec = SCHEMES.get(scheme or "")
        self.valid_scheme_params = {}
        for field in self.scheme_param_names:
            value = cleaned.get(field)
            if value is None or spec is None:
                continue
            param = field.removeprefix(SCHEME_PARAM_PREFIX)
            if param not in spec.params:
                self.add_error(field, f"Scheme {scheme} has no parameter {param}; clear it.")
                continue
            try:
                self.valid_scheme_params[param] = validate_scheme_params(scheme, {param: value})[param]
            except ConfigError as exc:
                self.add_error(field, str(exc))
        return cleaned

    def scheme_params(self) -> dict[str, Any]:
        """The scheme parameters the user set (the service fills in the defaults)."""
        return dict(self.valid_scheme_params)


def _param_field(name: str, infos: list[tuple[str, ParamInfo]]) -> forms.Field:
    """One form field for a parameter name shared by the terms in ``infos`` ((term, info) pairs)."""
    info = infos[0][1]
    terms = " ".join(term for term, _ in infos)
    attrs = {
        "data-terms": terms,
        # Each term's default, so the page can show the row's term's default as the placeholder.
        "data-defaults": " ".join(f"{term}={i.default}" for term, i in infos),
        "title": "; ".join(f"{term}: {i.help}, default {i.default}" for term, i in infos),
    }
    if info.type == "bool":
        # A checkbox cannot be "blank", so it starts at the default and is only read for the terms that have
        # it.
        return forms.BooleanField(
            required=False, initial=info.default == "true", widget=forms.CheckboxInput(attrs=attrs)
        )
    if info.type == "str":
        choices = [("", "default")] + [(c, c) for c in info.choices]
        return forms.ChoiceField(required=False, choices=choices, widget=forms.Select(attrs=attrs))
    if info.type == "list":
        return forms.CharField(
            required=False,
            max_length=200,
            widget=forms.TextInput(
                attrs={**attrs, "placeholder": f"{' / '.join(info.choices)} / 2,4,6", "size": 10}
            ),
        )
    if info.type == "int":
        return forms.IntegerField(
            required=False, widget=forms.NumberInput(attrs={**attrs, "step": "1", "placeholder": "default"})
        )
    return forms.FloatField(
        required=False, widget=forms.NumberInput(attrs={**attrs, "step": "any", "placeholder": "default"})
    )


class TermForm(forms.Form):
    """One weighted loss term. Blank parameters take the term's defaults; a row without a term is skipped.

    Every term's parameters are validated here against the engine's schema, so each error shows on its field.
    """

    def __init__(self, *args: Any, catalog: list[TermInfo], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.catalog = {t.name: t for t in catalog}
        self.fields["name"] = forms.ChoiceField(
            label="Term", required=False, choices=[("", "—")] + [(t.name, t.name) for t in catalog]
        )
        self.fields["weight"] = forms.FloatField(
            min_value=0, max_value=1e6, required=False, widget=forms.NumberInput(attrs={"step": "any"})
        )
        # A schedule moves the weight from the row's weight at the start of training to ``weight_end``.
        self.fields["weight_schedule"] = forms.ChoiceField(
            label="Weight schedule", required=False, choices=WEIGHT_SCHEDULES
        )
        self.fields["weight_end"] = forms.FloatField(
            label="End weight",
            min_value=0,
            max_value=1e6,
            required=False,
            widget=forms.NumberInput(attrs={"step": "any", "placeholder": "end"}),
        )
        self.param_names = term_param_names(catalog)
        for param in self.param_names:
            users = [(t.name, p) for t in catalog for p in t.params if p.name == param]
            self.fields[param] = _param_field(param, users)
        self.bool_params = {n for n in self.param_names if isinstance(self.fields[n], forms.BooleanField)}
        self.valid_params: dict[str, Any] | None = None

    def chosen_term(self) -> str:
        """The row's term as the page shows it: the posted one, else the initial one ("" for an empty row)."""
        if self.is_bound:
            return str(self.data.get(self.add_prefix("name")) or "")
        return str(self.initial.get("name") or "")

    def param_fields(self) -> list[dict[str, Any]]:
        """The row's parameter fields, each with the terms that take it and whether the page shows it: a row
        with a term shows that term's parameters (with its defaults as placeholders) and any other that holds
        a value or an error; an empty row shows them all (without JavaScript, the page's fallback)."""
        term = self.chosen_term()
        own = {p.name: p for p in self.catalog[term].params} if term in self.catalog else None
        rows = []
        for name in self.param_names:
            bound = self[name]
            widget = bound.field.widget
            if own is not None and name in own and not isinstance(bound.field, forms.BooleanField):
                if isinstance(bound.field, forms.ChoiceField):
                    bound.field.choices = [("", f"default ({own[name].default})"), *bound.field.choices[1:]]
                else:
                    widget.attrs["placeholder"] = own[name].default
            given = name not in self.bool_params and bound.value() not in (None, "")
            shown = own is None or name in own or given or bool(bound.errors)
            rows.append({"name": name, "field": bound, "shown": shown, "terms": widget.attrs["data-terms"]})
        return rows

    def _given(self, cleaned: dict[str, Any], name: str) -> bool:
        return name not in self.bool_params and cleaned.get(name) not in (None, "")

    def clean(self) -> dict[str, Any]:
        cleaned = super().clean()
        name = cleaned.get("name")
        given = [
            f
            for f in ["weight", "weight_schedule", "weight_end", *self.param_names]
            if self._given(cleaned, f)
        ]
        if not name:
            if given:
                self.add_error("name", "Choose a loss term for this row, or clear it.")
            return cleaned
        if self.errors:
            return cleaned
        self._check_params(name, cleaned)
        self._check_schedule(name, cleaned)
        return cleaned

    def _params(self, name: str, cleaned: dict[str, Any]) -> dict[str, Any]:
        own = {p.name for p in self.catalog[name].params}
        params = {}
        for field in self.param_names:
            if field in own and (field in self.bool_params or self._given(cleaned, field)):
                params[field] = cleaned[field]
        return params

    def _check_params(self, name: str, cleaned: dict[str, Any]) -> None:
        from workers.engine.errors import ConfigError
        from workers.engine.terms import validate_term_params

        own = {p.name for p in self.catalog[name].params}
        for field in self.param_names:
            if field not in own and self._given(cleaned, field):
                self.add_error(field, f"{name} has no parameter {field}; clear it.")
        given = self._params(name, cleaned)
        try:
            valid = validate_term_params(name, given)
        except ConfigError as exc:
            field = getattr(exc, "param", None)
            self.add_error(field if field in self.fields else None, str(exc))
        else:
            # Keep what the user set, in the engine's normal form (e.g. "2, 4" → [2, 4]); defaults stay
            # implicit.
            self.valid_params = {k: valid[k] for k in given}

    def _schedule(self, cleaned: dict[str, Any]) -> dict[str, Any]:
        kind = cleaned.get("weight_schedule")
        if not kind:
            return {}
        start = 1.0 if cleaned.get("weight") is None else cleaned["weight"]
        return {"weight": {"kind": kind, "start": start, "end": cleaned.get("weight_end")}}

    def _check_schedule(self, name: str, cleaned: dict[str, Any]) -> None:
        from workers.engine.errors import ConfigError
        from workers.engine.schedules import validate_schedule

        kind = cleaned.get("weight_schedule")
        if not kind:
            if cleaned.get("weight_end") is not None:
                self.add_error("weight_schedule", "Choose linear or cosine to use an end weight.")
            return
        if cleaned.get("weight_end") is None:
            self.add_error("weight_end", f"A {kind} schedule needs the weight at the end of training.")
            return
        try:
            validate_schedule(name, self._schedule(cleaned), {})
        except ConfigError as exc:
            self.add_error("weight_end", str(exc))

    def term(self) -> dict[str, Any] | None:
        data = self.cleaned_data
        if not data.get("name"):
            return None
        term = {
            "name": data["name"],
            "weight": 1.0 if data.get("weight") is None else data["weight"],
            "params": self.valid_params
            if self.valid_params is not None
            else self._params(data["name"], data),
        }
        schedule = self._schedule(data)
        if schedule:
            term["schedule"] = schedule
        return term


class BaseTermFormSet(forms.BaseFormSet):
    def clean(self) -> None:
        if any(self.errors):
            return
        if not self.terms():
            raise ValidationError("Add at least one loss term.")

    def terms(self) -> list[dict[str, Any]]:
        return [t for t in (f.term() for f in self.forms if f.cleaned_data) if t is not None]


TermFormSet = forms.formset_factory(
    TermForm, formset=BaseTermFormSet, extra=4, max_num=field_rules.MAX_TERMS, validate_max=True
)


def _initial_value(value: Any) -> Any:
    """A stored parameter value as its field shows it (a layer map list as "2, 4")."""
    if isinstance(value, list):
        return ", ".join(str(v) for v in value)
    return value


def parameter_schedules(recipe: Any) -> list[str]:
    """The scheduled parameters of ``recipe`` (``kd.temperature``): the form edits weight schedules only."""
    return [
        f"{term.get('name')}.{target}"
        for term in recipe.terms
        for target in (term.get("schedule") or {})
        if target != "weight"
    ]


def recipe_form_initial(recipe: Any) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The recipe form and its term rows pre-filled from a saved version (its next version starts there)."""
    from workers.engine.terms import LOSS_TERMS

    form = {
        "team": recipe.team_id,
        "name": recipe.name,
        "scheme": recipe.scheme,
        "description": recipe.description,
        **{SCHEME_PARAM_PREFIX + k: v for k, v in (recipe.scheme_params or {}).items()},
    }
    rows = []
    for term in recipe.terms:
        row = {"name": term.get("name"), "weight": term.get("weight", 1.0)}
        schedule = (term.get("schedule") or {}).get("weight")
        if schedule:
            row.update(weight=schedule.get("start"), weight_schedule=schedule.get("kind"),
                       weight_end=schedule.get("end"))
        # A saved version keeps every parameter; the ones at their default stay blank (the placeholder).
        spec = LOSS_TERMS.get(term.get("name"))
        defaults = {n: p.default for n, p in spec.params.items()} if spec is not None else {}
        row.update(
            {
                k: _initial_value(v)
                for k, v in (term.get("params") or {}).items()
                if k not in defaults or v != defaults[k] or isinstance(v, bool)
            }
        )
        rows.append(row)
    return form, rows


class RecipeImportForm(TeamScopedForm):
    """A recipe as an uploaded YAML document (the API's format); with ``recipe``, its next version."""

    file = forms.FileField(label="YAML file", help_text="A recipe as exported (.yaml).")

    def __init__(self, *args: Any, recipe: Any = None, max_bytes: int | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.recipe = recipe
        self.max_bytes = max_bytes
        self.fields["file"].widget.attrs["accept"] = ".yaml,.yml,application/yaml,text/yaml"
        if recipe is not None:
            self.fields["team"].widget = forms.HiddenInput()
            self.fields["team"].required = False
            self.fields["recipe"] = forms.IntegerField(widget=forms.HiddenInput(), initial=recipe.pk)

    def clean(self) -> dict[str, Any]:
        cleaned = super().clean()
        if self.recipe is not None:
            cleaned["team"] = self.recipe.team
        upload = cleaned.get("file")
        if upload is None:
            return cleaned
        if self.max_bytes is not None and upload.size > self.max_bytes:
            self.add_error("file", f"A YAML recipe may be at most {self.max_bytes // 1024} KiB.")
            return cleaned
        try:
            cleaned["text"] = upload.read().decode("utf-8")
        except UnicodeDecodeError:
            self.add_error("file", "The file is not UTF-8 text: export a recipe as YAML and upload that.")
        return cleaned
