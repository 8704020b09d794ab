from django.urls import path

from experiments.views import compare as compare_views
from experiments.views import fleet, pages, recipes, setup, stores, teams

app_name = "experiments"

urlpatterns = [
    path("", pages.home, name="home"),
    path("models/", pages.model_list, name="model_list"),
    path("models/new/", pages.model_create, name="model_create"),
    path("models/<int:model_id>/", pages.model_detail, name="model_detail"),
    path("models/<int:model_id>/derive/", pages.model_derive, name="model_derive"),
    path("datasets/", pages.dataset_list, name="dataset_list"),
    path("datasets/new/", pages.dataset_create, name="dataset_create"),
    path("datasets/<int:dataset_id>/", pages.dataset_detail, name="dataset_detail"),
    path("recipes/", recipes.recipe_list, name="recipe_list"),
    path("recipes/new/", recipes.recipe_create, name="recipe_create"),
    path("recipes/import/", recipes.recipe_import, name="recipe_import"),
    path("recipes/<int:recipe_id>/", recipes.recipe_detail, name="recipe_detail"),
    path("recipes/<int:recipe_id>/export.yaml", recipes.recipe_export, name="recipe_export"),
    path("experiments/", pages.experiment_list, name="experiment_list"),
    path("experiments/new/", setup.experiment_create, name="experiment_create"),
    path("experiments/new/check/", setup.experiment_check, name="experiment_check"),
    path("experiments/<int:experiment_id>/clone/", setup.experiment_clone, name="experiment_clone"),
    path("runs/<int:run_id>/clone/", setup.run_clone, name="run_clone"),
    path("experiments/<int:experiment_id>/", pages.experiment_detail, name="experiment_detail"),
    path(
        "experiments/<int:experiment_id>/runs.json", pages.experiment_runs_json, name="experiment_runs_json"
    ),
    path("experiments/<int:experiment_id>/cancel/", pages.experiment_cancel, name="experiment_cancel"),
    path("runs/<int:run_id>/", pages.run_detail, name="run_detail"),
    path("runs/<int:run_id>/status.json", pages.run_status_json, name="run_status_json"),
    path("runs/<int:run_id>/cancel/", pages.run_cancel, name="run_cancel"),
    path("runs/<int:run_id>/requeue/", pages.run_requeue, name="run_requeue"),
    path("runs/<int:run_id>/register/", pages.run_register_model, name="run_register_model"),
    path("teams/", teams.team_list_page, name="team_list"),
    path("teams/switch/", teams.team_switch, name="team_switch"),
    path("teams/<int:team_id>/", teams.team_detail, name="team_detail"),
    path("teams/<int:team_id>/members/add/", teams.team_member_add, name="team_member_add"),
    path(
        "teams/<int:team_id>/members/<int:membership_id>/role/",
        teams.team_member_role,
        name="team_member_role",
    ),
    path(
        "teams/<int:team_id>/members/<int:membership_id>/remove/",
        teams.team_member_remove,
        name="team_member_remove",
    ),
    path("teams/<int:team_id>/invites/create/", teams.team_invite_create, name="team_invite_create"),
    path("teams/<int:team_id>/invites/revoke/", teams.team_invite_revoke, name="team_invite_revoke"),
    # The invite pages are open without login: the link's token is the credential.
    path("invites/accept/", teams.team_invite_accept, name="team_invite_accept"),
    path("invites/<str:token>/", teams.team_invite_open, name="team_invite_open"),
    path("leaderboard/", pages.leaderboard_index, name="leaderboard_index"),
    path("leaderboard/<int:dataset_id>/", compare_views.leaderboard, name="leaderboard"),
    path("compare/", compare_views.compare, name="compare"),
    path("runs/<int:run_id>/config.json", compare_views.run_config_json, name="run_config_json"),
    path("runs/<int:run_id>/model.zip", compare_views.run_model_download, name="run_model_download"),
    path("stores/", stores.store_list, name="store_list"),
    path("stores/<int:store_id>/", stores.store_detail, name="store_detail"),
    path("stores/<int:store_id>/delete/", stores.store_delete, name="store_delete"),
    path("workers/", fleet.worker_list, name="worker_list"),
    path("workers/status.json", fleet.worker_list_json, name="worker_list_json"),
    path("workers/<int:worker_id>/drain/", fleet.worker_drain, name="worker_drain"),
    path("workers/<int:worker_id>/resume/", fleet.worker_resume, name="worker_resume"),
    path("workers/<int:worker_id>/shutdown/", fleet.worker_shutdown, name="worker_shutdown"),
    path("workers/<int:worker_id>/queues/add/", fleet.worker_add_queue, name="worker_add_queue"),
    path("workers/<int:worker_id>/queues/remove/", fleet.worker_remove_queue, name="worker_remove_queue"),
]
