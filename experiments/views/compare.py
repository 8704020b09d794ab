"""Analysis pages: compare runs, the leaderboards (and their CSV export), a run's frozen config as JSON and
the download of a finished student.

Team scoping: every run, dataset and config is looked up through the team-scoped selectors. Compare answers
404 for the whole request when any requested run is not visible to the user (or does not exist), rather than
silently dropping it: a shared link then never shows a different comparison than the one it names, and the
page never reveals which of the ids exist.
"""

from __future__ import annotations

import csv
from typing import Any

from django.contrib import messages
from django.core.paginator import Paginator
from django.http import Http404, HttpRequest, HttpResponse, JsonResponse, StreamingHttpResponse
from django.shortcuts import get_object_or_404, redirect
from django.template.response import TemplateResponse
from django.urls import reverse
from django.utils.http import content_disposition_header
from django.utils.text import slugify
from django.views.decorators.http import require_GET

from experiments import export, plots
from experiments.domain import leaderboard as board
from experiments.domain.seed_groups import seed_groups
from experiments.forms_compare import MAX_COMPARE_RUNS, CompareForm, LeaderboardQueryForm
from experiments.models import Run
from experiments.selectors import compare as compare_reads
from experiments.selectors import curves as curves_reads
from experiments.selectors import leaderboard as leaderboard_reads
from experiments.selectors import records
from experiments.selectors import teacher_stores as store_reads


# --- compare ------------------------------------------------------------------------------------------
@require_GET
def compare(request: HttpRequest) -> HttpResponse:
    form = CompareForm(request.GET or None)
    context: dict[str, Any] = {"form": form, "max_runs": MAX_COMPARE_RUNS}
    if form.is_bound and not form.is_valid():
        return TemplateResponse(request, "experiments/compare.html", context, status=400)
    run_ids: list[int] = form.cleaned_data["runs"] if form.is_bound else []
    if not run_ids:
        return TemplateResponse(request, "experiments/compare.html", context)
    runs = compare_reads.compare_run_list(user=request.user, run_ids=run_ids)
    if len(runs) != len(run_ids):
        raise Http404("Some of these runs do not exist or belong to a team you are not in.")
    comparison = compare_reads.run_comparison(runs=runs)
    names = curves_reads.metric_names(run_ids=run_ids)
    curve = form.cleaned_data["metric"] if form.cleaned_data["metric"] in names else _default_curve(
        names, comparison.metric)
    cost = form.cleaned_data["cost"] or "params"
    curves = curves_reads.metric_curves(run_ids=run_ids, name=curve) if curve else {}
    pareto_figure, optimal = _pareto(comparison, cost)
    context |= {
        "runs": runs,
        "comparison": comparison,
        "metric_names": names,
        "curve": curve,
        "cost": cost,
        "runs_param": ",".join(str(i) for i in run_ids),
        "optimal": optimal,
        "group_from": plots.GROUP_FROM,
        "figures": {
            "curves": _curves_figure(runs, curves, curve),
            "pareto": pareto_figure,
            "heatmap": _heatmap_figure(comparison),
        },
    }
    return TemplateResponse(request, "experiments/compare.html", context)


def _default_curve(names: list[str], metric: leaderboard_reads.PrimaryMetric) -> str:
    """The eval curve of the ranking metric when logged, else the training loss, else the first metric."""
    for name in (f"eval/{metric.name}", "loss"):
        if name in names:
            return name
    return names[0] if names else ""


def _run_label(run: Run) -> str:
    return f"#{run.pk} {run.student} · {_method(run)} · s{run.seed}"


def _method(run: Run) -> str:
    return "baseline" if run.is_baseline else str(run.recipe)


