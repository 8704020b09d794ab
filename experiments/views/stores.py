"""Teacher-output stores: a team's stores with their size and reuse, one store with every run that used it,
and deleting one (refused while a queued or running run needs it)."""

from __future__ import annotations

from django.contrib import messages
from django.core.exceptions import ValidationError
from django.http import HttpRequest, HttpResponse
from django.shortcuts import get_object_or_404, redirect
from django.template.defaultfilters import filesizeformat
from django.template.response import TemplateResponse
from django.views.decorators.http import require_GET, require_POST

from experiments.listing import list_page
from experiments.selectors import teacher_stores as store_reads
from experiments.selectors import teams
from experiments.services import teacher_stores as store_writes

STORE_SORTS = {
    "teacher": ("teacher_label",), "dataset": ("dataset_label", "split"), "k": ("k",),
    "size": ("size_bytes",), "per_token": ("bytes_per_token",), "reuse": ("reuse_count",),
    "created_at": ("created_at",), "last_used": ("last_used_at",),
}
DESCENDING_FIRST = frozenset({"size", "per_token", "reuse", "created_at", "last_used", "k"})


@require_GET
def store_list(request: HttpRequest) -> HttpResponse:
    team = teams.selected_team(request)
    stores = store_reads.store_list(user=request.user)
    if team is not None:
        stores = stores.filter(team=team)
    listing = list_page(request, stores, sorts=STORE_SORTS, default="-last_used",
                        descending_first=DESCENDING_FIRST)
    for store in listing.page.object_list:
        store.more_runs = max(store.run_count - len(store.shown_uses), 0)
    context = {"page": listing.page, "sorting": listing.columns, "sort": listing.sort, "team": team}
    return TemplateResponse(request, "experiments/stores.html", context)


@require_GET
def store_detail(request: HttpRequest, store_id: int) -> HttpResponse:
    store = get_object_or_404(store_reads.store_list(user=request.user), pk=store_id)
    context = {"store": store, "uses": store_reads.store_uses(store=store)}
    return TemplateResponse(request, "experiments/stores_detail.html", context)


@require_POST
def store_delete(request: HttpRequest, store_id: int) -> HttpResponse:
    store = get_object_or_404(store_reads.store_list(user=request.user), pk=store_id)
    try:
        deletion = store_writes.store_delete(store=store)
    except ValidationError as exc:
        messages.error(request, " ".join(exc.messages))
        return redirect("experiments:store_detail", store_id=store.pk)
    kept = deletion.files_kept
    done = f"its files stay: {kept}" if kept else f"{filesizeformat(deletion.freed_bytes)} freed"
    messages.success(request, f"Store {deletion.label} deleted ({done}).")
    return redirect("experiments:store_list")
