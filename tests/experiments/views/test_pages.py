import json
import re
from datetime import timedelta
from unittest import mock

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.urls import reverse
from django.utils import timezone

from experiments.models import (
    Artifact,
    DatasetSpec,
    Evaluation,
    Experiment,
    MetricPoint,
    ModelSpec,
    Recipe,
    Run,
    Worker,
)
from tests.factories import (
    DatasetSpecFactory,
    ExperimentFactory,
    ModelSpecFactory,
    RecipeFactory,
    RunFactory,
)

pytestmark = pytest.mark.django_db


# --- helpers --------------------------------------------------------------------------------------
@pytest.fixture
def experiment(team, digits_setup):
    experiment = ExperimentFactory(
        team=team, dataset=digits_setup["dataset"], teacher=digits_setup["teacher"], seeds=[0]
    )
    experiment.students.set(digits_setup["students"])
    experiment.recipes.set([digits_setup["recipe"]])
    return experiment


@pytest.fixture
def run(experiment, digits_setup):
    return RunFactory(
        experiment=experiment,
        student=digits_setup["students"][0],
        recipe=digits_setup["recipe"],
        teacher=digits_setup["teacher"],
    )


@pytest.fixture
def foreign(other_team):
    """An experiment, run, model and dataset of a team the logged-in user is not in."""
    dataset = DatasetSpecFactory(team=other_team)
    experiment = ExperimentFactory(team=other_team, dataset=dataset)
    run = RunFactory(experiment=experiment)
    return {"experiment": experiment, "run": run, "model": run.student, "dataset": dataset}


def _succeeded(experiment, student, recipe, seed, accuracy, *, baseline=False, params=1000, latency=0.5):
    run = RunFactory(experiment=experiment, student=student, recipe=recipe, seed=seed, is_baseline=baseline,
                     status=Run.Status.SUCCEEDED, step=20, total_steps=20, finished_at=timezone.now())
    Evaluation.objects.create(
        team=experiment.team,
        role=Evaluation.Role.STUDENT,
        run=run,
        model=student,
        dataset=experiment.dataset,
        split_key="k",
        accuracy=accuracy,
        param_count=params,
        latency_ms=latency,
    )
    return run


def _teacher_eval(teacher, dataset, accuracy, *, params=None, latency=None):
    return Evaluation.objects.create(team=teacher.team, role=Evaluation.Role.TEACHER, model=teacher,
                                     dataset=dataset, split_key="k", accuracy=accuracy, param_count=params,
                                     latency_ms=latency)


def _baseline_recipe(team):
    return RecipeFactory(team=team, name="hard_labels", scheme=Recipe.Scheme.HARD_LABELS,
                         terms=[{"name": "ce", "weight": 1.0, "params": {}}])


def _json_script(html, element_id):
    match = re.search(rf'<script id="{element_id}" type="application/json">(.*?)</script>', html, re.S)
    assert match, f"no json_script {element_id}"
    return json.loads(match.group(1))


def _points(run, name, steps, values):
    now = timezone.now()
    MetricPoint.objects.bulk_create(
        [
            MetricPoint(run=run, name=name, step=s, value=v, wall_time=now)
            for s, v in zip(steps, values, strict=True)
        ]
    )


# --- access ---------------------------------------------------------------------------------------
PAGES = [
    ("experiments:home", {}),
    ("experiments:model_list", {}),
    ("experiments:model_create", {}),
    ("experiments:dataset_list", {}),
    ("experiments:dataset_create", {}),
    ("experiments:recipe_list", {}),
    ("experiments:recipe_create", {}),
    ("experiments:experiment_list", {}),
    ("experiments:experiment_create", {}),
    ("experiments:leaderboard_index", {}),
    ("experiments:worker_list", {}),
]


@pytest.mark.parametrize(("name", "kwargs"), PAGES)
def test_every_page_requires_login(client, name, kwargs):
    response = client.get(reverse(name, kwargs=kwargs))

    assert response.status_code == 302
    assert response.url.startswith(reverse("login") + "?next=")


@pytest.mark.parametrize(
    ("name", "key", "obj"),
    [
        ("experiments:experiment_detail", "experiment_id", "experiment"),
        ("experiments:experiment_runs_json", "experiment_id", "experiment"),
        ("experiments:run_detail", "run_id", "run"),
        ("experiments:run_status_json", "run_id", "run"),
        ("experiments:model_detail", "model_id", "model"),
        ("experiments:dataset_detail", "dataset_id", "dataset"),
        ("experiments:leaderboard", "dataset_id", "dataset"),
    ],
)
def test_record_pages_and_json_require_login(client, foreign, name, key, obj):
    response = client.get(reverse(name, kwargs={key: foreign[obj].pk}))

    assert response.status_code == 302
    assert response.url.startswith(reverse("login"))


