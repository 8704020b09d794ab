"""Experiment set-up: the form (with sweeps), the check step before launch, and clones of experiments and
runs.

Thin views: the form validates and parses sweeps, ``preflight`` computes the checks, ``services`` validates
and creates. Every source record is looked up through a team-scoped selector, so another team's ids give 404.
"""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.contrib import messages
from django.core.exceptions import ValidationError
from django.http import HttpRequest, HttpResponse
from django.shortcuts import get_object_or_404, redirect
from django.template.response import TemplateResponse
from django.views.decorators.http import require_GET, require_http_methods, require_POST

from experiments import forms
from experiments.domain import preflight
from experiments.selectors import records as records_reads
from experiments.selectors import teams
from experiments.services import launch
from experiments.services import records as records_writes


def _render(request: HttpRequest, form: forms.ExperimentForm, *, report: preflight.Report | None = None,
            source: str = "") -> TemplateResponse:
    context: dict[str, Any] = {"form": form, "report": report, "source": source,
                               "run_limit": settings.MAX_RUNS_PER_EXPERIMENT}
    return TemplateResponse(request, "experiments/experiment_form.html", context)


@require_http_methods(["GET", "POST"])
def experiment_create(request: HttpRequest) -> HttpResponse:
    """The experiment form; a valid POST creates the experiment and its runs. ``?copy=<id>`` starts from an
    existing experiment (as its Clone button does)."""
    if request.method == "GET":
        source = _copy_source(request)
        initial = forms.experiment_initial(source) if source is not None else {}
        default_team = teams.selected_team(request)
        return _render(
            request,
            forms.ExperimentForm(user=request.user, default_team=default_team, initial=initial),
            source=str(source) if source is not None else "",
        )
    form = forms.ExperimentForm(request.POST, user=request.user, default_team=teams.selected_team(request))
    if form.is_valid():
        try:
            experiment = launch.experiment_create(created_by=request.user, **form.service_kwargs())
        except ValidationError as exc:
            forms.add_service_errors(form, exc)
        else:
            messages.success(request, f"Experiment {experiment} created with {experiment.runs.count()} runs.")
            return redirect("experiments:experiment_detail", experiment_id=experiment.pk)
    return _render(request, form)


def _copy_source(request: HttpRequest):
    source_id = request.GET.get("copy", "")
    if not source_id.isdigit():
        return None
    return records_reads.experiment_list(user=request.user).filter(pk=source_id).first()


@require_POST
def experiment_check(request: HttpRequest) -> HttpResponse:
    """The step before launch: the number of runs and the pre-flight checks, recomputed by the server, with
    the errors launching would give; nothing is created."""
    form = forms.ExperimentForm(request.POST, user=request.user, default_team=teams.selected_team(request))
    report = None
    if form.is_valid():
        kwargs = form.preflight_kwargs()
        derive, teacher = form.cleaned_data.get("derive_student"), form.cleaned_data.get("teacher")
        try:
            if derive and teacher is not None:  # counted and checked like the student it will become
                kwargs["students"] = [*kwargs["students"],
                                      records_writes.derived_student_preview(parent=teacher, layers=derive)]
            report = preflight.experiment_preflight(**kwargs)
            launch.experiment_validate(team=form.cleaned_data["team"],
                                         teacher_weights=form.cleaned_data.get("teacher_weights") or [],
                                         **kwargs)
        except ValidationError as exc:
            forms.add_service_errors(form, exc)
    return _render(request, form, report=report)


@require_GET
def experiment_clone(request: HttpRequest, experiment_id: int) -> HttpResponse:
    """The experiment form pre-filled from an experiment of the user's teams (its sweep included)."""
    source = get_object_or_404(records_reads.experiment_list(user=request.user), pk=experiment_id)
    default_team = teams.selected_team(request)
    form = forms.ExperimentForm(
        user=request.user, default_team=default_team, initial=forms.experiment_initial(source)
    )
    return _render(request, form, source=str(source))


@require_GET
def run_clone(request: HttpRequest, run_id: int) -> HttpResponse:
    """The experiment form pre-filled to train one run again with its concrete values, ready to edit."""
    run = get_object_or_404(records_reads.run_list(user=request.user), pk=run_id)
    default_team = teams.selected_team(request)
    form = forms.ExperimentForm(user=request.user, default_team=default_team, initial=forms.run_initial(run))
    return _render(request, form, source=f"run #{run.pk} of {run.experiment}")
