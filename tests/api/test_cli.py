"""The `distillweb` command-line client against a live server with a real token."""

from __future__ import annotations

import csv
import io
import json
import os
import stat
import subprocess
import sys
from pathlib import Path
from unittest import mock

import pytest
import yaml
from django.utils import timezone

from distillweb_cli import main as cli
from experiments.models import Experiment, Recipe, Run
from tests.api.conftest import DISPATCH, make_token
from tests.waiting import scaled

pytestmark = pytest.mark.django_db(transaction=True)

CONSOLE_SCRIPT = Path(sys.executable).with_name("distillweb")


@pytest.fixture(autouse=True)
def _isolated_config(monkeypatch, tmp_path):
    """Each test has its own config folder and no credentials in the environment."""
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    monkeypatch.delenv("DISTILLWEB_URL", raising=False)
    monkeypatch.delenv("DISTILLWEB_TOKEN", raising=False)


@pytest.fixture
def dispatch():
    with mock.patch(DISPATCH) as dispatch:
        yield dispatch


def run_cli(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = cli.main(list(argv), out=out, err=err)
    return code, out.getvalue(), err.getvalue()


@pytest.fixture
def logged_in(live_server, user, team):
    """The user's token, saved by `distillweb login`."""
    token = make_token(user)
    code, out, err = run_cli("login", "--url", live_server.url, "--token", token)
    assert code == 0, err
    return token


def _experiment_yaml(tmp_path: Path, **change) -> Path:
    spec = {"kind": "experiment", "name": "cli sweep", "dataset": "digits", "teacher": "mlp-teacher",
            "students": ["mlp-16", "mlp-32"], "recipes": ["kd-t4"], "seeds": [0], "train": {"max_steps": 10}}
    spec.update(change)
    path = tmp_path / "experiment.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


# --- login ----------------------------------------------------------------------------------------
def test_login_checks_the_token_and_saves_it_for_the_owner_only(live_server, user, team, tmp_path):
    token = make_token(user)

    code, out, _ = run_cli("login", "--url", live_server.url + "/", "--token", token)

    path = tmp_path / "config" / "distillweb" / "config.json"
    assert code == 0 and team.name in out
    assert json.loads(path.read_text()) == {"url": live_server.url, "token": token}
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_login_asks_for_the_token_when_it_is_left_out(live_server, user, team, tmp_path):
    token = make_token(user)

    with mock.patch.object(cli.getpass, "getpass", return_value=token + "\n") as ask:
        code, _, err = run_cli("login", "--url", live_server.url)

    assert code == 0, err
    assert ask.called
    assert json.loads((tmp_path / "config" / "distillweb" / "config.json").read_text())["token"] == token


def test_login_with_a_bad_token_fails_and_saves_nothing(live_server, tmp_path):
    code, _, err = run_cli("login", "--url", live_server.url, "--token", "dw_wrong")

    assert code == 1 and "401" in err and "Invalid or revoked token" in err
    assert not (tmp_path / "config" / "distillweb" / "config.json").exists()


def test_commands_without_a_login_explain_how_to_log_in():
    code, _, err = run_cli("status")

    assert code == 2 and "distillweb login" in err


def test_an_unreachable_server_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("DISTILLWEB_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("DISTILLWEB_TOKEN", "dw_x")

    code, _, err = run_cli("--timeout", "5", "status")

    assert code == 1 and "cannot reach http://127.0.0.1:9" in err


# --- submit and status ----------------------------------------------------------------------------
def test_submit_launches_the_yaml_and_status_lists_its_runs(
    logged_in, live_server, digits_setup, dispatch, tmp_path
):
    code, out, err = run_cli("submit", str(_experiment_yaml(tmp_path)))

    assert code == 0, err
    experiment = Experiment.objects.get(name="cli sweep")
    assert f"Experiment {experiment.pk} (cli sweep) launched with 4 runs." in out
    assert f"{live_server.url}/experiments/{experiment.pk}/" in out
    assert dispatch.call_count == 4

    code, out, err = run_cli("status", str(experiment.pk))

    assert code == 0, err
    lines = out.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("RUN"))
    rows = lines[header + 1 :]
    assert len(rows) == 4 and "0/4 runs done (4 queued)" in out
    assert {int(line.split()[0]) for line in rows} == set(experiment.runs.values_list("pk", flat=True))
    assert sum("baseline hard_labels" in line for line in rows) == 2
    assert all(" queued " in line and "0/10" in line for line in rows)


def test_submit_wait_follows_the_runs_until_they_finish(logged_in, digits_setup, dispatch, tmp_path):
    def finish_runs(seconds: float) -> None:
        Run.objects.update(status=Run.Status.SUCCEEDED, step=10, finished_at=timezone.now())

    with mock.patch.object(cli.time, "sleep", side_effect=finish_runs) as sleep:
        code, out, err = run_cli("submit", str(_experiment_yaml(tmp_path)), "--wait", "--interval", "0.1")

    assert code == 0, err
    assert sleep.call_count == 1
    assert "0/4 runs done (4 queued)" in out and "4/4 runs done (4 succeeded)" in out
    assert out.rstrip().endswith(": succeeded.")


def test_submit_wait_exits_1_when_a_run_fails(logged_in, digits_setup, dispatch, tmp_path):
    def fail_runs(seconds: float) -> None:
        Run.objects.update(status=Run.Status.FAILED, error="boom", finished_at=timezone.now())

    with mock.patch.object(cli.time, "sleep", side_effect=fail_runs):
        code, out, _ = run_cli("submit", str(_experiment_yaml(tmp_path)), "--wait")

    assert code == 1 and "4 failed" in out


def test_submit_check_shows_the_plan_and_launches_nothing(logged_in, digits_setup, dispatch, tmp_path):
    code, out, err = run_cli("submit", str(_experiment_yaml(tmp_path, seeds=[0, 1])), "--check")

    assert code == 0, err
    assert (
        out.startswith("8 runs: 2 students × 2 seeds") and "[ok] Runs:" in out and "Ready to launch." in out
    )
    assert not Experiment.objects.exists() and not dispatch.called


def test_submit_check_of_an_oversized_sweep_exits_1(logged_in, digits_setup, dispatch, tmp_path, settings):
    settings.MAX_RUNS_PER_EXPERIMENT = 5
    path = _experiment_yaml(tmp_path, train={"max_steps": 10, "lr": [0.001, 0.002]})

    code, out, _ = run_cli("submit", str(path), "--check")

    assert code == 1 and "error: lr:" in out and "cannot launch" in out


def test_submit_prints_the_apis_field_errors(logged_in, digits_setup, dispatch, tmp_path):
    path = _experiment_yaml(tmp_path, students=["mlp-16", "mlp-99"], seeds=[0, 0])

    code, out, err = run_cli("submit", str(path))

    assert code == 1 and out == ""
    assert "error 400" in err
    assert "  students: No model named 'mlp-99'" in err
    assert not Experiment.objects.exists() and not dispatch.called


def test_status_of_another_teams_experiment_is_a_404(logged_in, other_team):
    from tests.factories import ExperimentFactory

    secret = ExperimentFactory(team=other_team)

    code, _, err = run_cli("status", str(secret.pk))

    assert code == 1 and "404" in err


def test_status_without_an_id_shows_recent_runs(logged_in, experiment, run):
    code, out, _ = run_cli("status")

    assert code == 0 and out.splitlines()[1].split()[0] == str(run.pk)


# --- leaderboard, export, import ------------------------------------------------------------------
def test_leaderboard_csv_is_the_pages_export(logged_in, experiment, ranked):
    code, out, err = run_cli("leaderboard", str(experiment.dataset_id), "--csv")

    assert code == 0, err
    rows = list(csv.DictReader(io.StringIO(out)))
    assert [(r["rank"], r["student"], r["recipe"], r["pareto"]) for r in rows] == [
        ("1", "mlp-16", "kd-t4 v1", "True"),
        ("2", "mlp-16", "hard_labels v1", "False"),
        ("3", "mlp-32", "hard_labels v1", "True"),
        ("4", "mlp-32", "kd-t4 v1", "False"),
    ]
    assert float(rows[0]["mean"]) == pytest.approx(0.86) and float(rows[0]["kd_gain"]) == pytest.approx(0.05)
    assert rows[0]["params"] == "2000" and len(rows[0]["run_ids"].split()) == 2


def test_leaderboard_table_with_a_budget(logged_in, experiment, ranked):
    code, out, _ = run_cli("leaderboard", str(experiment.dataset_id), "--max-params", "1000")

    assert code == 0
    assert "ranked by accuracy (higher is better), 2 of 4 rows" in out
    assert "72.00% ± 0.00" in out and "mlp-16" not in out


def test_leaderboard_with_an_unknown_metric_prints_the_choices(logged_in, experiment, ranked):
    code, _, err = run_cli("leaderboard", str(experiment.dataset_id), "--metric", "vibes")

    assert code == 1 and "metric: No result here measures 'vibes'; available: accuracy" in err


def test_export_and_import_a_recipe(logged_in, digits_setup):
    recipe = digits_setup["recipe"]

    code, exported, _ = run_cli("export-recipe", str(recipe.pk))
    assert code == 0 and yaml.safe_load(exported)["terms"] == recipe.terms

    path = Path(os.environ["XDG_CONFIG_HOME"]).parent / "recipe.yaml"
    path.write_text(exported)
    code, out, err = run_cli("import-recipe", str(path))

    assert code == 0, err
    assert "kd-t4 v2" in out and Recipe.objects.filter(name="kd-t4", version=2).exists()


def test_the_console_script_reads_credentials_from_the_environment(live_server, user, experiment, run):
    env = {**os.environ, "DISTILLWEB_URL": live_server.url, "DISTILLWEB_TOKEN": make_token(user)}

    result = subprocess.run(
        [str(CONSOLE_SCRIPT), "status", str(experiment.pk)],
        env=env,
        capture_output=True,
        text=True,
        timeout=scaled(60),
    )

    assert result.returncode == 0, result.stderr
    assert f"Experiment {experiment.pk}" in result.stdout and str(run.pk) in result.stdout


def test_usage_errors_exit_2():
    assert run_cli("leaderboard", "not-a-number")[0] == 2
    assert run_cli("frobnicate")[0] == 2
