"""A run's resources through the API: accepted and refused with field errors like the page, documented in
the OpenAPI schema, and kept by a YAML export and import."""

from __future__ import annotations

from unittest import mock

import pytest
import yaml
from django.urls import reverse

from experiments.domain.validation import MULTI_HOST_MESSAGE
from experiments.models import Experiment
from tests.api.conftest import DISPATCH

pytestmark = pytest.mark.django_db

YAML = "application/yaml"
RESOURCE_KEYS = ("gpus", "processes", "strategy", "precision", "activation_checkpointing")


def _url(name: str, **kwargs) -> str:
    return reverse(f"api:{name}", kwargs=kwargs)


def _body(setup, **extra):
    return {
        "name": "resources",
        "dataset": setup["dataset"].pk,
        "teacher": setup["teacher"].pk,
        "students": [setup["students"][0].pk],
        "recipes": [setup["recipe"].pk],
        "seeds": [0],
        "max_steps": 10,
        "batch_size": 32,
        **extra,
    }


def test_the_api_accepts_the_resources_and_freezes_them(api, digits_setup):
    with mock.patch(DISPATCH):
        response = api.post(_url("experiment_list"), _body(
            digits_setup, gpus=4, processes=2, strategy="fsdp", precision=["bf16", "fp32"],
            activation_checkpointing=[False, True]))

    assert response.status_code == 201, response.json()
    experiment = Experiment.objects.get(pk=response.json()["id"])
    assert experiment.train["strategy"] == "fsdp"
    configs = [r.config["train"] for r in experiment.runs.all()]
    assert len(configs) == 2 * 2 * 2  # (kd + baseline) × 2 precisions × checkpointing off and on
    assert {(c["precision"], c["activation_checkpointing"]) for c in configs} == {
        ("bf16", False), ("bf16", True), ("fp32", False), ("fp32", True)}
    assert all((c["gpus"], c["processes"], c["strategy"]) == (4, 2, "fsdp") for c in configs)


@pytest.mark.parametrize(("extra", "field", "message"), [
    ({"gpus": 16}, "gpus", MULTI_HOST_MESSAGE),
    ({"gpus": [2, 12]}, "gpus", MULTI_HOST_MESSAGE),
    ({"processes": 0}, "processes", "Ensure this value is greater than or equal to 1."),
    ({"strategy": "zero3"}, "strategy", "Choose one of: auto, ddp, fsdp (or a list of them, a sweep)."),
    ({"precision": ["bf16", "fp16"]}, "precision",
     "Choose one of: auto, bf16, fp32 (or a list of them, a sweep)."),
    ({"activation_checkpointing": "maybe"}, "activation_checkpointing",
     "Give true or false, or both as a list [false, true] (a sweep)."),
    ({"gpus": 3}, "batch_size",
     "The batch is split evenly over the run's ranks: batch size 32 does not divide by 3 GPUs (one rank per "
     "GPU). Give a multiple of 3."),
    ({"processes": 6, "batch_size": 64}, "batch_size",
     "The batch is split evenly over the run's ranks: batch size 64 does not divide by 6 CPU processes. "
     "Give a multiple of 6."),
])
def test_the_api_refuses_bad_resources_on_their_field(api, digits_setup, extra, field, message):
    with mock.patch(DISPATCH):
        response = api.post(_url("experiment_list"), _body(digits_setup, **extra))

    assert response.status_code == 400
    assert response.json()[field] == [message]
    assert not Experiment.objects.exists()


def test_a_value_of_the_wrong_type_is_refused(api, digits_setup):
    body = _body(digits_setup, strategy=True, activation_checkpointing=3)
    response = api.post(_url("experiment_list"), body)

    assert response.status_code == 400
    assert set(response.json()) == {"strategy", "activation_checkpointing"}


def test_the_schema_documents_the_resource_keys(anonymous):
    schema = anonymous.get(_url("schema"), {"format": "json"}).json()

    body = schema["components"]["schemas"]["ExperimentCreateRequest"]["properties"]
    for key in RESOURCE_KEYS:
        assert key in body, key
        assert body[key].get("description"), key
    assert "multi-host" not in body["gpus"]["description"]  # the bound is stated, the reason in the error
    assert "[1, 8]" in body["gpus"]["description"]
    assert {"type": "string", "enum": ["auto", "ddp", "fsdp"]} in body["strategy"]["oneOf"]
    assert {"type": "string", "enum": ["auto", "bf16", "fp32"]} in body["precision"]["oneOf"]
    assert {"type": "boolean"} in body["activation_checkpointing"]["oneOf"]


def test_yaml_round_trip_keeps_the_resources(api, digits_setup, django_capture_on_commit_callbacks):
    with mock.patch(DISPATCH):
        created = api.post(_url("experiment_list"), _body(
            digits_setup, gpus=2, strategy=["ddp", "fsdp"], precision="fp32", activation_checkpointing=True,
        )).json()
    original = Experiment.objects.get(pk=created["id"])
    exported = api.get(_url("experiment_export", pk=original.pk)).content

    train = yaml.safe_load(exported)["train"]
    assert {k: train[k] for k in RESOURCE_KEYS} == {"gpus": 2, "processes": 1, "strategy": ["ddp", "fsdp"],
                                                    "precision": "fp32", "activation_checkpointing": True}
    with mock.patch(DISPATCH), django_capture_on_commit_callbacks(execute=True):
        response = api.post(_url("experiment_import"), exported, content_type=YAML)

    assert response.status_code == 201, response.json()
    copy = Experiment.objects.get(pk=response.json()["id"])
    assert {k: copy.train.get(k) for k in RESOURCE_KEYS} == {
        "gpus": 2, "processes": 1, "strategy": ["ddp", "fsdp"], "precision": "fp32",
        "activation_checkpointing": True}
    assert sorted(r.config["train"]["strategy"] for r in copy.runs.all()) == \
        sorted(r.config["train"]["strategy"] for r in original.runs.all())


def test_yaml_import_refuses_a_bad_resource_on_its_field(api, digits_setup):
    document = yaml.safe_dump({
        "kind": "experiment", "name": "bad", "dataset": digits_setup["dataset"].name,
        "teacher": digits_setup["teacher"].name, "students": [digits_setup["students"][0].name],
        "recipes": [digits_setup["recipe"].name], "seeds": [0], "train": {"gpus": 9},
    })

    response = api.post(_url("experiment_import"), document, content_type=YAML)

    assert response.status_code == 400
    assert response.json()["gpus"] == [MULTI_HOST_MESSAGE]