@pytest.mark.parametrize(("name", "kwargs"), PAGES[:-1])
def test_every_page_renders_for_a_member(client_logged_in, name, kwargs):
    response = client_logged_in.get(reverse(name, kwargs=kwargs))

    assert response.status_code == 200


@pytest.mark.parametrize(
    ("method", "name", "key", "obj"),
    [
        ("get", "experiments:experiment_detail", "experiment_id", "experiment"),
        ("get", "experiments:experiment_runs_json", "experiment_id", "experiment"),
        ("post", "experiments:experiment_cancel", "experiment_id", "experiment"),
        ("get", "experiments:run_detail", "run_id", "run"),
        ("get", "experiments:run_status_json", "run_id", "run"),
        ("post", "experiments:run_cancel", "run_id", "run"),
        ("post", "experiments:run_register_model", "run_id", "run"),
        ("get", "experiments:model_detail", "model_id", "model"),
        ("get", "experiments:dataset_detail", "dataset_id", "dataset"),
        ("get", "experiments:leaderboard", "dataset_id", "dataset"),
    ],
)
def test_other_teams_records_give_404(client_logged_in, foreign, method, name, key, obj):
    response = getattr(client_logged_in, method)(reverse(name, kwargs={key: foreign[obj].pk}), {"name": "x"}
                                                  if method == "post" else None)

    assert response.status_code == 404
    foreign["run"].refresh_from_db()
    assert foreign["run"].status == Run.Status.QUEUED


def test_lists_show_only_the_users_teams(client_logged_in, experiment, foreign):
    response = client_logged_in.get(reverse("experiments:experiment_list"))

    assert [row.pk for row in response.context["page"].object_list] == [experiment.pk]
    assert foreign["experiment"].name not in response.content.decode()
    models = client_logged_in.get(reverse("experiments:model_list")).context["models"]
    assert foreign["model"] not in models


def test_logout_is_a_post_form_with_csrf(client_logged_in):
    html = client_logged_in.get(reverse("experiments:home")).content.decode()

    form = re.search(r'<form method="post" action="/logout/".*?</form>', html, re.S)
    assert form and "csrfmiddlewaretoken" in form.group(0)


def test_login_page_renders_without_login(client):
    response = client.get(reverse("login"))

    assert response.status_code == 200
    assert b'name="password"' in response.content


# --- home -----------------------------------------------------------------------------------------
def test_home_shows_recent_experiments_and_active_runs(client_logged_in, experiment, run):
    response = client_logged_in.get(reverse("experiments:home"))

    assert response.context["active_runs"] == 1
    assert experiment.name in response.content.decode()
    assert f"#{run.pk}" in response.content.decode()


def test_home_empty_state_says_what_to_do_next(client_logged_in):
    html = client_logged_in.get(reverse("experiments:home")).content.decode()

    assert "Register a dataset" in html
    assert reverse("experiments:dataset_create") in html
    assert "No experiments yet" in html


# --- workers --------------------------------------------------------------------------------------
def test_workers_page_is_forbidden_for_non_staff(client_logged_in):
    response = client_logged_in.get(reverse("experiments:worker_list"))

    assert response.status_code == 403


def test_workers_page_escapes_worker_data_and_shows_heartbeat_age(client, staff_user, run):
    now = timezone.now()
    Worker.objects.create(
        name="<script>x</script>",
        hostname="host<b>",
        queues=["training"],
        versions={"torch": "<i>2.4</i>"},
        gpus=[{"name": "<img src=x onerror=alert(1)>", "memory_used_mb": 100}],
        last_heartbeat=now - timedelta(seconds=12),
    )
    Run.objects.filter(pk=run.pk).update(
        status=Run.Status.RUNNING, started_at=now, worker_name="<script>x</script>"
    )
    client.force_login(staff_user)

    response = client.get(reverse("experiments:worker_list"))

    html = response.content.decode()
    assert response.status_code == 200
    assert "&lt;script&gt;x&lt;/script&gt;" in html
    assert "<script>x</script>" not in html
    assert "<img src=x" not in html and "<i>2.4</i>" not in html
    assert re.search(r"1[2-4] s ago", html)
    row = response.context["rows"][0]
    assert not row.offline
    assert [r.pk for r in row.runs] == [run.pk]


