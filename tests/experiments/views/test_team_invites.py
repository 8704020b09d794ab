"""Team pages for invites and staff-created teams: the team list's create form, the team page's invite link
and pending invites, and the page an invite link opens (the only page in the app open without logging in)."""

from __future__ import annotations

import re
from datetime import timedelta

import pytest
from django.contrib.auth import get_user_model
from django.test import Client
from django.urls import URLPattern, reverse
from django.utils import timezone

import experiments.urls
from experiments.models import Membership, Team, TeamInvite
from experiments.services import teams
from tests.factories import MembershipFactory, TeamFactory, UserFactory

pytestmark = pytest.mark.django_db

NEW_PASSWORD = "a-long-fresh-passphrase-42"


@pytest.fixture
def lead(team):
    user = UserFactory(username="lena-lead")
    MembershipFactory(user=user, team=team, role=Membership.Role.LEAD)
    return user


@pytest.fixture
def as_lead(client, lead):
    client.force_login(lead)
    return client


@pytest.fixture
def invite(team, lead) -> tuple[TeamInvite, str]:
    return teams.team_invite_create(team=team, role=Membership.Role.MEMBER, by=lead, note="Sam")


ACCEPT = "/invites/accept/"


def _open_url(token: str) -> str:
    return reverse("experiments:team_invite_open", args=[token])


def _text(response) -> str:
    return response.content.decode()


def _signup(client, token: str, username: str = "newbie", password: str = NEW_PASSWORD,
            again: str | None = None):
    """Open the link, then send the sign-up form of the page it leads to."""
    client.get(_open_url(token))
    return client.post(ACCEPT, {"username": username, "password1": password,
                                "password2": password if again is None else again})


# --- staff create teams ---------------------------------------------------------------------------
def test_staff_create_a_team_from_the_team_list(client, staff_user):
    UserFactory(username="alice")
    client.force_login(staff_user)
    assert 'id="team-create-heading"' in _text(client.get(reverse("experiments:team_list")))

    response = client.post(reverse("experiments:team_list"), {"name": "Speech", "lead_username": "alice"})

    team = Team.objects.get(name="Speech")
    assert response.status_code == 302 and response.url == reverse("experiments:team_detail", args=[team.pk])
    assert Membership.objects.get(team=team).user.username == "alice"


def test_bad_team_input_gives_400_with_the_field_errors(client, staff_user, team):
    client.force_login(staff_user)

    response = client.post(reverse("experiments:team_list"), {"name": team.name.upper(), "lead_username": ""})

    assert response.status_code == 400
    form = response.context["create_form"]
    assert "exists already" in form.errors["name"][0]
    assert Team.objects.count() == 1


def test_a_non_staff_user_sees_no_create_form_and_cannot_create(client, lead):
    client.force_login(lead)
    assert 'id="team-create-heading"' not in _text(client.get(reverse("experiments:team_list")))

    response = client.post(reverse("experiments:team_list"), {"name": "Rogue"})

    assert response.status_code == 403
    assert not Team.objects.filter(name="Rogue").exists()


# --- making and listing invites -------------------------------------------------------------------
def test_a_lead_makes_a_link_shown_once(as_lead, team):
    response = as_lead.post(reverse("experiments:team_invite_create", args=[team.pk]),
                            {"role": "lead", "valid_for_days": "1", "note": "Sam from speech"})

    assert response.status_code == 200 and response["Cache-Control"] == "no-store"
    match = re.search(r'id="invite-url" value="(http://testserver/invites/([\w-]+)/)"', _text(response))
    assert match, "the page shows the new link"
    token = match.group(2)
    invite = TeamInvite.objects.get()
    assert (invite.role, invite.note) == ("lead", "Sam from speech")
    assert timedelta(hours=23) < invite.expires_at - timezone.now() <= timedelta(days=1)
    assert invite.token_hash != token and token not in str(TeamInvite.objects.values().get())

    page = _text(as_lead.get(reverse("experiments:team_detail", args=[team.pk])))
    assert token not in page
    assert "Sam from speech" in page and 'id="pending-invites"' in page


