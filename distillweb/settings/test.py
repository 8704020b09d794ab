"""Test settings: the real Postgres (DATABASE_URL, default the local server) and fast hashing."""

import os

os.environ.setdefault("DEBUG", "true")
os.environ.setdefault("DATABASE_URL", "postgres://postgres@127.0.0.1:5432/distillweb")
os.environ.setdefault("SECURE_SSL_REDIRECT", "false")
# Integration tests start real workers over this broker; unit tests never publish (dispatch is on commit).
os.environ.setdefault("CELERY_BROKER_URL", "redis://127.0.0.1:6379/15")

from pathlib import Path  # noqa: E402

from .base import *  # noqa: E402,F403
from .base import BASE_DIR, env  # noqa: E402

PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
ARTIFACT_ROOT = Path(env("ARTIFACT_ROOT", default=str(BASE_DIR / "var" / "test-artifacts")))  # noqa: F405
STORAGES["staticfiles"]["BACKEND"] = "django.contrib.staticfiles.storage.StaticFilesStorage"  # noqa: F405
WHITENOISE_USE_FINDERS = True