def _curves_figure(runs: list[Run], curves: curves_reads.Curves, name: str) -> dict[str, Any]:
    groups = seed_groups((r.pk, f"{r.student} · {_method(r)}", r.config) for r in runs)
    return plots.compare_figure(
        (
            plots.Curve(_run_label(r), *curves[r.pk], dashed=r.is_baseline, group=groups[r.pk],
                        color=plots.method_color(r.recipe_id, baseline=r.is_baseline))
            for r in runs if r.pk in curves
        ),
        metric=name,
    )


def _pareto(comparison: compare_reads.Comparison, cost: str) -> tuple[dict[str, Any], set[int]]:
    """The Pareto figure and the ids of the runs on the frontier (quality vs ``cost``; teachers left out)."""

    def cost_of(evaluation: Any) -> float | None:
        if evaluation is None:
            return None
        return evaluation.param_count if cost == "params" else evaluation.latency_ms

    metric = comparison.metric
    costs = [cost_of(row.evaluation) for row in comparison.rows]
    flags = board.pareto_flags(list(zip(costs, [r.quality for r in comparison.rows], strict=True)),
                                   higher_is_better=metric.higher_is_better)
    points = [
        plots.ParetoPoint(
            _run_label(row.run),
            c,
            row.quality,
            group="hard-label baseline" if row.run.is_baseline else str(row.run.recipe),
            optimal=flag,
            color=plots.method_color(row.run.recipe_id, baseline=row.run.is_baseline),
        )
        for row, c, flag in zip(comparison.rows, costs, flags, strict=True)
    ]
    points += [
        plots.ParetoPoint(
            f"teacher {e.model}", cost_of(e), leaderboard_reads.metric_value(e, metric), teacher=True
        )
        for e in comparison.teachers
    ]
    figure = plots.pareto_figure(points, cost_label="parameters" if cost == "params" else "latency (ms)",
                                 metric_label=metric.label, higher_is_better=metric.higher_is_better,
                                 percent=metric.percent)
    return figure, {row.run.pk for row, flag in zip(comparison.rows, flags, strict=True) if flag}


def _heatmap_figure(comparison: compare_reads.Comparison) -> dict[str, Any] | None:
    axes = compare_reads.heatmap_axes(comparison)
    if axes is None:
        return None
    metric = comparison.metric
    return plots.heatmap_figure(x_label=axes.x_label, y_label=axes.y_label, x_levels=axes.x_levels,
                                y_levels=axes.y_levels, z=axes.z, metric_label=metric.label,
                                higher_is_better=metric.higher_is_better, percent=metric.percent)


# --- one run: frozen config and model download -----------------------------------------------------------
@require_GET
def run_config_json(request: HttpRequest, run_id: int) -> JsonResponse:
    """The run's frozen config exactly as its worker received it (before paths are made absolute)."""
    run = get_object_or_404(records.run_list(user=request.user), pk=run_id)
    response = JsonResponse(run.config, safe=False, json_dumps_params={"indent": 2, "sort_keys": True})
    response["Content-Disposition"] = content_disposition_header(False, f"run-{run.pk}-config.json")
    return response


@require_GET
def run_model_download(request: HttpRequest, run_id: int) -> HttpResponse:
    """The finished student as a zipped Hugging Face folder with a model card (see experiments.export)."""
    runs = records.run_list(user=request.user).select_related("experiment__dataset", "student__parent")
    run = get_object_or_404(runs, pk=run_id)
    try:
        model = export.model_export(run=run)
    except export.ExportRefused as exc:
        messages.error(request, str(exc))
        return redirect("experiments:run_detail", run_id=run.pk)
    response = StreamingHttpResponse(export.model_export_stream(model), content_type="application/zip")
    response["Content-Disposition"] = content_disposition_header(True, model.filename)
    return response


# --- leaderboards ---------------------------------------------------------------------------------------
LEADERBOARD_PAGE_ROWS = 50