def test_workers_page_marks_silent_workers_offline(client, staff_user, settings):
    Worker.objects.create(name="gpu0@a", last_heartbeat=timezone.now() - timedelta(
        seconds=settings.WORKER_OFFLINE_AFTER_S + 5))
    Worker.objects.create(name="gpu1@b", last_heartbeat=timezone.now())
    client.force_login(staff_user)

    response = client.get(reverse("experiments:worker_list"))

    offline = {row.worker.name: row.offline for row in response.context["rows"]}
    assert offline == {"gpu0@a": True, "gpu1@b": False}
    assert "status-offline" in response.content.decode()


# --- record forms ---------------------------------------------------------------------------------
def test_model_create_registers_a_builtin_mlp(client_logged_in, team):
    response = client_logged_in.post(reverse("experiments:model_create"), {
        "team": team.pk, "name": "mlp-teacher", "source": "builtin", "builtin_arch": "mlp",
        "hidden_sizes": "256,256", "num_labels": 10,
    })

    assert response.status_code == 302
    spec = ModelSpec.objects.get(name="mlp-teacher")
    assert (spec.team, spec.config, spec.num_labels) == (team, {"hidden_sizes": [256, 256]}, 10)


def test_model_create_with_bad_hidden_sizes_creates_nothing(client_logged_in, team):
    response = client_logged_in.post(reverse("experiments:model_create"), {
        "team": team.pk, "name": "bad", "source": "builtin", "builtin_arch": "mlp", "hidden_sizes": "abc",
        "num_labels": 10,
    })

    assert response.status_code == 200
    assert response.context["form"].errors["hidden_sizes"]
    assert not ModelSpec.objects.exists()


def test_model_create_refuses_a_local_folder_outside_the_model_roots(
    client_logged_in, team, settings, tmp_path
):
    settings.MODEL_ROOTS = [tmp_path / "models"]
    (tmp_path / "models").mkdir()
    (tmp_path / "elsewhere").mkdir()

    response = client_logged_in.post(reverse("experiments:model_create"), {
        "team": team.pk, "name": "sneaky", "source": "hf", "local_path": str(tmp_path / "elsewhere"),
        "num_labels": 2,
    })

    assert "outside the allowed" in response.context["form"].errors["local_path"][0]
    assert not ModelSpec.objects.exists()


def test_model_create_from_a_transformers_config(client_logged_in, team):
    client_logged_in.post(reverse("experiments:model_create"), {
        "team": team.pk, "name": "tiny-bert", "source": "config", "num_labels": 5,
        "config": '{"model_type": "bert", "hidden_size": 32}',
    })

    assert ModelSpec.objects.get(name="tiny-bert").config["model_type"] == "bert"


def test_model_create_service_errors_show_on_the_form(client_logged_in, team):
    response = client_logged_in.post(
        reverse("experiments:model_create"),
        {
            "team": team.pk,
            "name": "no-type",
            "source": "config",
            "num_labels": 5,
            "config": '{"hidden_size": 32}',
        },
    )

    assert "model_type" in response.context["form"].errors["config"][0]
    assert not ModelSpec.objects.exists()


def test_dataset_create_packaged_digits(client_logged_in, team):
    response = client_logged_in.post(
        reverse("experiments:dataset_create"),
        {
            "team": team.pk,
            "name": "digits",
            "source": "builtin",
            "builtin_name": "digits",
            "text_column": "text",
            "label_column": "label",
            "eval_fraction": "0.2",
            "split_seed": "0",
            "max_length": "128",
        },
    )

    assert response.status_code == 302
    dataset = DatasetSpec.objects.get(name="digits")
    assert dataset.num_labels == 10 and dataset.splits["eval"] > 0


def test_dataset_create_refuses_a_file_outside_the_dataset_roots(client_logged_in, team, settings, tmp_path):
    settings.DATASET_ROOTS = [tmp_path / "data"]
    (tmp_path / "data").mkdir()

    response = client_logged_in.post(
        reverse("experiments:dataset_create"),
        {
            "team": team.pk,
            "name": "leak",
            "source": "hf",
            "local_path": "/etc/passwd",
            "text_column": "text",
            "label_column": "label",
            "num_labels": 2,
            "eval_fraction": "0.2",
            "split_seed": "0",
            "max_length": "128",
        },
    )

    assert "outside the allowed" in response.context["form"].errors["local_path"][0]
    assert not DatasetSpec.objects.exists()