def test_bad_invite_input_gives_400_with_the_field_errors(as_lead, team):
    response = as_lead.post(reverse("experiments:team_invite_create", args=[team.pk]),
                            {"role": "owner", "valid_for_days": "365"})

    assert response.status_code == 400
    errors = response.context["invite_form"].errors
    assert set(errors) == {"role", "valid_for_days"}
    assert not TeamInvite.objects.exists()


def test_a_member_cannot_invite_and_sees_no_invites(client, user, team, invite):
    client.force_login(user)

    response = client.post(reverse("experiments:team_invite_create", args=[team.pk]), {"role": "lead"})

    assert response.status_code == 403
    assert TeamInvite.objects.count() == 1
    page = _text(client.get(reverse("experiments:team_detail", args=[team.pk])))
    assert "Invite by link" not in page and "Pending invites" not in page


def test_a_lead_revokes_an_invite_and_its_link_stops_working(as_lead, team, invite):
    record, token = invite

    response = as_lead.post(reverse("experiments:team_invite_revoke", args=[team.pk]), {"invite": record.pk},
                            follow=True)

    assert "was revoked" in _text(response)
    assert 'id="pending-invites"' not in _text(response)
    opened = Client().get(_open_url(token))
    assert opened.status_code == 410 and "withdrawn" in _text(opened)


def test_an_invite_of_another_team_cannot_be_revoked_through_ones_own(as_lead, team, staff_user):
    other = TeamFactory(name="Other")
    foreign, _ = teams.team_invite_create(team=other, role="member", by=staff_user)

    response = as_lead.post(reverse("experiments:team_invite_revoke", args=[team.pk]), {"invite": foreign.pk})

    assert response.status_code == 404
    foreign.refresh_from_db()
    assert foreign.status == TeamInvite.Status.PENDING


def test_a_member_cannot_revoke(client, user, team, invite):
    client.force_login(user)
    url = reverse("experiments:team_invite_revoke", args=[team.pk])

    response = client.post(url, {"invite": invite[0].pk})

    assert response.status_code == 403
    invite[0].refresh_from_db()
    assert invite[0].status == TeamInvite.Status.PENDING


# --- the invite pages ----------------------------------------------------------------------------
def test_the_invite_pages_are_the_only_pages_open_without_login():
    open_pages = [
        p.name for p in experiments.urls.urlpatterns
        if isinstance(p, URLPattern) and getattr(p.callback, "login_required", True) is False
    ]

    assert sorted(open_pages) == ["team_invite_accept", "team_invite_open"]


def test_the_link_moves_its_token_out_of_the_address_at_once(client, invite):
    response = client.get(_open_url(invite[1]))

    assert response.status_code == 302 and response.url == ACCEPT
    page = client.get(ACCEPT)
    assert page.status_code == 200 and invite[1] not in _text(page)
    assert page["Cache-Control"].startswith("max-age=0")


def test_a_newcomer_opens_the_link_makes_an_account_and_lands_in_the_team(client, team, invite):
    text = _text(client.get(_open_url(invite[1]), follow=True))
    assert f"Join {team.name}" in text and 'name="password1"' in text and "lena-lead invited you" in text
    assert 'href="/login/?next=%2Finvites%2Faccept%2F"' in text

    response = _signup(client, invite[1])

    assert response.status_code == 302 and response.url == reverse("experiments:team_detail", args=[team.pk])
    user = get_user_model().objects.get(username="newbie")
    assert client.session["_auth_user_id"] == str(user.pk)
    assert Membership.objects.get(user=user).team == team
    landed = client.get(response.url)
    assert landed.status_code == 200 and f"You joined {team.name} as member" in _text(landed)


@pytest.mark.parametrize(
    ("password", "again"), [("short", None), ("password123", None), (NEW_PASSWORD, "other-1")]
)
def test_a_bad_password_gives_400_beside_the_field_and_no_account(client, invite, password, again):
    response = _signup(client, invite[1], password=password, again=again)

    assert response.status_code == 400
    assert response.context["form"].errors["password2"]
    assert not get_user_model().objects.filter(username="newbie").exists()
    invite[0].refresh_from_db()
    assert invite[0].status == TeamInvite.Status.PENDING


