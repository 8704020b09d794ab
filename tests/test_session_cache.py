"""Sessions read from a shared Redis cache when CACHE_URL names one: a request then reads no session row, and
logging out ends the session for every web process (the cache is shared, never per process)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import redis
from django.contrib.sessions.models import Session
from django.db import connection
from django.test.utils import CaptureQueriesContext, override_settings
from django.urls import reverse

REPO = Path(__file__).resolve().parents[1]
CACHE_URL = "redis://127.0.0.1:6379/14"


def _settings_with(env: dict[str, str]) -> list[str]:
    code = ("import django; django.setup(); from django.conf import settings; "
            "print(settings.SESSION_ENGINE); print(settings.CACHES['default']['BACKEND'])")
    clean = {k: v for k, v in os.environ.items() if k != "CACHE_URL"}
    env = {**clean, "DJANGO_SETTINGS_MODULE": "distillweb.settings.base", "DEBUG": "true", **env}
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True,
                         env=env, timeout=120)
    return out.stdout.split()


def test_cache_url_turns_on_cached_sessions_and_nothing_else_does():
    assert _settings_with({"CACHE_URL": CACHE_URL}) == ["django.contrib.sessions.backends.cached_db",
                                                         "django.core.cache.backends.redis.RedisCache"]
    assert _settings_with({}) == ["django.contrib.sessions.backends.db",
                                  "django.core.cache.backends.locmem.LocMemCache"]


@pytest.fixture
def redis_sessions(db):
    try:
        redis.Redis.from_url(CACHE_URL).ping()
    except redis.ConnectionError:
        if os.environ.get("DISTILLWEB_REQUIRE_SERVICES"):
            raise
        pytest.skip("Redis is not running")
    caches = {"default": {"BACKEND": "django.core.cache.backends.redis.RedisCache", "LOCATION": CACHE_URL}}
    with override_settings(CACHES=caches, SESSION_ENGINE="django.contrib.sessions.backends.cached_db"):
        yield
    redis.Redis.from_url(CACHE_URL).flushdb()


def test_a_cached_session_is_read_without_a_query_and_logout_ends_it(client, user, redis_sessions):
    client.force_login(user)
    assert Session.objects.count() == 1  # written through to the database too
    with CaptureQueriesContext(connection) as queries:
        assert client.get(reverse("api:team_list")).status_code == 200
    assert not any("django_session" in q["sql"] for q in queries.captured_queries)

    cookie = client.cookies["sessionid"].value
    client.post(reverse("logout"))
    client.cookies["sessionid"] = cookie  # the old cookie, as another tab or a stolen copy would send it
    assert client.get(reverse("api:team_list")).status_code in (401, 403)
    assert not Session.objects.exists()
