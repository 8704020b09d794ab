"""The leaderboard's summary rows: what the page reads equals the full computation over the evaluations, on
varied boards (sweeps, seeds, baselines, metrics, filters, pages), follows every write, and leaves the run
that trained a teacher out of the ranking."""

from __future__ import annotations

import random
import threading
from unittest import mock

import pytest
from django.core.management import call_command
from django.db import connection
from django.urls import reverse
from django.utils import timezone

from experiments.domain import leaderboard as board
from experiments.models import (
    Evaluation,
    Experiment,
    LeaderboardBoard,
    LeaderboardEntry,
    Run,
    TeacherStore,
    TeacherStoreUse,
)
from experiments.selectors import leaderboard as leaderboard_reads
from experiments.services import launch, leaderboard_summary, lifecycle, records
from tests.factories import DatasetSpecFactory, MembershipFactory, ModelSpecFactory, RecipeFactory
from tests.waiting import scaled

pytestmark = pytest.mark.django_db

DISPATCH = "experiments.services.dispatch._dispatch"
ROW_FIELDS = ("run_ids", "accuracies", "gains", "params", "latency_ms", "is_baseline", "stage", "sweep",
              "teacher_accuracy", "teacher_params", "rank", "pareto", "lora_r")


def _launch(setup, team, user, *, students, train, term_sweeps=None, seeds=(0, 1), name="x",
            teacher=None) -> Experiment:
    with mock.patch(DISPATCH):
        return launch.experiment_create(
            team=team, created_by=user, name=name, dataset=setup["dataset"],
            teacher=teacher or setup["teacher"], students=students, recipes=[setup["recipe"]],
            seeds=list(seeds), train={"max_steps": 10, **train}, term_sweeps=term_sweeps or {},
        )


def _finish(run: Run, metrics: dict, *, params: int, latency: float | None = None, split_key: str = "k"):
    """A succeeded run with its evaluation written directly (as the admin or an import would)."""
    now = timezone.now()
    Run.objects.filter(pk=run.pk).update(status=Run.Status.SUCCEEDED, started_at=now, finished_at=now,
                                         step=run.total_steps)
    return Evaluation.objects.create(
        team=run.team, role=Evaluation.Role.STUDENT, run=run, model=run.student,
        dataset=run.experiment.dataset, split_key=split_key, accuracy=metrics.get("accuracy"),
        param_count=params, latency_ms=latency, metrics=metrics,
    )


@pytest.fixture
def varied(digits_setup, team, user):
    """Three experiments on one dataset: a learning-rate × temperature sweep over two seeds, a plain one with
    two more students (one without a latency), and one whose runs only measured macro F1; scores drawn from a
    fixed seed so that ties and Pareto points are not arranged by hand."""
    rng = random.Random(7)
    extra = [ModelSpecFactory(team=team, name=f"mlp-{w}", config={"hidden_sizes": [w]}) for w in (8, 64)]
    swept = _launch(digits_setup, team, user, students=digits_setup["students"], name="sweep",
                    train={"lr": [1e-4, 3e-4]}, term_sweeps={"kd.temperature": [2.0, 4.0]})
    plain = _launch(digits_setup, team, user, students=extra, name="plain", seeds=(0, 1, 2), train={})
    f1_only = _launch(digits_setup, team, user, students=digits_setup["students"][:1], name="f1", seeds=(5,),
                      train={})
    sizes = {s.pk: 500 * (i + 1) for i, s in enumerate([*digits_setup["students"], *extra])}
    for run in [*swept.runs.all(), *plain.runs.all()]:
        accuracy = round(rng.uniform(0.6, 0.9), 2)
        metrics = {"accuracy": accuracy, "macro_f1": round(accuracy - rng.uniform(0, 0.1), 3),
                   "nll": round(rng.uniform(0.2, 0.9), 3)}
        latency = None if run.student == extra[1] else round(rng.uniform(0.2, 2.0), 2)
        _finish(run, metrics, params=sizes[run.student_id], latency=latency)
    for run in f1_only.runs.all():
        _finish(run, {"macro_f1": 0.5}, params=sizes[run.student_id])
    Evaluation.objects.create(team=team, role=Evaluation.Role.TEACHER, model=digits_setup["teacher"],
                              dataset=digits_setup["dataset"], split_key="k", accuracy=0.95, param_count=9000,
                              metrics={"accuracy": 0.95, "macro_f1": 0.94, "nll": 0.1})
    return {"dataset": digits_setup["dataset"], "swept": swept, "plain": plain}


