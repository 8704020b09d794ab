"""REST endpoints: thin viewsets over experiments.selectors (team-scoped reads: another team's record is a
404, like on the pages) and experiments.services (writes, through the domain's input rules in api.inputs).

Every view is exempt from LoginRequiredMiddleware: DRF authenticates (a bearer token, or the browser's
session) and answers 401 JSON instead of redirecting to the login page.
"""

from __future__ import annotations

import csv
import math
from typing import Any
from urllib.parse import urlencode

from django.contrib.auth.decorators import login_not_required
from django.core.exceptions import ValidationError as DjangoValidationError
from django.db.models import Q, QuerySet
from django.http import FileResponse, HttpRequest, HttpResponse, JsonResponse, StreamingHttpResponse
from django.shortcuts import get_object_or_404
from django.urls import Resolver404, resolve, reverse
from django.utils.text import slugify
from django.views.decorators.csrf import csrf_exempt
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiResponse, extend_schema
from rest_framework import serializers as drf_serializers
from rest_framework import status, viewsets
from rest_framework.exceptions import ValidationError
from rest_framework.request import Request
from rest_framework.response import Response

from experiments import export
from experiments.models import Experiment
from experiments.selectors import curves as curves_reads
from experiments.selectors import leaderboard as leaderboard_reads
from experiments.selectors import records as records_reads
from experiments.selectors import teacher_stores as store_reads
from experiments.services import lifecycle

from . import inputs, metric_downloads, yaml_io
from . import selectors as api_selectors
from . import serializers as s
from .parsers import YAML_PARSERS

YAML_CONTENT_TYPE = "application/yaml; charset=utf-8"
_YAML_BODY = {"application/yaml": {"type": "string", "description": "A YAML document (see the export)"}}
_ERRORS = OpenApiResponse(description="Field errors: {field: [messages]}")
_NOT_FOUND = OpenApiResponse(s.DetailSerializer, description="No such record among your teams'")
_CONFLICT = OpenApiResponse(s.DetailSerializer, description="The run is in a state that does not allow this")


class ApiViewSet(viewsets.GenericViewSet):
    """Base of every endpoint: DRF authentication instead of the login redirect, validated query
    parameters."""

    @classmethod
    def as_view(cls, actions=None, **initkwargs):
        # DRF (3.15.2+) exempts its views from LoginRequiredMiddleware too; the API depends on it, so say it
        # here.
        return login_not_required(super().as_view(actions, **initkwargs))

    def get_parsers(self):
        # Parsers are chosen before DRF sets ``action``; the route's method map names it already.
        action = getattr(self, "action", None) or (getattr(self, "action_map", None) or {}).get("post")
        if action == "import_yaml":
            return [parser() for parser in YAML_PARSERS]
        return super().get_parsers()

    def query(
        self, serializer_class: type[drf_serializers.Serializer], *, lists: tuple[str, ...] = ()
    ) -> dict[str, Any]:
        """The request's query parameters validated by ``serializer_class`` (400 on bad values). Parameters in
        ``lists`` may repeat or hold comma-separated values."""
        data: dict[str, Any] = {}
        for key, values in self.request.query_params.lists():
            if key in lists:
                data[key] = [v for value in values for v in value.split(",") if v]
            else:
                data[key] = values[-1]
        serializer = serializer_class(data=data)
        serializer.is_valid(raise_exception=True)
        return serializer.validated_data

    def paginated(
        self, rows: QuerySet | list, serializer_class: type[drf_serializers.Serializer]
    ) -> Response:
        page = self.paginate_queryset(rows)
        return self.get_paginated_response(
            serializer_class(page, many=True, context=self.get_serializer_context()).data
        )

    def respond(
        self,
        obj: Any,
        serializer_class: type[drf_serializers.Serializer],
        *,
        status_code: int = status.HTTP_200_OK,
    ) -> Response:
        return Response(serializer_class(obj, context=self.get_serializer_context()).data, status=status_code)