def _recipe_post(team, rows, **extra):
    data = {"team": team.pk, "name": "kd-t4", "scheme": "offline", "description": "",
            "terms-TOTAL_FORMS": str(len(rows)), "terms-INITIAL_FORMS": "0", **extra}
    for i, row in enumerate(rows):
        data.update({f"terms-{i}-{k}": v for k, v in row.items()})
    return data


def test_recipe_create_saves_weighted_terms_and_shows_the_formula(client_logged_in, team):
    response = client_logged_in.post(reverse("experiments:recipe_create"), _recipe_post(
        team, [{"name": "ce", "weight": "0.1"}, {"name": "kd", "weight": "0.9", "temperature": "4"}, {}]
    ), follow=True)

    recipe = Recipe.objects.get(name="kd-t4")
    assert [t["name"] for t in recipe.terms] == ["ce", "kd"]
    assert recipe.terms[1]["params"]["temperature"] == 4.0
    assert recipe.formula in response.content.decode()


def test_recipe_create_out_of_range_param_creates_nothing(client_logged_in, team):
    response = client_logged_in.post(reverse("experiments:recipe_create"), _recipe_post(
        team, [{"name": "kd", "weight": "1", "temperature": "-1"}]
    ))

    assert response.status_code == 400
    assert "must be > 0" in " ".join(response.context["terms"].forms[0].errors["temperature"])
    assert not Recipe.objects.exists()


def test_recipe_create_hard_labels_scheme_with_kd_is_a_scheme_error(client_logged_in, team):
    response = client_logged_in.post(reverse("experiments:recipe_create"), _recipe_post(
        team, [{"name": "kd", "weight": "1"}], scheme="hard_labels"
    ))

    assert response.context["form"].errors["scheme"]
    assert not Recipe.objects.exists()


# --- experiment create ----------------------------------------------------------------------------
def _experiment_post(team, setup, **extra):
    data = {
        "team": team.pk,
        "name": "kd sweep",
        "dataset": setup["dataset"].pk,
        "teacher": setup["teacher"].pk,
        "students": [s.pk for s in setup["students"]],
        "recipes": [setup["recipe"].pk],
        "seeds": "0,1",
        "max_steps": "20",
        "batch_size": "32",
        "lr": "0.001",
        "lr_schedule": "cosine",
    }
    data.update(extra)
    return {k: v for k, v in data.items() if v is not None}


def test_experiment_create_makes_runs_with_a_baseline_per_student_and_seed(
    client_logged_in, team, digits_setup, django_capture_on_commit_callbacks
):
    with mock.patch("workers.tasks.run_distillation.apply_async") as apply_async:
        with django_capture_on_commit_callbacks(execute=True):
            response = client_logged_in.post(reverse("experiments:experiment_create"),
                                             _experiment_post(team, digits_setup))

    experiment = Experiment.objects.get()
    assert response.status_code == 302
    assert response.url == reverse("experiments:experiment_detail", kwargs={"experiment_id": experiment.pk})
    runs = list(experiment.runs.all())
    assert len(runs) == 2 * 2 * 2  # students × seeds × (kd recipe + baseline)
    baselines = {(r.student_id, r.seed) for r in runs if r.is_baseline}
    assert baselines == {(s.pk, seed) for s in digits_setup["students"] for seed in (0, 1)}
    assert all(r.recipe.scheme == Recipe.Scheme.HARD_LABELS for r in runs if r.is_baseline)
    assert experiment.train["max_steps"] == 20 and experiment.train["lr_schedule"] == "cosine"
    assert apply_async.call_count == len(runs)
    assert {c.kwargs["args"][0] for c in apply_async.call_args_list} == {r.pk for r in runs}


def _assert_nothing_created():
    assert Experiment.objects.count() == 0
    assert Run.objects.count() == 0


def test_experiment_create_kd_recipe_without_teacher_is_a_teacher_error(client_logged_in, team, digits_setup):
    response = client_logged_in.post(reverse("experiments:experiment_create"),
                                     _experiment_post(team, digits_setup, teacher=""))

    assert response.status_code == 200
    assert "teacher" in response.context["form"].errors
    _assert_nothing_created()


def test_experiment_create_student_with_other_label_count_is_a_students_error(
    client_logged_in, team, digits_setup
):
    five = ModelSpecFactory(team=team, name="five-way", num_labels=5)

    response = client_logged_in.post(reverse("experiments:experiment_create"),
                                     _experiment_post(team, digits_setup, students=[five.pk]))

    assert "5 labels" in response.context["form"].errors["students"][0]
    _assert_nothing_created()


