"""Reads of teams: the user's teams (scoped by an API token's team), their members and roles, who may manage
a team, and the team selected in the header (kept in the session, checked against the user's teams on every
request)."""

from __future__ import annotations

from django.contrib.auth.models import AbstractBaseUser, AnonymousUser
from django.db.models import Case, Count, IntegerField, OuterRef, QuerySet, Subquery, Value, When
from django.http import HttpRequest

from experiments.models import Membership, Team

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