def _full(user, dataset, metric_name="", **filters):
    """The full computation over the evaluations, filtered and ranked as the page did before summaries."""
    metric = leaderboard_reads.QUALITY_METRICS.get(metric_name) or leaderboard_reads.primary_metric(dataset)
    rows = leaderboard_reads.leaderboard(user=user, dataset=dataset, metric=metric, split_key="k")
    return board.leaderboard_filter(rows, higher_is_better=metric.higher_is_better, **filters)


def _summary(user, dataset, metric_name="", **filters):
    return leaderboard_reads.leaderboard_benchmark(user=user, dataset=dataset, metric_name=metric_name,
                                                   filters=filters)


def _as_dicts(rows):
    return [{"key": (r.experiment.pk, r.student.pk, r.recipe.pk),
             **{f: getattr(r, f) for f in ROW_FIELDS}, "mean": r.mean, "std": r.std, "kd_gain": r.kd_gain,
             "retention": r.retention} for r in rows]


@pytest.mark.parametrize("metric_name, filters", [
    ("", {}),
    ("", {"max_params": 1500}),
    ("", {"max_latency_ms": 1.0}),
    ("", {"family": "mlp"}),
    ("macro_f1", {}),
    ("nll", {}),  # lower is better
    ("nll", {"max_params": 1000}),
])
def test_summary_rows_equal_the_full_computation(user, varied, metric_name, filters):
    full = _full(user, varied["dataset"], metric_name, **filters)
    benchmark = _summary(user, varied["dataset"], metric_name, **filters)

    assert benchmark.metric.name == (metric_name or "accuracy")
    assert len(full) > 4 and len(benchmark.rows) == len(full)
    assert _as_dicts(benchmark.rows) == _as_dicts(full)
    assert [r.rank for r in benchmark.frontier()] == [r.rank for r in full if r.pareto]
    if not filters:
        assert benchmark.total == len(full)


def test_a_page_is_one_slice_of_the_ranking(user, varied):
    full = _full(user, varied["dataset"])
    rows = _summary(user, varied["dataset"]).rows

    middle = rows[3:7]

    assert _as_dicts(middle) == _as_dicts(full[3:7])
    assert [r.rank for r in middle] == [4, 5, 6, 7]
    assert _as_dicts([rows[-1]]) == _as_dicts(full[-1:])


def test_the_page_and_the_api_read_the_summary(client_logged_in, user, varied):
    full = _full(user, varied["dataset"])
    url = reverse("experiments:leaderboard", kwargs={"dataset_id": varied["dataset"].pk})

    with mock.patch("experiments.views.compare.LEADERBOARD_PAGE_ROWS", 5):
        page = client_logged_in.get(url, {"page": 2}).context["page"]
    api = client_logged_in.get(f"/api/leaderboards/{varied['dataset'].pk}/", {"limit": 3, "offset": 2})

    assert [r.run_ids for r in page.object_list] == [r.run_ids for r in full[5:10]]
    assert [r.rank for r in page.object_list] == [6, 7, 8, 9, 10]
    assert api.status_code == 200, api.content
    assert [row["run_ids"] for row in api.json()["results"]] == [r.run_ids for r in full[2:5]]
    assert api.json()["count"] == len(full) and api.json()["total"] == len(full)