def _filter_records(records: QuerySet, params: dict[str, Any], **lookups: str) -> QuerySet:
    """Apply the common ``team`` and ``q`` filters, and each given parameter → ORM lookup."""
    lookups = {"team": "team_id", "q": "name__icontains", **lookups}
    for param, lookup in lookups.items():
        if params.get(param) not in (None, ""):
            records = records.filter(**{lookup: params[param]})
    return records


def _yaml_response(text: str, name: str) -> HttpResponse:
    response = HttpResponse(text, content_type=YAML_CONTENT_TYPE)
    response["Content-Disposition"] = f'attachment; filename="{slugify(name) or "export"}.yaml"'
    return response


def _yaml_body(request: Request) -> str:
    if not isinstance(request.data, str) or not request.data.strip():
        raise ValidationError(
            {"yaml": ["Send a YAML document as the body (Content-Type: application/yaml)."]}
        )
    return request.data


# --- teams ----------------------------------------------------------------------------------------
class TeamViewSet(ApiViewSet):
    """The teams you belong to."""

    @extend_schema(summary="Your teams (staff: all)", responses=s.TeamSerializer(many=True))
    def list(self, request: Request) -> Response:
        return self.paginated(api_selectors.team_list(user=request.user), s.TeamSerializer)


class TeacherStoreViewSet(ApiViewSet):
    """Stores of teacher outputs of your teams (read-only; delete one on its page)."""

    @extend_schema(summary="Teacher stores of your teams", responses=s.TeacherStoreSerializer(many=True))
    def list(self, request: Request) -> Response:
        stores = store_reads.store_list(user=request.user).order_by("-last_used_at", "-id")
        return self.paginated(stores, s.TeacherStoreSerializer)


# --- records --------------------------------------------------------------------------------------
class ModelSpecViewSet(ApiViewSet):
    """Models (teachers and students) of your teams."""

    serializer_class = s.ModelSpecSerializer

    def get_queryset(self) -> QuerySet:
        return (
            records_reads.model_spec_list(user=self.request.user)
            .select_related("created_by")
            .order_by("team__name", "name", "id")
        )

    @extend_schema(summary="Models of your teams", parameters=[s.ModelFilterSerializer])
    def list(self, request: Request) -> Response:
        params = self.query(s.ModelFilterSerializer)
        return self.paginated(
            _filter_records(self.get_queryset(), params, task="task", source="source"), s.ModelSpecSerializer
        )

    @extend_schema(summary="A model", responses={200: s.ModelSpecSerializer, 404: _NOT_FOUND})
    def retrieve(self, request: Request, pk: int) -> Response:
        return self.respond(self.get_object(), s.ModelSpecSerializer)

    @extend_schema(
        summary="Register a model (the web form's fields)",
        request=s.ModelCreateSerializer,
        responses={201: s.ModelSpecSerializer, 400: _ERRORS},
    )
    def create(self, request: Request) -> Response:
        spec = inputs.model_create(user=request.user, payload=request.data)
        return self.respond(spec, s.ModelSpecSerializer, status_code=status.HTTP_201_CREATED)

    @extend_schema(
        summary="Derive a smaller student from this model (a layer subset, narrower widths)",
        request=s.ModelDeriveSerializer,
        responses={201: s.ModelSpecSerializer, 400: _ERRORS, 404: _NOT_FOUND},
    )
    def derive(self, request: Request, pk: int) -> Response:
        spec = inputs.model_derive(user=request.user, parent=self.get_object(), payload=request.data)
        return self.respond(spec, s.ModelSpecSerializer, status_code=status.HTTP_201_CREATED)