@pytest.mark.parametrize(
    ("field", "value"),
    [("lr", "fast"), ("lr", "5"), ("max_steps", "0"), ("max_steps", "abc"), ("batch_size", "100000"),
     ("batch_size", "0"), ("lr_schedule", "sawtooth"), ("seeds", "one")],
)
def test_experiment_create_bad_settings_are_field_errors(client_logged_in, team, digits_setup, field, value):
    response = client_logged_in.post(reverse("experiments:experiment_create"),
                                     _experiment_post(team, digits_setup, **{field: value}))

    assert response.status_code == 200
    assert field in response.context["form"].errors
    _assert_nothing_created()


def test_experiment_create_warmup_longer_than_run_is_a_service_field_error(
    client_logged_in, team, digits_setup
):
    response = client_logged_in.post(reverse("experiments:experiment_create"),
                                     _experiment_post(team, digits_setup, warmup_steps="50"))

    assert response.context["form"].errors["warmup_steps"]
    _assert_nothing_created()


def test_experiment_create_rejects_another_teams_record(client_logged_in, team, digits_setup, foreign):
    response = client_logged_in.post(reverse("experiments:experiment_create"),
                                     _experiment_post(team, digits_setup, teacher=foreign["model"].pk))

    assert "valid choice" in response.context["form"].errors["teacher"][0]
    assert not Experiment.objects.filter(team=team).exists()
    assert not Run.objects.filter(team=team).exists()


def test_experiment_create_form_can_start_from_an_existing_experiment(client_logged_in, experiment):
    response = client_logged_in.get(reverse("experiments:experiment_create") + f"?copy={experiment.pk}")

    form = response.context["form"]
    assert form.initial["dataset"] == experiment.dataset_id
    assert form.initial["max_steps"] == 20


# --- experiment detail ----------------------------------------------------------------------------
def test_experiment_detail_shows_setup_runs_and_a_live_endpoint(client_logged_in, experiment, run):
    Run.objects.filter(pk=run.pk).update(status=Run.Status.FAILED, error="CUDA out of memory <oops>",
                                         finished_at=timezone.now())
    RunFactory(experiment=experiment, student=run.student, recipe=run.recipe, seed=1, is_baseline=True)

    response = client_logged_in.get(
        reverse("experiments:experiment_detail", kwargs={"experiment_id": experiment.pk})
    )

    html = response.content.decode()
    assert response.context["active"] is True
    assert reverse("experiments:experiment_runs_json", kwargs={"experiment_id": experiment.pk}) in html
    assert "CUDA out of memory &lt;oops&gt;" in html
    assert "baseline" in html
    assert _json_script(html, "curves-figure-data")["data"] == []


def test_experiment_runs_json_reports_status_step_and_total(client_logged_in, experiment, run):
    Run.objects.filter(pk=run.pk).update(status=Run.Status.RUNNING, started_at=timezone.now(), step=7,
                                         total_steps=20)
    _points(run, "eval/accuracy", [5, 10], [0.4, 0.6])

    data = client_logged_in.get(
        reverse("experiments:experiment_runs_json", kwargs={"experiment_id": experiment.pk}) + "?curves=1"
    ).json()

    assert data["status"] == "running" and data["active"] is True
    assert data["runs"] == [{"id": run.pk, "status": "running", "step": 7, "total_steps": 20,
                             "progress_percent": 35, "accuracy": None, "error": ""}]
    assert f'id="run-{run.pk}"' in data["html"]
    assert data["figures"]["curves-figure"]["data"][0]["y"] == [0.4, 0.6]


def test_experiment_runs_json_is_inactive_when_all_runs_finished(client_logged_in, experiment, digits_setup):
    _succeeded(experiment, digits_setup["students"][0], digits_setup["recipe"], 0, 0.9)

    data = client_logged_in.get(
        reverse("experiments:experiment_runs_json", kwargs={"experiment_id": experiment.pk})
    ).json()

    assert data["active"] is False and data["status"] == "succeeded"
    assert data["runs"][0]["accuracy"] == 0.9
    assert "figures" not in data


def test_experiment_cancel_cancels_unfinished_runs(client_logged_in, experiment, run, digits_setup):
    done = _succeeded(experiment, digits_setup["students"][1], digits_setup["recipe"], 0, 0.8)

    response = client_logged_in.post(
        reverse("experiments:experiment_cancel", kwargs={"experiment_id": experiment.pk})
    )

    assert response.status_code == 302
    run.refresh_from_db()
    done.refresh_from_db()
    assert run.status == Run.Status.CANCELLED
    assert done.status == Run.Status.SUCCEEDED