def test_a_finished_run_enters_the_board_through_the_lifecycle(digits_setup, team, user):
    experiment = _launch(digits_setup, team, user, students=digits_setup["students"][:1], train={},
                         seeds=(0,))
    run = experiment.runs.get(is_baseline=False)
    lifecycle.run_claim(run_id=run.pk, task_id="t", worker_name="w")

    lifecycle.run_finish(run_id=run.pk, task_id="t",
                         result={"steps": 10, "student": {"accuracy": 0.8, "params": 700}})

    [entry] = LeaderboardEntry.objects.all()
    assert entry.stats["accuracy"]["run_ids"] == [run.pk] and entry.score == 0.8 and entry.params == 700
    baseline = experiment.runs.get(is_baseline=True)
    lifecycle.run_claim(run_id=baseline.pk, task_id="b", worker_name="w")
    lifecycle.run_finish(run_id=baseline.pk, task_id="b", result={"steps": 10, "student": {"accuracy": 0.7}})
    kd = LeaderboardEntry.objects.get(is_baseline=False)
    assert kd.stats["accuracy"]["gains"] == [pytest.approx(0.1)]  # the baseline's arrival changed the KD gain


def test_deleting_an_evaluation_or_a_run_updates_the_board(user, varied, django_capture_on_commit_callbacks):
    plain = varied["plain"]
    run = plain.runs.filter(is_baseline=False).first()
    others = list(plain.runs.filter(is_baseline=False, student=run.student).exclude(pk=run.pk))

    with django_capture_on_commit_callbacks(execute=True):
        Evaluation.objects.filter(run=run).delete()
    after_eval = _summary(user, varied["dataset"]).rows
    with django_capture_on_commit_callbacks(execute=True):
        Run.objects.filter(pk__in=[o.pk for o in others]).delete()

    assert _as_dicts(after_eval) == _as_dicts(_full(user, varied["dataset"]))
    assert run.pk not in {i for r in after_eval for i in r.run_ids}
    after_runs = _summary(user, varied["dataset"]).rows
    assert not {o.pk for o in others} & {i for r in after_runs for i in r.run_ids}
    assert _as_dicts(_summary(user, varied["dataset"]).rows) == _as_dicts(_full(user, varied["dataset"]))


def test_an_experiment_deleted_takes_its_rows_with_it(user, varied, django_capture_on_commit_callbacks):
    with django_capture_on_commit_callbacks(execute=True):
        varied["plain"].delete()

    assert not LeaderboardEntry.objects.filter(experiment_id=varied["plain"].pk).exists()
    assert _as_dicts(_summary(user, varied["dataset"]).rows) == _as_dicts(_full(user, varied["dataset"]))


def test_the_run_that_trained_the_teacher_is_not_ranked(client_logged_in, digits_setup, team, user):
    """A teacher fine-tuned here (a hard-label run, registered as a model) and then distilled: the fine-tuning
    run is the board's reference, not a student."""
    big = ModelSpecFactory(team=team, name="mlp-128", config={"hidden_sizes": [128]})
    fine_tune = _launch(digits_setup, team, user, students=[big], train={}, seeds=(0,), name="fine-tune")
    for run in fine_tune.runs.all():
        _finish(run, {"accuracy": 0.97}, params=20000)
    trained = fine_tune.runs.get(is_baseline=False)
    teacher = records.model_register_from_run(run=trained, name="mlp-128-tuned", created_by=user)
    assert len(_summary(user, digits_setup["dataset"]).rows) == 2  # not a teacher of anything yet

    distilled = _launch(digits_setup, team, user, students=digits_setup["students"][:1], train={},
                        seeds=(0,), name="distil", teacher=teacher)
    for run in distilled.runs.all():
        _finish(run, {"accuracy": 0.9 if not run.is_baseline else 0.85}, params=700)

    rows = _summary(user, digits_setup["dataset"]).rows
    assert trained.pk not in {i for r in rows for i in r.run_ids}
    assert [r.experiment.pk for r in rows] == [fine_tune.pk, distilled.pk, distilled.pk]  # its baseline stays
    response = client_logged_in.get(reverse("experiments:leaderboard", args=[digits_setup["dataset"].pk]))
    assert trained.pk not in {i for r in response.context["rows"] for i in r.run_ids}
    assert response.context["rows"][0].rank == 1


