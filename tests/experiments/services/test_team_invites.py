"""Invite links and staff-created teams: the services (experiments.services.teams)."""

from __future__ import annotations

import hashlib
import threading
from datetime import timedelta

import pytest
from django.contrib.auth import get_user_model
from django.core.exceptions import PermissionDenied, ValidationError
from django.db import connection, connections, transaction
from django.utils import timezone

from experiments.models import Membership, Team, TeamInvite
from experiments.selectors import teams as teams_reads
from experiments.services import teams
from tests.factories import MembershipFactory, TeamFactory, UserFactory
from tests.waiting import wait_until

pytestmark = pytest.mark.django_db

NEW_PASSWORD = "a-long-fresh-passphrase-42"


@pytest.fixture
def lead(team):
    user = UserFactory(username="lena-lead")
    MembershipFactory(user=user, team=team, role=Membership.Role.LEAD)
    return user


def _invite(team, by, role=Membership.Role.MEMBER, **kwargs) -> tuple[TeamInvite, str]:
    return teams.team_invite_create(team=team, role=role, by=by, **kwargs)


# --- creating and revoking ------------------------------------------------------------------------
def test_an_invite_stores_only_the_hash_of_an_unguessable_token(team, lead):
    invite, token = _invite(team, lead, note="Sam from speech")
    _, other_token = _invite(team, lead)

    assert len(token) >= 40 and token != other_token
    stored = TeamInvite.objects.values().get(pk=invite.pk)
    assert token not in str(stored)
    assert stored["token_hash"] == hashlib.sha256(token.encode()).hexdigest()
    assert invite.note == "Sam from speech" and invite.created_by == lead
    assert invite.status == TeamInvite.Status.PENDING
    assert timedelta(days=6, hours=23) < invite.expires_at - timezone.now() <= timedelta(days=7)
    assert teams_reads.invite_for_token(token) == invite


def test_only_a_lead_or_staff_can_invite(team, user, lead, staff_user):
    with pytest.raises(PermissionDenied):
        _invite(team, user)
    assert not TeamInvite.objects.exists()

    _invite(team, staff_user, role=Membership.Role.LEAD)
    assert TeamInvite.objects.get().role == Membership.Role.LEAD


@pytest.mark.parametrize("valid_for", [timedelta(0), timedelta(days=31)])
def test_an_invite_lasts_one_to_thirty_days(team, lead, valid_for):
    with pytest.raises(ValidationError) as exc:
        _invite(team, lead, valid_for=valid_for)

    assert "valid_for" in exc.value.message_dict
    assert not TeamInvite.objects.exists()


def test_an_unknown_role_is_refused(team, lead):
    with pytest.raises(ValidationError) as exc:
        _invite(team, lead, role="owner")

    assert "role" in exc.value.message_dict


def test_a_revoked_invite_leaves_the_pending_list_and_cannot_be_revoked_twice(team, lead):
    invite, _ = _invite(team, lead)
    kept, _ = _invite(team, lead)

    teams.team_invite_revoke(invite=invite, by=lead)

    assert list(teams_reads.team_pending_invites(team=team)) == [kept]
    with pytest.raises(ValidationError, match="already revoked"):
        teams.team_invite_revoke(invite=invite, by=lead)
    with pytest.raises(teams.InviteRefused, match="withdrawn") as exc:
        teams.team_invite_accept(invite_id=invite.pk, user=UserFactory())
    assert exc.value.reason == TeamInvite.Status.REVOKED


def test_a_member_cannot_revoke(team, lead, user):
    invite, _ = _invite(team, lead)

    with pytest.raises(PermissionDenied):
        teams.team_invite_revoke(invite=invite, by=user)
    invite.refresh_from_db()
    assert invite.revoked_at is None


