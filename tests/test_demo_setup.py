"""`make demo`'s set-up: its env file makes the README's commands work without DEBUG, its processes keep the
periodic sweeps off the training worker, and its known warnings stay out of the log."""

import os
import stat
import subprocess
import sys
from pathlib import Path

from django.conf import settings

from experiments.management.commands.demo import process_plan, write_demo_env

REPO = Path(__file__).resolve().parents[1]


def _manage(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    """manage.py in a clean environment: only what the test names, as after `make demo` in a new shell."""
    clean = {
        k: v
        for k, v in os.environ.items()
        if k not in {"DJANGO_SETTINGS_MODULE", "DEBUG", "DATABASE_URL", "CELERY_BROKER_URL", "SECRET_KEY",
                     "SECURE_SSL_REDIRECT", "DJANGO_ALLOW_ASYNC_UNSAFE", "ARTIFACT_ROOT"}
    }
    return subprocess.run([sys.executable, "manage.py", *args], cwd=REPO, env={**clean, **env},
                          capture_output=True, text=True, timeout=120)


def test_demo_env_file_is_private_generated_once_and_kept(tmp_path):
    path = tmp_path / "demo.env"
    key = write_demo_env(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert len(key) >= 50 and key.isalnum()
    assert f"SECRET_KEY={key}" in path.read_text()
    assert write_demo_env(path) == key  # a second `make demo` keeps the key (and the sessions signed with it)
    path.chmod(0o644)
    write_demo_env(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_documented_commands_work_after_the_demo_without_debug(tmp_path):
    write_demo_env(tmp_path / "demo.env")
    env = {"DISTILLWEB_VAR_DIR": str(tmp_path)}
    result = _manage("check", env=env)
    assert result.returncode == 0, result.stderr
    assert "no issues" in result.stdout
    result = _manage("migrate", "--noinput", env=env)
    assert result.returncode == 0, result.stderr
    result = _manage("axes_reset_username", "admin", env=env)
    assert result.returncode == 0, result.stderr


def test_a_deployment_never_reads_the_demo_key(tmp_path):
    """With a real database named, the demo's file is ignored: a missing SECRET_KEY still stops the site."""
    write_demo_env(tmp_path / "demo.env")
    result = _manage("check", env={"DISTILLWEB_VAR_DIR": str(tmp_path),
                                   "DATABASE_URL": "postgres://postgres@127.0.0.1:5432/distillweb"})
    assert result.returncode != 0 and "SECRET_KEY" in result.stderr


def test_demo_runs_the_sweeps_on_their_own_worker_beside_the_training_worker():
    plan = process_plan(host="127.0.0.1", port="8000")
    workers = [(argv, extra) for argv, extra in plan if "worker" in argv]
    assert len(workers) == 2

    def queues(argv: list[str]) -> list[str]:
        return argv[argv.index("-Q") + 1].split(",")

    (training, training_env), (fleet, fleet_env) = sorted(workers, key=lambda w: "-B" in w[0])
    assert queues(training) == [settings.RUN_QUEUE] and "-B" not in training
    assert training[training.index("--concurrency") + 1] == "1"
    # Beat, and the sweeps it sends, live on the fleet worker only: never behind a run that trains.
    assert queues(fleet) == [settings.FLEET_QUEUE] and "-B" in fleet
    assert fleet_env.get("WORKER_WARMUP") == "0" and "WORKER_WARMUP" not in training_env
    assert training[training.index("-n") + 1] != fleet[fleet.index("-n") + 1]
    (server, server_env), = [(argv, extra) for argv, extra in plan if "runserver" in argv]
    assert server[-1] == "127.0.0.1:8000" and server_env["DJANGO_RUNSERVER_HIDE_WARNING"] == "true"


def test_known_harmless_warnings_of_the_embedded_shape_are_silenced(tmp_path):
    code = (
        "import logging, warnings\n"
        "from celery.exceptions import SecurityWarning\n"
        "kombu = logging.getLogger('kombu.connection')\n"
        "kombu.warning('No hostname was supplied. Reverting to default x')\n"
        "kombu.warning('another kombu warning')\n"
        "warnings.warn(SecurityWarning(\"You're running the worker with superuser privileges: no\"))\n"
        "warnings.warn(SecurityWarning('another security warning'))\n"
    )
    result = _manage("shell", "-c", code, env={"DEBUG": "true", "DISTILLWEB_VAR_DIR": str(tmp_path)})
    assert result.returncode == 0, result.stderr
    assert "No hostname was supplied" not in result.stderr
    assert "superuser privileges" not in result.stderr
    assert "another kombu warning" in result.stderr and "another security warning" in result.stderr