def _board_shapes() -> list[dict]:
    """The board rows without the summary rows' ids (a rebuild writes new ones)."""
    boards = list(LeaderboardBoard.objects.order_by("pk").values("team", "dataset", "split_key", "metrics",
                                                                  "ranked", "evaluations", "split_label"))
    for row in boards:
        for ranked in row["ranked"].values():
            ranked["frontier"] = [f[1:] for f in ranked["frontier"]]
    assert boards
    return boards


def test_rebuild_command_recomputes_the_same_rows(user, varied, capsys):
    before = _summary(user, varied["dataset"])
    incremental = _as_dicts(before.rows)
    boards = _board_shapes()
    # A bulk delete bypasses the signals: the summary and board rows are gone until the rebuild.
    LeaderboardEntry.objects.all().delete()
    LeaderboardBoard.objects.all().delete()
    assert not _summary(user, varied["dataset"]).rows

    call_command("rebuild_leaderboard")

    after = _summary(user, varied["dataset"])
    assert _as_dicts(after.rows) == incremental
    assert (after.total, after.splits, after.recipes, after.families) == \
        (before.total, before.splits, before.recipes, before.families)
    assert _board_shapes() == boards
    assert f"{LeaderboardEntry.objects.count()} leaderboard rows written." in capsys.readouterr().out


def test_other_teams_never_see_the_rows(other_user, varied):
    assert not LeaderboardEntry.objects.filter(team__memberships__user=other_user).exists()
    assert not _summary(other_user, varied["dataset"]).rows



def test_the_migration_summarises_existing_results(user, varied):
    import importlib

    from django.apps import apps
    from django.db import connection

    expected = _as_dicts(_summary(user, varied["dataset"]).rows)
    LeaderboardEntry.objects.all().delete()
    migration = importlib.import_module("experiments.migrations.0011_leaderboard_summary")

    with connection.schema_editor() as editor:
        migration.summarise_existing_results(apps, editor)

    assert expected and _as_dicts(_summary(user, varied["dataset"]).rows) == expected


def test_the_board_row_holds_what_the_page_shows_of_the_whole_board(user, varied):
    """The split, the metrics, the count, the options and the frontier come from one board row, equal to
    computing them over every summary row."""
    (stored,) = LeaderboardBoard.objects.filter(dataset=varied["dataset"])
    ranked_rows = LeaderboardEntry.objects.filter(dataset=varied["dataset"], trains_teacher=False)
    assert stored.evaluations == Evaluation.objects.filter(role=Evaluation.Role.STUDENT).count()
    assert stored.metrics == ["accuracy", "macro_f1", "nll"]
    for name in stored.metrics:
        full = _full(user, varied["dataset"], name)
        assert stored.ranked[name]["count"] == len(full) == ranked_rows.filter(means__has_key=name).count()
        assert [f[3] for f in stored.ranked[name]["frontier"]] == [r.rank for r in full if r.pareto]
    benchmark = _summary(user, varied["dataset"])
    assert (benchmark.recipes, benchmark.families) == (["hard_labels", "kd-t4"], ["mlp"])


def test_the_global_scope_merges_the_boards_of_the_users_teams(user, varied, other_team):
    """Two teams' boards of the same eval split: the global leaderboard's count, rows, frontier and ranks
    equal the full computation over both teams' evaluations."""
    MembershipFactory(user=user, team=other_team, role="member")
    theirs = {"dataset": DatasetSpecFactory(team=other_team, name="digits-copy"),
              "teacher": ModelSpecFactory(team=other_team, name="their-teacher"),
              "students": [ModelSpecFactory(team=other_team, name=f"their-{w}", config={"hidden_sizes": [w]})
                           for w in (12, 24)],
              "recipe": RecipeFactory(team=other_team, name="kd-t2")}
    experiment = _launch(theirs, other_team, user, students=theirs["students"], train={}, name="theirs")
    for i, run in enumerate(experiment.runs.order_by("pk")):
        _finish(run, {"accuracy": 0.7 + 0.05 * (i % 4), "macro_f1": 0.6}, params=400 + 600 * (i % 3))
    assert LeaderboardBoard.objects.filter(split_key="k").count() == 2

    benchmark = leaderboard_reads.leaderboard_benchmark(user=user, dataset=varied["dataset"], split_key="k",
                                                        scope="global")
    metric = leaderboard_reads.primary_metric(varied["dataset"])
    full = board.leaderboard_filter(
        leaderboard_reads.leaderboard(user=user, dataset=varied["dataset"], metric=metric, split_key="k",
                                      scope="global"), higher_is_better=True)
    assert {r.experiment.team_id for r in full} == {varied["dataset"].team_id, other_team.pk}
    assert benchmark.total == len(full)
    assert _as_dicts(benchmark.rows) == _as_dicts(full)
    assert [r.rank for r in benchmark.frontier()] == [r.rank for r in full if r.pareto]
    assert "kd-t2" in benchmark.recipes and "kd-t4" in benchmark.recipes


