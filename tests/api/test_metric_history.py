"""A run's metric history at full resolution: keyset pages with a cursor by (name, step), and the CSV and
Parquet downloads of every point."""

from __future__ import annotations

import csv
import io
import math
from datetime import UTC, datetime, timedelta

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.urls import reverse

from api import metric_downloads
from api.serializers import history_cursor
from experiments.models import MetricPoint

pytestmark = pytest.mark.django_db

T0 = datetime(2026, 1, 2, 3, 4, 5, 123456, tzinfo=UTC)


def _url(name: str, run) -> str:
    return reverse(f"api:{name}", kwargs={"pk": run.pk})


def _points(run, name: str, steps, value=lambda step: step / 7) -> None:
    MetricPoint.objects.bulk_create(
        [
            MetricPoint(run=run, name=name, step=s, value=value(s), wall_time=T0 + timedelta(seconds=s))
            for s in steps
        ],
        batch_size=5000,
    )


def _walk(api, url: str, params: dict) -> tuple[list[dict], int]:
    """Every page from the first to the one without a cursor: (points, pages)."""
    points, pages = [], 0
    body = api.get(url, params).json()
    while True:
        pages += 1
        points += body["points"]
        if body["cursor"] is None:
            assert body["next"] is None
            return points, pages
        assert body["next"].startswith("http://testserver" + url)
        body = api.get(body["next"]).json()


def test_a_walk_over_25000_points_meets_every_point_once_in_step_order(api, run):
    _points(run, "loss", range(25_000))
    _points(run, "kd", range(0, 100, 10))
    url = _url("run_metric_history", run)

    points, pages = _walk(api, url, {"name": "loss", "limit": 10_000})

    assert pages == 3
    assert [p["step"] for p in points] == list(range(25_000))
    assert {p["name"] for p in points} == {"loss"}
    assert points[7] == {"name": "loss", "step": 7, "value": 1.0, "wall_time": "2026-01-02T03:04:12.123456Z"}


def test_the_cursor_is_stable_where_steps_tie_across_metrics(api, run):
    for name in ("b", "a", "eval/accuracy"):
        _points(run, name, range(0, 50, 5), value=lambda step, n=name: len(n) + step)
    expected = [(n, step) for n in sorted(["b", "a", "eval/accuracy"]) for step in range(0, 50, 5)]

    for limit in (1, 3, 7, 10, 29, 30, 31):
        points, pages = _walk(api, _url("run_metric_history", run), {"limit": limit})

        assert [(p["name"], p["step"]) for p in points] == expected, limit
        assert pages == math.ceil(len(expected) / limit)


def test_points_logged_during_a_walk_come_after_the_cursor_never_twice(api, run):
    _points(run, "loss", range(10))
    url = _url("run_metric_history", run)
    first = api.get(url, {"name": "loss", "limit": 6}).json()
    _points(run, "loss", range(10, 13))  # a live run logs on

    rest = api.get(url, {"name": "loss", "limit": 6, "cursor": first["cursor"]}).json()

    assert [p["step"] for p in first["points"] + rest["points"]] == list(range(12))
    assert rest["cursor"] == history_cursor("loss", 11)


def test_after_step_starts_after_that_step_and_nan_is_null(api, run):
    _points(run, "loss", range(5), value=lambda step: float("nan") if step == 3 else float(step))

    body = api.get(_url("run_metric_history", run), {"name": "loss", "after_step": 1}).json()

    assert [(p["step"], p["value"]) for p in body["points"]] == [(2, 2.0), (3, None), (4, 4.0)]
    assert body["cursor"] is None and body["name"] == "loss" and body["limit"] == 1000


@pytest.mark.parametrize(
    "params", [{"name": "loss", "after_step": str(2**62)}, {"cursor": history_cursor("loss", 2**62)}]
)
def test_a_position_past_every_step_is_an_empty_page(api, run, params):
    _points(run, "loss", range(3))

    response = api.get(_url("run_metric_history", run), params)

    assert response.status_code == 200
    assert response.json()["points"] == [] and response.json()["cursor"] is None


def test_a_run_without_points_has_an_empty_history(api, run):
    body = api.get(_url("run_metric_history", run)).json()

    assert body == {"run": run.pk, "name": None, "limit": 1000, "points": [], "cursor": None, "next": None}


