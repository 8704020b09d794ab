"""Login throttling (django-axes): too many failed logins lock that username from that address for a
cool-off."""

from datetime import timedelta

import pytest
from axes.models import AccessAttempt
from django.core.management import call_command

from tests.factories import UserFactory
from tests.test_deploy import _manage

pytestmark = pytest.mark.django_db

PASSWORD = "right-pass-123"
LIMIT = 3


@pytest.fixture
def user(settings):
    settings.AXES_FAILURE_LIMIT = LIMIT
    settings.AXES_COOLOFF_TIME = timedelta(minutes=15)
    user = UserFactory(username="alice")
    user.set_password(PASSWORD)
    user.save()
    return user


def _login(client, password: str, username: str = "alice"):
    return client.post("/login/", {"username": username, "password": password})


def _logged_in(client) -> bool:
    return "_auth_user_id" in client.session


def test_bad_logins_lock_the_account_with_a_message_even_for_the_right_password(client, user):
    for _ in range(LIMIT - 1):
        response = _login(client, "wrong")
        assert response.status_code == 200 and "correct username and password" in response.content.decode()
    response = _login(client, "wrong")
    assert response.status_code == 429
    text = response.content.decode()
    assert (
        "Too many failed logins" in text
        and "after 3 failed attempts" in text
        and "Try again in 15 min" in text
    )

    response = _login(client, PASSWORD)
    assert response.status_code == 429 and not _logged_in(client)


def test_the_lock_ends_after_the_cool_off(client, user):
    for _ in range(LIMIT):
        _login(client, "wrong")
    assert _login(client, PASSWORD).status_code == 429
    # The cool-off passes: every recorded failure is now older than it.
    AccessAttempt.objects.update(
        attempt_time=AccessAttempt.objects.get().attempt_time - timedelta(minutes=16)
    )
    response = _login(client, PASSWORD)
    assert response.status_code == 302 and _logged_in(client)


def test_an_admin_reset_ends_the_lock(client, user):
    for _ in range(LIMIT):
        _login(client, "wrong")
    assert _login(client, PASSWORD).status_code == 429
    call_command("axes_reset_username", "alice")
    assert _login(client, PASSWORD).status_code == 302 and _logged_in(client)


def test_a_good_login_before_the_limit_works_and_resets_the_count(client, user):
    for _ in range(LIMIT - 1):
        _login(client, "wrong")
    assert _login(client, PASSWORD).status_code == 302 and _logged_in(client)
    client.logout()
    # The count started again: LIMIT - 1 more failures still leave the account open.
    for _ in range(LIMIT - 1):
        _login(client, "wrong")
    assert _login(client, PASSWORD).status_code == 302


def test_the_lock_is_per_username(client, user):
    for _ in range(LIMIT):
        _login(client, "wrong")
    assert _login(client, PASSWORD).status_code == 429
    bob = UserFactory(username="bob")
    bob.set_password(PASSWORD)
    bob.save()
    assert _login(client, PASSWORD, username="bob").status_code == 302


def test_the_admin_login_is_throttled_too(client, user):
    user.is_staff = True
    user.save()
    for _ in range(LIMIT):
        client.post("/admin/login/", {"username": "alice", "password": "wrong"})
    response = client.post("/admin/login/", {"username": "alice", "password": PASSWORD})
    assert response.status_code == 429


def test_limits_come_from_the_environment(tmp_path):
    code = ("from django.conf import settings as s; "
            "print('AXES', s.AXES_ENABLED, s.AXES_FAILURE_LIMIT, int(s.AXES_COOLOFF_TIME.total_seconds()))")
    result = _manage("shell", "-c", code, env={"DEBUG": "true", "DISTILLWEB_VAR_DIR": str(tmp_path),
                                               "LOGIN_FAILURE_LIMIT": "7", "LOGIN_COOLOFF_S": "120"})
    assert result.returncode == 0, result.stderr
    assert "AXES True 7 120" in result.stdout
