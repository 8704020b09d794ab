"""The leaderboard's CSV export says which students are LoRA-merged, as the page does: an ``adapter`` column
with the page's label ("LoRA r=8, merged", "LoRA r=16, 4-bit, merged"), empty for full fine-tuning."""

from __future__ import annotations

import csv
import io

import pytest
from django.urls import reverse
from django.utils import timezone

from experiments import export
from experiments.models import Evaluation, Run
from experiments.selectors import leaderboard as leaderboard_reads
from tests.factories import ExperimentFactory, RunFactory

pytestmark = pytest.mark.django_db


def _finished(experiment, student, recipe, *, train, accuracy, seed=0):
    now = timezone.now()
    run = RunFactory(experiment=experiment, student=student, recipe=recipe, seed=seed,
                     config={"train": {"max_steps": 20, **train}}, status=Run.Status.SUCCEEDED,
                     started_at=now, finished_at=now, step=20, total_steps=20)
    Evaluation.objects.create(team=experiment.team, role=Evaluation.Role.STUDENT, run=run, model=student,
                              dataset=experiment.dataset, split_key="k", accuracy=accuracy, param_count=1000,
                              latency_ms=0.5)
    return run


@pytest.fixture
def boards(team, digits_setup):
    """A LoRA experiment (r=8), a QLoRA one (r=16), a full fine-tuning one and one that sweeps the rank."""
    student, recipe, dataset = digits_setup["students"][0], digits_setup["recipe"], digits_setup["dataset"]
    made = {}
    for name, train in (("lora", {"lora_r": 8}), ("qlora", {"lora_r": 16, "lora_4bit": True}), ("full", {}),
                        ("swept", {"lora_r": [4, 32]})):
        made[name] = ExperimentFactory(team=team, dataset=dataset, name=name,
                                       train={"max_steps": 20, **train})
    _finished(made["lora"], student, recipe, train={"lora_r": 8, "lora_4bit": False}, accuracy=0.9)
    _finished(made["qlora"], student, recipe, train={"lora_r": 16, "lora_4bit": True}, accuracy=0.85)
    _finished(made["full"], student, recipe, train={}, accuracy=0.8)
    _finished(made["full"], student, recipe, train={"lora_r": 0}, accuracy=0.82, seed=1)
    for rank, accuracy in ((4, 0.7), (32, 0.75)):
        _finished(made["swept"], student, recipe, train={"lora_r": rank}, accuracy=accuracy)
    return made


EXPECTED = {
    ("lora", ""): "LoRA r=8, merged",
    ("qlora", ""): "LoRA r=16, 4-bit, merged",
    ("full", ""): "",
    ("swept", "lora_r=4"): "LoRA r=4, merged",
    ("swept", "lora_r=32"): "LoRA r=32, merged",
}


def test_the_pages_csv_export_has_the_adapter_column(client_logged_in, digits_setup, boards):
    url = reverse("experiments:leaderboard", kwargs={"dataset_id": digits_setup["dataset"].pk})
    response = client_logged_in.get(url, {"format": "csv"})

    assert response.status_code == 200
    header, *rows = list(csv.reader(io.StringIO(response.content.decode())))
    assert header == export.LEADERBOARD_CSV_HEADER and "adapter" in header
    col = {name: i for i, name in enumerate(header)}
    # Next to the other settings that tell a row's runs apart (the sweep point).
    assert col["adapter"] == col["sweep"] + 1
    assert {(r[col["experiment"]], r[col["sweep"]]): r[col["adapter"]] for r in rows} == EXPECTED


def test_the_csv_cell_is_the_rows_label(user, digits_setup, boards):
    board = leaderboard_reads.leaderboard(user=user, dataset=digits_setup["dataset"])
    metric = leaderboard_reads.primary_metric(digits_setup["dataset"])

    header, *lines = export.leaderboard_csv_lines(board, metric=metric, config_url=str)

    cells = [line[header.index("adapter")] for line in lines]
    assert cells == [row.adapter for row in board]  # the page's own label, not a second wording
    assert {(r.experiment.name, r.sweep): cell for r, cell in zip(board, cells, strict=True)} == EXPECTED
