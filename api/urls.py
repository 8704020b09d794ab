"""/api/…: the REST endpoints, the OpenAPI schema and Swagger UI, and the browser page for API tokens."""

from django.contrib.auth.decorators import login_not_required
from django.urls import path, re_path
from drf_spectacular.views import SpectacularAPIView, SpectacularSwaggerSplitView

from . import views, views_tokens

app_name = "api"

LIST = {"get": "list"}
LIST_CREATE = {"get": "list", "post": "create"}
DETAIL = {"get": "retrieve"}

urlpatterns = [
    # Pages for people (session login).
    path("token/", views_tokens.token_list, name="token_list"),
    path("token/<int:token_id>/revoke/", views_tokens.token_revoke, name="token_revoke"),
    # The schema and its viewer describe the API only; they are public like any API documentation.
    path("schema/", login_not_required(SpectacularAPIView.as_view()), name="schema"),
    # The split view serves Swagger UI's set-up script from the same URL (?script): no inline script, so the
    # site's Content-Security-Policy applies unchanged.
    path(
        "docs/", login_not_required(SpectacularSwaggerSplitView.as_view(url_name="api:schema")), name="docs"
    ),
    # Endpoints.
    path("teams/", views.TeamViewSet.as_view(LIST), name="team_list"),
    path("teacher-stores/", views.TeacherStoreViewSet.as_view(LIST), name="teacher_store_list"),
    path("models/", views.ModelSpecViewSet.as_view(LIST_CREATE), name="model_list"),
    path("models/<int:pk>/", views.ModelSpecViewSet.as_view(DETAIL), name="model_detail"),
    path("models/<int:pk>/derive/", views.ModelSpecViewSet.as_view({"post": "derive"}), name="model_derive"),
    path("datasets/", views.DatasetSpecViewSet.as_view(LIST_CREATE), name="dataset_list"),
    path("datasets/<int:pk>/", views.DatasetSpecViewSet.as_view(DETAIL), name="dataset_detail"),
    path("recipes/", views.RecipeViewSet.as_view(LIST_CREATE), name="recipe_list"),
    path("recipes/import", views.RecipeViewSet.as_view({"post": "import_yaml"}), name="recipe_import"),
    path("recipes/<int:pk>/", views.RecipeViewSet.as_view(DETAIL), name="recipe_detail"),
    path(
        "recipes/<int:pk>/export.yaml", views.RecipeViewSet.as_view({"get": "export"}), name="recipe_export"
    ),
    path("experiments/", views.ExperimentViewSet.as_view(LIST_CREATE), name="experiment_list"),
    path("experiments/check", views.ExperimentViewSet.as_view({"post": "check"}), name="experiment_check"),
    path(
        "experiments/import",
        views.ExperimentViewSet.as_view({"post": "import_yaml"}),
        name="experiment_import",
    ),
    path("experiments/<int:pk>/", views.ExperimentViewSet.as_view(DETAIL), name="experiment_detail"),
    path(
        "experiments/<int:pk>/cancel/",
        views.ExperimentViewSet.as_view({"post": "cancel"}),
        name="experiment_cancel",
    ),
    path(
        "experiments/<int:pk>/export.yaml",
        views.ExperimentViewSet.as_view({"get": "export"}),
        name="experiment_export",
    ),
    path("runs/", views.RunViewSet.as_view(LIST), name="run_list"),
    path("runs/<int:pk>/", views.RunViewSet.as_view(DETAIL), name="run_detail"),
    path("runs/<int:pk>/cancel/", views.RunViewSet.as_view({"post": "cancel"}), name="run_cancel"),
    path("runs/<int:pk>/requeue/", views.RunViewSet.as_view({"post": "requeue"}), name="run_requeue"),
    path("runs/<int:pk>/metrics/", views.RunViewSet.as_view({"get": "metrics"}), name="run_metrics"),
    path(
        "runs/<int:pk>/metrics/history/",
        views.RunViewSet.as_view({"get": "history"}),
        name="run_metric_history",
    ),
    path(
        "runs/<int:pk>/metrics.csv", views.RunViewSet.as_view({"get": "metrics_csv"}), name="run_metrics_csv"
    ),
    path(
        "runs/<int:pk>/metrics.parquet",
        views.RunViewSet.as_view({"get": "metrics_parquet"}),
        name="run_metrics_parquet",
    ),
    path("runs/<int:pk>/register/", views.RunViewSet.as_view({"post": "register"}), name="run_register"),
    path("leaderboards/", views.LeaderboardViewSet.as_view(LIST), name="leaderboard_list"),
    path("leaderboards/<int:pk>/", views.LeaderboardViewSet.as_view(DETAIL), name="leaderboard_detail"),
    path(
        "leaderboards/<int:pk>/export.csv",
        views.LeaderboardViewSet.as_view({"get": "export"}),
        name="leaderboard_export",
    ),
    # [\s\S]: a path with an encoded line break (%0A) is still an API path, answered in JSON.
    re_path(r"^(?P<path>[\s\S]*)$", views.not_found, name="not_found"),
]
