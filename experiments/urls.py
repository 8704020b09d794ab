from django.urls import path

from . import views

app_name = "experiments"

urlpatterns = [
    path("", views.home, name="home"),
    path("models/", views.model_list, name="model_list"),
    path("models/new/", views.model_create, name="model_create"),
    path("models/<int:model_id>/", views.model_detail, name="model_detail"),
    path("models/<int:model_id>/derive/", views.model_derive, name="model_derive"),
    path("datasets/", views.dataset_list, name="dataset_list"),
    path("datasets/new/", views.dataset_create, name="dataset_create"),
    path("datasets/<int:dataset_id>/", views.dataset_detail, name="dataset_detail"),
    path("recipes/", views.recipe_list, name="recipe_list"),
    path("recipes/new/", views.recipe_create, name="recipe_create"),
    path("experiments/", views.experiment_list, name="experiment_list"),
    path("experiments/new/", views.experiment_create, name="experiment_create"),
    path("experiments/<int:experiment_id>/", views.experiment_detail, name="experiment_detail"),
    path("experiments/<int:experiment_id>/runs.json", views.experiment_runs_json, name="experiment_runs_json"),
    path("experiments/<int:experiment_id>/cancel/", views.experiment_cancel, name="experiment_cancel"),
    path("runs/<int:run_id>/", views.run_detail, name="run_detail"),
    path("runs/<int:run_id>/status.json", views.run_status_json, name="run_status_json"),
    path("runs/<int:run_id>/cancel/", views.run_cancel, name="run_cancel"),
    path("runs/<int:run_id>/register/", views.run_register_model, name="run_register_model"),
    path("leaderboard/", views.leaderboard_index, name="leaderboard_index"),
    path("leaderboard/<int:dataset_id>/", views.leaderboard, name="leaderboard"),
    path("workers/", views.worker_list, name="worker_list"),
]
