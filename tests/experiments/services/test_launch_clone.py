"""Clone an experiment or a run into the experiment form, edit it and launch a new experiment."""

import json
from unittest import mock

import pytest
from django.urls import reverse

from experiments.models import Experiment, Run
from experiments.services import launch
from tests.factories import ExperimentFactory, RunFactory

pytestmark = pytest.mark.django_db

DISPATCH = "experiments.services.dispatch._dispatch"


@pytest.fixture
def swept(digits_setup, team, user):
    """An experiment sweeping lr × kd temperature for one student: 2 × (2 + baseline) = 6 runs."""
    with mock.patch(DISPATCH):
        return launch.experiment_create(
            team=team,
            created_by=user,
            name="lr × τ",
            dataset=digits_setup["dataset"],
            teacher=digits_setup["teacher"],
            students=digits_setup["students"][:1],
            recipes=[digits_setup["recipe"]],
            seeds=[3],
            train={"max_steps": 40, "lr": [1e-3, 3e-3], "lr_schedule": "cosine"},
            term_sweeps={"kd.temperature": [2.0, 8.0]},
        )


def _pick(experiment, *, lr, temperature=None):
    for run in experiment.runs.all():
        terms = {t["name"]: t for t in run.config["terms"]}
        if run.config["train"]["lr"] == lr and (
                temperature is None and run.is_baseline
                or "kd" in terms and terms["kd"]["params"]["temperature"] == temperature):
            return run
    raise AssertionError("no such run")


def _as_posted(form) -> dict:
    """What the browser posts for a pre-filled form the user launches unchanged."""
    data = {}
    for bound in form:
        value = bound.value()
        if value not in (None, "", []):
            data[bound.name] = value
    return data


def _configs(experiment) -> list[str]:
    return sorted(json.dumps(r.config, sort_keys=True) for r in experiment.runs.all())


# --- experiments ----------------------------------------------------------------------------------
def test_an_experiment_clone_prefills_the_form_with_its_sweep(client_logged_in, swept, digits_setup):
    response = client_logged_in.get(
        reverse("experiments:experiment_clone", kwargs={"experiment_id": swept.pk})
    )

    assert response.status_code == 200
    form = response.context["form"]
    assert form.initial["name"] == "lr × τ (clone)"
    assert form.initial["students"] == [digits_setup["students"][0].pk]
    assert form.initial["recipes"] == [digits_setup["recipe"].pk]
    assert form.initial["seeds"] == "3"
    assert form.initial["lr"] == [1e-3, 3e-3] and form.initial["max_steps"] == 40
    assert form.initial["lr_schedule"] == "cosine"
    html = response.content.decode()
    assert 'value="0.001, 0.003"' in html
    assert "kd.temperature = 2, 8" in html
    assert "Clone <span class=\"h-sub\">lr × τ</span>" in html


def test_an_experiment_clone_launched_unchanged_recreates_the_same_runs(client_logged_in, swept):
    form = client_logged_in.get(reverse("experiments:experiment_clone", kwargs={"experiment_id": swept.pk})
                                ).context["form"]

    with mock.patch(DISPATCH):
        response = client_logged_in.post(reverse("experiments:experiment_create"), _as_posted(form))

    clone = Experiment.objects.exclude(pk=swept.pk).get()
    assert response.status_code == 302 and clone.name == "lr × τ (clone)"
    assert clone.train == swept.train
    assert _configs(clone) == _configs(swept)


def test_an_experiment_clone_can_be_edited_before_launch(client_logged_in, swept):
    form = client_logged_in.get(reverse("experiments:experiment_clone", kwargs={"experiment_id": swept.pk})
                                ).context["form"]
    data = {**_as_posted(form), "lr": "1e-2", "term_sweeps": "kd.temperature = 1:3:lin3", "name": "edited"}

    with mock.patch(DISPATCH):
        client_logged_in.post(reverse("experiments:experiment_create"), data)

    clone = Experiment.objects.get(name="edited")
    assert clone.runs.count() == 3 + 1
    assert {r.config["train"]["lr"] for r in clone.runs.all()} == {1e-2}
    assert clone.train["term_sweeps"] == {"kd.temperature": [1.0, 2.0, 3.0]}


# --- runs -----------------------------------------------------------------------------------------
def test_a_run_clone_prefills_its_student_recipe_seed_and_concrete_values(
    client_logged_in, swept, digits_setup
):
    run = _pick(swept, lr=3e-3, temperature=8.0)

    response = client_logged_in.get(reverse("experiments:run_clone", kwargs={"run_id": run.pk}))

    assert response.status_code == 200
    form = response.context["form"]
    assert form.initial["students"] == [run.student_id] and form.initial["recipes"] == [run.recipe_id]
    assert form.initial["seeds"] == "3"
    assert form.initial["lr"] == 3e-3 and form.initial["max_steps"] == 40
    assert form.initial["term_sweeps"] == {"kd.temperature": [8.0]}
    assert form.initial["teacher"] == digits_setup["teacher"].pk
    assert f"run #{run.pk}" in form.initial["name"] and "lr=3e-3 τ=8" in form.initial["description"]


