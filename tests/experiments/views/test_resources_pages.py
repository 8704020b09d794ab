"""The experiment form's Resources section (GPUs, CPU processes, strategy, precision, activation
checkpointing), and the run page's resources from the frozen config."""

import re
from unittest import mock

import pytest
from django.urls import reverse
from django.utils import timezone

from experiments import forms
from experiments.domain.validation import MULTI_HOST_MESSAGE
from experiments.models import Experiment, Run, Worker
from tests.factories import ExperimentFactory, RunFactory

pytestmark = pytest.mark.django_db

DISPATCH = "experiments.services.dispatch._dispatch"


def _post(team, setup, **extra):
    return {
        "team": team.pk,
        "name": "resources",
        "dataset": setup["dataset"].pk,
        "teacher": setup["teacher"].pk,
        "students": [setup["students"][0].pk],
        "recipes": [setup["recipe"].pk],
        "seeds": "0",
        "max_steps": "10",
        "batch_size": "32",
        **extra,
    }


def test_the_form_renders_a_resources_section_with_the_field_rules(client_logged_in, team, digits_setup):
    html = client_logged_in.get(reverse("experiments:experiment_create")).content.decode()

    section = html[html.index('id="resources"'):]
    section = section[:section.index("</section>")]
    assert "<h2>Resources" in section
    for name in ("gpus", "processes", "strategy", "precision", "activation_checkpointing"):
        assert f'id="field-{name}"' in section
    assert 'placeholder="default 1"' in section and "(1 to 8)" in section  # the gpus rule's bounds
    assert re.search(r'type="checkbox" name="strategy" value="fsdp"', section)
    assert re.search(r'type="checkbox" name="precision" value="auto"[^>]*checked', section)
    assert '<option value="both">off and on (a sweep)</option>' in section
    # The resources are not repeated among the training settings.
    training = html[:html.index('id="resources"')]
    assert 'id="field-gpus"' not in training


def test_the_form_keeps_resources_out_of_the_training_settings(user):
    form = forms.ExperimentForm(user=user)
    names = [f.name for f in form.train_fields()]

    assert [f.name for f in form.resource_fields()] == [
        "gpus", "processes", "strategy", "precision", "activation_checkpointing",
        "lora_r", "lora_alpha", "lora_dropout", "lora_targets", "lora_4bit"]
    assert "gpus" not in names and "strategy" not in names and "lora_r" not in names and "lr" in names


def test_the_form_saves_the_resources_into_every_run(client_logged_in, team, digits_setup):
    data = _post(team, digits_setup, gpus="4", processes="2", strategy=["ddp"], precision=["bf16", "fp32"],
                 activation_checkpointing="on")

    with mock.patch(DISPATCH):
        response = client_logged_in.post(reverse("experiments:experiment_create"), data)

    assert response.status_code == 302
    experiment = Experiment.objects.get()
    assert experiment.train["precision"] == ["bf16", "fp32"]
    assert experiment.runs.count() == 2 * 2  # (kd + baseline) × 2 precisions
    for run in experiment.runs.all():
        train = run.config["train"]
        assert (train["gpus"], train["processes"], train["strategy"]) == (4, 2, "ddp")
        assert train["activation_checkpointing"] is True
    assert {r.config["train"]["precision"] for r in experiment.runs.all()} == {"bf16", "fp32"}
    page = client_logged_in.get(response.url).content.decode()  # each run tagged with its point of the sweep
    assert "precision=bf16" in page and "precision=fp32" in page


def test_the_form_shows_the_errors_on_their_fields(client_logged_in, team, digits_setup):
    response = client_logged_in.post(reverse("experiments:experiment_create"),
                                     _post(team, digits_setup, gpus="16"))
    form = response.context["form"]
    assert form.errors["gpus"] == [MULTI_HOST_MESSAGE]

    response = client_logged_in.post(reverse("experiments:experiment_create"),
                                     _post(team, digits_setup, gpus="3", batch_size="32"))
    assert "does not divide by 3 GPUs" in response.context["form"].errors["batch_size"][0]
    assert not Experiment.objects.exists()


