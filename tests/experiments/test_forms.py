import pytest
from django import forms as django_forms
from django.core.exceptions import ValidationError

from experiments import forms
from experiments.domain.engine_config import TRAIN_DEFAULTS
from experiments.domain.validation import TRAIN_FIELDS
from experiments.models import Recipe
from tests.factories import DatasetSpecFactory, MembershipFactory, ModelSpecFactory, RecipeFactory

pytestmark = pytest.mark.django_db


# --- seeds ----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("raw", "seeds"),
    [
        ("0", [0]),
        ("0,1,2", [0, 1, 2]),
        (" 3 , 5 ", [3, 5]),
        ("0-2", [0, 1, 2]),
        ("7,0-1", [7, 0, 1]),
        ("", []),
    ],
)
def test_parse_seeds_accepts_lists_and_ranges(raw, seeds):
    assert forms.parse_seeds(raw) == seeds


@pytest.mark.parametrize("raw", ["a", "1,b", "-1", "2-1", "1.5"])
def test_parse_seeds_rejects_anything_else(raw):
    with pytest.raises(ValidationError):
        forms.parse_seeds(raw)


# --- service errors -------------------------------------------------------------------------------
class _Form(django_forms.Form):
    teacher = django_forms.CharField(required=False)
    hidden_sizes = django_forms.CharField(required=False)


def test_service_errors_become_field_errors_and_unknown_keys_non_field_errors():
    form = _Form({})
    assert form.is_valid()

    forms.add_service_errors(
        form,
        ValidationError({"teacher": ["Choose a teacher."], "config": ["Bad widths."], "gpu": ["Too big."]}),
        {"config": "hidden_sizes"},
    )

    assert form.errors["teacher"] == ["Choose a teacher."]
    assert form.errors["hidden_sizes"] == ["Bad widths."]
    assert form.non_field_errors() == ["Gpu: Too big."]


def test_service_error_without_fields_is_a_non_field_error():
    form = _Form({})
    form.is_valid()

    forms.add_service_errors(form, ValidationError("Something is off."))

    assert form.non_field_errors() == ["Something is off."]


# --- models ---------------------------------------------------------------------------------------
def _model_data(team, **extra):
    return {
        "team": team.pk,
        "name": "mlp-big",
        "source": "builtin",
        "num_labels": 10,
        "builtin_arch": "mlp",
        "hidden_sizes": "256, 256",
        **extra,
    }


def test_model_form_parses_hidden_sizes(user, team):
    form = forms.ModelSpecForm(_model_data(team), user=user)

    assert form.is_valid(), form.errors
    assert form.service_fields()["config"] == {"hidden_sizes": [256, 256]}
    assert form.service_fields()["builtin_arch"] == "mlp"


@pytest.mark.parametrize("hidden", ["abc", "256,x", "0", "70000"])
def test_model_form_rejects_bad_hidden_sizes(user, team, hidden):
    form = forms.ModelSpecForm(_model_data(team, hidden_sizes=hidden), user=user)

    assert not form.is_valid()
    assert "hidden_sizes" in form.errors


@pytest.mark.parametrize(("config", "message"), [("{not json", "Not valid JSON"), ("[1, 2]", "JSON object")])
def test_model_form_rejects_bad_config_json(user, team, config, message):
    form = forms.ModelSpecForm(_model_data(team, source="config", config=config), user=user)

    assert not form.is_valid()
    assert message in form.errors["config"][0]


def test_model_form_only_offers_the_users_teams(user, team, other_team):
    form = forms.ModelSpecForm(_model_data(other_team), user=user)

    assert not form.is_valid()
    assert "team" in form.errors
    assert list(form.fields["team"].queryset) == [team]


# --- datasets -------------------------------------------------------------------------------------
def test_dataset_form_checks_label_names_against_num_labels(user, team):
    data = {
        "team": team.pk,
        "name": "news",
        "source": "hf",
        "hub_name": "org/news",
        "text_column": "text",
        "label_column": "label",
        "num_labels": 3,
        "label_names": "a, b",
        "eval_fraction": 0.2,
        "split_seed": 0,
        "max_length": 128,
    }

    form = forms.DatasetSpecForm(data, user=user)

    assert not form.is_valid()
    assert "label_names" in form.errors


def test_dataset_form_leaves_builtin_label_count_to_the_service(user, team):
    data = {
        "team": team.pk,
        "name": "digits",
        "source": "builtin",
        "builtin_name": "digits",
        "text_column": "text",
        "label_column": "label",
        "eval_fraction": 0.2,
        "split_seed": 0,
        "max_length": 128,
    }

    form = forms.DatasetSpecForm(data, user=user)

    assert form.is_valid(), form.errors
    fields = form.service_fields()
    assert "num_labels" not in fields and "hub_name" not in fields
    assert fields["builtin_name"] == "digits"


