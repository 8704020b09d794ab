"""The leaderboard says which students are LoRA-merged: a run with ``lora_r`` > 0 exports its adapters merged
into the weights, and its row carries "LoRA r=8, merged" (read from the run's frozen config, in the same
query as the rest of the row)."""

from __future__ import annotations

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
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


def test_rows_say_whether_their_student_is_lora_merged(user, digits_setup, boards):
    rows = leaderboard_reads.leaderboard(user=user, dataset=digits_setup["dataset"])

    by_name = {(r.experiment.name, r.sweep): r for r in rows}
    assert {key: (r.lora_r, r.adapter) for key, r in by_name.items()} == {
        ("lora", ""): (8, "LoRA r=8, merged"),
        ("qlora", ""): (16, "LoRA r=16, 4-bit, merged"),
        ("full", ""): (0, ""),
        ("swept", "lora_r=4"): (4, "LoRA r=4, merged"),
        ("swept", "lora_r=32"): (32, "LoRA r=32, merged"),
    }
    assert by_name[("full", "")].seeds == 2  # a config without lora_r and one with 0 are one full-FT row


def test_the_adapter_costs_no_extra_query(user, digits_setup, boards):
    with CaptureQueriesContext(connection) as with_lora:
        leaderboard_reads.leaderboard(user=user, dataset=digits_setup["dataset"])
    Run.objects.filter(experiment__name__in=["lora", "qlora", "swept"]).delete()
    with CaptureQueriesContext(connection) as without:
        leaderboard_reads.leaderboard(user=user, dataset=digits_setup["dataset"])

    assert len(with_lora.captured_queries) == len(without.captured_queries)


def test_the_leaderboard_page_shows_the_lora_badge(client_logged_in, digits_setup, boards):
    url = reverse("experiments:leaderboard", args=[digits_setup["dataset"].pk])
    html = client_logged_in.get(url).content.decode()

    assert html.count("data-adapter") == 4
    assert ">LoRA r=8, merged</span>" in html and ">LoRA r=16, 4-bit, merged</span>" in html


def test_the_model_card_of_a_lora_run_says_the_adapter_is_merged(digits_setup, boards):
    lora_run = boards["lora"].runs.get()
    full_run = boards["full"].runs.filter(seed=0).get()

    def card(run):
        return export.model_card(run=run, fmt="transformers", meta={}, folder_name="student", student=None,
                                 teacher=None, baseline=None)

    lora_card, full_card = card(lora_run), card(full_run)
    assert "- Adapter: LoRA r=8, merged into these weights" in lora_card
    # The adapter line sits with the models, after the student.
    assert lora_card.index("- Student: ") < lora_card.index("- Adapter: ") < lora_card.index("- Teacher: ")
    assert "- Adapter:" not in full_card
