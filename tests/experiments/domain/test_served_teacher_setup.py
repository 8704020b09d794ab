"""A teacher served by an inference server (issue 14) on the web side: registered by a configured server's
name and the served model's name (never a URL), turned into the engine's ``server`` model, and checked in
pre-flight (the server is asked for its model; a served student or a non-LM dataset is an error).
The server itself is a real vLLM in tests/workers/engine/test_served_teacher.py; here it is one that does not
answer (nothing listens on port 9)."""

from __future__ import annotations

import re

import pytest
from django.core.exceptions import ValidationError
from django.urls import reverse

from experiments import forms
from experiments.domain import engine_config, preflight
from experiments.models import ModelSpec, Recipe
from experiments.services import records
from tests.factories import DatasetSpecFactory, ModelSpecFactory, RecipeFactory
from workers.engine.config import ModelConfig

pytestmark = pytest.mark.django_db

SERVERS = {"gpu-pool": "http://127.0.0.1:9"}
TINY_LLAMA = {"model_type": "llama", "hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
              "intermediate_size": 64, "vocab_size": 160, "max_position_embeddings": 64}


@pytest.fixture
def servers(settings):
    settings.TEACHER_SERVERS = dict(SERVERS)


def _served(team, user, **fields):
    return records.model_spec_create(team=team, created_by=user, **{
        "name": "served", "source": "server", "task": "causal_lm", "hub_id": "org/teacher",
        "config": {"server": "gpu-pool"}, "num_labels": 0, **fields})


def test_a_served_teacher_is_registered_by_server_name_and_becomes_an_engine_model(team, user, servers):
    spec = _served(team, user)
    config = engine_config.model_config(spec)
    assert config == {"source": "server", "num_labels": 0, "name": "org/teacher",
                      "params": {"server": "gpu-pool"}}
    assert ModelConfig(**config).describe() == "org/teacher"
    assert "127.0.0.1" not in str(config)


@pytest.mark.parametrize(("fields", "key", "message"), [
    ({"config": {"server": "other"}}, "config", r"configured teacher servers \(gpu-pool\)"),
    ({"config": {"server": "http://127.0.0.1:9"}}, "config", "configured teacher servers"),
    ({"task": "classification"}, "task", "causal language models"),
    ({"hub_id": ""}, "hub_id", "Give the model name"),
])
def test_a_served_model_needs_a_configured_server_a_name_and_a_causal_lm(team, user, servers, fields, key,
                                                                          message):
    with pytest.raises(ValidationError) as exc:
        _served(team, user, **fields)
    assert key in exc.value.message_dict
    assert re.search(message, exc.value.message_dict[key][0])


def test_the_model_form_offers_the_configured_servers_only(team, user, servers):
    data = {"team": team.pk, "name": "served", "source": "server", "task": "causal_lm", "server": "gpu-pool",
            "served_model": " org/teacher "}
    form = forms.ModelSpecForm(data, user=user)
    assert form.is_valid(), form.errors
    assert form.service_fields() | {"notes": ""} == {
        "name": "served", "source": "server", "num_labels": 0, "task": "causal_lm", "notes": "",
        "tokenizer_id": "", "hub_id": "org/teacher", "config": {"server": "gpu-pool"}}
    assert form.error_aliases() == {"hub_id": "served_model", "config": "server"}
    form = forms.ModelSpecForm({**data, "server": "http://127.0.0.1:9", "served_model": ""}, user=user)
    assert not form.is_valid()
    assert "server" in form.errors and "served_model" in form.errors


def test_without_configured_servers_the_source_is_a_field_error(team, user, settings, client):
    settings.TEACHER_SERVERS = {}
    client.force_login(user)
    answer = client.post(reverse("experiments:model_create"), {
        "team": team.pk, "name": "served", "source": "server", "task": "causal_lm", "served_model": "m"})
    assert answer.status_code in (200, 400)
    assert "No teacher server is configured" in answer.content.decode()
    assert not ModelSpec.objects.filter(source="server").exists()


def test_preflight_asks_the_server_and_refuses_a_served_student(team, user, servers):
    teacher = _served(team, user)
    student = ModelSpecFactory(team=team, name="student", source="config", builtin_arch="", task="causal_lm",
                               num_labels=0, config=TINY_LLAMA)
    dataset = DatasetSpecFactory(team=team, name="fortunes", builtin_name="fortunes", task="causal_lm",
                                 num_labels=0, label_names=[])
    recipe = RecipeFactory(team=team, name="topk", scheme=Recipe.Scheme.OFFLINE,
                           terms=[{"name": "topk", "weight": 1.0, "params": {"k": 8}}])
    check = preflight.check_served_teachers(dataset=dataset, teacher=teacher, students=[student])
    assert check.level == "warning" and "Teacher server 'gpu-pool' failed after 2 tries" in check.summary
    assert "127.0.0.1" not in check.summary
    report = preflight.experiment_preflight(dataset=dataset, teacher=teacher, students=[student],
                                            recipes=[recipe], seeds=[0], train={"max_steps": 10})
    assert "served" in [c.key for c in report.checks]

    check = preflight.check_served_teachers(dataset=dataset, teacher=student, students=[teacher])
    assert check.level == "error" and "only a teacher can be" in check.summary
    digits = DatasetSpecFactory(team=team, name="digits")
    check = preflight.check_served_teachers(dataset=digits, teacher=teacher, students=[student])
    assert check.level == "error" and "serves causal language models" in check.summary
    assert preflight.check_served_teachers(dataset=dataset, teacher=student, students=[student]) is None