def test_cancel_needs_post(client_logged_in, run):
    response = client_logged_in.get(reverse("experiments:run_cancel", kwargs={"run_id": run.pk}))

    assert response.status_code == 405
    run.refresh_from_db()
    assert run.status == Run.Status.QUEUED


# --- run detail -----------------------------------------------------------------------------------
def test_run_detail_shows_loss_terms_and_eval_curves(client_logged_in, run):
    _points(run, "loss", [10, 20, 30], [2.0, 1.5, 1.2])
    _points(run, "ce", [10, 20, 30], [2.1, 1.8, 1.6])
    _points(run, "kd", [10, 20, 30], [1.9, 1.4, 1.1])
    _points(run, "eval/accuracy", [20], [0.7])
    _points(run, "eval/loss", [20], [0.9])

    response = client_logged_in.get(reverse("experiments:run_detail", kwargs={"run_id": run.pk}))

    html = response.content.decode()
    loss = _json_script(html, "loss-figure-data")
    assert [t["name"] for t in loss["data"]] == ["loss", "ce", "kd"]
    assert loss["data"][0]["y"] == [2.0, 1.5, 1.2]
    evals = _json_script(html, "eval-figure-data")
    assert sorted(t["name"] for t in evals["data"]) == ["accuracy", "loss"]
    assert "vendor/plotly.min.js" in html
    assert "&quot;train&quot;" in html  # the resolved config, pretty-printed and escaped


def test_run_detail_shows_the_error_of_a_failed_run(client_logged_in, run):
    Run.objects.filter(pk=run.pk).update(
        status=Run.Status.FAILED, finished_at=timezone.now(),
        error="Column 'text' not found in data.csv. Columns: <sentence>, label",
    )

    html = client_logged_in.get(reverse("experiments:run_detail", kwargs={"run_id": run.pk})).content.decode()

    assert 'class="error-box"' in html
    assert "Column &#x27;text&#x27; not found in data.csv. Columns: &lt;sentence&gt;, label" in html
    assert "Cancel run" not in html


def test_run_detail_lists_evaluations_and_artifacts(client_logged_in, experiment, digits_setup):
    run = _succeeded(experiment, digits_setup["students"][0], digits_setup["recipe"], 0, 0.91)
    Run.objects.filter(pk=run.pk).update(teacher=digits_setup["teacher"])
    _teacher_eval(digits_setup["teacher"], experiment.dataset, 0.97)
    Artifact.objects.create(run=run, kind=Artifact.Kind.MODEL, path=f"runs/{run.pk}/final", size_bytes=2048)

    response = client_logged_in.get(reverse("experiments:run_detail", kwargs={"run_id": run.pk}))

    html = response.content.decode()
    assert [e.role for e in response.context["evaluations"]] == ["student", "teacher"]
    assert "91.00%" in html and "97.00%" in html
    assert f"runs/{run.pk}/final" in html
    assert "Register as a model" in html


def test_run_status_json_reports_progress_and_curves(client_logged_in, run):
    Run.objects.filter(pk=run.pk).update(status=Run.Status.RUNNING, started_at=timezone.now(), step=5,
                                         total_steps=20, samples_per_s=512.0)
    _points(run, "loss", [5], [1.0])

    url = reverse("experiments:run_status_json", kwargs={"run_id": run.pk})
    data = client_logged_in.get(url).json()
    with_curves = client_logged_in.get(url + "?curves=1").json()

    assert (data["status"], data["step"], data["total_steps"], data["progress_percent"]) == (
        "running",
        5,
        20,
        25,
    )
    assert data["active"] is True and data["samples_per_s"] == 512.0
    assert "step 5 / 20" in data["html"]
    assert "figures" not in data
    assert with_curves["figures"]["loss-figure"]["data"][0]["y"] == [1.0]
    assert "tokens/s" not in data["html"] and "GPU memory" not in data["html"]
    # A causal LM on a GPU also logs tokens/s and peak GPU memory: the newest of each shows live.
    _points(run, "tokens_per_s", [4, 5], [900.0, 1234.0])
    _points(run, "gpu_memory_bytes", [5], [3 * 2**30])
    html = client_logged_in.get(url).json()["html"]
    assert "1234 tokens/s" in html and "GPU memory 3.0\xa0GB" in html


def test_run_cancel_marks_a_queued_run_cancelled(client_logged_in, run):
    response = client_logged_in.post(reverse("experiments:run_cancel", kwargs={"run_id": run.pk}))

    assert response.status_code == 302
    run.refresh_from_db()
    assert run.status == Run.Status.CANCELLED and run.cancel_requested


