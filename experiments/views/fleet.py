"""The worker fleet console (staff only): the fleet page, its live JSON, and POST actions on one worker.

Every view here answers 403 to non-staff users (the login middleware has already sent anonymous users to the
login page). Actions redirect back to the fleet page with a message saying what the worker answered.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import wraps

from django.conf import settings
from django.contrib import messages
from django.core.exceptions import PermissionDenied
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import redirect
from django.template.response import TemplateResponse
from django.views.decorators.http import require_GET, require_POST

from experiments.selectors import fleet as fleet_reads
from experiments.services import fleet as fleet_writes

View = Callable[..., HttpResponse]


def staff_required(view: View) -> View:
    @wraps(view)
    def wrapper(request: HttpRequest, *args, **kwargs) -> HttpResponse:
        if not request.user.is_staff:
            raise PermissionDenied("The worker fleet is visible to staff only.")
        return view(request, *args, **kwargs)

    return wrapper


@staff_required
@require_GET
def worker_list(request: HttpRequest) -> HttpResponse:
    rows, orphans = fleet_reads.worker_rows()
    context = {"rows": rows, "orphans": orphans, "offline_after_s": settings.WORKER_OFFLINE_AFTER_S}
    return TemplateResponse(request, "experiments/worker_list.html", context)


@staff_required
@require_GET
def worker_list_json(request: HttpRequest) -> JsonResponse:
    rows, orphans = fleet_reads.worker_rows()
    return JsonResponse({
        "workers": [fleet_reads.worker_row_data(row) for row in rows],
        "orphans": [run.pk for run in orphans],
    })


def _act(request: HttpRequest, action: Callable[[], str]) -> HttpResponse:
    try:
        messages.success(request, action())
    except fleet_writes.FleetError as exc:
        messages.error(request, str(exc))
    return redirect("experiments:worker_list")


@staff_required
@require_POST
def worker_drain(request: HttpRequest, worker_id: int) -> HttpResponse:
    return _act(request, lambda: fleet_writes.worker_drain(worker_id=worker_id))


@staff_required
@require_POST
def worker_resume(request: HttpRequest, worker_id: int) -> HttpResponse:
    return _act(request, lambda: fleet_writes.worker_resume(worker_id=worker_id))


@staff_required
@require_POST
def worker_shutdown(request: HttpRequest, worker_id: int) -> HttpResponse:
    return _act(request, lambda: fleet_writes.worker_shutdown(worker_id=worker_id))


@staff_required
@require_POST
def worker_add_queue(request: HttpRequest, worker_id: int) -> HttpResponse:
    queue = request.POST.get("queue", "")
    return _act(request, lambda: fleet_writes.worker_add_queue(worker_id=worker_id, queue=queue))


@staff_required
@require_POST
def worker_remove_queue(request: HttpRequest, worker_id: int) -> HttpResponse:
    queue = request.POST.get("queue", "")
    return _act(request, lambda: fleet_writes.worker_remove_queue(worker_id=worker_id, queue=queue))
