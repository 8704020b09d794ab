"""The dashboard's hot API paths cost a fixed number of queries however many runs and points there are, and
read from indexes: the run list newest first, a run's downsampled curves, and its full history."""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta

import pytest
from django.db import connection
from django.urls import reverse
from django.utils import timezone

from experiments.models import MetricPoint, Run
from experiments.selectors import curves

pytestmark = pytest.mark.django_db


def _runs(run, n: int) -> list[Run]:
    from tests.factories import RunFactory

    return [
        RunFactory(experiment=run.experiment, student=run.student, recipe=run.recipe, seed=100 + i)
        for i in range(n)
    ]


def _points(run, name: str, steps, value=lambda step: math.sin(step / 40)) -> None:
    now = timezone.now()
    MetricPoint.objects.bulk_create(
        [MetricPoint(run=run, name=name, step=s, value=value(s), wall_time=now) for s in steps],
        batch_size=5000,
    )


def _queries(django_assert_max_num_queries, api, url: str, params: dict, limit: int) -> tuple[dict, int]:
    """The answer and how many queries it took (at most ``limit``), after one request that pays the token's
    once-a-while bookkeeping."""
    api.get(url, params)
    with django_assert_max_num_queries(limit) as captured:
        response = api.get(url, params)
    assert response.status_code == 200, response.content[:300]
    return response.json(), len(captured.captured_queries)


def test_the_run_list_costs_the_same_queries_for_3_and_40_runs(api, run, django_assert_max_num_queries):
    url = reverse("api:run_list")
    _runs(run, 2)
    small, small_queries = _queries(django_assert_max_num_queries, api, url, {"limit": 50}, 14)
    _runs(run, 37)
    large, large_queries = _queries(django_assert_max_num_queries, api, url, {"limit": 50}, 14)

    assert large_queries == small_queries
    assert small["count"] == 3 and len(small["results"]) == 3
    assert large["count"] == 40 and len(large["results"]) == 40


def test_the_run_list_is_newest_first_and_ties_go_to_the_higher_id(api, run):
    older, *same = _runs(run, 3)
    stamp = timezone.now()
    Run.objects.filter(pk=older.pk).update(created_at=stamp - timedelta(hours=1))
    Run.objects.filter(pk__in=[r.pk for r in same]).update(created_at=stamp)
    Run.objects.filter(pk=run.pk).update(created_at=stamp - timedelta(hours=2))

    ids = [r["id"] for r in api.get(reverse("api:run_list"), {"limit": 50}).json()["results"]]

    assert ids == sorted((r.pk for r in same), reverse=True) + [older.pk, run.pk]


def test_the_newest_runs_across_teams_are_read_from_an_index_not_sorted(run):
    _runs(run, 5)
    query = Run.objects.order_by("-created_at", "-id")[:50]
    with connection.cursor() as cursor:
        cursor.execute("SET LOCAL enable_seqscan = off")  # as on a large table; the plan must not sort
        sql, params = query.query.sql_with_params()
        cursor.execute("EXPLAIN " + sql, params)
        plan = "\n".join(row[0] for row in cursor.fetchall())

    assert "run_created_id" in plan and "Sort" not in plan


def test_downsampled_curves_cost_the_same_queries_for_100_and_20000_points(
    api, run, django_assert_max_num_queries
):
    url, params = reverse("api:run_metrics", kwargs={"pk": run.pk}), {"name": "loss", "max_points": 500}
    _points(run, "loss", range(100))
    small, small_queries = _queries(django_assert_max_num_queries, api, url, params, 12)
    MetricPoint.objects.filter(run=run).delete()
    _points(run, "loss", range(20_000), value=lambda s: 9.0 if s == 12_345 else math.sin(s / 40))
    _points(run, "kd", range(0, 20_000, 100))
    large, large_queries = _queries(django_assert_max_num_queries, api, url, params, 12)

    assert large_queries == small_queries
    assert small["series"][0]["points"] == 100 and not small["series"][0]["downsampled"]
    assert small["series"][0]["steps"] == list(range(100))
    loss = large["series"][0]
    assert large["names"] == ["kd", "loss"] and [s["name"] for s in large["series"]] == ["loss"]
    assert loss["points"] == 20_000 and loss["downsampled"] and len(loss["steps"]) <= 500
    assert loss["steps"][0] == 0 and loss["steps"][-1] == 19_999 and 12_345 in loss["steps"]
    assert loss["values"][loss["steps"].index(12_345)] == 9.0


