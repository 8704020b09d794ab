"""Latency and speedup on the run, compare and leaderboard pages: a latency with its spread and the setting it
was measured in, a speedup only with its interval, CPU / shared-host figures marked as such."""

from __future__ import annotations

import pytest
from django.urls import reverse
from django.utils import timezone

from experiments.domain.compare import latency_of, speedup
from experiments.models import Evaluation, Run
from tests.factories import ExperimentFactory, RunFactory

pytestmark = pytest.mark.django_db

CPU = {"device": "cpu", "threads": 1, "batch": 1, "throughput_batch": 32, "seq_len": None,
       "throughput_seq_len": None, "shared_host": True}


def _efficiency(median: float, *, setting: dict | None = CPU) -> dict:
    metrics = {"latency_ms_p50": median, "latency_ms_p25": 0.95 * median, "latency_ms_p75": 1.05 * median,
               "latency_ms_min": 0.9 * median, "latency_ms_max": 1.3 * median, "latency_ms_p95": 1.2 * median}
    return metrics | ({"efficiency_setting": setting} if setting else {})


@pytest.fixture
def board(team, digits_setup):
    experiment = ExperimentFactory(team=team, dataset=digits_setup["dataset"],
                                   teacher=digits_setup["teacher"], seeds=[0])
    Evaluation.objects.create(team=team, role=Evaluation.Role.TEACHER, model=digits_setup["teacher"],
                              dataset=experiment.dataset, split_key="k", accuracy=0.95, param_count=8000,
                              latency_ms=2.0, metrics={"accuracy": 0.95, **_efficiency(2.0)})
    runs = []
    for student, latency, metrics in ((digits_setup["students"][0], 0.5, _efficiency(0.5)),
                                      (digits_setup["students"][1], 0.8, {})):  # an old evaluation: no spread
        run = RunFactory(experiment=experiment, student=student, recipe=digits_setup["recipe"], seed=0,
                         teacher=digits_setup["teacher"],
                         status=Run.Status.SUCCEEDED, finished_at=timezone.now())
        Evaluation.objects.create(team=team, role=Evaluation.Role.STUDENT, run=run, model=student,
                                  dataset=experiment.dataset, split_key="k", accuracy=0.9, param_count=2000,
                                  latency_ms=latency, metrics={"accuracy": 0.9, **metrics})
        runs.append(run)
    return {"experiment": experiment, "runs": runs}


def test_identical_latencies_give_an_interval_around_one():
    a, b = latency_of(_efficiency(0.5)), latency_of(_efficiency(0.52))
    ratio = speedup(a, b)
    assert ratio is not None and ratio.contains(1.0) and ratio.low < ratio.value < ratio.high
    assert ratio.mark == "CPU, shared host" and ratio.comparable
    assert speedup(latency_of({"latency_ms_p50": 2.0}), b) is None  # no spread, no speedup
    gpu = latency_of(_efficiency(0.5, setting={**CPU, "device": "cuda:NVIDIA H100", "shared_host": False}))
    assert gpu.mark == "" and not speedup(gpu, b).comparable


def test_the_leaderboard_shows_a_speedup_only_with_its_interval_and_marks_cpu(client_logged_in, board):
    response = client_logged_in.get(reverse("experiments:leaderboard",
                                            kwargs={"dataset_id": board["experiment"].dataset_id}))
    rows = {r.run_ids[0]: r for r in response.context["rows"]}
    timed, old = rows[board["runs"][0].pk], rows[board["runs"][1].pk]
    interval = timed.speedup_interval
    assert interval.value == pytest.approx(4.0)
    assert interval.low == pytest.approx(1.8 / 0.65) and interval.high == pytest.approx(2.6 / 0.45)
    assert old.speedup_interval is None and old.speedup == pytest.approx(2.5)  # the API keeps the bare ratio
    html = response.content.decode()
    assert "4× <span class=\"muted small\" data-speedup-interval>[2.77–5.78×]</span>" in html
    assert "0.5 ms <span class=\"muted small\" data-latency-spread>[0.475–0.525]</span>" in html
    assert html.count("data-cpu-mark") == html.count(">CPU, shared host</span>") == 2  # latency + speedup
    assert "2.5×" not in html  # the old row's bare ratio is not shown


def test_the_compare_page_shows_latency_spread_speedup_interval_and_the_cpu_mark(client_logged_in, board):
    ids = ",".join(str(r.pk) for r in board["runs"])
    html = client_logged_in.get(reverse("experiments:compare"), {"runs": ids}).content.decode()
    assert "data-speedup-interval>[2.77–5.78×]" in html
    assert "2 ms <span class=\"muted small\" data-latency-spread>[1.9–2.1]</span>" in html  # the teacher
    assert "0.8 ms" in html and ">CPU, shared host</span>" in html
    assert "cpu · 1 thread · batch 1 · shared host" in html  # the setting, in the cell's title


def test_the_run_page_shows_the_latency_with_its_setting(client_logged_in, board):
    run = board["runs"][0]
    html = client_logged_in.get(reverse("experiments:run_detail", kwargs={"run_id": run.pk})).content.decode()
    assert "0.5 ms <span class=\"muted small\" data-latency-spread>[0.475–0.525]</span>" in html
    assert "data-cpu-mark" in html and "cpu · 1 thread · batch 1 · shared host" in html
    assert "efficiency_setting" not in html  # shown in the latency cell, not as a raw JSON metric
