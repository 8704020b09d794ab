"""Recipe pages: the list (latest versions), the form (a new recipe, or the next version of one), a recipe's
page (its versions, what changed between them, the experiments that used each) and its YAML export and
import.

The YAML document format is the API's (``api.yaml_io``): the page's export is the API's export, and an import
is validated exactly as ``POST /api/recipes/import`` validates it.
"""

from __future__ import annotations

from typing import Any

from django.contrib import messages
from django.core.exceptions import ValidationError
from django.http import HttpRequest, HttpResponse
from django.shortcuts import get_object_or_404, redirect
from django.template.response import TemplateResponse
from django.urls import reverse
from django.utils.text import slugify
from django.views.decorators.csrf import csrf_exempt, csrf_protect
from django.views.decorators.http import require_GET
from rest_framework.exceptions import ValidationError as DocumentError

from api import yaml_io
from api.parsers import YAML_MAX_BYTES
from experiments import forms, forms_recipe
from experiments.domain.recipe_versions import recipe_changes
from experiments.models import Recipe
from experiments.selectors import records as records_reads
from experiments.selectors import teams
from experiments.services import records as records_writes
from experiments.views.pages import _list_context
from experiments.views.uploads import CappedUploadHandler, announced_too_large

RECIPE_SORTS = {
    "name": ("name", "version"),
    "team": ("team__name", "name"),
    "scheme": ("scheme", "name"),
    "created_at": ("created_at",),
}
RECIPE_INITIAL_TERMS = [{"name": "ce", "weight": 0.1}, {"name": "kd", "weight": 0.9, "temperature": 4.0}]


@require_GET
def recipe_list(request: HttpRequest) -> HttpResponse:
    context = _list_context(
        request, records_reads.recipe_latest_list(user=request.user), RECIPE_SORTS, "name"
    )
    context["recipes"] = context["page"].object_list
    context["import_form"] = forms_recipe.RecipeImportForm(user=request.user, default_team=context["team"])
    return TemplateResponse(request, "experiments/recipe_list.html", context)


def _start_from(request: HttpRequest) -> Recipe | None:
    """The version a new one starts from (``?from=ID``, one of the user's recipes), if any."""
    raw = request.GET.get("from", "")
    if not raw.isdigit():
        return None
    return records_reads.recipe_list(user=request.user).filter(pk=int(raw)).first()


def recipe_create(request: HttpRequest) -> HttpResponse:
    """A new recipe, or (a name that exists, e.g. from ``?from=ID``) the next version of one."""
    catalog = forms_recipe.loss_term_catalog()
    bound = request.method == "POST"
    start = None if bound else _start_from(request)
    initial, initial_terms = forms_recipe.recipe_form_initial(start) if start else ({}, RECIPE_INITIAL_TERMS)
    form = forms_recipe.RecipeForm(
        request.POST if bound else None,
        user=request.user,
        default_team=teams.selected_team(request),
        initial=initial,
    )
    terms = forms_recipe.TermFormSet(
        request.POST if bound else None,
        prefix="terms",
        form_kwargs={"catalog": catalog},
        initial=None if bound else initial_terms,
    )
    if bound and all([form.is_valid(), terms.is_valid()]):
        data = form.cleaned_data
        try:
            recipe = records_writes.recipe_create(
                team=data["team"],
                created_by=request.user,
                name=data["name"],
                scheme=data["scheme"],
                terms=terms.terms(),
                description=data["description"],
                scheme_params=form.scheme_params(),
            )
        except ValidationError as exc:
            forms.add_service_errors(form, exc)
        else:
            messages.success(request, f"Recipe {recipe} saved: {recipe.formula}")
            return redirect("experiments:recipe_detail", recipe_id=recipe.pk)
    context = {
        "form": form,
        "terms": terms,
        "catalog": catalog,
        "start": start,
        "unedited_schedules": forms_recipe.parameter_schedules(start) if start else [],
    }
    return TemplateResponse(request, "experiments/recipe_form.html", context, status=400 if bound else 200)


def _detail_context(request: HttpRequest, recipe: Recipe) -> dict[str, Any]:
    versions = records_reads.recipe_versions(recipe=recipe)
    used = records_reads.recipe_experiments(user=request.user, recipes=versions)
    rows = []
    for i, version in enumerate(versions):
        previous = versions[i + 1] if i + 1 < len(versions) else None
        changes = recipe_changes(_facts(previous), _facts(version)) if previous is not None else []
        rows.append(
            {"recipe": version, "previous": previous, "changes": changes, "experiments": used[version.pk]}
        )
    return {
        "recipe": recipe,
        "latest": versions[0],
        "versions": rows,
        "import_form": forms_recipe.RecipeImportForm(
            user=request.user, default_team=recipe.team, recipe=recipe
        ),
    }


