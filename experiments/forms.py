"""Forms only validate and shape input; services create records.

Services raise ``ValidationError`` with field keys; :func:`add_service_errors` puts them on the form so a
page shows every problem next to the field it belongs to.
"""

from __future__ import annotations

from typing import Any

from django import forms
from django.conf import settings
from django.core.exceptions import ValidationError
from django.forms.utils import ErrorDict

from experiments.domain import fields as field_rules
from experiments.domain import input_rules, model_size, specs, sweep_plan, sweeps, uploads
from experiments.domain.engine_config import TRAIN_DEFAULTS
from experiments.domain.validation import (
    LORA_FIELDS,
    MAX_SEEDS,
    RESOURCE_FIELDS,
    TRAIN_CHOICES,
    TRAIN_FIELDS,
)
from experiments.models import Experiment, ModelSpec, Recipe, Run
from experiments.selectors import records as records_reads
from experiments.selectors import teams as teams_reads


def add_service_errors(
    form: forms.BaseForm, exc: ValidationError, aliases: dict[str, str] | None = None
) -> None:
    """Attach a service's ValidationError to ``form``: known keys become field errors, the rest non-field
    ones."""
    for field, message in field_rules.service_error_targets(exc, form.fields, aliases):
        form.add_error(field, message)


class TeamOptionSelect(forms.Select):
    """A select whose options carry ``data-team`` (and optional extra data) so the page can filter them by
    team."""

    def __init__(self, *args: Any, option_data=None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.option_data = option_data

    def create_option(self, name, value, label, selected, index, subindex=None, attrs=None):
        option = super().create_option(name, value, label, selected, index, subindex, attrs)
        instance = getattr(value, "instance", None)
        if instance is not None:
            option["attrs"]["data-team"] = instance.team_id
            for key, val in (self.option_data(instance) if self.option_data else {}).items():
                option["attrs"][f"data-{key}"] = val
        return option


class TeamOptionSelectMultiple(TeamOptionSelect, forms.SelectMultiple):
    pass


class TeamScopedForm(forms.Form):
    """A form whose first field is one of the user's teams; records it refers to must belong to that team."""

    team = input_rules.TEAM.field()
    team_fields: tuple[str, ...] = ()

    def __init__(self, *args: Any, user, default_team=None, **kwargs: Any) -> None:
        """``default_team``: the team chosen in the header's switcher, preselected (a bound form keeps its
        data)."""
        super().__init__(*args, **kwargs)
        self.user = user
        teams = teams_reads.team_list(user=user)
        self.fields["team"].queryset = teams
        team_count = teams.count()
        self.has_team = team_count > 0
        self.multiple_teams = team_count > 1
        if not self.multiple_teams:
            self.fields["team"].widget = forms.HiddenInput()
            first = field_rules.default_team(teams)
            if first is not None:
                self.fields["team"].initial = first
        elif default_team is not None and "team" not in self.initial:
            self.fields["team"].initial = default_team.pk
        # Keyboard-first: the cursor starts in the record's name.
        if "name" in self.fields:
            self.fields["name"].widget.attrs.setdefault("autofocus", True)

    def label_with_team(self, obj) -> str:
        return f"{obj} · {obj.team}" if self.multiple_teams else str(obj)

    def clean(self) -> dict[str, Any]:
        cleaned = super().clean()
        for name, message in field_rules.team_problems(cleaned, self.team_fields):
            self.add_error(name, message)
        return cleaned


# --- models ---------------------------------------------------------------------------------------
MODEL = input_rules.MODEL_SPEC


class ModelSpecForm(TeamScopedForm):
    name = MODEL["name"].field()
    source = MODEL["source"].field(widget=forms.RadioSelect)
    task = MODEL["task"].field()
    num_labels = MODEL["num_labels"].field(help_text="Classes the model predicts (classification only).")
    builtin_arch = MODEL["builtin_arch"].field(label="Architecture")
    hidden_sizes = MODEL["hidden_sizes"].field(
        help_text='Hidden layer widths, comma-separated, e.g. "256,256".'
    )
    config = MODEL["config"].field(
        label="Transformers config (JSON)",
        widget=forms.Textarea(
            attrs={
                "rows": 8,
                "class": "mono",
                "spellcheck": "false",
                "placeholder": '{"model_type": "bert", "hidden_size": 128, '
                '"num_hidden_layers": 2, "num_attention_heads": 2}',
            }
        ),
        help_text='A transformers config dict with a "model_type"; the model starts from random weights.',
    )
    hub_id = MODEL["hub_id"].field(label="Hub id", help_text="e.g. google-bert/bert-base-uncased")
    local_path = MODEL["local_path"].field(
        label="Local folder", help_text="A model folder under one of the server's model roots."
    )
    revision = MODEL["revision"].field(help_text="Branch, tag or commit (optional).")
    tokenizer_id = MODEL["tokenizer_id"].field(
        label="Tokenizer id", help_text="Optional; defaults to the model's own tokenizer."
    )
    server = MODEL["server"].field(
        label="Teacher server", help_text="One of the inference servers this site is configured with."
    )
    served_model = MODEL["served_model"].field(
        label="Served model", help_text="The name the server serves it under (its /v1/models id)."
    )
    notes = MODEL["notes"].field(widget=forms.Textarea(attrs={"rows": 2}))

    def clean_hidden_sizes(self) -> list[int]:
        return MODEL["hidden_sizes"].from_text(self.cleaned_data["hidden_sizes"])

    def clean_config(self) -> dict[str, Any]:
        return MODEL["config"].from_text(self.cleaned_data["config"])

    def clean(self) -> dict[str, Any]:
        cleaned = super().clean()
        input_rules.model_spec_checks(cleaned, self.errors, self.add_error)
        return cleaned

    def service_fields(self) -> dict[str, Any]:
        """Keyword arguments for ``services.model_spec_create`` (besides team and created_by)."""
        return input_rules.model_spec_service_fields(self.cleaned_data)

    def error_aliases(self) -> dict[str, str]:
        """Service error keys → this form's fields (a builtin net's config is its hidden sizes)."""
        return input_rules.model_spec_error_aliases(self.cleaned_data)


LAYER_PRESETS = field_rules.LAYER_PRESETS
DERIVE = input_rules.MODEL_DERIVE


class ModelDeriveForm(forms.Form):
    """A student derived from the model on the page (DistilBERT recipe): kept layers and optional widths."""

    name = DERIVE["name"].field(help_text="The student's name in the parent's team.")
    layers = DERIVE["layers"].field(
        help_text='"every_other" (layers 0, 2, 4, …), "every_third", "all", or layer ids such as '
        '"0,2,4,7,9,11".',
    )
    hidden_size = DERIVE["hidden_size"].field(
        widget=forms.NumberInput(attrs={"placeholder": "parent's"}),
        help_text="Narrower width (optional); the leading features are copied.",
    )
    intermediate_size = DERIVE["intermediate_size"].field(
        widget=forms.NumberInput(attrs={"placeholder": "parent's"}),
        help_text="Feed-forward width (optional).",
    )
    num_attention_heads = DERIVE["num_attention_heads"].field(
        widget=forms.NumberInput(attrs={"placeholder": "auto"}),
        help_text="Default keeps the parent's head size.",
    )

    def clean_layers(self) -> str | list[int]:
        return DERIVE["layers"].from_text(self.cleaned_data["layers"])

    def service_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``services.model_derive`` (besides parent and created_by)."""
        return input_rules.model_derive_kwargs(self.cleaned_data)


# --- datasets -------------------------------------------------------------------------------------
DATASET = input_rules.DATASET_SPEC


class DatasetSpecForm(TeamScopedForm):
    name = DATASET["name"].field()
    source = DATASET["source"].field(widget=forms.RadioSelect)
    task = DATASET["task"].field(
        help_text="What is learned from it: labels, next tokens, or sentence embeddings."
    )
    builtin_name = DATASET["builtin_name"].field(label="Packaged dataset")
    hub_name = DATASET["hub_name"].field(label="Hub dataset", help_text="e.g. SetFit/bbc-news")
    local_path = DATASET["local_path"].field(
        label="Local file", help_text="A CSV or JSONL file under one of the server's dataset roots."
    )
    upload = DATASET["upload"].field(
        label="File", widget=forms.FileInput(attrs={"accept": ",".join(uploads.UPLOAD_SUFFIXES)})
    )
    eval_local_path = DATASET["eval_local_path"].field(
        label="Separate eval file",
        help_text="Optional: a held-out file with the same columns, under a dataset root. The whole local "
        "file then trains.",
    )
    pack = DATASET["pack"].field(
        label="Pack texts into blocks",
        help_text="Causal LM: concatenate the texts and cut them into max-length blocks.",
    )
    text_column = DATASET["text_column"].field()
    label_column = DATASET["label_column"].field()
    num_labels = DATASET["num_labels"].field(
        help_text="Number of classes (filled in for packaged datasets and uploaded files)."
    )
    label_names = DATASET["label_names"].field(help_text="Optional, comma-separated, in label-id order.")
    eval_fraction = DATASET["eval_fraction"].field(
        help_text="Share of rows held out for evaluation (stratified)."
    )
    split_seed = DATASET["split_seed"].field(help_text="Seed of the train / eval split.")
    max_length = DATASET["max_length"].field(help_text="Token limit for text inputs.")
    notes = DATASET["notes"].field(widget=forms.Textarea(attrs={"rows": 2}))

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # The limit may change at run time (settings in tests), so the help text is read per form.
        self.fields["upload"].help_text = (
            "CSV, JSONL, JSON, Parquet or text (causal LM / embedding), up to "
            f"{uploads.size_text(settings.DATASET_UPLOAD_MAX_BYTES)}."
        )

    def clean_label_names(self) -> list[str]:
        return DATASET["label_names"].from_text(self.cleaned_data["label_names"])

    def clean_upload(self):
        upload = self.cleaned_data.get("upload")
        if upload:
            suffix = uploads.upload_suffix(upload.name)
            if suffix is None:
                raise ValidationError(f"Upload a {', '.join(uploads.UPLOAD_SUFFIXES)} file.")
            if upload.size > settings.DATASET_UPLOAD_MAX_BYTES:
                raise ValidationError(uploads.too_large_message(settings.DATASET_UPLOAD_MAX_BYTES))
        return upload

    def refuse_upload(self, message: str) -> None:
        """Show only ``message`` on the file field (an oversized upload: the other fields are not checked)."""
        self._errors = ErrorDict()
        self._errors["upload"] = self.error_class([message])

    def clean(self) -> dict[str, Any]:
        cleaned = super().clean()
        input_rules.dataset_spec_checks(cleaned, self.errors, self.add_error)
        return cleaned

    def service_fields(self) -> dict[str, Any]:
        """Keyword arguments for ``services.dataset_spec_create``; empty values are left to the service."""
        return input_rules.dataset_spec_service_fields(self.cleaned_data)


# --- experiments ----------------------------------------------------------------------------------
def parse_seeds(raw: str) -> list[int]:
    """ "0, 1, 2" → [0, 1, 2]; also accepts a range "0-4"."""
    return field_rules.parse_seeds(raw.replace(" ", "").split(","))


TRAIN_LABELS = {
    "lr": "Learning rate",
    "eval_every": "Evaluate every",
    "save_every": "Checkpoint every",
    "log_every": "Log every",
    "grad_clip": "Gradient clipping",
    "gpus": "GPUs",
    "processes": "CPU processes",
    "lora_r": "LoRA rank",
    "lora_alpha": "LoRA alpha",
    "lora_dropout": "LoRA dropout",
}


def _bound(value: float, kind: type) -> str:
    return f"{int(value):,}" if kind is int else sweeps.format_number(value)


EXPERIMENT = input_rules.EXPERIMENT


class SweepField(forms.CharField):
    """A numeric setting that takes one value or a sweep (``sweeps.SYNTAX_HELP``); cleans to a list of values
    (empty when left blank)."""

    def __init__(self, *, setting: str, **kwargs: Any) -> None:
        self.setting = setting
        self.kind, self.min_value, self.max_value, _ = TRAIN_FIELDS[setting]
        super().__init__(**kwargs)

    def prepare_value(self, value: Any) -> Any:
        return sweep_plan.format_values(value) if isinstance(value, list | tuple) else value

    def clean(self, value: Any) -> list[int | float]:
        # A string, stripped and length-checked, then read as the setting's values.
        return EXPERIMENT[self.setting].from_text(super().clean(value))


class ChoiceSweepField(forms.MultipleChoiceField):
    """A resource choice (strategy, precision): tick one, or several to sweep them; cleans to one name, a list
    of names, or None when nothing is ticked (the default)."""

    def __init__(self, *, setting: str, **kwargs: Any) -> None:
        self.setting = setting
        super().__init__(**kwargs)

    def clean(self, value: Any) -> Any:
        return EXPERIMENT[self.setting].from_text(super().clean(value))


class OnOffSweepField(forms.CharField):
    """A yes/no resource (activation checkpointing): off, on, or both (a sweep); cleans to False, True,
    ``[False, True]``, or None when blank."""

    def __init__(self, *, setting: str, **kwargs: Any) -> None:
        self.setting = setting
        super().__init__(**kwargs)

    def prepare_value(self, value: Any) -> Any:
        if isinstance(value, list | tuple):
            return "both" if len(set(value)) > 1 else self.prepare_value(value[0]) if value else ""
        return {True: "on", False: "off"}.get(value, value) if isinstance(value, bool) else value

    def clean(self, value: Any) -> Any:
        return EXPERIMENT[self.setting].from_text(super().clean(value))


class TermSweepsField(forms.CharField):
    """Sweeps of recipe term parameters, one per line (``sweeps.parse_term_sweeps``); cleans to
    ``{"kd.temperature": [2.0, 4.0]}``."""

    def prepare_value(self, value: Any) -> Any:
        if isinstance(value, dict):
            return "\n".join(f"{axis} = {sweep_plan.format_values(values)}" for axis, values in value.items())
        return value

    def clean(self, value: Any) -> dict[str, list[Any]]:
        return EXPERIMENT["term_sweeps"].from_text(super().clean(value))


MODEL_PICKERS = ("teacher", "students", "assistant", "extra_teachers")
TASK_SHORT = {"classification": "classification", "causal_lm": "causal LM", "embedding": "embedding"}


def model_summary(model: ModelSpec) -> str:
    """What a model picker shows after the name: task, labels (classifiers) and parameters."""
    parts = [TASK_SHORT.get(model.task, model.task)]
    if model.task == "classification":
        parts.append(f"{model.num_labels} labels")
    size = model_size.model_size(model)
    parts.append(f"{model_size.size_text(size)} params" if size is not None else "params unknown")
    return ", ".join(parts)


def model_option_data(model: ModelSpec) -> dict[str, Any]:
    """What the page needs to tell whether a model fits the chosen dataset (``data-*`` of its option)."""
    return {"task": model.task, "kind": specs.model_kind(model), "labels": model.num_labels,
            "name": model.name}


def dataset_option_data(dataset) -> dict[str, Any]:
    return {"task": dataset.task, "kind": specs.dataset_kind(dataset), "labels": dataset.num_labels}


class ExperimentForm(TeamScopedForm):
    """Teacher, dataset, students, recipes and seeds, the training settings, and sweeps: any numeric training
    setting may list or range its values, and ``term_sweeps`` sweeps recipe term parameters."""

    name = EXPERIMENT["name"].field()
    description = EXPERIMENT["description"].field(widget=forms.Textarea(attrs={"rows": 2}))
    dataset = EXPERIMENT["dataset"].field(widget=TeamOptionSelect)
    teacher = EXPERIMENT["teacher"].field(
        empty_label="— none (hard-label training only) —",
        widget=TeamOptionSelect,
        help_text="Needed by every recipe that distills (any term other than ce).",
    )
    students = EXPERIMENT["students"].field(
        widget=TeamOptionSelectMultiple(attrs={"size": 6}),
        help_text="Each student is trained with each recipe and seed, plus a hard-label baseline.",
    )
    derive_student = EXPERIMENT["derive_student"].field(
        label="Derive a student from the teacher",
        help_text="Adds a student built from the teacher's own layers, weights copied (the DistilBERT "
        "recipe).",
    )
    recipes = EXPERIMENT["recipes"].field(widget=TeamOptionSelectMultiple(attrs={"size": 6}))
    term_sweeps = EXPERIMENT["term_sweeps"].field(
        TermSweepsField,
        label="Recipe parameter sweeps",
        help_text=sweeps.TERM_SWEEP_HELP,
        widget=forms.Textarea(
            attrs={
                "rows": 3,
                "class": "mono",
                "spellcheck": "false",
                "placeholder": "kd.temperature = 2, 4, 8",
            }
        ),
    )
    assistant = EXPERIMENT["assistant"].field(
        empty_label="— none —",
        widget=TeamOptionSelect,
        help_text="Teacher-assistant recipes: distilled from the teacher first, then teaches the students.",
    )
    extra_teachers = EXPERIMENT["extra_teachers"].field(
        widget=TeamOptionSelectMultiple(attrs={"size": 4}),
        help_text="Multi-teacher recipes: averaged with the teacher above.",
    )
    teacher_weights = EXPERIMENT["teacher_weights"].field(
        help_text='Multi-teacher weights, the teacher above first, e.g. "0.5,0.25,0.25" (default: equal).',
    )
    seeds = EXPERIMENT["seeds"].field(
        help_text=f'Comma-separated, e.g. "0,1,2" or "0-2"; at most {MAX_SEEDS}.'
    )
    lr_schedule = EXPERIMENT["lr_schedule"].field(label="LR schedule", help_text="Decay after warm-up.")
    early_stopping_metric = EXPERIMENT["early_stopping_metric"].field(
        label="Early-stopping metric",
        help_text="Watched on a validation slice held out of the train split (the eval split is only "
        "reported); needs a patience.",
    )
    vary_labelled_subset = EXPERIMENT["vary_labelled_subset"].field(
        label="Vary the labelled subset with the seed",
        help_text="With a labelled fraction below 1: each seed draws its own labelled rows (its baseline "
        "shares them), so the spread over seeds includes the choice of labelled subset.",
    )

    strategy = EXPERIMENT["strategy"].field(
        ChoiceSweepField,
        setting="strategy",
        widget=forms.CheckboxSelectMultiple,
        initial=[TRAIN_DEFAULTS["strategy"]],
        label="Strategy",
        help_text="How several ranks share the student: fsdp shards its weights, gradients and optimizer "
        "state over the ranks, ddp replicates them; auto is fsdp with several ranks. With one rank either "
        "trains as a single process. Tick several to sweep them.",
    )
    precision = EXPERIMENT["precision"].field(
        ChoiceSweepField,
        setting="precision",
        widget=forms.CheckboxSelectMultiple,
        initial=[TRAIN_DEFAULTS["precision"]],
        label="Precision",
        help_text="auto: bf16 on a GPU, fp32 on a CPU. Tick several to sweep them.",
    )
    activation_checkpointing = EXPERIMENT["activation_checkpointing"].field(
        OnOffSweepField,
        setting="activation_checkpointing",
        widget=forms.Select(choices=input_rules.ON_OFF_CHOICES),
        initial="off",
        label="Activation checkpointing",
        help_text="Recompute each block's activations in the backward pass: less memory, about a third "
        "more compute.",
    )
    lora_targets = EXPERIMENT["lora_targets"].field(
        label="LoRA target modules",
        widget=forms.TextInput(attrs={"placeholder": "attention projections", "spellcheck": "false"}),
        help_text="With a LoRA rank above 0: the linear layers that get adapters, as module names separated "
        "by commas (e.g. q_proj,v_proj); blank: the attention projections of the student's architecture.",
    )
    lora_4bit = EXPERIMENT["lora_4bit"].field(
        OnOffSweepField,
        setting="lora_4bit",
        widget=forms.Select(choices=input_rules.ON_OFF_CHOICES),
        initial="off",
        label="4-bit QLoRA",
        help_text="With a LoRA rank above 0: keep the frozen weights in 4 bits (bitsandbytes; GPU queues "
        "only).",
    )

    team_fields = input_rules.EXPERIMENT_TEAM_FIELDS
    # The training settings, LoRA's last and together.
    train_field_names = (*(n for n in (*TRAIN_FIELDS, *TRAIN_CHOICES) if n not in LORA_FIELDS), *LORA_FIELDS)
    sweep_syntax = sweeps.SYNTAX_HELP

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        models = records_reads.model_spec_list(user=self.user).order_by("team__name", "name")
        self.fields["dataset"].queryset = records_reads.dataset_spec_list(user=self.user).order_by(
            "team__name", "name"
        )
        self.fields["teacher"].queryset = models
        self.fields["students"].queryset = models
        self.fields["assistant"].queryset = models
        self.fields["extra_teachers"].queryset = models
        self.fields["recipes"].queryset = records_reads.recipe_list(user=self.user).order_by(
            "team__name", "name", "-version"
        )
        for name in ("dataset", "recipes"):
            self.fields[name].label_from_instance = self.label_with_team
        # Model pickers: each option says what the model is; the page searches and filters them by the
        # dataset's task (static/js/experiment_setup.js).
        for name in MODEL_PICKERS:
            self.fields[name].label_from_instance = self.model_label
            self.fields[name].widget.option_data = model_option_data
            self.fields[name].widget.attrs["data-model-picker"] = name
        # What the page's run count needs to know about each option (static/js/experiment_setup.js).
        self.fields["recipes"].widget.option_data = lambda r: {
            "baseline": "1" if r.scheme == Recipe.Scheme.HARD_LABELS else "0",
            "terms": " ".join(str(t.get("name", "")) for t in r.terms),
            "chain": sweep_plan.chain_length(r.scheme, r.scheme_params),
        }
        self.fields["dataset"].widget.option_data = dataset_option_data
        for name, (kind, lo, hi, help_text) in TRAIN_FIELDS.items():
            default = TRAIN_DEFAULTS.get(name)
            widget = forms.TextInput(
                attrs={
                    "placeholder": f"default {default}",
                    "autocomplete": "off",
                    "spellcheck": "false",
                    "data-sweep": kind.__name__,
                }
            )
            self.fields[name] = EXPERIMENT[name].field(
                SweepField,
                setting=name,
                widget=widget,
                label=TRAIN_LABELS.get(name, name.replace("_", " ").capitalize()),
                help_text=f"{help_text} ({_bound(lo, kind)} to {_bound(hi, kind)}).",
            )
        # Keep the schedule and the other choices next to the numeric settings.
        for name in (*TRAIN_CHOICES, *RESOURCE_FIELDS):
            self.fields[name] = self.fields.pop(name)

    def model_label(self, model: ModelSpec) -> str:
        """"mlp-32 — classification, 10 labels, 2.41k params" (with its team when the user has several)."""
        return f"{self.label_with_team(model)} — {model_summary(model)}"

    def clean_seeds(self) -> list[int]:
        return EXPERIMENT["seeds"].from_text(self.cleaned_data["seeds"])

    def clean(self) -> dict[str, Any]:
        cleaned = super().clean()
        input_rules.experiment_checks(cleaned, self.errors, self.add_error)
        return cleaned

    def clean_teacher_weights(self) -> list[float]:
        return EXPERIMENT["teacher_weights"].from_text(self.cleaned_data["teacher_weights"])

    def basic_fields(self):
        return [
            self[n]
            for n in (
                "team",
                "name",
                "description",
                "dataset",
                "teacher",
                "students",
                "derive_student",
                "recipes",
                "seeds",
            )
        ]

    def scheme_fields(self):
        return [self[n] for n in ("assistant", "extra_teachers", "teacher_weights")]

    def train_fields(self):
        return [self[n] for n in self.train_field_names if n not in (*RESOURCE_FIELDS, *LORA_FIELDS)]

    def resource_fields(self):
        """The Resources section: GPUs, CPU processes, strategy, precision, activation checkpointing, and the
        student's LoRA adapter (rank 0: full fine-tuning)."""
        return [self[n] for n in (*RESOURCE_FIELDS, *LORA_FIELDS)]

    def train_settings(self) -> dict[str, Any]:
        """The training settings given: one value as itself, a sweep as its list of values."""
        return input_rules.experiment_train_settings(self.cleaned_data)

    def service_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``services.experiment_create`` (besides created_by)."""
        return input_rules.experiment_service_kwargs(self.cleaned_data)

    def preflight_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``preflight.experiment_preflight``."""
        return input_rules.experiment_preflight_kwargs(self.cleaned_data)


def _weights_text(weights: list[float]) -> str:
    return ",".join(f"{w:.6g}" for w in weights)


def experiment_initial(experiment: Experiment) -> dict[str, Any]:
    """The experiment form pre-filled from an experiment, its sweep included: the same runs, ready to edit."""
    train = {k: v for k, v in (experiment.train or {}).items() if k in ExperimentForm.train_field_names}
    return {
        "team": experiment.team_id,
        "name": f"{experiment.name} (clone)"[:200],
        "description": experiment.description,
        "dataset": experiment.dataset_id,
        "teacher": experiment.teacher_id,
        "assistant": experiment.assistant_id,
        "students": [s.pk for s in experiment.students.all()],
        "recipes": [r.pk for r in experiment.recipes.all()],
        "extra_teachers": [m.pk for m in experiment.extra_teachers.all()],
        "teacher_weights": _weights_text(experiment.teacher_weights)
        if experiment.extra_teachers.exists()
        else "",
        "seeds": ",".join(str(s) for s in experiment.seeds),
        **train,
        "term_sweeps": dict((experiment.train or {}).get("term_sweeps") or {}),
    }


def run_initial(run: Run) -> dict[str, Any]:
    """The experiment form pre-filled to train one run again: its student, recipe and seed, and the concrete
    values its frozen config was trained with (the swept ones included)."""
    experiment = run.experiment
    config = run.config or {}
    train = {k: v for k, v in (config.get("train") or {}).items() if k in ExperimentForm.train_field_names}
    fraction = (config.get("dataset") or {}).get("labelled_fraction")
    if fraction is not None:
        train["labelled_fraction"] = fraction
    if (config.get("dataset") or {}).get("labelled_seed") is not None:
        train["vary_labelled_subset"] = True
    term_sweeps = {}
    for axis in (experiment.train or {}).get("term_sweeps") or {}:
        value = sweep_plan.config_value(config, axis)
        if value is not None:
            term_sweeps[axis] = [value]
    label = sweep_plan.run_label(train=experiment.train or {}, config=config)
    return {
        "team": run.team_id,
        "name": f"{experiment.name} · run #{run.pk} (clone)"[:200],
        "description": f"Clone of run #{run.pk} of {experiment.name}" + (f" ({label})." if label else "."),
        "dataset": experiment.dataset_id,
        "teacher": experiment.teacher_id,
        "assistant": experiment.assistant_id,
        "students": [run.student_id],
        "recipes": [run.recipe_id],
        "extra_teachers": [m.pk for m in experiment.extra_teachers.all()],
        "teacher_weights": _weights_text(experiment.teacher_weights)
        if experiment.extra_teachers.exists()
        else "",
        "seeds": str(run.seed),
        **train,
        "term_sweeps": term_sweeps,
    }


# --- runs -----------------------------------------------------------------------------------------
class RegisterModelForm(forms.Form):
    name = input_rules.REGISTER_MODEL["name"].field(help_text="The new model's name in its team.")


# --- leaderboards ---------------------------------------------------------------------------------
class LeaderboardFilterForm(forms.Form):
    """A size / latency budget: rows above it are hidden and the rest ranked among themselves."""

    max_params = input_rules.LEADERBOARD_BUDGET["max_params"].field(
        label="Max parameters", widget=forms.NumberInput(attrs={"placeholder": "any"})
    )
    max_latency_ms = input_rules.LEADERBOARD_BUDGET["max_latency_ms"].field(
        label="Max latency (ms)", widget=forms.NumberInput(attrs={"placeholder": "any", "step": "any"})
    )


# The recipe form lives in its own module; these names stay importable from here.
from experiments.forms_recipe import (  # noqa: E402,F401
    NEED_LABELS,
    WEIGHT_SCHEDULES,
    BaseTermFormSet,
    ParamInfo,
    RecipeForm,
    TermForm,
    TermFormSet,
    TermInfo,
    loss_term_catalog,
    term_param_names,
)
