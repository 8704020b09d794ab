"""The leaderboard's CSV export says which students are LoRA-merged, as the page does: an ``adapter`` column
with the page's label ("LoRA r=8, merged", "LoRA r=16, 4-bit, merged"), empty for full fine-tuning."""

from __future__ import annotations

import csv
import io

import pytest
from django.urls import reverse

from experiments import export
from experiments.selectors import leaderboard as leaderboard_reads
from tests.experiments.selectors import test_leaderboard_lora as lora_boards

pytestmark = pytest.mark.django_db


boards = lora_boards.boards  # the LoRA, QLoRA, full fine-tuning and rank-sweep experiments


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