class DatasetSpecViewSet(ApiViewSet):
    """Datasets of your teams."""

    serializer_class = s.DatasetSpecSerializer

    def get_queryset(self) -> QuerySet:
        return (
            records_reads.dataset_spec_list(user=self.request.user)
            .select_related("created_by")
            .order_by("team__name", "name", "id")
        )

    @extend_schema(summary="Datasets of your teams", parameters=[s.DatasetFilterSerializer])
    def list(self, request: Request) -> Response:
        params = self.query(s.DatasetFilterSerializer)
        return self.paginated(
            _filter_records(self.get_queryset(), params, task="task", source="source"),
            s.DatasetSpecSerializer,
        )

    @extend_schema(summary="A dataset", responses={200: s.DatasetSpecSerializer, 404: _NOT_FOUND})
    def retrieve(self, request: Request, pk: int) -> Response:
        return self.respond(self.get_object(), s.DatasetSpecSerializer)

    @extend_schema(
        summary="Register a dataset (the web form's fields)",
        request=s.DatasetCreateSerializer,
        responses={201: s.DatasetSpecSerializer, 400: _ERRORS},
    )
    def create(self, request: Request) -> Response:
        dataset = inputs.dataset_create(user=request.user, payload=request.data)
        return self.respond(dataset, s.DatasetSpecSerializer, status_code=status.HTTP_201_CREATED)


class RecipeViewSet(ApiViewSet):
    """Recipes of your teams: weighted loss terms and a training scheme, versioned by name."""

    serializer_class = s.RecipeSerializer

    def get_queryset(self) -> QuerySet:
        return (
            records_reads.recipe_list(user=self.request.user)
            .select_related("created_by")
            .order_by("team__name", "name", "-version", "id")
        )

    @extend_schema(summary="Recipes of your teams (every version)", parameters=[s.RecipeFilterSerializer])
    def list(self, request: Request) -> Response:
        params = self.query(s.RecipeFilterSerializer)
        recipes = _filter_records(self.get_queryset(), params, scheme="scheme", name="name")
        return self.paginated(recipes, s.RecipeSerializer)

    @extend_schema(summary="A recipe", responses={200: s.RecipeSerializer, 404: _NOT_FOUND})
    def retrieve(self, request: Request, pk: int) -> Response:
        return self.respond(self.get_object(), s.RecipeSerializer)

    @extend_schema(
        summary="Save a recipe (an existing name gets its next version)",
        request=s.RecipeCreateSerializer,
        responses={201: s.RecipeSerializer, 400: _ERRORS},
    )
    def create(self, request: Request) -> Response:
        recipe = inputs.recipe_create(user=request.user, payload=request.data)
        return self.respond(recipe, s.RecipeSerializer, status_code=status.HTTP_201_CREATED)

    @extend_schema(
        summary="The recipe as YAML", responses={(200, "application/yaml"): OpenApiTypes.STR, 404: _NOT_FOUND}
    )
    def export(self, request: Request, pk: int) -> HttpResponse:
        recipe = self.get_object()
        return _yaml_response(yaml_io.recipe_export(recipe), f"{recipe.name}-v{recipe.version}")

    @extend_schema(
        summary="Save a recipe from YAML (as exported)",
        request=_YAML_BODY,
        parameters=[s.ImportQuerySerializer],
        responses={201: s.RecipeSerializer, 400: _ERRORS},
    )
    def import_yaml(self, request: Request) -> Response:
        params = self.query(s.ImportQuerySerializer)
        recipe = yaml_io.recipe_import(_yaml_body(request), user=request.user, team_id=params.get("team"))
        return self.respond(recipe, s.RecipeSerializer, status_code=status.HTTP_201_CREATED)


