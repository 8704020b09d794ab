"""Reads of teams: the user's teams (scoped by an API token's team), their members and roles, who may manage
a team, and the team selected in the header (kept in the session, checked against the user's teams on every
request)."""

from __future__ import annotations

import hashlib

from django.contrib.auth.models import AbstractBaseUser, AnonymousUser
from django.db.models import Case, Count, IntegerField, OuterRef, QuerySet, Subquery, Value, When
from django.http import HttpRequest
from django.utils import timezone
from django.utils.formats import date_format

from experiments.models import Membership, Team, TeamInvite

SESSION_KEY = "team_id"


_REQUEST_CACHE = "_distillweb_teams"


User = AbstractBaseUser | AnonymousUser


def team_summaries(*, user: User) -> QuerySet[Team]:
    """The user's teams (staff: all), each with ``member_count`` and the user's own ``my_role`` ("" if
    none)."""
    mine = Membership.objects.filter(user_id=user.pk)
    # Filtered by id, not through the memberships join, so that member_count counts every member.
    teams = Team.objects.all() if user.is_staff else Team.objects.filter(pk__in=mine.values("team_id"))
    my_role = mine.filter(team=OuterRef("pk")).values("role")[:1]
    return teams.annotate(member_count=Count("memberships"), my_role=Subquery(my_role)).order_by("name")


def team_members(*, team: Team) -> QuerySet[Membership]:
    """The team's memberships with their users: leads first, then by username."""
    lead_first = Case(
        When(role=Membership.Role.LEAD, then=Value(0)), default=Value(1), output_field=IntegerField()
    )
    return (
        Membership.objects.filter(team=team)
        .select_related("user")
        .order_by(lead_first, "user__username", "pk")
    )


def can_manage(*, user: User, team: Team) -> bool:
    """Whether the user may change the team's membership: a lead of the team, or staff."""
    if not user.is_authenticated:
        return False
    if user.is_staff:
        return True
    return Membership.objects.filter(team=team, user_id=user.pk, role=Membership.Role.LEAD).exists()


def user_teams(request: HttpRequest) -> list[Team]:
    """The teams the header's switcher offers (staff: all), read once per request."""
    cached = getattr(request, _REQUEST_CACHE, None)
    if cached is None:
        user = request.user
        cached = list(team_list(user=user).order_by("name")) if user.is_authenticated else []
        setattr(request, _REQUEST_CACHE, cached)
    return cached


def selected_team(request: HttpRequest) -> Team | None:
    """The team chosen in the header, or None for "All my teams".

    The session only holds an id: it is checked against the user's teams on every request, and forgotten when
    the user has left that team (or it was deleted) since.
    """
    team_id = request.session.get(SESSION_KEY)
    if team_id is None:
        return None
    team = next((t for t in user_teams(request) if t.pk == team_id), None)
    if team is None:
        del request.session[SESSION_KEY]
    return team


def team_scope(user) -> int | None:
    """The one team a request is limited to, or None: an API token bound to a team sets ``scope_team_id`` on
    the request's user (api.authentication), and every team-scoped read here honours it, staff included."""
    return getattr(user, "scope_team_id", None)


def team_list(*, user) -> QuerySet[Team]:
    teams = Team.objects.all() if user.is_staff else Team.objects.filter(memberships__user=user)
    if (team_id := team_scope(user)) is not None:
        teams = teams.filter(pk=team_id)
    return teams


def team_pending_invites(*, team: Team) -> QuerySet[TeamInvite]:
    """The team's invites that can still be accepted, newest first."""
    return (
        TeamInvite.objects.filter(
            team=team, accepted_at__isnull=True, revoked_at__isnull=True, expires_at__gt=timezone.now()
        )
        .select_related("created_by")
        .order_by("-created_at", "-pk")
    )


def invite_token_hash(token: str) -> str:
    # The token carries 256 random bits, so a plain hash (no salt, no slow KDF) cannot be reversed by search.
    return hashlib.sha256(token.encode()).hexdigest()


def invite_for_token(token: str) -> TeamInvite | None:
    """The invite a link's token names, found by the token's hash (the token itself is never stored)."""
    return (
        TeamInvite.objects.select_related("team", "created_by")
        .filter(token_hash=invite_token_hash(token))
        .first()
    )


def invite_refusal(invite: TeamInvite | None) -> tuple[str, str] | None:
    """Why an invite cannot be accepted, as (reason, message for the person holding the link), or None."""
    if invite is None:
        return "invalid", (
            "This invitation link is not valid. Check that you copied the whole link, or ask the team's lead "
            "for a new one."
        )
    status = invite.status
    if status == TeamInvite.Status.PENDING:
        return None
    ask = f"Ask a lead of {invite.team} for a new link."
    if status == TeamInvite.Status.ACCEPTED:
        when = date_format(timezone.localtime(invite.accepted_at), "Y-m-d H:i T")
        used = f"This invitation to {invite.team} was already used on {when}: each link works once."
        return status, f"{used} {ask}"
    if status == TeamInvite.Status.REVOKED:
        return status, f"This invitation to {invite.team} was withdrawn by the team. {ask}"
    when = date_format(timezone.localtime(invite.expires_at), "Y-m-d H:i T")
    return status, f"This invitation to {invite.team} expired on {when}. {ask}"
