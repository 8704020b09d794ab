"""Leaderboard rows of swept experiments: one row per point of the sweep (seeds averaged within a point),
labelled with the point, and KD gain against the baseline trained with the same training settings."""

from __future__ import annotations

import csv
import io
from unittest import mock

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.urls import reverse
from django.utils import timezone

from experiments.models import Evaluation, Experiment, Run
from experiments.selectors import leaderboard as leaderboard_reads
from experiments.services import launch

pytestmark = pytest.mark.django_db

DISPATCH = "experiments.services.dispatch._dispatch"


def _launch(digits_setup, team, user, *, train, term_sweeps=None, seeds=(0, 1), name="sweep") -> Experiment:
    with mock.patch(DISPATCH):
        return launch.experiment_create(
            team=team,
            created_by=user,
            name=name,
            dataset=digits_setup["dataset"],
            teacher=digits_setup["teacher"],
            students=digits_setup["students"][:1],
            recipes=[digits_setup["recipe"]],
            seeds=list(seeds),
            train={"max_steps": 10, **train},
            term_sweeps=term_sweeps or {},
            # These tests write each run's evaluation by hand: an identical baseline is trained, not reused.
            reuse_baselines=False,
        )


def _finish(run: Run, accuracy: float, *, params: int = 1000) -> None:
    now = timezone.now()
    Run.objects.filter(pk=run.pk).update(status=Run.Status.SUCCEEDED, started_at=now, finished_at=now,
                                         step=run.total_steps)
    Evaluation.objects.create(team=run.team, role=Evaluation.Role.STUDENT, run=run, model=run.student,
                              dataset=run.experiment.dataset, split_key="k", accuracy=accuracy,
                              param_count=params, latency_ms=0.5)


def _finish_all(experiment: Experiment, accuracy) -> None:
    """Finish every run with ``accuracy(run)`` (None leaves the run unfinished)."""
    for run in experiment.runs.select_related("experiment__dataset", "team", "student"):
        value = accuracy(run)
        if value is not None:
            _finish(run, value)


def _rows(user, experiment) -> list[leaderboard_reads.LeaderboardRow]:
    return leaderboard_reads.leaderboard(user=user, dataset=experiment.dataset)


def _by_label(rows) -> dict[tuple[bool, str], leaderboard_reads.LeaderboardRow]:
    table = {(r.is_baseline, r.sweep): r for r in rows}
    assert len(table) == len(rows), "two rows share a (baseline, sweep) label"
    return table


# Accuracies per (baseline?, lr, seed): the two learning rates give clearly different scores.
LR_SCORES = {
    (False, 1e-4, 0): 0.80, (False, 1e-4, 1): 0.84,
    (False, 3e-4, 0): 0.90, (False, 3e-4, 1): 0.92,
    (True, 1e-4, 0): 0.75, (True, 1e-4, 1): 0.77,
    (True, 3e-4, 0): 0.70, (True, 3e-4, 1): 0.70,
}


def _lr_score(run: Run) -> float | None:
    return LR_SCORES.get((run.is_baseline, run.config["train"]["lr"], run.seed))


def test_each_swept_learning_rate_is_a_row_over_its_own_seeds(digits_setup, team, user):
    experiment = _launch(digits_setup, team, user, train={"lr": [1e-4, 3e-4]})
    assert experiment.runs.count() == 2 * 2 * 2  # lr × seeds × (kd + baseline)
    _finish_all(experiment, _lr_score)

    rows = _rows(user, experiment)

    table = _by_label(rows)
    assert set(table) == {(False, "lr=1e-4"), (False, "lr=3e-4"), (True, "lr=1e-4"), (True, "lr=3e-4")}
    assert all(r.seeds == 2 for r in rows)
    low, high = table[(False, "lr=1e-4")], table[(False, "lr=3e-4")]
    assert low.mean == pytest.approx(0.82) and low.std == pytest.approx(0.0282843, abs=1e-6)
    assert high.mean == pytest.approx(0.91) and high.std == pytest.approx(0.0141421, abs=1e-6)
    assert table[(True, "lr=1e-4")].mean == pytest.approx(0.76)
    assert table[(True, "lr=3e-4")].mean == pytest.approx(0.70) and table[(True, "lr=3e-4")].std == 0.0
    # KD gain against the baseline with the same learning rate and seed.
    assert low.kd_gain == pytest.approx(0.06) and low.kd_gain_std == pytest.approx(0.0141421, abs=1e-6)
    assert high.kd_gain == pytest.approx(0.21)
    assert table[(True, "lr=1e-4")].kd_gain is None
    # Each row holds the runs of its own point.
    for row in rows:
        assert {Run.objects.get(pk=i).config["train"]["lr"] for i in row.run_ids} == \
            {1e-4 if row.sweep == "lr=1e-4" else 3e-4}
    assert [r.rank for r in rows] == [1, 2, 3, 4] and rows[0] is high