# --- experiments ----------------------------------------------------------------------------------
class ExperimentViewSet(ApiViewSet):
    """Experiments of your teams: a teacher, a dataset, students x recipes x seeds."""

    serializer_class = s.ExperimentDetailSerializer

    def get_queryset(self) -> QuerySet:
        return (
            records_reads.experiment_list(user=self.request.user)
            .select_related("assistant")
            .prefetch_related("students", "recipes", "extra_teachers")
        )

    @extend_schema(
        summary="Experiments of your teams, newest first",
        parameters=[s.ExperimentFilterSerializer],
        responses=s.ExperimentSerializer(many=True),
    )
    def list(self, request: Request) -> Response:
        params = self.query(s.ExperimentFilterSerializer)
        experiments = _filter_records(self.get_queryset(), params, dataset="dataset_id", teacher="teacher_id")
        if params.get("student"):
            experiments = experiments.filter(
                pk__in=Experiment.objects.filter(students=params["student"]).values("pk")
            )
        if params.get("recipe"):
            experiments = experiments.filter(
                pk__in=Experiment.objects.filter(recipes=params["recipe"]).values("pk")
            )
        if params.get("active") is not None:
            active = Q(queued_count__gt=0) | Q(running_count__gt=0)  # the run counts of experiment_list
            experiments = experiments.filter(active if params["active"] else ~active)
        return self.paginated(experiments.order_by(params["ordering"], "-id"), s.ExperimentSerializer)

    @extend_schema(summary="An experiment", responses={200: s.ExperimentDetailSerializer, 404: _NOT_FOUND})
    def retrieve(self, request: Request, pk: int) -> Response:
        return self.respond(self.get_object(), s.ExperimentDetailSerializer)

    def _created(self, experiment: Experiment) -> Response:
        response = self.respond(
            self.get_queryset().get(pk=experiment.pk),
            s.ExperimentDetailSerializer,
            status_code=status.HTTP_201_CREATED,
        )
        response["Location"] = response.data["url"]
        return response

    @extend_schema(
        summary="Launch an experiment: creates its runs (with a hard-label baseline per student "
        "and seed) and queues them",
        request=s.ExperimentCreateSerializer,
        responses={201: s.ExperimentDetailSerializer, 400: _ERRORS},
    )
    def create(self, request: Request) -> Response:
        return self._created(inputs.experiment_create(user=request.user, payload=request.data))

    @extend_schema(
        summary="Check a launch without creating anything: run count, pre-flight checks and the "
        "errors it would give",
        request=s.ExperimentCreateSerializer,
        responses={200: s.PreflightSerializer, 400: _ERRORS},
    )
    def check(self, request: Request) -> Response:
        return Response(inputs.experiment_check(user=request.user, payload=request.data))

    @extend_schema(
        summary="Cancel every unfinished run",
        request=None,
        responses={200: s.CancelledSerializer, 404: _NOT_FOUND},
    )
    def cancel(self, request: Request, pk: int) -> Response:
        return Response({"cancelled": lifecycle.experiment_cancel(experiment=self.get_object())})

    @extend_schema(
        summary="The experiment as YAML (records by name)",
        responses={(200, "application/yaml"): OpenApiTypes.STR, 404: _NOT_FOUND},
    )
    def export(self, request: Request, pk: int) -> HttpResponse:
        experiment = self.get_object()
        return _yaml_response(yaml_io.experiment_export(experiment), experiment.name)

    @extend_schema(
        summary="Launch an experiment from YAML (as exported); with ?check=true only check it",
        request=_YAML_BODY,
        parameters=[s.ExperimentImportQuerySerializer],
        responses={201: s.ExperimentDetailSerializer, 200: s.PreflightSerializer, 400: _ERRORS},
    )
    def import_yaml(self, request: Request) -> Response:
        params = self.query(s.ExperimentImportQuerySerializer)
        if params.get("check"):
            return Response(
                yaml_io.experiment_import(
                    _yaml_body(request), user=request.user, team_id=params.get("team"), check=True
                )
            )
        return self._created(
            yaml_io.experiment_import(_yaml_body(request), user=request.user, team_id=params.get("team"))
        )


