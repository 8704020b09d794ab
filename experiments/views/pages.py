"""Thin function views: parse the request, call selectors and services, render.

Every record is looked up through a team-scoped selector, so another team's ids give 404. The ``*_json``
views feed the pages' live refresh (static/js/app.js) and are login-required like everything else.
"""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.contrib import messages
from django.core.exceptions import ValidationError
from django.db.models import Q, QuerySet
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import get_object_or_404, redirect
from django.template.loader import render_to_string
from django.template.response import TemplateResponse
from django.views.decorators.csrf import csrf_exempt, csrf_protect
from django.views.decorators.http import require_GET, require_POST

from experiments import forms, plots
from experiments.domain import input_rules, queue_order, routing, specs, uploads
from experiments.domain.engine_config import TRAIN_DEFAULTS, run_resources
from experiments.domain.seed_groups import seed_groups
from experiments.listing import list_page
from experiments.models import DatasetSpec, Experiment, Run
from experiments.selectors import curves, fleet, footprint, leaderboard, teams
from experiments.selectors import records as records_reads
from experiments.selectors import results as results_reads
from experiments.services import lifecycle
from experiments.services import records as records_writes
from experiments.views.uploads import CappedUploadHandler, announced_too_large

ACTIVE = (Run.Status.QUEUED, Run.Status.RUNNING)


# --- home -----------------------------------------------------------------------------------------
@require_GET
def home(request: HttpRequest) -> HttpResponse:
    user = request.user
    fleet_summary = fleet.fleet_summary()
    context = {
        **records_reads.home_summary(user=user),
        "fleet": fleet_summary,
        "workers_online": fleet_summary.workers_online,
        "model_count": records_reads.model_spec_list(user=user).count(),
        "dataset_count": records_reads.dataset_spec_list(user=user).count(),
        "recipe_count": records_reads.recipe_list(user=user).count(),
        "has_team": teams.team_list(user=user).exists(),
    }
    return TemplateResponse(request, "experiments/home.html", context)


# --- records --------------------------------------------------------------------------------------
# Sort keys each list offers (?sort=key or ?sort=-key); the fields they order by.
MODEL_SORTS = {
    "name": ("name",), "team": ("team__name", "name"), "source": ("source", "name"),
    "labels": ("num_labels",), "params": ("param_count",), "created_at": ("created_at",),
}
DATASET_SORTS = {
    "name": ("name",), "team": ("team__name", "name"), "source": ("source", "name"),
    "classes": ("num_labels",), "created_at": ("created_at",),
}
EXPERIMENT_SORTS = {
    "name": ("name",), "team": ("team__name", "name"), "dataset": ("dataset__name", "name"),
    "runs": ("run_count",), "created_at": ("created_at",),
}
DESCENDING_FIRST = frozenset({"created_at", "params", "labels", "classes", "runs"})


def _list_context(
    request: HttpRequest, queryset: QuerySet, sorts: dict[str, tuple[str, ...]], default: str
) -> dict[str, Any]:
    """A list page's rows for the team chosen in the header (all the user's teams if none), sorted and
    paged."""
    team = teams.selected_team(request)
    if team is not None:
        queryset = queryset.filter(team=team)
    listing = list_page(request, queryset, sorts=sorts, default=default, descending_first=DESCENDING_FIRST)
    return {"page": listing.page, "sorting": listing.columns, "sort": listing.sort, "team": team}


@require_GET
def model_list(request: HttpRequest) -> HttpResponse:
    context = _list_context(request, records_reads.model_spec_list(user=request.user), MODEL_SORTS, "name")
    context["models"] = context["page"].object_list
    return TemplateResponse(request, "experiments/model_list.html", context)


def model_create(request: HttpRequest) -> HttpResponse:
    default_team = teams.selected_team(request)
    form = forms.ModelSpecForm(request.POST or None, user=request.user, default_team=default_team)
    if request.method == "POST" and form.is_valid():
        try:
            spec = records_writes.model_spec_create(
                team=form.cleaned_data["team"], created_by=request.user, **form.service_fields()
            )
        except ValidationError as exc:
            forms.add_service_errors(form, exc, form.error_aliases())
        else:
            messages.success(request, f"Model {spec} registered.")
            return redirect("experiments:model_list")
    return TemplateResponse(request, "experiments/model_form.html", {"form": form})


