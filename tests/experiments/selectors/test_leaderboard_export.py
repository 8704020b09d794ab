"""Leaderboards: benchmark (split + metric), filters, Pareto flags, team and global views, CSV export, and the
run config JSON the rows link to."""

import csv
import io
import itertools
import json

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.urls import reverse
from django.utils import timezone

from experiments import export
from experiments.domain import leaderboard
from experiments.models import Evaluation, ModelSpec, Recipe, Run
from experiments.selectors import leaderboard as leaderboard_reads
from tests.factories import (
    DatasetSpecFactory,
    ExperimentFactory,
    MembershipFactory,
    ModelSpecFactory,
    RecipeFactory,
    RunFactory,
)

pytestmark = pytest.mark.django_db

_names = itertools.count()


def _succeeded(experiment, student, recipe, seed, accuracy, *, baseline=False, params=1000, latency=0.5,
               split_key="k", macro_f1=None):
    run = RunFactory(experiment=experiment, student=student, recipe=recipe, seed=seed, is_baseline=baseline,
                     status=Run.Status.SUCCEEDED, step=20, total_steps=20, finished_at=timezone.now(),
                     config={"dataset": {"source": "builtin", "name": "digits", "eval_fraction": 0.2,
                                         "split_seed": 0, "max_length": 128}, "train": {"seed": seed}})
    metrics = {"accuracy": accuracy, "macro_f1": accuracy - 0.1 if macro_f1 is None else macro_f1}
    Evaluation.objects.create(team=experiment.team, role=Evaluation.Role.STUDENT, run=run, model=student,
                              dataset=experiment.dataset, split_key=split_key, accuracy=accuracy,
                              param_count=params, latency_ms=latency, metrics=metrics)
    return run


def _baseline_recipe(team):
    return RecipeFactory(team=team, name="hard_labels", scheme=Recipe.Scheme.HARD_LABELS,
                         terms=[{"name": "ce", "weight": 1.0, "params": {}}])


def _url(dataset, **params):
    url = reverse("experiments:leaderboard", kwargs={"dataset_id": dataset.pk})
    return url, params


def _get(client, dataset, **params):
    url, params = _url(dataset, **params)
    return client.get(url, params)


def _csv(client, dataset, **params):
    response = _get(client, dataset, format="csv", **params)
    assert response.status_code == 200
    return list(csv.reader(io.StringIO(response.content.decode())))


@pytest.fixture
def board(team, digits_setup):
    """On digits (teacher 0.9, 8000 params): two MLP students with kd and the baseline over seeds, and a BERT
    student whose record names would be spreadsheet formulas."""
    dataset, teacher, kd = digits_setup["dataset"], digits_setup["teacher"], digits_setup["recipe"]
    s1, s2 = digits_setup["students"]
    base = _baseline_recipe(team)
    experiment = ExperimentFactory(team=team, dataset=dataset, teacher=teacher, name="digits sweep")
    Evaluation.objects.create(team=team, role=Evaluation.Role.TEACHER, model=teacher, dataset=dataset,
                              split_key="k", accuracy=0.9, param_count=8000, latency_ms=2.0,
                              metrics={"accuracy": 0.9, "macro_f1": 0.88})
    runs = {
        "s1-kd": [
            _succeeded(experiment, s1, kd, 0, 0.85, params=2000),
            _succeeded(experiment, s1, kd, 1, 0.87, params=2000),
        ],
        "s1-base": [
            _succeeded(experiment, s1, base, 0, 0.80, baseline=True, params=2000),
            _succeeded(experiment, s1, base, 1, 0.82, baseline=True, params=2000),
        ],
        "s2-kd": [_succeeded(experiment, s2, kd, 0, 0.70, params=500, latency=0.2)],
        "s2-base": [_succeeded(experiment, s2, base, 0, 0.72, baseline=True, params=500, latency=0.2)],
    }
    bert = ModelSpecFactory(
        team=team,
        name='=HYPERLINK("http://evil.example","x")',
        source=ModelSpec.Source.CONFIG,
        builtin_arch="",
        config={"model_type": "bert", "hidden_size": 32},
    )
    evil_recipe = RecipeFactory(team=team, name="@SUM(A1)")
    evil_experiment = ExperimentFactory(team=team, dataset=dataset, teacher=teacher, name="-1+2")
    runs["bert"] = [_succeeded(evil_experiment, bert, evil_recipe, 0, 0.95, params=50_000, latency=3.0)]
    return {"dataset": dataset, "runs": runs, "s1": s1, "s2": s2, "bert": bert, "kd": kd, "base": base}