def test_term_sweep_points_are_rows_and_share_the_experiments_baseline(digits_setup, team, user):
    experiment = _launch(digits_setup, team, user, train={}, term_sweeps={"kd.temperature": [2.0, 8.0]})
    assert experiment.runs.count() == 2 * (2 + 1)  # seeds × (kd at two temperatures + one baseline)
    scores = {(2.0, 0): 0.80, (2.0, 1): 0.82, (8.0, 0): 0.88, (8.0, 1): 0.90}

    def score(run: Run) -> float:
        if run.is_baseline:
            return 0.75 if run.seed == 0 else 0.79
        return scores[(run.config["terms"][1]["params"]["temperature"], run.seed)]

    _finish_all(experiment, score)

    table = _by_label(_rows(user, experiment))

    assert set(table) == {(False, "τ=2"), (False, "τ=8"), (True, "")}  # baselines have no term sweep
    assert table[(False, "τ=2")].mean == pytest.approx(0.81) and table[(False, "τ=2")].seeds == 2
    assert table[(False, "τ=8")].mean == pytest.approx(0.89)
    assert table[(False, "τ=2")].kd_gain == pytest.approx(0.04)  # (0.80 - 0.75 + 0.82 - 0.79) / 2
    assert table[(False, "τ=8")].kd_gain == pytest.approx(0.12)
    assert table[(True, "")].seeds == 2 and table[(True, "")].mean == pytest.approx(0.77)


def test_training_and_term_sweeps_together_label_both_values(digits_setup, team, user):
    experiment = _launch(digits_setup, team, user, train={"lr": [1e-4, 3e-4]},
                         term_sweeps={"kd.temperature": [2.0, 8.0]}, seeds=(0,))
    _finish_all(experiment, lambda run: 0.7 if run.is_baseline else
                0.8 + (0.1 if run.config["train"]["lr"] == 3e-4 else 0)
                + (0.05 if run.config["terms"][1]["params"]["temperature"] == 8.0 else 0))

    table = _by_label(_rows(user, experiment))

    assert set(table) == {(False, "lr=1e-4 τ=2"), (False, "lr=1e-4 τ=8"), (False, "lr=3e-4 τ=2"),
                          (False, "lr=3e-4 τ=8"), (True, "lr=1e-4"), (True, "lr=3e-4")}
    assert table[(False, "lr=3e-4 τ=8")].mean == pytest.approx(0.95)
    assert table[(False, "lr=3e-4 τ=8")].kd_gain == pytest.approx(0.25)


def test_without_a_baseline_at_the_same_settings_kd_gain_uses_the_experiments_baseline(
    digits_setup, team, user
):
    experiment = _launch(digits_setup, team, user, train={"lr": [1e-4, 3e-4]})
    # The baseline at lr=3e-4 never finished: only the lr=1e-4 one is on the leaderboard.
    _finish_all(experiment, lambda run: None if run.is_baseline and run.config["train"]["lr"] == 3e-4
                else _lr_score(run))

    table = _by_label(_rows(user, experiment))

    assert set(table) == {(False, "lr=1e-4"), (False, "lr=3e-4"), (True, "lr=1e-4")}
    assert table[(False, "lr=1e-4")].kd_gain == pytest.approx(0.06)
    assert table[(False, "lr=3e-4")].kd_gain == pytest.approx((0.90 - 0.75 + 0.92 - 0.77) / 2)