@require_GET
def model_detail(request: HttpRequest, model_id: int) -> HttpResponse:
    spec = get_object_or_404(records_reads.model_spec_list(user=request.user), pk=model_id)
    return _render_model(request, spec, forms.ModelDeriveForm(initial={"name": f"{spec.name}-student"[:120]}))


def _render_model(request: HttpRequest, spec, derive_form: forms.ModelDeriveForm) -> HttpResponse:
    runs = records_reads.run_list(user=request.user).filter(Q(student=spec) | Q(teacher=spec))[:20]
    context = {
        "spec": spec,
        "runs": runs,
        "derived": spec.derived.order_by("name"),
        "adapter": footprint.model_adapter(spec=spec),
        # Only transformers models can be derived from (builtin nets have no layers to subset).
        "derive_form": derive_form if specs.model_kind(spec) == "text" else None,
    }
    return TemplateResponse(request, "experiments/model_detail.html", context)


@require_POST
def model_derive(request: HttpRequest, model_id: int) -> HttpResponse:
    parent = get_object_or_404(records_reads.model_spec_list(user=request.user), pk=model_id)
    form = forms.ModelDeriveForm(request.POST)
    if form.is_valid():
        try:
            spec = records_writes.model_derive(
                parent=parent, created_by=request.user, **form.service_kwargs()
            )
        except ValidationError as exc:
            forms.add_service_errors(form, exc, input_rules.MODEL_DERIVE_ALIASES)
        else:
            messages.success(request, f"Derived {spec} from {parent}; use it as a student.")
            return redirect("experiments:model_detail", model_id=spec.pk)
    return _render_model(request, parent, form)


@require_GET
def dataset_list(request: HttpRequest) -> HttpResponse:
    context = _list_context(
        request, records_reads.dataset_spec_list(user=request.user), DATASET_SORTS, "name"
    )
    context["datasets"] = context["page"].object_list
    return TemplateResponse(request, "experiments/dataset_list.html", context)


@csrf_exempt  # checked by _dataset_create once the upload cap is in place (reading the token parses the body)
def dataset_create(request: HttpRequest) -> HttpResponse:
    """Register a dataset; an uploaded file over ``DATASET_UPLOAD_MAX_BYTES`` is refused before it is stored.

    A body announced too large is not read at all. Otherwise :class:`~experiments.views.CappedUploadHandler`
    goes first for this request, so a client that sends more than it announced is cut off while the body is
    read.
    """
    cap = settings.DATASET_UPLOAD_MAX_BYTES
    if request.method == "POST":
        if announced_too_large(request, cap):
            default_team = teams.selected_team(request)
            form = forms.DatasetSpecForm(user=request.user, default_team=default_team,
                                         initial={"source": DatasetSpec.Source.UPLOAD})
            return _dataset_too_large(request, form, cap)
        request.upload_handlers.insert(0, CappedUploadHandler(cap, request))
    return _dataset_create(request, cap)


@csrf_protect
def _dataset_create(request: HttpRequest, cap: int) -> HttpResponse:
    bound = request.method == "POST"
    default_team = teams.selected_team(request)
    form = forms.DatasetSpecForm(request.POST if bound else None, request.FILES if bound else None,
                                 user=request.user, default_team=default_team)
    capped = next((h for h in request.upload_handlers if isinstance(h, CappedUploadHandler)), None)
    if bound and capped is not None and capped.exceeded:
        return _dataset_too_large(request, form, cap)
    if bound and form.is_valid():
        try:
            dataset = records_writes.dataset_spec_create(
                team=form.cleaned_data["team"], created_by=request.user, **form.service_fields()
            )
        except ValidationError as exc:
            forms.add_service_errors(form, exc)
        else:
            messages.success(request, f"Dataset {dataset} registered.")
            return redirect("experiments:dataset_list")
    return TemplateResponse(request, "experiments/dataset_form.html", {"form": form})


def _dataset_too_large(request: HttpRequest, form: forms.DatasetSpecForm, cap: int) -> HttpResponse:
    form.refuse_upload(uploads.too_large_message(cap))
    return TemplateResponse(request, "experiments/dataset_form.html", {"form": form}, status=413)


@require_GET
def dataset_detail(request: HttpRequest, dataset_id: int) -> HttpResponse:
    dataset = get_object_or_404(records_reads.dataset_spec_list(user=request.user), pk=dataset_id)
    experiments = records_reads.experiment_list(user=request.user).filter(dataset=dataset)[:20]
    return TemplateResponse(
        request, "experiments/dataset_detail.html", {"dataset": dataset, "experiments": experiments}
    )


