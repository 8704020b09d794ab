"""The API's leaderboard rows say which students are LoRA-merged, as the page does: ``adapter`` is null for
full fine-tuning, else ``{"kind": "lora", "lora_r": 8, "lora_4bit": false, "merged": true, "label": "LoRA r=8,
merged"}`` (``lora_r`` and ``lora_4bit`` named as in the experiment's training settings); the CSV export has
the ``adapter`` column; the schema documents the field."""

from __future__ import annotations

import csv
import io

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.urls import reverse

from experiments.models import Run
from tests.experiments.selectors.test_leaderboard_lora import _finished
from tests.factories import ExperimentFactory

pytestmark = pytest.mark.django_db


def _url(name: str, **kwargs) -> str:
    return reverse(f"api:{name}", kwargs=kwargs)


@pytest.fixture
def boards(team, digits_setup):
    """A LoRA experiment (r=8), a QLoRA one (r=16) and a full fine-tuning one (no lora_r, and lora_r 0)."""
    student, recipe, dataset = digits_setup["students"][0], digits_setup["recipe"], digits_setup["dataset"]
    made = {}
    for name, train in (("lora", {"lora_r": 8}), ("qlora", {"lora_r": 16, "lora_4bit": True}), ("full", {})):
        made[name] = ExperimentFactory(team=team, dataset=dataset, name=name,
                                       train={"max_steps": 20, **train})
    _finished(made["lora"], student, recipe, train={"lora_r": 8, "lora_4bit": False}, accuracy=0.9)
    _finished(made["qlora"], student, recipe, train={"lora_r": 16, "lora_4bit": True}, accuracy=0.85)
    _finished(made["full"], student, recipe, train={}, accuracy=0.8)
    _finished(made["full"], student, recipe, train={"lora_r": 0}, accuracy=0.82, seed=1)
    return made


def test_rows_carry_the_adapter_structured(api, digits_setup, boards):
    body = api.get(_url("leaderboard_detail", pk=digits_setup["dataset"].pk)).json()

    by_name = {r["experiment"]["name"]: r for r in body["results"]}
    assert by_name["lora"]["adapter"] == {
        "kind": "lora", "lora_r": 8, "lora_4bit": False, "merged": True, "label": "LoRA r=8, merged",
    }
    assert by_name["qlora"]["adapter"] == {
        "kind": "lora", "lora_r": 16, "lora_4bit": True, "merged": True, "label": "LoRA r=16, 4-bit, merged",
    }
    assert by_name["full"]["adapter"] is None and by_name["full"]["seeds"] == 2


def test_the_adapter_costs_the_api_no_extra_query(api, digits_setup, boards):
    url = _url("leaderboard_detail", pk=digits_setup["dataset"].pk)
    assert api.get(url).status_code == 200  # the token's first use is recorded once
    with CaptureQueriesContext(connection) as with_lora:
        assert api.get(url).status_code == 200
    Run.objects.filter(experiment__name__in=["lora", "qlora"]).delete()
    with CaptureQueriesContext(connection) as without:
        assert api.get(url).status_code == 200

    assert len(with_lora.captured_queries) == len(without.captured_queries)


def test_the_api_csv_export_has_the_adapter_column(api, digits_setup, boards):
    response = api.get(_url("leaderboard_export", pk=digits_setup["dataset"].pk))

    assert response.status_code == 200
    header, *rows = list(csv.reader(io.StringIO(response.content.decode())))
    col = {name: i for i, name in enumerate(header)}
    assert {r[col["experiment"]]: r[col["adapter"]] for r in rows} == {
        "lora": "LoRA r=8, merged",
        "qlora": "LoRA r=16, 4-bit, merged",
        "full": "",
    }


def test_the_schema_documents_the_adapter(anonymous):
    schema = anonymous.get(_url("schema"), {"format": "json"}).json()
    components = schema["components"]["schemas"]

    row = components["LeaderboardRow"]
    field = row["properties"]["adapter"]
    assert "adapter" in row["required"] and field["nullable"] is True
    [ref] = [part["$ref"] for part in field.get("allOf", [field]) if "$ref" in part]
    adapter = components[ref.rsplit("/", 1)[-1]]
    assert set(adapter["properties"]) == {"kind", "lora_r", "lora_4bit", "merged", "label"}
    assert set(adapter["required"]) == set(adapter["properties"])
    assert adapter["properties"]["lora_r"]["type"] == "integer"
    assert adapter["properties"]["lora_4bit"]["type"] == "boolean"