# --- CSV ------------------------------------------------------------------------------------------
def test_csv_export_has_every_row_with_links_to_each_runs_config(client_logged_in, board):
    response = _get(client_logged_in, board["dataset"], format="csv")

    assert response["Content-Type"] == "text/csv; charset=utf-8"
    assert response["Content-Disposition"].startswith('attachment; filename="leaderboard-digits-accuracy')
    header, *rows = list(csv.reader(io.StringIO(response.content.decode())))
    assert header == export.LEADERBOARD_CSV_HEADER
    col = {name: i for i, name in enumerate(header)}
    assert [r[col["rank"]] for r in rows] == ["1", "2", "3", "4", "5"]
    top = rows[1]  # the BERT row ranks first; s1 · kd second
    assert (top[col["student"]], top[col["recipe"]]) == (board["s1"].name, "kd-t4 v1")
    assert float(top[col["mean"]]) == pytest.approx(0.86) and top[col["seeds"]] == "2"
    assert float(top[col["retention"]]) == pytest.approx(0.86 / 0.9)
    assert float(top[col["kd_gain"]]) == pytest.approx(0.05)
    assert top[col["metric"]] == "accuracy" and top[col["higher_is_better"]] == "True"
    ids = [r.pk for r in board["runs"]["s1-kd"]]
    assert top[col["run_ids"]] == " ".join(map(str, ids))
    assert top[col["config_urls"]] == " ".join(f"http://testserver/runs/{i}/config.json" for i in ids)


def test_csv_escapes_formulas_but_keeps_negative_numbers_numeric(client_logged_in, board):
    header, *rows = _csv(client_logged_in, board["dataset"])
    col = {name: i for i, name in enumerate(header)}

    bert = next(r for r in rows if "HYPERLINK" in r[col["student"]])
    assert bert[col["student"]] == "'" + board["bert"].name
    assert bert[col["recipe"]] == "'@SUM(A1) v1"
    assert bert[col["experiment"]] == "'-1+2"
    s2_kd = next(r for r in rows if r[col["student"]] == board["s2"].name and r[col["recipe"]] == "kd-t4 v1")
    assert float(s2_kd[col["kd_gain"]]) == pytest.approx(-0.02)  # a number, not text: no apostrophe
    assert not any(cell.startswith(("=", "+", "@")) for row in rows for cell in row)


@pytest.mark.parametrize("value", ["=1+1", "+cmd", "-2", "@x", "\tdata", "\rdata"])
def test_csv_safe_prefixes_formula_triggers(value):
    assert export.csv_safe(value) == "'" + value


@pytest.mark.parametrize("value", ["plain", "", 3, -0.5, None, True, "a=b"])
def test_csv_safe_leaves_other_cells_alone(value):
    assert export.csv_safe(value) == value


def test_csv_export_applies_the_same_filters(client_logged_in, board):
    header, *small = _csv(client_logged_in, board["dataset"], max_params=1000)
    col = {name: i for i, name in enumerate(header)}
    assert {r[col["student"]] for r in small} == {board["s2"].name}
    assert [r[col["rank"]] for r in small] == ["1", "2"]

    _, *kd_only = _csv(client_logged_in, board["dataset"], recipe="kd-t4")
    assert {r[col["recipe"]] for r in kd_only} == {"kd-t4 v1"} and len(kd_only) == 2

    _, *berts = _csv(client_logged_in, board["dataset"], family="bert")
    assert [r[col["family"]] for r in berts] == ["bert"]