def test_every_curve_is_answered_in_name_order_with_its_own_count(api, run):
    _points(run, "loss", range(3000))
    _points(run, "eval/accuracy", range(0, 3000, 300), value=lambda s: s / 3000)

    body = api.get(reverse("api:run_metrics", kwargs={"pk": run.pk}), {"max_points": 100}).json()

    series = {s["name"]: s for s in body["series"]}
    assert [s["name"] for s in body["series"]] == ["eval/accuracy", "loss"]
    assert series["eval/accuracy"]["points"] == 10 and not series["eval/accuracy"]["downsampled"]
    assert series["eval/accuracy"]["values"] == [s / 3000 for s in range(0, 3000, 300)]
    assert series["loss"]["points"] == 3000 and len(series["loss"]["steps"]) <= 100


def test_a_name_the_run_never_logged_is_an_empty_answer(api, run):
    _points(run, "loss", range(10))

    body = api.get(reverse("api:run_metrics", kwargs={"pk": run.pk}), {"name": "nope"}).json()

    assert body["series"] == [] and body["names"] == ["loss"]


def test_point_counts_are_per_name_and_only_for_the_names_asked(run):
    _points(run, "loss", range(250))
    _points(run, "kd", range(40))

    assert curves.run_metric_point_counts(run_id=run.pk, names=["loss", "ce"]) == {"loss": 250}
    assert curves.run_metric_point_counts(run_id=run.pk, names=[]) == {}


@pytest.mark.parametrize("microsecond", [0, 5, 120_000, 999_999])
def test_history_wall_times_read_as_text_are_the_iso_utc_json_of_the_datetime(api, run, microsecond):
    stamp = datetime(2026, 3, 4, 5, 6, 7, microsecond, tzinfo=UTC)
    MetricPoint.objects.create(run=run, name="loss", step=0, value=1.0, wall_time=stamp)

    body = api.get(reverse("api:run_metric_history", kwargs={"pk": run.pk}), {"name": "loss"}).json()

    assert body["points"][0]["wall_time"] == stamp.isoformat().replace("+00:00", "Z")


def test_listed_rows_are_exactly_what_the_run_serializer_writes(api, run, user):
    from django.test import RequestFactory

    from api import selectors as api_selectors
    from api.serializers import RunSerializer
    from experiments.models import Evaluation
    from tests.factories import RunFactory

    queued = RunFactory(experiment=run.experiment, student=run.student, recipe=run.recipe, seed=7,
                        is_baseline=True, teacher=None)
    stamp = timezone.now().replace(microsecond=120_000)
    Run.objects.filter(pk=run.pk).update(
        status=Run.Status.SUCCEEDED, step=20, total_steps=20, started_at=stamp, finished_at=stamp,
        heartbeat_at=stamp, samples_per_s=12.5, worker_name="w1", attempt=1,
    )
    Run.objects.filter(pk=queued.pk).update(waiting_for=run)
    Evaluation.objects.create(
        team=run.team, role=Evaluation.Role.STUDENT, run=run, model=run.student,
        dataset=run.experiment.dataset, split="test", accuracy=0.875, metrics={"accuracy": 0.875},
    )

    body = api.get(reverse("api:run_list"), {"limit": 50}).json()["results"]

    request = RequestFactory().get("/", HTTP_HOST="testserver")
    runs = api_selectors.run_list(user=user).order_by("-created_at", "-id")
    expected = RunSerializer(runs, many=True, context={"request": request}).data
    assert body == [dict(row) for row in expected]
    assert [r["id"] for r in body] == [queued.pk, run.pk]
    assert body[1]["metric"]["value"] == 0.875 and body[1]["progress_percent"] == 100
    assert body[0]["teacher"] is None and body[0]["waiting_for"] == run.pk