def test_run_cancel_of_a_running_run_requests_cancellation(client_logged_in, run):
    Run.objects.filter(pk=run.pk).update(status=Run.Status.RUNNING, started_at=timezone.now())

    client_logged_in.post(reverse("experiments:run_cancel", kwargs={"run_id": run.pk}))

    run.refresh_from_db()
    assert run.status == Run.Status.RUNNING and run.cancel_requested


def test_register_as_model_creates_a_model_from_the_run(client_logged_in, experiment, digits_setup):
    run = _succeeded(experiment, digits_setup["students"][0], digits_setup["recipe"], 0, 0.9)

    response = client_logged_in.post(reverse("experiments:run_register_model", kwargs={"run_id": run.pk}),
                                     {"name": "distilled-mlp"})

    assert response.status_code == 302 and response.url == reverse("experiments:model_list")
    spec = ModelSpec.objects.get(name="distilled-mlp")
    assert spec.source == ModelSpec.Source.RUN and spec.source_run == run and spec.team == experiment.team


def test_register_as_model_refuses_an_unfinished_run(client_logged_in, run):
    response = client_logged_in.post(reverse("experiments:run_register_model", kwargs={"run_id": run.pk}),
                                     {"name": "too-early"})

    assert response.status_code == 200
    assert "has not succeeded" in " ".join(response.context["register_form"].non_field_errors())
    assert not ModelSpec.objects.filter(name="too-early").exists()


def test_register_as_model_with_a_taken_name_is_a_name_error(client_logged_in, experiment, digits_setup):
    run = _succeeded(experiment, digits_setup["students"][0], digits_setup["recipe"], 0, 0.9)

    response = client_logged_in.post(reverse("experiments:run_register_model", kwargs={"run_id": run.pk}),
                                     {"name": digits_setup["teacher"].name})

    assert response.context["register_form"].errors["name"]
    assert not ModelSpec.objects.filter(source=ModelSpec.Source.RUN).exists()


# --- leaderboard ----------------------------------------------------------------------------------
@pytest.fixture
def ranked(team, experiment, digits_setup):
    """Two students, a kd recipe and the baseline over seeds 0 and 1; teacher accuracy 0.9."""
    s1, s2 = digits_setup["students"]
    kd, base = digits_setup["recipe"], _baseline_recipe(team)
    _teacher_eval(digits_setup["teacher"], experiment.dataset, 0.9, params=8000, latency=2.0)
    for seed, acc in ((0, 0.85), (1, 0.87)):
        _succeeded(experiment, s1, kd, seed, acc, params=2000)
    for seed, acc in ((0, 0.80), (1, 0.82)):
        _succeeded(experiment, s1, base, seed, acc, baseline=True, params=2000)
    _succeeded(experiment, s2, kd, 0, 0.70, params=500)
    _succeeded(experiment, s2, base, 0, 0.72, baseline=True, params=500)
    return {"s1": s1, "s2": s2, "kd": kd, "base": base}


def test_leaderboard_ranks_rows_with_retention_and_kd_gain(client_logged_in, experiment, ranked):
    response = client_logged_in.get(
        reverse("experiments:leaderboard", kwargs={"dataset_id": experiment.dataset_id})
    )

    rows = response.context["rows"]
    assert [(r.student, r.recipe) for r in rows] == [
        (ranked["s1"], ranked["kd"]), (ranked["s1"], ranked["base"]),
        (ranked["s2"], ranked["base"]), (ranked["s2"], ranked["kd"]),
    ]
    assert [r.rank for r in rows] == [1, 2, 3, 4]
    top = rows[0]
    assert top.mean == pytest.approx(0.86) and top.seeds == 2
    assert top.retention == pytest.approx(0.86 / 0.9)
    assert top.kd_gain == pytest.approx(0.05)
    assert rows[1].kd_gain is None  # the baseline gains nothing over itself
    assert rows[3].kd_gain == pytest.approx(-0.02)
    assert top.compression == pytest.approx(4.0) and top.speedup == pytest.approx(4.0)  # 8000/2000, 2.0/0.5
    assert rows[2].compression == pytest.approx(16.0)
    html = response.content.decode()
    assert "4.0×" in html and "16.0×" in html
    assert "86.00%" in html and "95.6%" in html and "+5.00 pp" in html and "-2.00 pp" in html
    assert "(n=2)" in html