def test_pending_invites_leave_out_used_and_expired_ones_newest_first(team, lead):
    used, _ = _invite(team, lead)
    expired, _ = _invite(team, lead)
    older, _ = _invite(team, lead)
    newer, _ = _invite(team, lead)
    teams.team_invite_accept(invite_id=used.pk, user=UserFactory())
    TeamInvite.objects.filter(pk=expired.pk).update(expires_at=timezone.now() - timedelta(seconds=1))

    assert list(teams_reads.team_pending_invites(team=team)) == [newer, older]


# --- accepting --------------------------------------------------------------------------------------
def test_an_existing_user_joins_with_the_invited_role_once(team, lead):
    invite, _ = _invite(team, lead, role=Membership.Role.LEAD)
    newcomer = UserFactory(username="newcomer")

    membership = teams.team_invite_accept(invite_id=invite.pk, user=newcomer)

    assert (membership.team, membership.user, membership.role) == (team, newcomer, Membership.Role.LEAD)
    invite.refresh_from_db()
    assert invite.status == TeamInvite.Status.ACCEPTED and invite.accepted_by == newcomer
    with pytest.raises(teams.InviteRefused, match="already used") as exc:
        teams.team_invite_accept(invite_id=invite.pk, user=UserFactory(username="second"))
    assert exc.value.reason == TeamInvite.Status.ACCEPTED
    assert not Membership.objects.filter(team=team, user__username="second").exists()


def test_an_expired_invite_is_refused_and_changes_nothing(team, lead):
    invite, _ = _invite(team, lead)
    TeamInvite.objects.filter(pk=invite.pk).update(expires_at=timezone.now() - timedelta(minutes=1))
    users_before = get_user_model().objects.count()

    with pytest.raises(teams.InviteRefused, match="expired") as exc:
        teams.team_invite_accept_new_user(invite_id=invite.pk, username="late", password=NEW_PASSWORD)

    assert exc.value.reason == TeamInvite.Status.EXPIRED
    assert get_user_model().objects.count() == users_before
    invite.refresh_from_db()
    assert invite.accepted_at is None


def test_an_unknown_token_finds_no_invite(team, lead):
    invite, token = _invite(team, lead)

    assert teams_reads.invite_for_token(token[:-1]) is None
    assert teams_reads.invite_for_token(invite.token_hash) is None
    assert teams_reads.invite_refusal(None)[0] == "invalid"
    with pytest.raises(teams.InviteRefused, match="not valid"):
        teams.team_invite_accept(invite_id=invite.pk + 1000, user=UserFactory())


def test_a_member_opening_the_link_leaves_it_for_someone_else(team, lead, user):
    invite, _ = _invite(team, lead)

    with pytest.raises(teams.InviteRefused, match="already in") as exc:
        teams.team_invite_accept(invite_id=invite.pk, user=user)

    assert exc.value.reason == "member"
    invite.refresh_from_db()
    assert invite.status == TeamInvite.Status.PENDING
    assert teams.team_invite_accept(invite_id=invite.pk, user=UserFactory()).team == team


def test_a_new_account_is_made_and_joins(team, lead):
    invite, _ = _invite(team, lead)

    membership = teams.team_invite_accept_new_user(invite_id=invite.pk, username=" newbie ",
                                                   password=NEW_PASSWORD)

    user = membership.user
    assert user.username == "newbie" and user.check_password(NEW_PASSWORD)
    assert membership.team == team and membership.role == Membership.Role.MEMBER
    invite.refresh_from_db()
    assert invite.accepted_by == user


@pytest.mark.parametrize("password", ["short", "password123", "newbie-newbie"])
def test_a_new_account_obeys_the_password_validators(team, lead, password):
    invite, _ = _invite(team, lead)

    with pytest.raises(ValidationError) as exc:
        teams.team_invite_accept_new_user(invite_id=invite.pk, username="newbie-newbie", password=password)

    assert "password" in exc.value.message_dict
    assert not get_user_model().objects.filter(username="newbie-newbie").exists()
    invite.refresh_from_db()
    assert invite.status == TeamInvite.Status.PENDING