def test_a_run_clone_launched_unchanged_trains_the_same_config_again(client_logged_in, swept):
    run = _pick(swept, lr=3e-3, temperature=8.0)
    form = client_logged_in.get(reverse("experiments:run_clone", kwargs={"run_id": run.pk})).context["form"]

    with mock.patch(DISPATCH):
        client_logged_in.post(reverse("experiments:experiment_create"), _as_posted(form))

    clone = Experiment.objects.exclude(pk=swept.pk).get()
    runs = list(clone.runs.all())
    assert len(runs) == 2  # the run again, and its student's baseline
    again = next(r for r in runs if not r.is_baseline)
    assert again.config == run.config


def test_a_baseline_run_clone_trains_the_baseline_only(client_logged_in, swept):
    baseline = _pick(swept, lr=1e-3)
    form = client_logged_in.get(reverse("experiments:run_clone", kwargs={"run_id": baseline.pk})).context[
        "form"
    ]

    with mock.patch(DISPATCH):
        client_logged_in.post(reverse("experiments:experiment_create"), _as_posted(form))

    clone = Experiment.objects.exclude(pk=swept.pk).get()
    assert [(r.is_baseline, r.config) for r in clone.runs.all()] == [(True, baseline.config)]


# --- buttons and labels ---------------------------------------------------------------------------
def test_the_experiment_and_run_pages_have_clone_buttons(client_logged_in, swept):
    run = _pick(swept, lr=3e-3, temperature=8.0)

    experiment_page = client_logged_in.get(reverse("experiments:experiment_detail",
                                                   kwargs={"experiment_id": swept.pk})).content.decode()
    run_page = client_logged_in.get(
        reverse("experiments:run_detail", kwargs={"run_id": run.pk})
    ).content.decode()

    assert reverse("experiments:experiment_clone", kwargs={"experiment_id": swept.pk}) in experiment_page
    assert reverse("experiments:run_clone", kwargs={"run_id": run.pk}) in run_page
    assert 'id="sweep-point"' in run_page and "lr=3e-3 τ=8" in run_page


def test_a_run_of_an_experiment_without_a_sweep_shows_no_sweep_label(client_logged_in, team, digits_setup):
    experiment = ExperimentFactory(
        team=team, dataset=digits_setup["dataset"], train={"max_steps": 20, "lr": 1e-3}
    )
    run = RunFactory(
        experiment=experiment, student=digits_setup["students"][0], recipe=digits_setup["recipe"]
    )

    page = client_logged_in.get(reverse("experiments:run_detail", kwargs={"run_id": run.pk})).content.decode()

    assert 'id="sweep-point"' not in page
    assert reverse("experiments:run_clone", kwargs={"run_id": run.pk}) in page


# --- permissions ----------------------------------------------------------------------------------
@pytest.fixture
def foreign_run(other_team):
    return RunFactory(experiment=ExperimentFactory(team=other_team))


def test_cloning_another_teams_experiment_or_run_is_a_404(client_logged_in, foreign_run):
    experiment_url = reverse(
        "experiments:experiment_clone", kwargs={"experiment_id": foreign_run.experiment_id}
    )
    run_url = reverse("experiments:run_clone", kwargs={"run_id": foreign_run.pk})

    assert client_logged_in.get(experiment_url).status_code == 404
    assert client_logged_in.get(run_url).status_code == 404


def test_copy_of_another_teams_experiment_starts_an_empty_form(client_logged_in, foreign_run):
    response = client_logged_in.get(
        reverse("experiments:experiment_create") + f"?copy={foreign_run.experiment_id}"
    )

    assert response.status_code == 200
    assert "dataset" not in response.context["form"].initial
    assert foreign_run.experiment.name not in response.content.decode()


def test_clone_pages_need_a_login(client, swept):
    run = swept.runs.first()
    for url in (reverse("experiments:experiment_clone", kwargs={"experiment_id": swept.pk}),
                reverse("experiments:run_clone", kwargs={"run_id": run.pk})):
        response = client.get(url)
        assert response.status_code == 302 and "/login/" in response.url


def test_clone_pages_only_answer_gets(client_logged_in, swept):
    url = reverse("experiments:experiment_clone", kwargs={"experiment_id": swept.pk})

    assert client_logged_in.post(url).status_code == 405
    assert Run.objects.count() == 6


def test_staff_may_clone_any_teams_experiment(client, staff_user, foreign_run):
    client.force_login(staff_user)

    response = client.get(
        reverse("experiments:experiment_clone", kwargs={"experiment_id": foreign_run.experiment_id})
    )

    assert response.status_code == 200
    assert response.context["form"].initial["dataset"] == foreign_run.experiment.dataset_id
