"""The experiment form's model pickers (what each option says and carries for the page's filter), Create over
the run limit, and the models list's task and parameter columns."""

import re
from unittest import mock

import pytest
from django.urls import reverse

from experiments.domain import model_size
from experiments.models import Experiment, ModelSpec
from tests.factories import DatasetSpecFactory, ModelSpecFactory, TeamFactory

pytestmark = pytest.mark.django_db

DISPATCH = "experiments.services.dispatch._dispatch"


def _torch_params(hidden_sizes, *, input_width, num_labels):
    from workers.engine.models import MLP

    return sum(p.numel() for p in MLP(input_width, num_labels, hidden_sizes).parameters())


def _option(html, select_name, value):
    """The <option> tag (attributes and text) of ``value`` inside the select named ``select_name``."""
    select = re.search(rf'<select name="{select_name}".*?</select>', html, re.S).group(0)
    return re.search(rf'<option value="{value}"[^>]*>[^<]*</option>', select).group(0)


def _post(team, setup, **extra):
    data = {"team": team.pk, "name": "picked", "dataset": setup["dataset"].pk, "teacher": setup["teacher"].pk,
            "students": [s.pk for s in setup["students"]], "recipes": [setup["recipe"].pk], "seeds": "0",
            "max_steps": "50"}
    return {**data, **extra}


# --- pickers ------------------------------------------------------------------------------------------------
def test_each_model_option_says_task_labels_and_parameters(client_logged_in, digits_setup, team):
    lm = ModelSpecFactory(team=team, name="tiny-lm", source=ModelSpec.Source.CONFIG, builtin_arch="",
                          task="causal_lm", num_labels=0,
                          config={"model_type": "gpt2", "n_embd": 32, "n_layer": 2, "n_head": 2,
                                  "vocab_size": 500, "n_positions": 64})
    html = client_logged_in.get(reverse("experiments:experiment_create")).content.decode()

    student = digits_setup["students"][0]                      # mlp-16 on 10 classes: digits' 64 features
    params = model_size.short_count(_torch_params([16], input_width=64, num_labels=10))
    option = _option(html, "students", student.pk)
    assert f">mlp-16 — classification, 10 labels, {params} params</option>" in option
    for attr in ('data-task="classification"', 'data-kind="tabular"', 'data-labels="10"',
                 'data-name="mlp-16"'):
        assert attr in option
    lm_option = _option(html, "teacher", lm.pk)
    assert "tiny-lm — causal LM, " in lm_option and "labels" not in lm_option.split(">")[1]
    assert 'data-task="causal_lm"' in lm_option and 'data-kind="text"' in lm_option


def test_the_model_selects_are_pickers_and_the_dataset_options_carry_what_they_filter_by(
    client_logged_in, digits_setup
):
    html = client_logged_in.get(reverse("experiments:experiment_create")).content.decode()

    for name in ("teacher", "students", "assistant", "extra_teachers"):
        assert re.search(rf'<select name="{name}"[^>]*data-model-picker="{name}"', html)
    dataset = _option(html, "dataset", digits_setup["dataset"].pk)
    assert 'data-task="classification"' in dataset and 'data-kind="tabular"' in dataset
    assert 'data-labels="10"' in dataset


def test_another_teams_models_are_not_offered(client_logged_in, digits_setup):
    foreign = ModelSpecFactory(team=TeamFactory(), name="foreign-net")

    html = client_logged_in.get(reverse("experiments:experiment_create")).content.decode()

    assert "foreign-net" not in html and f'value="{foreign.pk}"' not in html


def test_the_selects_still_post_the_form(client_logged_in, digits_setup, team):
    with mock.patch(DISPATCH):
        response = client_logged_in.post(reverse("experiments:experiment_create"), _post(team, digits_setup))

    assert response.status_code == 302
    experiment = Experiment.objects.get()
    assert experiment.teacher == digits_setup["teacher"]
    assert set(experiment.students.all()) == set(digits_setup["students"])


# --- Create over the run limit ------------------------------------------------------------------------------
def test_a_check_over_the_limit_renders_create_disabled(client_logged_in, digits_setup, team, settings):
    settings.MAX_RUNS_PER_EXPERIMENT = 3                       # 2 students × (kd + baseline) = 4 runs
    over = client_logged_in.post(reverse("experiments:experiment_check"), _post(team, digits_setup))
    settings.MAX_RUNS_PER_EXPERIMENT = 4
    under = client_logged_in.post(reverse("experiments:experiment_check"), _post(team, digits_setup))

    assert re.search(r"<button[^>]*data-launch disabled", over.content.decode())
    assert not re.search(r"<button[^>]*data-launch disabled", under.content.decode())
    assert under.context["report"].can_launch


def test_the_server_refuses_a_grid_over_the_limit_whatever_the_page_allows(
    client_logged_in, digits_setup, team, settings
):
    settings.MAX_RUNS_PER_EXPERIMENT = 3

    response = client_logged_in.post(reverse("experiments:experiment_create"), _post(team, digits_setup))

    assert "the limit is 3" in " ".join(response.context["form"].errors["seeds"])
    assert not Experiment.objects.exists()


# --- models list --------------------------------------------------------------------------------------------
def _row(html, name):
    return re.search(rf"<tr>\s*<td><a [^>]*>{re.escape(name)}</a></td>.*?</tr>", html, re.S).group(0)


def test_the_models_list_shows_task_and_builtin_parameter_counts(client_logged_in, team):
    ModelSpecFactory(team=team, name="digits-mlp", config={"hidden_sizes": [64, 32]}, num_labels=10)
    ModelSpecFactory(team=team, name="flower-mlp", config={"hidden_sizes": [8]}, num_labels=3)
    ModelSpecFactory(team=team, name="hub-bert", source=ModelSpec.Source.HF, builtin_arch="",
                     hub_id="org/bert", config={}, num_labels=5)
    ModelSpecFactory(team=team, name="prepared", source=ModelSpec.Source.HF, builtin_arch="",
                     hub_id="org/prepared", config={}, task="embedding", num_labels=0, param_count=22_700_000)

    html = client_logged_in.get(reverse("experiments:model_list")).content.decode()

    assert '<th scope="col">Task</th>' in html
    digits = _row(html, "digits-mlp")
    exact = _torch_params([64, 32], input_width=64, num_labels=10)
    assert f"data-params>{model_size.short_count(exact)}</td>" in digits
    assert f"{exact:,} on digits (64 features)" in digits and ">classification</td>" in digits
    flowers = _row(html, "flower-mlp")     # 3 classes: iris (4 features) or wine (13)
    low, high = (_torch_params([8], input_width=w, num_labels=3) for w in (4, 13))
    assert f"data-params>{low}–{high}</td>" in flowers
    assert "data-params>—</td>" in _row(html, "hub-bert")
    prepared = _row(html, "prepared")
    assert "data-params>22.7M</td>" in prepared and ">embedding</td>" in prepared


def test_the_models_list_counts_a_builtin_net_without_reading_anything_per_row(
    client_logged_in, team, django_assert_max_num_queries
):
    for i in range(15):
        ModelSpecFactory(team=team, name=f"net-{i}", config={"hidden_sizes": [i + 1]})
    DatasetSpecFactory(team=team)

    client_logged_in.get(reverse("experiments:model_list"))             # warm the session and the user
    with django_assert_max_num_queries(8):
        response = client_logged_in.get(reverse("experiments:model_list"))

    assert response.status_code == 200