@pytest.mark.django_db(transaction=True)
def test_two_experiments_of_one_board_refreshing_together_both_count(digits_setup, team, user):
    """Each refresh locks the board row before computing it: the second reads the first's rows instead of
    writing a board that misses them."""
    first = _launch(digits_setup, team, user, students=digits_setup["students"][:1], train={}, name="a")
    second = _launch(digits_setup, team, user, students=digits_setup["students"][1:], train={}, name="b")
    for i, run in enumerate([*first.runs.all(), *second.runs.all()]):
        _finish(run, {"accuracy": 0.6 + 0.01 * i}, params=500 + 100 * i)
    LeaderboardEntry.objects.all().delete()  # the board row stays: refreshing it is what races
    both_computed = threading.Barrier(2, timeout=scaled(60))
    compute = leaderboard_reads.leaderboard_entry_values

    def entries_then_wait(**kwargs):
        values = compute(**kwargs)
        both_computed.wait()  # both have their rows before either computes the board
        return values

    errors = []

    def refresh(experiment_id):
        try:
            leaderboard_summary.leaderboard_summary_refresh(experiment_ids=[experiment_id])
        except Exception as exc:  # reported below: a thread's exception would otherwise vanish
            errors.append(exc)
        finally:
            connection.close()

    with mock.patch.object(leaderboard_reads, "leaderboard_entry_values", entries_then_wait):
        threads = [threading.Thread(target=refresh, args=(x.pk,)) for x in (first, second)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert not errors
    (stored,) = LeaderboardBoard.objects.all()
    assert stored.ranked["accuracy"]["count"] == LeaderboardEntry.objects.count() == 4
    assert stored.evaluations == 8


def test_the_migration_computes_the_boards_of_existing_results(user, varied):
    import importlib

    from django.apps import apps

    expected = _board_shapes()
    LeaderboardBoard.objects.all().delete()
    migration = importlib.import_module("experiments.migrations.0016_leaderboard_boards")

    with connection.schema_editor() as editor:
        migration.compute_existing_boards(apps, editor)

    assert _board_shapes() == expected


def test_the_page_names_the_store_a_rows_runs_trained_from(client_logged_in, user, varied):
    run = varied["plain"].runs.filter(is_baseline=False).order_by("pk").first()
    store = TeacherStore.objects.create(team=run.team, key="b" * 64, kind="topk", split="train", k=64,
                                        format=2, teacher_label="mlp-teacher", path="teacher-cache/bbb")
    TeacherStoreUse.objects.create(run=run, store=store, key=store.key, label=store.label, split="train",
                                   filled=True)
    page = client_logged_in.get(reverse("experiments:leaderboard", args=[varied["dataset"].pk]))
    rows = page.context["page"].object_list
    assert len(rows) == page.context["total"] < 50  # every row on the one page
    (row,) = [r for r in rows if run.pk in r.run_ids]
    assert row.stores == "mlp-teacher · top-64 · format 2"
    assert all(not r.stores for r in rows if r is not row)
    assert "store: mlp-teacher · top-64 · format 2" in page.content.decode()
