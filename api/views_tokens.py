"""The "API token" page: a user creates and revokes their own tokens (session login, like every page)."""

from __future__ import annotations

from datetime import timedelta

from django.contrib import messages
from django.core.exceptions import ValidationError
from django.http import HttpRequest, HttpResponse
from django.shortcuts import get_object_or_404, redirect
from django.template.response import TemplateResponse
from django.urls import reverse
from django.utils import timezone
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_http_methods, require_POST

from experiments.domain.fields import service_error_targets

from . import selectors, services
from .forms import TokenCreateForm


@never_cache  # the page shows a new token once: no cache may keep it
@require_http_methods(["GET", "POST"])
def token_list(request: HttpRequest) -> HttpResponse:
    form = TokenCreateForm(request.POST or None, user=request.user)
    created, token = None, None
    if request.method == "POST" and form.is_valid():
        data = form.cleaned_data
        days = data["expires_in_days"]
        try:
            created, token = services.api_token_create(
                user=request.user,
                name=data["name"],
                scope=data["scope"],
                team=data["team"],
                expires_at=timezone.now() + timedelta(days=days) if days else None,
            )
        except ValidationError as exc:
            for field, message in service_error_targets(exc, form.fields, {"expires_at": "expires_in_days"}):
                form.add_error(field, message)
        else:
            form = TokenCreateForm(user=request.user)
    context = {
        "form": form,
        "tokens": selectors.api_token_list(user=request.user),
        "now": timezone.now(),
        "created": created,
        "token": token,
        "site_url": request.build_absolute_uri("/").rstrip("/"),
        "schema_url": request.build_absolute_uri(reverse("api:schema")),
        "docs_url": request.build_absolute_uri(reverse("api:docs")),
    }
    return TemplateResponse(request, "api/token_list.html", context)


@require_POST
def token_revoke(request: HttpRequest, token_id: int) -> HttpResponse:
    token = get_object_or_404(selectors.api_token_list(user=request.user), pk=token_id)
    services.api_token_revoke(token=token)
    messages.success(request, f"Token {token.name} revoked: requests with it now get 401.")
    return redirect("api:token_list")