def test_a_taken_username_gives_400(client, invite):
    UserFactory(username="Newbie")

    response = _signup(client, invite[1], username="newbie")

    assert response.status_code == 400 and response.context["form"].errors["username"]


def test_a_used_link_says_so_and_makes_no_second_account(client, team, invite):
    other = Client()
    other.get(_open_url(invite[1]))  # opened before it was used, accepted after
    assert _signup(client, invite[1]).status_code == 302

    late = other.post(ACCEPT, {"username": "second", "password1": NEW_PASSWORD, "password2": NEW_PASSWORD})
    reopened = Client().get(_open_url(invite[1]))

    for response in (late, reopened):
        assert response.status_code == 410
        assert "already used" in _text(response) and "each link works once" in _text(response)
    assert not get_user_model().objects.filter(username="second").exists()


def test_an_expired_link_says_so(client, invite):
    client.get(_open_url(invite[1]))
    TeamInvite.objects.filter(pk=invite[0].pk).update(expires_at=timezone.now() - timedelta(hours=1))

    for response in (_signup(client, invite[1]), client.get(_open_url(invite[1]))):
        assert response.status_code == 410 and "expired on" in _text(response)
    assert not get_user_model().objects.filter(username="newbie").exists()


def test_an_unknown_link_gives_a_404_page_with_a_message(client, invite):
    response = client.get(_open_url("x" * 43))

    assert response.status_code == 404 and "not valid" in _text(response)
    signup = {"username": "newbie", "password1": NEW_PASSWORD, "password2": NEW_PASSWORD}
    no_link = client.post(ACCEPT, signup)
    assert no_link.status_code == 404 and "Open the invitation link" in _text(no_link)
    assert not get_user_model().objects.filter(username="newbie").exists()


def test_a_signed_in_user_joins_with_one_click(client, team, invite):
    bob = UserFactory(username="bob")
    client.force_login(bob)
    page = _text(client.get(_open_url(invite[1]), follow=True))
    assert f"Join {team.name} as bob" in page and 'name="password1"' not in page

    response = client.post(ACCEPT)

    assert response.status_code == 302
    assert Membership.objects.get(user=bob).team == team


def test_an_existing_account_logs_in_through_the_login_page_then_joins(client, team, invite):
    bob = UserFactory(username="bob")
    bob.set_password(NEW_PASSWORD)
    bob.save()
    login = client.get(_open_url(invite[1]), follow=True).context["login_url"]

    response = client.post(login, {"username": "bob", "password": NEW_PASSWORD, "next": ACCEPT})

    assert response.status_code == 302 and response.url == ACCEPT
    assert client.post(ACCEPT).status_code == 302
    assert Membership.objects.filter(user=bob, team=team).exists()


def test_the_login_for_an_invite_is_throttled_like_any_login(client, settings, invite):
    settings.AXES_FAILURE_LIMIT = 2
    bob = UserFactory(username="bob")
    bob.set_password(NEW_PASSWORD)
    bob.save()
    login = client.get(_open_url(invite[1]), follow=True).context["login_url"]

    statuses = [client.post(login, {"username": "bob", "password": "wrong"}).status_code for _ in range(2)]
    locked = client.post(login, {"username": "bob", "password": NEW_PASSWORD})

    assert statuses == [200, 429] and locked.status_code == 429
    assert not Membership.objects.filter(user=bob).exists()


def test_a_member_opening_the_link_is_told_and_the_link_stays_usable(client, user, team, invite):
    client.force_login(user)
    assert "You are already in" in _text(client.get(_open_url(invite[1]), follow=True))

    response = client.post(ACCEPT)

    assert response.status_code == 409 and "already in" in _text(response)
    invite[0].refresh_from_db()
    assert invite[0].status == TeamInvite.Status.PENDING


def test_csrf_is_checked_on_the_invite_page(team, invite):
    client = Client(enforce_csrf_checks=True)

    response = _signup(client, invite[1])

    assert response.status_code == 403
    assert not get_user_model().objects.filter(username="newbie").exists()