# --- recipe terms ---------------------------------------------------------------------------------
def _terms_data(rows):
    data = {"terms-TOTAL_FORMS": str(len(rows)), "terms-INITIAL_FORMS": "0"}
    for i, row in enumerate(rows):
        data.update({f"terms-{i}-{k}": v for k, v in row.items()})
    return data


def test_term_formset_skips_empty_rows_and_keeps_given_params_only():
    catalog = forms.loss_term_catalog()
    formset = forms.TermFormSet(
        _terms_data(
            [{"name": "ce", "weight": "0.1"}, {}, {"name": "kd", "weight": "0.9", "temperature": "4"}]
        ),
        prefix="terms",
        form_kwargs={"catalog": catalog},
    )

    assert formset.is_valid(), formset.errors
    assert formset.terms() == [
        {"name": "ce", "weight": 0.1, "params": {}},
        {"name": "kd", "weight": 0.9, "params": {"temperature": 4.0}},
    ]


def test_term_formset_needs_a_term():
    formset = forms.TermFormSet(
        _terms_data([{}, {}]), prefix="terms", form_kwargs={"catalog": forms.loss_term_catalog()}
    )

    assert not formset.is_valid()
    assert "at least one loss term" in formset.non_form_errors()[0]


def test_term_row_with_params_but_no_term_is_an_error():
    formset = forms.TermFormSet(
        _terms_data([{"weight": "0.5"}]), prefix="terms", form_kwargs={"catalog": forms.loss_term_catalog()}
    )

    assert not formset.is_valid()
    assert "name" in formset.forms[0].errors


def test_loss_term_catalog_lists_the_engine_terms():
    catalog = {t.name: t for t in forms.loss_term_catalog()}

    assert {
        "ce",
        "kd",
        "reverse_kl",
        "jsd",
        "taid",
        "topk",
        "uld",
        "hidden_mse",
        "hidden_cosine",
        "attention_mse",
        "attention_kl",
        "embedding_mse",
    } <= set(catalog)
    topk = {p.name: p for p in catalog["topk"].params}
    assert (topk["k"].type, topk["k"].default) == ("int", "64")
    assert topk["divergence"].choices == ("kd", "reverse_kl", "jsd", "tvd")
    assert (topk["tail"].type, topk["tail"].default) == ("bool", "true")
    assert catalog["hidden_mse"].needs == ("hidden states",) and catalog["ce"].needs == ()


def _term_form(catalog=None, **data):
    catalog = catalog or forms.loss_term_catalog()
    return forms.TermForm({f"t-{k}": v for k, v in data.items()}, prefix="t", catalog=catalog)


def test_term_form_builds_a_widget_per_parameter_type():
    form = forms.TermForm(catalog=forms.loss_term_catalog())

    assert isinstance(form.fields["temperature"], django_forms.FloatField)
    assert isinstance(form.fields["k"], django_forms.IntegerField)
    assert isinstance(form.fields["divergence"].widget, django_forms.Select)
    assert [c[0] for c in form.fields["divergence"].choices] == ["", "kd", "reverse_kl", "jsd", "tvd"]
    assert isinstance(form.fields["pooling"], django_forms.ChoiceField)
    assert (
        isinstance(form.fields["tail"].widget, django_forms.CheckboxInput)
        and form.fields["tail"].initial is True
    )
    assert isinstance(form.fields["adaptive"], django_forms.BooleanField)
    assert isinstance(form.fields["layer_map"], django_forms.CharField)
    assert "topk" in form.fields["temperature"].widget.attrs["data-terms"].split()
    assert [c[0] for c in form.fields["weight_schedule"].choices] == ["", "linear", "cosine"]


def test_term_form_keeps_only_the_chosen_terms_params_in_engine_form():
    form = _term_form(name="topk", weight="1", k="8", divergence="jsd", beta="0.2", adaptive="on")
    assert form.is_valid(), form.errors
    assert form.term() == {
        "name": "topk",
        "weight": 1.0,
        "params": {"k": 8, "divergence": "jsd", "tail": False, "beta": 0.2},
    }

    form = _term_form(name="hidden_mse", layer_map="2, 4", tail="on")
    assert form.is_valid(), form.errors
    assert form.term() == {"name": "hidden_mse", "weight": 1.0, "params": {"layer_map": [2, 4]}}

    form = _term_form(name="taid", adaptive="on")
    assert form.is_valid(), form.errors
    assert form.term()["params"] == {"adaptive": True}