def test_leaderboard_budget_keeps_rows_that_fit_and_reranks(client_logged_in, experiment, ranked):
    response = client_logged_in.get(
        reverse("experiments:leaderboard", kwargs={"dataset_id": experiment.dataset_id}), {"max_params": 1000}
    )

    rows = response.context["rows"]
    assert [(r.student, r.rank) for r in rows] == [(ranked["s2"], 1), (ranked["s2"], 2)]
    assert response.context["total"] == 4


def test_leaderboard_hides_other_teams_results(client_logged_in, other_user, client, experiment, ranked):
    client.force_login(other_user)

    response = client.get(reverse("experiments:leaderboard", kwargs={"dataset_id": experiment.dataset_id}))

    assert response.status_code == 404


def test_leaderboard_index_counts_finished_runs(client_logged_in, experiment, ranked):
    response = client_logged_in.get(reverse("experiments:leaderboard_index"))

    [dataset] = response.context["datasets"]
    assert dataset.result_count == 6


# --- query counts ---------------------------------------------------------------------------------
def _count_queries(client, url):
    with CaptureQueriesContext(connection) as ctx:
        assert client.get(url).status_code == 200
    return len(ctx.captured_queries)


def test_experiment_list_uses_a_constant_number_of_queries(client_logged_in, team, digits_setup,
                                                           django_assert_max_num_queries):
    def add_experiment():
        experiment = ExperimentFactory(
            team=team, dataset=digits_setup["dataset"], teacher=digits_setup["teacher"]
        )
        experiment.students.set(digits_setup["students"])
        experiment.recipes.set([digits_setup["recipe"]])
        RunFactory(experiment=experiment, student=digits_setup["students"][0], recipe=digits_setup["recipe"])

    url = reverse("experiments:experiment_list")
    add_experiment()
    few = _count_queries(client_logged_in, url)
    for _ in range(12):
        add_experiment()

    with django_assert_max_num_queries(few):
        response = client_logged_in.get(url)
    assert len(response.context["page"].object_list) == 13


def test_leaderboard_uses_a_constant_number_of_queries(client_logged_in, team, experiment, digits_setup,
                                                       django_assert_max_num_queries):
    base = _baseline_recipe(team)
    url = reverse("experiments:leaderboard", kwargs={"dataset_id": experiment.dataset_id})
    _succeeded(experiment, digits_setup["students"][0], base, 0, 0.8, baseline=True)
    few = _count_queries(client_logged_in, url)
    for i, student in enumerate(ModelSpecFactory.create_batch(8, team=team)):
        recipe = RecipeFactory(team=team)
        _succeeded(experiment, student, recipe, 0, 0.5 + i / 100)
        _succeeded(experiment, student, base, 0, 0.5, baseline=True)

    with django_assert_max_num_queries(few):
        response = client_logged_in.get(url)
    assert len(response.context["rows"]) == 17


def test_causal_lm_leaderboard_ranks_by_perplexity_lower_first(client_logged_in, team, digits_setup):
    from tests.factories import DatasetSpecFactory, ExperimentFactory

    corpus = DatasetSpecFactory(
        team=team, name="corpus", task="causal_lm", num_labels=0, builtin_name="fortunes"
    )
    experiment = ExperimentFactory(team=team, dataset=corpus, teacher=digits_setup["teacher"])
    student, kd, base = digits_setup["students"][0], digits_setup["recipe"], _baseline_recipe(team)
    Evaluation.objects.create(team=team, role=Evaluation.Role.TEACHER, model=digits_setup["teacher"],
                              dataset=corpus, split_key="k", metrics={"perplexity": 10.0})
    for recipe, ppl, baseline in ((kd, 20.0, False), (base, 25.0, True)):
        run = RunFactory(experiment=experiment, student=student, recipe=recipe, seed=0, is_baseline=baseline,
                         status=Run.Status.SUCCEEDED, step=20, total_steps=20, finished_at=timezone.now())
        Evaluation.objects.create(
            team=team,
            role=Evaluation.Role.STUDENT,
            run=run,
            model=student,
            dataset=corpus,
            split_key="k",
            metrics={"perplexity": ppl},
            param_count=1000,
        )

    response = client_logged_in.get(reverse("experiments:leaderboard", kwargs={"dataset_id": corpus.pk}))

    rows = response.context["rows"]
    assert [r.recipe for r in rows] == [kd, base]  # lower perplexity ranks first
    assert rows[0].kd_gain == pytest.approx(5.0)  # 5 points of perplexity better than the baseline
    assert rows[0].retention == pytest.approx(0.5)  # teacher 10 / student 20
    html = response.content.decode()
    assert "Perplexity" in html and "20.000" in html
