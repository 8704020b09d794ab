"""Settings: production values pass `check --deploy`; the embedded default needs no server."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _manage(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    clean = {
        k: v
        for k, v in os.environ.items()
        if k
        not in {
            "DJANGO_SETTINGS_MODULE",
            "DEBUG",
            "DATABASE_URL",
            "CELERY_BROKER_URL",
            "SECRET_KEY",
            "SECURE_SSL_REDIRECT",
            "DJANGO_ALLOW_ASYNC_UNSAFE",
        }
    }
    return subprocess.run(
        [sys.executable, "manage.py", *args],
        cwd=REPO,
        env={**clean, **env},
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_check_deploy_is_clean_with_production_values(tmp_path):
    result = _manage(
        "check", "--deploy", "--fail-level", "DEBUG",
        env={"DEBUG": "false", "SECRET_KEY": "k" * 20 + "-production-secret-value-0123456789-abcdefghijk",
             "ALLOWED_HOSTS": "distill.example.org", "DATABASE_URL": "postgres://postgres@127.0.0.1:5432/distillweb",
             "CELERY_BROKER_URL": "redis://127.0.0.1:6379/0", "DISTILLWEB_VAR_DIR": str(tmp_path)},
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "no issues" in result.stdout


def test_production_refuses_to_start_without_a_secret_key(tmp_path):
    result = _manage("check", env={"DEBUG": "false", "DISTILLWEB_VAR_DIR": str(tmp_path)})
    assert result.returncode != 0 and "SECRET_KEY" in result.stderr


@pytest.mark.parametrize("debug", ["true"])
def test_embedded_default_is_sqlite_and_the_filesystem_broker(tmp_path, debug):
    code = ("from django.conf import settings as s; "
            "print('SETTINGS', s.DATABASES['default']['ENGINE'], s.CELERY_BROKER_URL, s.ARTIFACT_ROOT)")
    result = _manage("shell", "-c", code, env={"DEBUG": debug, "DISTILLWEB_VAR_DIR": str(tmp_path)})
    assert result.returncode == 0, result.stderr
    line = next(x for x in result.stdout.splitlines() if x.startswith("SETTINGS"))
    engine, broker, artifacts = line.split()[1:]
    assert engine == "django.db.backends.sqlite3" and broker == "filesystem://"
    assert artifacts == str(tmp_path / "artifacts")
    assert (tmp_path / "broker" / "queue").is_dir()


def test_plotly_js_is_served_locally(client, django_user_model):
    from django.contrib.staticfiles import finders

    path = finders.find("vendor/plotly.min.js")
    assert path and path.endswith("plotly.min.js")
    response = client.get("/static/vendor/plotly.min.js")
    assert response.status_code == 200
    assert b"plotly" in b"".join(response.streaming_content)[:2000].lower()


def test_collectstatic_includes_plotly(tmp_path):
    result = _manage("collectstatic", "--noinput", env={"DEBUG": "false", "SECRET_KEY": "x" * 60,
                                                         "STATIC_ROOT": str(tmp_path / "static"),
                                                         "DISTILLWEB_VAR_DIR": str(tmp_path)})
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "static" / "vendor" / "plotly.min.js").stat().st_size > 1_000_000