@pytest.mark.parametrize(
    ("data", "field", "message"),
    [
        ({"name": "kd", "temperature": "-1"}, "temperature", "must be > 0, got -1"),
        ({"name": "topk", "k": "0"}, "k", "Parameter 'k' of loss term 'topk' must be >= 1, got 0."),
        ({"name": "topk", "tail": "on", "temperature": "2"}, "temperature", "must be 1 when tail is on"),
        ({"name": "taid", "t_start": "0.8", "t_end": "0.5"}, "t_end", "must be >= t_start (0.8)"),
        ({"name": "hidden_mse", "layer_map": "middle"}, "layer_map", "a list of teacher layer numbers"),
        ({"name": "topk", "divergence": "hellinger"}, "divergence", "Select a valid choice"),
        ({"name": "ce", "temperature": "2"}, "temperature", "ce has no parameter temperature"),
        (
            {"name": "kd", "weight_schedule": "linear"},
            "weight_end",
            "needs the weight at the end of training",
        ),
        ({"name": "kd", "weight_end": "1"}, "weight_schedule", "Choose linear or cosine"),
    ],
)
def test_term_form_shows_each_error_on_its_field(data, field, message):
    form = _term_form(**data)

    assert not form.is_valid()
    assert message in " ".join(form.errors[field])


def test_term_form_weight_schedule_goes_from_the_weight_to_the_end_weight():
    form = _term_form(name="kd", weight="0", weight_schedule="linear", weight_end="0.9", temperature="4")

    assert form.is_valid(), form.errors
    assert form.term() == {
        "name": "kd",
        "weight": 0.0,
        "params": {"temperature": 4.0},
        "schedule": {"weight": {"kind": "linear", "start": 0.0, "end": 0.9}},
    }


def test_term_formset_with_new_terms_and_a_schedule():
    formset = forms.TermFormSet(
        _terms_data(
            [
                {"name": "ce", "weight": "0.1"},
                {
                    "name": "topk",
                    "weight": "0.9",
                    "k": "16",
                    "tail": "on",
                    "weight_schedule": "cosine",
                    "weight_end": "0.5",
                },
                {"tail": "on", "adaptive": "on"},
            ]
        ),  # checkboxes alone do not make a row
        prefix="terms",
        form_kwargs={"catalog": forms.loss_term_catalog()},
    )

    assert formset.is_valid(), formset.errors
    assert formset.terms() == [
        {"name": "ce", "weight": 0.1, "params": {}},
        {
            "name": "topk",
            "weight": 0.9,
            "params": {"k": 16, "tail": True},
            "schedule": {"weight": {"kind": "cosine", "start": 0.9, "end": 0.5}},
        },
    ]


def test_recipe_form_offers_every_scheme_of_the_model(user):
    form = forms.RecipeForm(user=user)

    assert list(form.fields["scheme"].choices) == list(Recipe.Scheme.choices)


def test_clean_terms_keeps_schedules_and_normalises_params():
    from experiments.domain.validation import clean_terms

    cleaned = clean_terms(
        [
            {
                "name": "kd",
                "weight": 0,
                "params": {"temperature": 4},
                "schedule": {"weight": {"kind": "linear", "start": 0, "end": 1}},
            },
            {"name": "hidden_mse", "weight": 1, "params": {"layer_map": "2,4"}},
        ],
        scheme="online",
    )

    assert cleaned == [
        {
            "name": "kd",
            "weight": 0.0,
            "params": {"temperature": 4.0},
            "schedule": {"weight": {"kind": "linear", "start": 0.0, "end": 1.0}},
        },
        {"name": "hidden_mse", "weight": 1.0, "params": {"layer_map": [2, 4]}},
    ]


@pytest.mark.parametrize(
    ("terms", "message"),
    [
        (
            [{"name": "kd", "schedule": {"temperature": {"kind": "linear", "start": 4, "end": 0}}}],
            "end must be > 0",
        ),
        (
            [{"name": "topk", "params": {"k": 0}}],
            "Term 1 (topk): Parameter 'k' of loss term 'topk' must be >= 1",
        ),
        (
            [{"name": "kd", "weight": 0, "schedule": {"weight": {"kind": "constant", "start": 0}}}],
            "positive weight",
        ),
    ],
)
def test_clean_terms_rejects_bad_params_and_schedules(terms, message):
    from experiments.domain.validation import clean_terms

    with pytest.raises(ValidationError) as exc:
        clean_terms(terms, scheme="offline")
    assert message in exc.value.message_dict["terms"][0]


# --- experiments ----------------------------------------------------------------------------------
def _experiment_data(team, setup, **extra):
    return {
        "team": team.pk,
        "name": "sweep",
        "dataset": setup["dataset"].pk,
        "teacher": setup["teacher"].pk,
        "students": [s.pk for s in setup["students"]],
        "recipes": [setup["recipe"].pk],
        "seeds": "0,1",
        **extra,
    }


