import pytest
from django import forms as django_forms
from django.core.exceptions import ValidationError

from experiments import forms
from experiments.engine_config import TRAIN_DEFAULTS
from experiments.models import Recipe
from experiments.validation import TRAIN_FIELDS
from tests.factories import DatasetSpecFactory, MembershipFactory, ModelSpecFactory, RecipeFactory

pytestmark = pytest.mark.django_db


# --- seeds ----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("raw", "seeds"),
    [("0", [0]), ("0,1,2", [0, 1, 2]), (" 3 , 5 ", [3, 5]), ("0-2", [0, 1, 2]), ("7,0-1", [7, 0, 1]), ("", [])],
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
    return {"team": team.pk, "name": "mlp-big", "source": "builtin", "num_labels": 10, "builtin_arch": "mlp",
            "hidden_sizes": "256, 256", **extra}


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
    data = {"team": team.pk, "name": "news", "source": "hf", "hub_name": "org/news", "text_column": "text",
            "label_column": "label", "num_labels": 3, "label_names": "a, b", "eval_fraction": 0.2,
            "split_seed": 0, "max_length": 128}

    form = forms.DatasetSpecForm(data, user=user)

    assert not form.is_valid()
    assert "label_names" in form.errors


def test_dataset_form_leaves_builtin_label_count_to_the_service(user, team):
    data = {"team": team.pk, "name": "digits", "source": "builtin", "builtin_name": "digits", "text_column": "text",
            "label_column": "label", "eval_fraction": 0.2, "split_seed": 0, "max_length": 128}

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
        _terms_data([{"name": "ce", "weight": "0.1"}, {}, {"name": "kd", "weight": "0.9", "temperature": "4"}]),
        prefix="terms", form_kwargs={"catalog": catalog},
    )

    assert formset.is_valid(), formset.errors
    assert formset.terms() == [
        {"name": "ce", "weight": 0.1, "params": {}},
        {"name": "kd", "weight": 0.9, "params": {"temperature": 4.0}},
    ]


def test_term_formset_needs_a_term():
    formset = forms.TermFormSet(_terms_data([{}, {}]), prefix="terms",
                                form_kwargs={"catalog": forms.loss_term_catalog()})

    assert not formset.is_valid()
    assert "at least one loss term" in formset.non_form_errors()[0]


def test_term_row_with_params_but_no_term_is_an_error():
    formset = forms.TermFormSet(_terms_data([{"weight": "0.5"}]), prefix="terms",
                                form_kwargs={"catalog": forms.loss_term_catalog()})

    assert not formset.is_valid()
    assert "name" in formset.forms[0].errors


def test_loss_term_catalog_lists_the_engine_terms():
    names = [t.name for t in forms.loss_term_catalog()]

    assert {"ce", "kd", "reverse_kl", "jsd"} <= set(names)


# --- experiments ----------------------------------------------------------------------------------
def _experiment_data(team, setup, **extra):
    return {"team": team.pk, "name": "sweep", "dataset": setup["dataset"].pk, "teacher": setup["teacher"].pk,
            "students": [s.pk for s in setup["students"]], "recipes": [setup["recipe"].pk], "seeds": "0,1",
            **extra}


def test_experiment_form_builds_hyperparameter_fields_from_train_fields(user):
    form = forms.ExperimentForm(user=user)

    for name, (kind, lo, hi, _help) in TRAIN_FIELDS.items():
        field = form.fields[name]
        assert isinstance(field, django_forms.IntegerField if kind is int else django_forms.FloatField)
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
    RecipeFactory(team=team, name="hard", scheme=Recipe.Scheme.HARD_LABELS,
                  terms=[{"name": "ce", "weight": 1.0, "params": {}}])

    html = str(forms.ExperimentForm(user=user)["recipes"])

    assert 'data-baseline="1"' in html
    assert f'data-team="{team.pk}"' in html