# --- filters, Pareto, benchmark -------------------------------------------------------------------
def test_filters_by_method_family_and_latency(client_logged_in, board):
    response = _get(client_logged_in, board["dataset"], family="mlp", max_latency_ms=0.3)

    rows = response.context["rows"]
    assert {(r.student, r.recipe) for r in rows} == {(board["s2"], board["kd"]), (board["s2"], board["base"])}
    assert response.context["total"] == 5
    html = response.content.decode()
    assert (
        '<option value="bert">bert</option>' in html and '<option value="mlp" selected>mlp</option>' in html
    )
    assert '<option value="@SUM(A1)">@SUM(A1)</option>' in html  # every method present on the benchmark


def test_pareto_flag_marks_rows_nobody_beats_at_their_size(client_logged_in, board):
    response = _get(client_logged_in, board["dataset"])

    flagged = {(r.student.pk, r.recipe.pk) for r in response.context["rows"] if r.pareto}
    assert flagged == {
        (board["bert"].pk, board["runs"]["bert"][0].recipe_id),  # the best score
        (board["s1"].pk, board["kd"].pk),  # best at 2000 params
        (board["s2"].pk, board["base"].pk),  # best at 500 params (the baseline beats kd there)
    }
    assert response.content.decode().count("★ Pareto") == 3


def test_pareto_flag_is_recomputed_among_the_filtered_rows(client_logged_in, board):
    response = _get(client_logged_in, board["dataset"], recipe="kd-t4")

    assert [(r.student, r.pareto) for r in response.context["rows"]] == [
        (board["s1"], True),
        (board["s2"], True),
    ]


def test_metric_select_ranks_by_another_metric_and_defaults_to_the_primary(
    client_logged_in, team, digits_setup
):
    experiment = ExperimentFactory(team=team, dataset=digits_setup["dataset"])
    s1, s2 = digits_setup["students"]
    _succeeded(experiment, s1, digits_setup["recipe"], 0, 0.9, macro_f1=0.5)
    _succeeded(experiment, s2, digits_setup["recipe"], 0, 0.8, macro_f1=0.7)

    by_f1 = _get(client_logged_in, digits_setup["dataset"], metric="macro_f1")
    unknown = _get(client_logged_in, digits_setup["dataset"], metric="ece; DROP TABLE")

    assert by_f1.context["metric"].name == "macro_f1"
    assert [r.student for r in by_f1.context["rows"]] == [s2, s1]
    assert "Macro F1" in by_f1.content.decode() and "70.00%" in by_f1.content.decode()
    assert unknown.context["metric"].name == "accuracy"
    assert [r.student for r in unknown.context["rows"]] == [s1, s2]
    assert [m.name for m in unknown.context["benchmark"].metrics] == ["accuracy", "macro_f1"]


def test_one_leaderboard_per_eval_split(client_logged_in, team, digits_setup):
    experiment = ExperimentFactory(team=team, dataset=digits_setup["dataset"])
    s1, s2 = digits_setup["students"]
    _succeeded(experiment, s1, digits_setup["recipe"], 0, 0.9, split_key="main")
    _succeeded(experiment, s1, digits_setup["recipe"], 1, 0.9, split_key="main")
    _succeeded(experiment, s2, digits_setup["recipe"], 0, 0.5, split_key="other")

    default = _get(client_logged_in, digits_setup["dataset"])
    other = _get(client_logged_in, digits_setup["dataset"], split="other")

    assert [s.key for s in default.context["benchmark"].splits] == ["main", "other"]
    assert [r.student for r in default.context["rows"]] == [s1]
    assert [r.student for r in other.context["rows"]] == [s2]
    assert "eval · 20% eval, seed 0, max length 128 (2)" in default.content.decode()


# --- team and global views ------------------------------------------------------------------------
@pytest.fixture
def teams(user, team, other_team, staff_user):
    """The user's two teams and a third team, each with its own digits dataset record (same eval split)."""
    second = MembershipFactory(user=user).team
    third = other_team
    boards = {}
    for t in (team, second, third):
        dataset = DatasetSpecFactory(team=t, name=f"digits-{t.slug}")
        student = ModelSpecFactory(team=t, name=f"lb-student-{next(_names)}")
        experiment = ExperimentFactory(team=t, dataset=dataset, name=f"exp of {t.name}")
        _succeeded(experiment, student, RecipeFactory(team=t), 0, 0.5 + 0.1 * len(boards))
        boards[t.pk] = dataset
    return {"mine": team, "second": second, "third": third, "datasets": boards}