def test_experiment_form_builds_hyperparameter_fields_from_train_fields(user):
    form = forms.ExperimentForm(user=user)

    for name, (kind, lo, hi, _help) in TRAIN_FIELDS.items():
        field = form.fields[name]
        assert isinstance(field, forms.SweepField) and field.kind is kind  # one value or a sweep
        assert field.initial == TRAIN_DEFAULTS[name]
        assert (field.min_value, field.max_value) == (lo, hi)
    assert form.fields["lr_schedule"].initial == TRAIN_DEFAULTS["lr_schedule"]


def test_experiment_form_valid_data_gives_service_kwargs(user, team, digits_setup):
    form = forms.ExperimentForm(_experiment_data(team, digits_setup, lr="0.01", max_steps="30"), user=user)

    assert form.is_valid(), form.errors
    kwargs = form.service_kwargs()
    assert kwargs["seeds"] == [0, 1]
    assert kwargs["train"] == {"lr": 0.01, "max_steps": 30}
    assert kwargs["students"] == digits_setup["students"]


def test_experiment_form_rejects_other_teams_records_as_invalid_choices(user, team, other_team, digits_setup):
    foreign = DatasetSpecFactory(team=other_team)

    form = forms.ExperimentForm(_experiment_data(team, digits_setup, dataset=foreign.pk), user=user)

    assert not form.is_valid()
    assert "valid choice" in form.errors["dataset"][0]


def test_experiment_form_rejects_records_of_another_of_the_users_teams(user, team, other_team, digits_setup):
    MembershipFactory(user=user, team=other_team)
    other_student = ModelSpecFactory(team=other_team)
    data = _experiment_data(team, digits_setup, students=[digits_setup["students"][0].pk, other_student.pk])

    form = forms.ExperimentForm(data, user=user)

    assert not form.is_valid()
    assert "another team" in form.errors["students"][0]


@pytest.mark.parametrize("seeds", ["0,0", ",".join(str(i) for i in range(21)), ""])
def test_experiment_form_checks_seeds(user, team, digits_setup, seeds):
    form = forms.ExperimentForm(_experiment_data(team, digits_setup, seeds=seeds), user=user)

    assert not form.is_valid()
    assert "seeds" in form.errors


def test_experiment_form_marks_baseline_recipes_for_the_run_preview(user, team):
    RecipeFactory(
        team=team,
        name="hard",
        scheme=Recipe.Scheme.HARD_LABELS,
        terms=[{"name": "ce", "weight": 1.0, "params": {}}],
    )

    html = str(forms.ExperimentForm(user=user)["recipes"])

    assert 'data-baseline="1"' in html
    assert f'data-team="{team.pk}"' in html


def test_a_dataset_with_a_separate_eval_file_and_packing_reaches_the_engine(user, team, settings, tmp_path):
    from experiments.domain import engine_config
    from experiments.services import records

    settings.DATASET_ROOTS = [tmp_path]
    (tmp_path / "train.jsonl").write_text('{"text": "a b c"}\n')
    (tmp_path / "eval.jsonl").write_text('{"text": "d e f"}\n')
    base = {
        "team": team.pk,
        "name": "corpus",
        "source": "hf",
        "task": "causal_lm",
        "text_column": "text",
        "label_column": "label",
        "eval_fraction": 0.2,
        "split_seed": 0,
        "max_length": 64,
        "local_path": str(tmp_path / "train.jsonl"),
    }
    form = forms.DatasetSpecForm(
        {**base, "eval_local_path": str(tmp_path / "eval.jsonl"), "pack": "on"}, user=user
    )
    assert form.is_valid(), form.errors
    spec = records.dataset_spec_create(team=team, created_by=user, **form.service_fields())
    cfg = engine_config.dataset_config(spec)
    assert cfg["eval_path"] == str((tmp_path / "eval.jsonl").resolve()) and cfg["pack"] is True
    plain = engine_config.dataset_config(DatasetSpecFactory(team=team))
    assert "eval_path" not in plain and "pack" not in plain  # split keys of older datasets do not move

    for extra, field in (
        ({"eval_local_path": "/etc/passwd"}, "eval_local_path"),
        ({"eval_local_path": str(tmp_path / "../x.jsonl")}, "eval_local_path"),
        ({"pack": "on", "task": "classification", "num_labels": 2}, "pack"),
    ):
        form = forms.DatasetSpecForm({**base, "name": f"bad-{field}-{len(extra)}", **extra}, user=user)
        assert form.is_valid(), form.errors
        with pytest.raises(ValidationError) as exc:
            records.dataset_spec_create(team=team, created_by=user, **form.service_fields())
        assert field in exc.value.message_dict