def test_a_taken_username_is_refused_whatever_its_case(team, lead):
    UserFactory(username="Taken")
    invite, _ = _invite(team, lead)

    with pytest.raises(ValidationError) as exc:
        teams.team_invite_accept_new_user(invite_id=invite.pk, username="taken", password=NEW_PASSWORD)

    assert "username" in exc.value.message_dict
    invite.refresh_from_db()
    assert invite.status == TeamInvite.Status.PENDING


@pytest.mark.django_db(transaction=True)
def test_two_people_opening_one_link_at_once_join_only_once():
    team = TeamFactory(name="Race")
    lead = UserFactory(username="race-lead")
    MembershipFactory(team=team, user=lead, role=Membership.Role.LEAD)
    invite, _ = _invite(team, lead)
    first, second = UserFactory(username="first"), UserFactory(username="second")
    first_holds_the_invite, release_first = threading.Event(), threading.Event()
    refusals: list[teams.InviteRefused] = []

    def accept_and_hold() -> None:
        try:
            with transaction.atomic():
                teams.team_invite_accept(invite_id=invite.pk, user=first)
                first_holds_the_invite.set()
                release_first.wait(60)
        finally:
            connections.close_all()

    def accept() -> None:
        try:
            teams.team_invite_accept(invite_id=invite.pk, user=second)
        except teams.InviteRefused as exc:
            refusals.append(exc)
        finally:
            connections.close_all()

    holder = threading.Thread(target=accept_and_hold)
    holder.start()
    assert first_holds_the_invite.wait(60)
    contender = threading.Thread(target=accept)
    contender.start()

    def contender_waits_on_the_lock() -> bool:
        with connection.cursor() as cursor:
            cursor.execute("SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                           "AND datname = current_database()")
            return cursor.fetchone()[0] >= 1

    wait_until(contender_waits_on_the_lock, timeout=20, what="the second acceptance to wait for the first")
    release_first.set()
    holder.join(60)
    contender.join(60)

    assert [r.reason for r in refusals] == [TeamInvite.Status.ACCEPTED]
    assert set(Membership.objects.filter(team=team).values_list("user__username", flat=True)) == {
        "race-lead", "first"
    }


# --- staff create teams -----------------------------------------------------------------------------
def test_staff_create_a_team_with_its_first_lead(staff_user):
    alice = UserFactory(username="alice")

    team = teams.team_create_by_staff(name="  Speech   research ", lead_username="alice", by=staff_user)

    assert team.name == "Speech research" and team.slug == "speech-research"
    assert list(Membership.objects.filter(team=team).values_list("user", "role")) == [
        (alice.pk, Membership.Role.LEAD)
    ]


def test_a_team_without_a_lead_yet_is_allowed(staff_user):
    team = teams.team_create_by_staff(name="Vision", by=staff_user)

    assert not Membership.objects.filter(team=team).exists()


def test_only_staff_create_teams(lead):
    with pytest.raises(PermissionDenied):
        teams.team_create_by_staff(name="Rogue", lead_username="lena-lead", by=lead)
    assert not Team.objects.filter(name="Rogue").exists()


@pytest.mark.parametrize(
    ("name", "lead_username", "field"),
    [("", "", "name"), ("   ", "", "name"), ("existing TEAM", "", "name"),
     ("New", "nobody", "lead_username")],
)
def test_team_creation_refuses_bad_input_by_field(staff_user, name, lead_username, field):
    TeamFactory(name="Existing team")
    before = Team.objects.count()

    with pytest.raises(ValidationError) as exc:
        teams.team_create_by_staff(name=name, lead_username=lead_username, by=staff_user)

    assert field in exc.value.message_dict
    assert Team.objects.count() == before


def test_names_that_slugify_alike_get_distinct_slugs(staff_user):
    first = teams.team_create_by_staff(name="NLP & speech", by=staff_user)
    second = teams.team_create_by_staff(name="NLP speech", by=staff_user)

    assert first.slug == "nlp-speech" and second.slug == "nlp-speech-2"