def test_team_view_shows_this_datasets_team_and_global_view_all_my_teams(client_logged_in, teams):
    dataset = teams["datasets"][teams["mine"].pk]

    team_view = _get(client_logged_in, dataset)
    global_view = _get(client_logged_in, dataset, scope="global")

    assert {r.experiment.team for r in team_view.context["rows"]} == {teams["mine"]}
    assert {r.experiment.team for r in global_view.context["rows"]} == {teams["mine"], teams["second"]}
    assert f"({teams['second'].name})" in global_view.content.decode()


def test_staff_global_view_shows_every_team(client, staff_user, teams):
    client.force_login(staff_user)

    response = _get(client, teams["datasets"][teams["mine"].pk], scope="global")

    assert {r.experiment.team for r in response.context["rows"]} == {
        teams["mine"],
        teams["second"],
        teams["third"],
    }


def test_other_teams_leaderboard_and_csv_are_404(client_logged_in, teams):
    foreign = teams["datasets"][teams["third"].pk]

    assert _get(client_logged_in, foreign).status_code == 404
    assert _get(client_logged_in, foreign, format="csv", scope="global").status_code == 404


def test_global_view_uses_a_constant_number_of_queries(
    client_logged_in, teams, django_assert_max_num_queries
):
    dataset = teams["datasets"][teams["mine"].pk]
    url, params = _url(dataset, scope="global")
    with CaptureQueriesContext(connection) as ctx:
        client_logged_in.get(url, params)
    for t in (teams["mine"], teams["second"]):
        experiment = ExperimentFactory(team=t, dataset=teams["datasets"][t.pk])
        for i in range(6):
            student = ModelSpecFactory(team=t, name=f"lb-student-{next(_names)}")
            _succeeded(experiment, student, RecipeFactory(team=t), 0, 0.3 + i / 100)

    with django_assert_max_num_queries(len(ctx.captured_queries)):
        response = client_logged_in.get(url, params)
    assert len(response.context["rows"]) == 14


def test_leaderboard_rows_link_runs_configs_and_compare(client_logged_in, board):
    html = _get(client_logged_in, board["dataset"]).content.decode()

    run = board["runs"]["s1-kd"][0]
    assert reverse("experiments:run_config_json", kwargs={"run_id": run.pk}) in html
    ids = ",".join(str(r.pk) for r in board["runs"]["s1-kd"])
    assert f'form="compare-rows" name="runs" value="{ids}"' in html
    assert f'action="{reverse("experiments:compare")}"' in html
    assert "format=csv" in html


def test_leaderboard_filter_selector_keeps_unknown_sizes_out_of_budgets_and_the_frontier(board, user):
    rows = leaderboard_reads.leaderboard(user=user, dataset=board["dataset"])
    rows[0].params = None

    kept = leaderboard.leaderboard_filter(rows, higher_is_better=True)
    budget = leaderboard.leaderboard_filter(rows, higher_is_better=True, max_params=10**9)

    assert kept[0].pareto is False and len(kept) == 5
    assert rows[0] not in budget and [r.rank for r in budget] == [1, 2, 3, 4]


# --- run config JSON ------------------------------------------------------------------------------
def test_run_config_json_is_the_frozen_config(client_logged_in, board):
    run = board["runs"]["s1-kd"][0]

    response = client_logged_in.get(reverse("experiments:run_config_json", kwargs={"run_id": run.pk}))

    assert response.status_code == 200 and response["Content-Type"] == "application/json"
    assert json.loads(response.content) == run.config
    assert f'filename="run-{run.pk}-config.json"' in response["Content-Disposition"]


def test_run_config_json_is_team_scoped(client_logged_in, client, other_team):
    foreign = RunFactory(experiment=ExperimentFactory(team=other_team))
    url = reverse("experiments:run_config_json", kwargs={"run_id": foreign.pk})

    assert client_logged_in.get(url).status_code == 404
    client.logout()
    anonymous = client.get(url)
    assert anonymous.status_code == 302 and anonymous.url.startswith(reverse("login"))