# --- runs -----------------------------------------------------------------------------------------
class RunViewSet(ApiViewSet):
    """Runs of your teams' experiments: one training job each."""

    serializer_class = s.RunDetailSerializer

    def get_queryset(self) -> QuerySet:
        if self.action == "list":
            return api_selectors.run_list_rows(user=self.request.user)
        if self.action in ("metrics", "history", "metrics_csv", "metrics_parquet"):
            # The points are read by the run's id: the run itself only needs to be one of the user's.
            return records_reads.run_list(user=self.request.user).select_related(None).only("id", "team_id")
        return api_selectors.run_list(user=self.request.user).prefetch_related("artifacts", "transitions")

    @extend_schema(
        summary="Runs of your teams, newest first",
        parameters=[s.RunFilterSerializer],
        responses=s.RunSerializer(many=True),
    )
    def list(self, request: Request) -> Response:
        params = self.query(s.RunFilterSerializer, lists=("status",))
        runs = _filter_records(
            self.get_queryset(),
            params,
            experiment="experiment_id",
            student="student_id",
            recipe="recipe_id",
            is_baseline="is_baseline",
        )
        if params.get("status"):
            runs = runs.filter(status__in=sorted(params["status"]))
        page = self.paginate_queryset(runs.order_by(params["ordering"], "-id"))
        refs = api_selectors.run_row_refs(rows=page)
        return self.get_paginated_response(s.run_rows(page, refs=refs, request=request))

    @extend_schema(
        summary="A run with its frozen config, evaluations and artifacts",
        responses={200: s.RunDetailSerializer, 404: _NOT_FOUND},
    )
    def retrieve(self, request: Request, pk: int) -> Response:
        return self.respond(self.get_object(), s.RunDetailSerializer)

    @extend_schema(
        summary="Cancel a run: a queued one at once, a running one at its next check",
        request=None,
        responses={200: s.RunDetailSerializer, 404: _NOT_FOUND, 409: _CONFLICT},
    )
    def cancel(self, request: Request, pk: int) -> Response:
        run = self.get_object()
        if run.is_terminal:
            return Response(
                {"detail": f"Run #{run.pk} had already finished ({run.status})."},
                status=status.HTTP_409_CONFLICT,
            )
        lifecycle.run_cancel(run=run, reason=f"Cancelled by {request.user.get_username()} (API).")
        return self.respond(self.get_object(), s.RunDetailSerializer)

    @extend_schema(
        summary="Queue a failed, cancelled or stale run again (resumes from its checkpoint)",
        request=None,
        responses={200: s.RunDetailSerializer, 404: _NOT_FOUND, 409: _CONFLICT},
    )
    def requeue(self, request: Request, pk: int) -> Response:
        run = self.get_object()
        try:
            lifecycle.run_requeue(run=run, reason=f"Requeued by {request.user.get_username()} (API).")
        except DjangoValidationError as exc:
            return Response({"detail": " ".join(exc.messages)}, status=status.HTTP_409_CONFLICT)
        return self.respond(self.get_object(), s.RunDetailSerializer)

    @extend_schema(
        summary="The run's metric curves, downsampled on the server",
        parameters=[s.MetricsQuerySerializer],
        responses={200: s.MetricsSerializer, 400: _ERRORS, 404: _NOT_FOUND},
    )
    def metrics(self, request: Request, pk: int) -> Response:
        run = self.get_object()
        params = self.query(s.MetricsQuerySerializer, lists=("name",))
        max_points = params["max_points"]
        names = curves_reads.metric_names(run_ids=[run.pk])
        wanted = set(params.get("name") or names)
        series = curves_reads.run_metric_curves(
            run_id=run.pk, names=[n for n in names if n in wanted], max_points=max_points
        )
        return Response({"run": run.pk, "max_points": max_points, "names": names, "series": series})

    @extend_schema(
        summary="The run's metric points at full resolution, a page at a time (a cursor by step)",
        description=(
            "Every stored point, never downsampled, in (name, step) order: one metric's points in step order "
            "with `name`, else every metric's. Pass the page's `cursor` (or follow `next`) for the next "
            "page; both are null once the history is exhausted. With `name`, `after_step=S` starts after "
            "step S. Each page is a keyset read on the (run, name, step) index."
        ),
        parameters=[s.MetricHistoryQuerySerializer],
        responses={200: s.MetricHistorySerializer, 400: _ERRORS, 404: _NOT_FOUND},
    )
    def history(self, request: Request, pk: int) -> Response:
        run = self.get_object()
        params = self.query(s.MetricHistoryQuerySerializer)
        name, limit = params["name"], params["limit"]
        # One point more than the page: a cursor only when another page has points.
        rows = curves_reads.run_metric_history(
            run_id=run.pk, name=name, after=params["after"], limit=limit + 1, iso_times=True
        )
        page = rows[:limit]
        cursor = s.history_cursor(page[-1][0], page[-1][1]) if len(rows) > limit else None
        next_url = None
        if cursor is not None:
            query = {"name": name} if name is not None else {}
            query = urlencode({**query, "limit": limit, "cursor": cursor})
            next_url = request.build_absolute_uri(f"{request.path}?{query}")
        points = [
            {"name": n, "step": step, "value": value if math.isfinite(value) else None, "wall_time": time}
            for n, step, value, time in page
        ]
        body = {"run": run.pk, "name": name, "limit": limit, "points": points}
        return Response({**body, "cursor": cursor, "next": next_url})

    @extend_schema(
        summary="Every metric point of the run as CSV (streamed): step, name, value, wall_time",
        responses={(200, "text/csv"): OpenApiTypes.STR, 404: _NOT_FOUND},
    )
    def metrics_csv(self, request: Request, pk: int) -> StreamingHttpResponse:
        run = self.get_object()
        response = StreamingHttpResponse(
            metric_downloads.csv_chunks(run_id=run.pk), content_type="text/csv; charset=utf-8"
        )
        response["Content-Disposition"] = f'attachment; filename="run-{run.pk}-metrics.csv"'
        return response

    @extend_schema(
        summary="Every metric point of the run as Parquet: step, name, value, wall_time (UTC timestamp)",
        responses={(200, metric_downloads.PARQUET_CONTENT_TYPE): OpenApiTypes.BINARY, 404: _NOT_FOUND},
    )
    def metrics_parquet(self, request: Request, pk: int) -> FileResponse:
        run = self.get_object()
        return FileResponse(
            metric_downloads.parquet_file(run_id=run.pk),
            as_attachment=True,
            filename=f"run-{run.pk}-metrics.parquet",
            content_type=metric_downloads.PARQUET_CONTENT_TYPE,
        )

    @extend_schema(
        summary="Register the run's trained student as a model",
        request=s.RegisterModelSerializer,
        responses={201: s.ModelSpecSerializer, 400: _ERRORS, 404: _NOT_FOUND},
    )
    def register(self, request: Request, pk: int) -> Response:
        spec = inputs.run_register_model(user=request.user, run=self.get_object(), payload=request.data)
        return self.respond(spec, s.ModelSpecSerializer, status_code=status.HTTP_201_CREATED)