def test_a_clone_keeps_the_resources(user, team, digits_setup):
    train = {"gpus": 2, "strategy": ["ddp", "fsdp"], "activation_checkpointing": True}
    experiment = ExperimentFactory(team=team, dataset=digits_setup["dataset"], seeds=[0], train=train)

    initial = forms.experiment_initial(experiment)
    form = forms.ExperimentForm(initial=initial, user=user)

    assert (initial["gpus"], initial["strategy"]) == (2, ["ddp", "fsdp"])
    assert form["activation_checkpointing"].value() == "on"
    assert 'value="on" selected' in str(form["activation_checkpointing"])


def test_the_run_page_shows_world_size_strategy_and_precision(client_logged_in, team, digits_setup):
    experiment = ExperimentFactory(team=team, dataset=digits_setup["dataset"], seeds=[0])
    run = RunFactory(experiment=experiment, student=digits_setup["students"][0],
                     recipe=digits_setup["recipe"], queue="gpu-4x80g",
                     config={"train": {"max_steps": 20, "gpus": 4, "processes": 1, "strategy": "auto",
                                       "precision": "bf16", "activation_checkpointing": True}})

    html = client_logged_in.get(reverse("experiments:run_detail", args=[run.pk])).content.decode()

    assert '<dd data-resource="world_size">4 (4 GPUs)</dd>' in html
    assert '<dd data-resource="strategy">fsdp (auto)</dd>' in html
    assert '<dd data-resource="precision">bf16</dd>' in html
    assert '<dd data-resource="activation_checkpointing">on</dd>' in html


def test_the_run_page_of_an_older_run_shows_one_rank(client_logged_in, team, digits_setup):
    experiment = ExperimentFactory(team=team, dataset=digits_setup["dataset"], seeds=[0])
    run = RunFactory(experiment=experiment, student=digits_setup["students"][0],
                     recipe=digits_setup["recipe"], queue="cpu")

    html = client_logged_in.get(reverse("experiments:run_detail", args=[run.pk])).content.decode()

    assert '<dd data-resource="world_size">1 (1 CPU process)</dd>' in html
    assert '<dd data-resource="precision">auto (fp32 on a CPU)</dd>' in html


def test_a_waiting_multi_gpu_run_says_what_group_it_needs(client_logged_in, team, digits_setup):
    llama_7b = {"model_type": "llama", "hidden_size": 4096, "num_hidden_layers": 32,
                "num_attention_heads": 32, "num_key_value_heads": 32, "intermediate_size": 11008,
                "vocab_size": 32000, "max_position_embeddings": 4096, "tie_word_embeddings": False}
    Worker.objects.create(name="w@host", hostname="host", queues=["gpu-80g"], state=Worker.State.ONLINE,
                          last_heartbeat=timezone.now())
    experiment = ExperimentFactory(team=team, dataset=digits_setup["dataset"], seeds=[0])
    run = RunFactory(experiment=experiment, student=digits_setup["students"][0],
                     recipe=digits_setup["recipe"], queue="gpu-4x40g", status=Run.Status.QUEUED,
                     config={"student": {"source": "config", "params": llama_7b, "num_labels": 0},
                             "teacher": None, "task": "causal_lm", "scheme": "offline",
                             "terms": [{"name": "ce", "weight": 1.0, "params": {}}],
                             "dataset": {"max_length": 256}, "train": {"batch_size": 8, "gpus": 4}})

    html = client_logged_in.get(reverse("experiments:run_detail", args=[run.pk])).content.decode()

    assert "The run needs 4 GPUs with ≥ " in html
    assert "no online worker serves a group that large (largest: gpu-80g)." in html
    assert "per rank (4 ranks, fsdp)" in html