@require_GET
def leaderboard(request: HttpRequest, dataset_id: int) -> HttpResponse:
    dataset = get_object_or_404(records.dataset_spec_list(user=request.user), pk=dataset_id)
    query = LeaderboardQueryForm(request.GET or None)
    chosen = query.filters()
    benchmark = leaderboard_reads.leaderboard_benchmark(
        user=request.user, dataset=dataset, metric_name=chosen.get("metric", ""),
        split_key=chosen.get("split", ""), scope=chosen.get("scope", "team"), filters=chosen,
    )
    metric = benchmark.metric
    rows = benchmark.rows
    if request.GET.get("format") == "csv":
        return _leaderboard_csv(request, benchmark, rows)
    csv_query = request.GET.copy()
    csv_query["format"] = "csv"
    # The table shows one page of the ranking, the plot that page and the Pareto frontier of every row that
    # fits (the CSV keeps every row): the page costs the same whatever the size of the board.
    page = Paginator(rows, LEADERBOARD_PAGE_ROWS).get_page(request.GET.get("page"))
    labels = store_reads.store_labels_for_runs(i for r in page.object_list for i in r.run_ids)
    for row in page.object_list:
        row.stores = "; ".join(dict.fromkeys(labels[i] for i in row.run_ids if i in labels))
    shown = {tuple(r.run_ids) for r in page.object_list}
    plotted = [*page.object_list, *(r for r in benchmark.frontier() if tuple(r.run_ids) not in shown)]
    context = {
        "dataset": dataset,
        "rows": rows,
        "page": page,
        "total": benchmark.total,
        "budget": query,
        "metric": metric,
        "benchmark": benchmark,
        "chosen": chosen,
        "csv_query": csv_query.urlencode(),
        "max_runs": MAX_COMPARE_RUNS,
        "filtered": any(k in chosen for k in ("max_params", "max_latency_ms", "recipe", "family")),
        "figure": _leaderboard_figure(plotted, metric),
    }
    return TemplateResponse(request, "experiments/leaderboard.html", context)


def _leaderboard_figure(rows: list[leaderboard_reads.LeaderboardRow],
                        metric: leaderboard_reads.PrimaryMetric) -> dict[str, Any]:
    """The plotted rows against their size, coloured by method (the same colours as every other figure),
    dominated rows faded, the Pareto frontier of the rows flagged ``pareto`` as a step line and each teacher
    as a star."""
    points = [
        plots.ParetoPoint(
            f"{r.student} · {r.recipe}" + (f" · {r.sweep}" if r.sweep else ""),
            r.params,
            r.mean,
            group="hard-label baseline" if r.is_baseline else str(r.recipe),
            optimal=r.pareto,
            color=plots.method_color(r.recipe.pk, baseline=r.is_baseline),
            spread=r.std if r.seeds > 1 else None,
        )
        for r in rows
    ]
    teachers = {r.teacher.pk: r for r in rows if r.teacher is not None and r.teacher_accuracy is not None}
    points += [
        plots.ParetoPoint(f"teacher {r.teacher}", r.teacher_params, r.teacher_accuracy, teacher=True)
        for r in teachers.values()
    ]
    return plots.pareto_figure(points, cost_label="parameters", metric_label=metric.label,
                               higher_is_better=metric.higher_is_better, percent=metric.percent)


def _leaderboard_csv(request: HttpRequest, benchmark: leaderboard_reads.Benchmark,
                     rows: list[leaderboard_reads.LeaderboardRow]) -> HttpResponse:
    response = HttpResponse(content_type="text/csv; charset=utf-8")
    name = (
        f"leaderboard-{slugify(benchmark.dataset.name) or benchmark.dataset.pk}-{benchmark.metric.name}.csv"
    )
    response["Content-Disposition"] = content_disposition_header(True, name)
    writer = csv.writer(response)
    writer.writerows(
        export.leaderboard_csv_lines(
            rows,
            metric=benchmark.metric,
            config_url=lambda run_id: request.build_absolute_uri(
                reverse("experiments:run_config_json", args=[run_id])
            ),
        )
    )
    return response