# --- experiments ----------------------------------------------------------------------------------
@require_GET
def experiment_list(request: HttpRequest) -> HttpResponse:
    context = _list_context(request, records_reads.experiment_list_rows(user=request.user), EXPERIMENT_SORTS,
                            "-created_at")
    page = context["page"]
    page.object_list = records_reads.experiment_rows(page.object_list)
    return TemplateResponse(request, "experiments/experiment_list.html", context)


@require_GET
def experiment_detail(request: HttpRequest, experiment_id: int) -> HttpResponse:
    experiment = get_object_or_404(records_reads.experiment_list(user=request.user), pk=experiment_id)
    runs = list(records_reads.experiment_runs(experiment=experiment))
    context = {
        **_experiment_live(experiment, runs),
        "experiment": experiment,
        "students": experiment.students.all(),
        "recipes": experiment.recipes.all(),
        "train": {**TRAIN_DEFAULTS, **experiment.train},
        "curves": _experiment_figure(experiment, runs),
        "queue_notices": routing.experiment_queue_notices(runs=runs),
        "results": results_reads.experiment_results(experiment=experiment),
    }
    return TemplateResponse(request, "experiments/experiment_detail.html", context)


@require_GET
def experiment_runs_json(request: HttpRequest, experiment_id: int) -> JsonResponse:
    experiment = get_object_or_404(records_reads.experiment_list(user=request.user), pk=experiment_id)
    runs = list(records_reads.experiment_runs(experiment=experiment))
    live = _experiment_live(experiment, runs)
    data: dict[str, Any] = {
        "status": live["status"],
        "active": live["active"],
        "runs": [
            {"id": r.pk, "status": r.status, "step": r.step, "total_steps": r.total_steps,
             "progress_percent": r.progress_percent, "accuracy": r.accuracy, "error": r.error}
            for r in runs
        ],
        "html": render_to_string("experiments/_runs_table.html", {**live, "experiment": experiment}, request),
    }
    if request.GET.get("curves"):
        data["figures"] = {"curves-figure": _experiment_figure(experiment, runs)}
    return JsonResponse(data)


def _experiment_live(experiment: Experiment, runs: list[Run]) -> dict[str, Any]:
    """What the runs table shows; recomputed from the fresh runs so the live refresh never lags."""
    counts = {s: 0 for s in Run.Status.values}
    for run in runs:
        counts[run.status] += 1
    queue_order.annotate_positions(runs)  # each queued run's place in its queue, in one query
    for status, n in counts.items():
        setattr(experiment, f"{status}_count", n)
    done = counts["succeeded"] + counts["failed"] + counts["cancelled"]
    return {
        "runs": runs,
        "counts": {s: n for s, n in counts.items() if n},
        "done": done,
        "progress": int(100 * done / len(runs)) if runs else 0,
        "status": records_reads.experiment_status(experiment),
        "active": counts["queued"] + counts["running"] > 0,
    }


def _experiment_figure(experiment: Experiment, runs: list[Run]) -> dict[str, Any]:
    series = curves.experiment_metric_series(experiment=experiment, name="eval/accuracy")
    by_id = {r.pk: r for r in runs}
    groups = seed_groups((r.pk, f"{r.student} · {_method(r)}", r.config) for r in runs)
    return plots.runs_figure(
        plots.Curve(f"#{r.pk} {r.student} · {_method(r)} · s{r.seed}", steps, values, dashed=r.is_baseline,
                    group=groups[r.pk], color=plots.method_color(r.recipe_id, baseline=r.is_baseline))
        for r, (steps, values) in ((by_id[i], s) for i, s in sorted(series.items()) if i in by_id)
    )


def _method(run: Run) -> str:
    return "baseline" if run.is_baseline else str(run.recipe)


@require_POST
def experiment_cancel(request: HttpRequest, experiment_id: int) -> HttpResponse:
    experiment = get_object_or_404(records_reads.experiment_list(user=request.user), pk=experiment_id)
    n = lifecycle.experiment_cancel(experiment=experiment)
    if n:
        messages.success(request, f"Cancelling {n} unfinished run{'s' if n != 1 else ''}.")
    else:
        messages.info(request, "Every run of this experiment had already finished.")
    return redirect("experiments:experiment_detail", experiment_id=experiment.pk)