def test_no_gain_when_the_experiments_baseline_is_ambiguous(digits_setup, team, user):
    experiment = _launch(digits_setup, team, user, train={"lr": [1e-4, 3e-4, 1e-3]}, seeds=(0,))
    scores = {1e-4: 0.7, 3e-4: 0.6}
    # Baselines finished at two of the three learning rates: none is "the" baseline of lr=1e-3.
    _finish_all(experiment, lambda run: scores.get(run.config["train"]["lr"]) if run.is_baseline else 0.8)

    table = _by_label(_rows(user, experiment))

    assert table[(False, "lr=1e-4")].kd_gain == pytest.approx(0.1)
    assert table[(False, "lr=3e-4")].kd_gain == pytest.approx(0.2)
    assert table[(False, "lr=1e-3")].kd_gain is None


def test_an_experiment_without_a_sweep_keeps_one_row_per_recipe(digits_setup, team, user):
    experiment = _launch(digits_setup, team, user, train={"lr": 3e-4}, name="plain")
    _finish_all(experiment, _lr_score)

    rows = _rows(user, experiment)

    assert [(r.is_baseline, r.sweep, r.seeds) for r in rows] == [(False, "", 2), (True, "", 2)]
    assert rows[0].kd_gain == pytest.approx(0.21)


def test_page_csv_and_api_show_the_sweep_label(client_logged_in, digits_setup, team, user):
    from api.services import api_token_create

    experiment = _launch(digits_setup, team, user, train={"lr": [1e-4, 3e-4]})
    _finish_all(experiment, _lr_score)
    url = reverse("experiments:leaderboard", args=[experiment.dataset_id])

    page = client_logged_in.get(url)
    exported = client_logged_in.get(url, {"format": "csv"})
    token = api_token_create(user=user, name="lb")[1]
    api = client_logged_in.get(reverse("api:leaderboard_detail", args=[experiment.dataset_id]),
                               headers={"Authorization": f"Bearer {token}"})

    html = page.content.decode()
    assert html.count(">lr=1e-4</span>") == 2 and html.count(">lr=3e-4</span>") == 2
    header, *lines = list(csv.reader(io.StringIO(exported.content.decode())))
    assert sorted(line[header.index("sweep")] for line in lines) == [
        "lr=1e-4",
        "lr=1e-4",
        "lr=3e-4",
        "lr=3e-4",
    ]
    assert sorted((r["is_baseline"], r["sweep"], r["seeds"]) for r in api.json()["results"]) == [
        (False, "lr=1e-4", 2), (False, "lr=3e-4", 2), (True, "lr=1e-4", 2), (True, "lr=3e-4", 2)]


def test_the_page_runs_as_many_queries_for_many_sweep_points_as_for_one(client_logged_in, digits_setup, team,
                                                                        user):
    url = reverse("experiments:leaderboard", args=[digits_setup["dataset"].pk])

    def count() -> int:
        with CaptureQueriesContext(connection) as ctx:
            assert client_logged_in.get(url).status_code == 200
        return len(ctx.captured_queries)

    few = _launch(digits_setup, team, user, train={"lr": 1e-3}, seeds=(0,), name="one point")
    _finish_all(few, lambda run: 0.8)
    client_logged_in.get(url)  # warm per-process caches
    one_point = count()
    many = _launch(digits_setup, team, user, train={"lr": [1e-4, 3e-4, 1e-3], "batch_size": [32, 64]},
                   term_sweeps={"kd.temperature": [2.0, 8.0]}, seeds=(0, 1), name="many points")
    _finish_all(many, lambda run: 0.7 if run.is_baseline else 0.8)

    assert count() == one_point
    assert len(leaderboard_reads.leaderboard(user=user, dataset=digits_setup["dataset"])) == 2 + 6 * 2 + 6