# --- leaderboards ---------------------------------------------------------------------------------
class LeaderboardViewSet(ApiViewSet):
    """Leaderboards: one per dataset (and eval split and metric), rows as on the leaderboard page."""

    serializer_class = s.LeaderboardRowSerializer

    @extend_schema(
        summary="Datasets with a leaderboard, and how many results each has",
        parameters=[s.RecordFilterSerializer],
        responses=s.LeaderboardDatasetSerializer(many=True),
    )
    def list(self, request: Request) -> Response:
        params = self.query(s.RecordFilterSerializer)
        datasets = _filter_records(leaderboard_reads.leaderboard_datasets(user=request.user), params)
        return self.paginated(datasets.order_by("team__name", "name", "id"), s.LeaderboardDatasetSerializer)

    def _board(self, pk: int) -> tuple[leaderboard_reads.Benchmark, list[leaderboard_reads.LeaderboardRow]]:
        """The benchmark and its filtered rows, chosen by the page's query parameters (400 on bad ones, and on
        a metric or split the results do not have, where the page would fall back to its default)."""
        dataset = get_object_or_404(records_reads.dataset_spec_list(user=self.request.user), pk=pk)
        chosen = inputs.leaderboard_query(self.request.query_params)
        benchmark = leaderboard_reads.leaderboard_benchmark(
            user=self.request.user,
            dataset=dataset,
            metric_name=chosen.get("metric", ""),
            split_key=chosen.get("split", ""),
            scope=chosen.get("scope", "team"),
            filters=chosen,
        )
        errors = {}
        if chosen.get("metric", benchmark.metric.name) != benchmark.metric.name:
            errors["metric"] = [
                f"No result here measures {chosen['metric']!r}; available: "
                f"{', '.join(m.name for m in benchmark.metrics)}."
            ]
        if chosen.get("split", benchmark.split_key) != benchmark.split_key:
            errors["split"] = [
                f"No results on eval split {chosen['split']!r}; available: "
                f"{', '.join(o.key for o in benchmark.splits) or 'none'}."
            ]
        if errors:
            raise ValidationError(errors)
        return benchmark, benchmark.rows

    @extend_schema(
        summary="A dataset's leaderboard: rows ranked by a quality metric (mean over seeds), with "
        "retention, KD gain, compression, speedup and the Pareto flag",
        parameters=[s.LeaderboardQuerySerializer, s.PageQuerySerializer],
        responses={200: s.LeaderboardPageSerializer, 400: _ERRORS, 404: _NOT_FOUND},
    )
    def retrieve(self, request: Request, pk: int) -> Response:
        benchmark, rows = self._board(pk)
        page = self.paginated(rows, s.LeaderboardRowSerializer)
        page.data = {
            **page.data,
            "dataset": {"id": benchmark.dataset.pk, "name": benchmark.dataset.name},
            "metric": s.PrimaryMetricSerializer(benchmark.metric).data,
            "metrics": s.PrimaryMetricSerializer(benchmark.metrics, many=True).data,
            "split": benchmark.split_key,
            "splits": s.SplitOptionSerializer(benchmark.splits, many=True).data,
            "scope": benchmark.scope,
            "total": benchmark.total,
        }
        return page

    @extend_schema(
        summary="The leaderboard as CSV, as the page exports it (same parameters)",
        parameters=[s.LeaderboardQuerySerializer],
        responses={(200, "text/csv"): OpenApiTypes.STR, 400: _ERRORS, 404: _NOT_FOUND},
    )
    def export(self, request: Request, pk: int) -> HttpResponse:
        benchmark, rows = self._board(pk)
        response = HttpResponse(content_type="text/csv; charset=utf-8")
        dataset_slug = slugify(benchmark.dataset.name) or benchmark.dataset.pk
        name = f"leaderboard-{dataset_slug}-{benchmark.metric.name}.csv"
        response["Content-Disposition"] = f'attachment; filename="{name}"'
        csv.writer(response).writerows(
            export.leaderboard_csv_lines(
                rows,
                metric=benchmark.metric,
                config_url=lambda run_id: request.build_absolute_uri(
                    reverse("experiments:run_config_json", kwargs={"run_id": run_id})
                ),
            )
        )
        return response


# --- anything else under /api/ --------------------------------------------------------------------
@csrf_exempt  # it changes nothing: a POST to an unknown path is a 404, not a CSRF failure page
@login_not_required
def not_found(request: HttpRequest, path: str = "") -> JsonResponse:
    """A JSON 404 for unknown API paths (instead of the site's HTML page or a login redirect)."""
    detail = "Not found."
    if not request.path.endswith("/"):
        try:
            match = resolve(request.path + "/")
        except Resolver404:
            match = None
        if match is not None and match.func is not not_found:
            detail = f"Not found. Did you mean {request.path}/ ?"
    return JsonResponse({"detail": detail}, status=404)