def test_a_page_is_a_fixed_number_of_queries_wherever_it_starts(api, run):
    _points(run, "a", range(3000))
    _points(run, "b", range(3000))
    url = _url("run_metric_history", run)
    deep = history_cursor("a", 2990)

    counts = []
    pages = ({"limit": 50}, {"limit": 50, "cursor": deep}, {"name": "b", "limit": 50, "after_step": 2000})
    for params in pages:
        with CaptureQueriesContext(connection) as queries:
            assert api.get(url, params).status_code == 200
        counts.append(len([q for q in queries if "experiments_metricpoint" in q["sql"]]))

    assert counts == [1, 2, 1]  # a cursor near a metric's end reads its rest, then the next metrics'


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"limit": "0"}, "limit"),
        ({"limit": "10001"}, "limit"),
        ({"limit": "abc"}, "limit"),
        ({"limit": "-5"}, "limit"),
        ({"cursor": "not a cursor"}, "cursor"),
        ({"cursor": "bm90IGpzb24"}, "cursor"),  # base64 of "not json"
        ({"cursor": history_cursor("a\x00b", 1)}, "cursor"),
        ({"cursor": history_cursor("kd", 1), "name": "loss"}, "cursor"),
        ({"cursor": history_cursor("kd", 1), "after_step": "3"}, "after_step"),
        ({"after_step": "3"}, "after_step"),
        ({"name": "loss", "after_step": "-1"}, "after_step"),
        ({"name": "loss", "after_step": "99999999999999999999999"}, "after_step"),
        ({"name": "x" * 65}, "name"),
        ({"name": "a\x00b"}, "name"),
    ],
)
def test_bad_parameters_are_400s_with_the_field(api, run, params, field):
    response = api.get(_url("run_metric_history", run), params)

    assert response.status_code == 400, response.content
    assert field in response.json()


@pytest.mark.parametrize("name", ["run_metric_history", "run_metrics_csv", "run_metrics_parquet"])
def test_another_teams_run_is_a_404(api, foreign, name):
    _points(foreign["run"], "loss", range(3))

    response = api.get(_url(name, foreign["run"]))

    assert response.status_code == 404
    assert set(response.json()) == {"detail"}


@pytest.mark.parametrize("name", ["run_metric_history", "run_metrics_csv", "run_metrics_parquet"])
def test_login_is_required(anonymous, run, name):
    response = anonymous.get(_url(name, run))

    assert response.status_code == 401
    assert "detail" in response.json()


def test_the_csv_streams_every_point_page_by_page(api, run, monkeypatch):
    monkeypatch.setattr(metric_downloads, "PAGE_POINTS", 4)
    _points(run, "loss", range(10), value=lambda step: math.inf if step == 9 else step / 3)
    _points(run, "eval/accuracy", range(0, 10, 5))

    response = api.get(_url("run_metrics_csv", run))

    assert response.status_code == 200 and response.streaming
    assert response["Content-Type"] == "text/csv; charset=utf-8"
    assert response["Content-Disposition"] == f'attachment; filename="run-{run.pk}-metrics.csv"'
    chunks = [chunk.decode() for chunk in response.streaming_content]
    assert len(chunks) == 3  # 12 points, 4 a page
    rows = list(csv.reader(io.StringIO("".join(chunks))))
    assert rows[0] == ["step", "name", "value", "wall_time"]
    expected = [
        (step, name, float(value), T0 + timedelta(seconds=step))
        for name, step, value in MetricPoint.objects.filter(run=run)
        .order_by("name", "step")
        .values_list("name", "step", "value")
    ]
    assert [(int(s), n, float(v), datetime.fromisoformat(t)) for s, n, v, t in rows[1:]] == expected
    assert rows[1][:2] == ["0", "eval/accuracy"] and rows[-1][2] == "inf"


def test_the_csv_of_a_run_without_points_is_its_header(api, run):
    response = api.get(_url("run_metrics_csv", run))

    assert b"".join(response.streaming_content) == b"step,name,value,wall_time\n"


def test_the_parquet_holds_every_point(api, run, monkeypatch):
    pq = pytest.importorskip("pyarrow.parquet")
    monkeypatch.setattr(metric_downloads, "PAGE_POINTS", 1000)
    monkeypatch.setattr(metric_downloads, "PARQUET_ROW_GROUP", 2000)
    _points(run, "loss", range(4500))
    _points(run, "kd", range(3))

    response = api.get(_url("run_metrics_parquet", run))

    assert response.status_code == 200
    assert response["Content-Type"] == metric_downloads.PARQUET_CONTENT_TYPE
    assert f'filename="run-{run.pk}-metrics.parquet"' in response["Content-Disposition"]
    parquet = pq.ParquetFile(io.BytesIO(b"".join(response.streaming_content)))
    table = parquet.read()
    assert table.column_names == ["step", "name", "value", "wall_time"]
    assert parquet.metadata.num_row_groups == 3
    assert table.num_rows == 4503
    assert table.column("name").to_pylist() == ["kd"] * 3 + ["loss"] * 4500
    assert table.column("step").to_pylist() == [0, 1, 2, *range(4500)]
    assert table.column("wall_time").to_pylist()[4] == T0 + timedelta(seconds=1)
    assert table.column("value").to_pylist()[-1] == pytest.approx(4499 / 7)


def test_the_run_page_links_the_downloads(client, user, run):
    client.force_login(user)

    page = client.get(reverse("experiments:run_detail", kwargs={"run_id": run.pk})).content.decode()

    assert f'href="{_url("run_metrics_csv", run)}"' in page
    assert f'href="{_url("run_metrics_parquet", run)}"' in page


def test_a_logged_in_browser_downloads_with_its_session(client, user, run):
    _points(run, "loss", range(2))
    client.force_login(user)

    response = client.get(_url("run_metrics_csv", run))

    assert response.status_code == 200
    assert b"".join(response.streaming_content).count(b"\n") == 3