# --- runs -----------------------------------------------------------------------------------------
@require_GET
def run_detail(request: HttpRequest, run_id: int) -> HttpResponse:
    run = get_object_or_404(records_reads.run_list(user=request.user), pk=run_id)
    return _render_run(request, run, forms.RegisterModelForm(initial={"name": _registered_name(run)}))


def _registered_name(run: Run) -> str:
    return f"{run.student.name}-{run.recipe.name}-s{run.seed}-run{run.pk}"[:120]


def _render_run(request: HttpRequest, run: Run, register_form: forms.RegisterModelForm) -> HttpResponse:
    series = curves.run_metric_series(run=run)
    on_gpu = footprint.run_trains_on_gpu(run=run)
    context = {
        "run": run,
        "figures": _run_figures(series),
        "evaluations": records_reads.run_evaluations(run=run),
        "artifacts": run.artifacts.all(),
        "registered": run.registered_models.all(),
        "register_form": register_form,
        "queue_notice": routing.run_queue_notice(run=run),
        "live": curves.run_live_telemetry(run=run) if run.status == Run.Status.RUNNING else {},
        "transitions": run.transitions.all(),
        "resources": run_resources(run.config or {}, on_gpu=on_gpu),
        "footprint": footprint.run_footprint(run=run, on_gpu=on_gpu),
    }
    return TemplateResponse(request, "experiments/run_detail.html", context)


def _run_figures(series: dict[str, tuple[list[int], list[float]]]) -> dict[str, Any]:
    return {"loss-figure": plots.loss_figure(series), "eval-figure": plots.eval_figure(series)}


@require_GET
def run_status_json(request: HttpRequest, run_id: int) -> JsonResponse:
    run = get_object_or_404(records_reads.run_list(user=request.user), pk=run_id)
    data: dict[str, Any] = {
        "id": run.pk,
        "status": run.status,
        "active": not run.is_terminal,
        "step": run.step,
        "total_steps": run.total_steps,
        "progress_percent": run.progress_percent,
        "samples_per_s": run.samples_per_s,
        "error": run.error,
        "html": render_to_string("experiments/_run_status.html", {
            "run": run,
            "live": curves.run_live_telemetry(run=run) if run.status == Run.Status.RUNNING else {},
        }, request),
    }
    if request.GET.get("curves"):
        data["figures"] = _run_figures(curves.run_metric_series(run=run))
    return JsonResponse(data)


@require_POST
def run_cancel(request: HttpRequest, run_id: int) -> HttpResponse:
    run = get_object_or_404(records_reads.run_list(user=request.user), pk=run_id)
    if run.is_terminal:
        messages.info(request, f"Run #{run.pk} had already finished ({run.status}).")
    else:
        run = lifecycle.run_cancel(run=run)
        messages.success(request, f"Run #{run.pk} cancelled." if run.is_terminal
                         else f"Run #{run.pk} will stop at its next check (within a few steps).")
    return redirect("experiments:run_detail", run_id=run.pk)


@require_POST
def run_requeue(request: HttpRequest, run_id: int) -> HttpResponse:
    run = get_object_or_404(records_reads.run_list(user=request.user), pk=run_id)
    try:
        run = lifecycle.run_requeue(run=run, reason=f"Requeued by {request.user.get_username()}.")
    except ValidationError as exc:
        messages.error(request, " ".join(exc.messages))
    else:
        messages.success(request, f"Run #{run.pk} is queued again (a new attempt that resumes from its last "
                                  f"checkpoint).")
    return redirect("experiments:run_detail", run_id=run.pk)


@require_POST
def run_register_model(request: HttpRequest, run_id: int) -> HttpResponse:
    run = get_object_or_404(records_reads.run_list(user=request.user), pk=run_id)
    form = forms.RegisterModelForm(request.POST)
    if form.is_valid():
        try:
            spec = records_writes.model_register_from_run(
                run=run, name=form.cleaned_data["name"], created_by=request.user
            )
        except ValidationError as exc:
            forms.add_service_errors(form, exc, input_rules.REGISTER_MODEL_ALIASES)
        else:
            messages.success(
                request, f"Registered {spec} from run #{run.pk}; use it as a teacher or a student."
            )
            return redirect("experiments:model_list")
    return _render_run(request, run, form)


# --- leaderboards ---------------------------------------------------------------------------------
@require_GET
def leaderboard_index(request: HttpRequest) -> HttpResponse:
    datasets = leaderboard.leaderboard_datasets(user=request.user).order_by("team__name", "name")
    return TemplateResponse(request, "experiments/leaderboard_index.html", {"datasets": datasets})
