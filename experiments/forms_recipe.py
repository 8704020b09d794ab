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


class RecipeForm(TeamScopedForm):
    name = input_rules.RECIPE["name"].field(help_text="Saving a name that exists creates its next version.")
    scheme = input_rules.RECIPE["scheme"].field()
    description = input_rules.RECIPE["description"].field(widget=forms.Textarea(attrs={"rows": 2}))


def _param_field(name: str, infos: list[tuple[str, ParamInfo]]) -> forms.Field:
    """One form field for a parameter name shared by the terms in ``infos`` ((term, info) pairs)."""
    info = infos[0][1]
    terms = " ".join(term for term, _ in infos)
    attrs = {
        "data-terms": terms,
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