def _facts(recipe: Recipe) -> dict[str, Any]:
    return {
        "scheme": recipe.scheme,
        "scheme_params": recipe.scheme_params,
        "terms": recipe.terms,
        "description": recipe.description,
    }


@require_GET
def recipe_detail(request: HttpRequest, recipe_id: int) -> HttpResponse:
    recipe = get_object_or_404(records_reads.recipe_list(user=request.user), pk=recipe_id)
    return TemplateResponse(request, "experiments/recipe_detail.html", _detail_context(request, recipe))


@require_GET
def recipe_export(request: HttpRequest, recipe_id: int) -> HttpResponse:
    recipe = get_object_or_404(records_reads.recipe_list(user=request.user), pk=recipe_id)
    response = HttpResponse(yaml_io.recipe_export(recipe), content_type="application/yaml; charset=utf-8")
    filename = slugify(f"{recipe.name}-v{recipe.version}") or "recipe"
    response["Content-Disposition"] = f'attachment; filename="{filename}.yaml"'
    return response


@csrf_exempt  # checked by _recipe_import once the upload cap is in place (reading the token parses the body)
def recipe_import(request: HttpRequest) -> HttpResponse:
    """Save the recipe in an uploaded YAML document: a new recipe, or the next version of the one named
    (``recipe``: the recipe page's, whose name it then takes). A document over the API's YAML cap is refused
    while the body is read. A GET (e.g. a reload after a refused import) goes to the list and its import
    form."""
    if request.method != "POST":
        return redirect(reverse("experiments:recipe_list") + "#import")
    if announced_too_large(request, YAML_MAX_BYTES):
        return _import_refused(request, None, {"file": [_too_large()]}, status=413)
    request.upload_handlers.insert(0, CappedUploadHandler(YAML_MAX_BYTES, request))
    return _recipe_import(request)


def _too_large() -> str:
    return f"A YAML recipe may be at most {YAML_MAX_BYTES // 1024} KiB."


@csrf_protect
def _recipe_import(request: HttpRequest) -> HttpResponse:
    target = None
    if request.POST.get("recipe", "").isdigit():
        target = get_object_or_404(
            records_reads.recipe_list(user=request.user), pk=int(request.POST["recipe"])
        )
    form = forms_recipe.RecipeImportForm(
        request.POST, request.FILES, user=request.user, recipe=target, max_bytes=YAML_MAX_BYTES
    )
    capped = next((h for h in request.upload_handlers if isinstance(h, CappedUploadHandler)), None)
    if capped is not None and capped.exceeded:
        return _import_refused(request, target, {"file": [_too_large()]}, status=413)
    if not form.is_valid():
        return _import_refused(request, target, {}, form=form)
    try:
        recipe = yaml_io.recipe_import(
            form.cleaned_data["text"],
            user=request.user,
            team_id=form.cleaned_data["team"].pk,
            name=target.name if target is not None else None,
        )
    except DocumentError as exc:
        return _import_refused(request, target, exc.detail)
    messages.success(request, f"Recipe {recipe} imported: {recipe.formula}")
    return redirect("experiments:recipe_detail", recipe_id=recipe.pk)


def _import_refused(
    request: HttpRequest, target: Recipe | None, errors: Any, *, status: int = 400, form: Any = None
) -> HttpResponse:
    """The page the import came from, with the document's errors by field (a 400, or 413 when too large)."""
    problems = [
        (str(field), str(message))
        for field, messages_ in (errors.items() if hasattr(errors, "items") else [("yaml", errors)])
        for message in (messages_ if isinstance(messages_, list | tuple) else [messages_])
    ]
    if target is not None:
        context = _detail_context(request, target)
    else:
        context = _list_context(
            request, records_reads.recipe_latest_list(user=request.user), RECIPE_SORTS, "name"
        )
        context["recipes"] = context["page"].object_list
        context["import_form"] = forms_recipe.RecipeImportForm(
            user=request.user, default_team=context["team"]
        )
    if form is not None:
        context["import_form"] = form
    context["import_errors"] = problems
    template = "experiments/recipe_detail.html" if target is not None else "experiments/recipe_list.html"
    return TemplateResponse(request, template, context, status=status)
