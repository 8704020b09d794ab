"""Teams: who is in them with which role, what a lead may change, and the team selected in the header.

Roles (``Membership.Role``): a *member* sees and creates the team's records; a *lead* also manages the
team's membership (adds an existing user, changes a role, removes a member). Staff may do everything a lead
may, in every team. A team always keeps at least one lead: the last one can be neither demoted nor removed.

Every membership write locks the team's row first, so two leads who demote each other at the same moment are
serialised and the second one is refused instead of leaving the team without a lead.

The header's team switcher keeps the selected team's id in the session; :func:`selected_team` checks it
against the user's teams on every request (a membership removed since is simply forgotten).
"""

from __future__ import annotations

from django.contrib.auth import get_user_model
from django.contrib.auth.models import AbstractBaseUser, AnonymousUser
from django.core.exceptions import PermissionDenied, ValidationError
from django.db import transaction
from django.db.models import Case, Count, IntegerField, OuterRef, QuerySet, Subquery, Value, When
from django.http import HttpRequest

from . import selectors
from .models import Membership, Team

SESSION_KEY = "team_id"
_REQUEST_CACHE = "_distillweb_teams"

User = AbstractBaseUser | AnonymousUser


# --- reads ----------------------------------------------------------------------------------------
def team_list(*, user: User) -> QuerySet[Team]:
    """The user's teams (staff: all), each with ``member_count`` and the user's own ``my_role`` ("" if none)."""
    mine = Membership.objects.filter(user_id=user.pk)
    # Filtered by id, not through the memberships join, so that member_count counts every member.
    teams = Team.objects.all() if user.is_staff else Team.objects.filter(pk__in=mine.values("team_id"))
    my_role = mine.filter(team=OuterRef("pk")).values("role")[:1]
    return teams.annotate(member_count=Count("memberships"), my_role=Subquery(my_role)).order_by("name")


def team_members(*, team: Team) -> QuerySet[Membership]:
    """The team's memberships with their users: leads first, then by username."""
    lead_first = Case(When(role=Membership.Role.LEAD, then=Value(0)), default=Value(1), output_field=IntegerField())
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


# --- writes ---------------------------------------------------------------------------------------
def _lock_team_for(team: Team, *, by: User) -> None:
    """Lock the team's row for this transaction and check, under the lock, that ``by`` may manage it."""
    Team.objects.select_for_update().get(pk=team.pk)
    if not can_manage(user=by, team=team):
        raise PermissionDenied("Only a lead of this team can change its members.")


def _check_role(role: str) -> None:
    if role not in Membership.Role.values:
        raise ValidationError({"role": f"Unknown role {role!r}: choose one of {', '.join(Membership.Role.values)}."})


def _leads_besides(membership: Membership) -> int:
    return (
        Membership.objects.filter(team_id=membership.team_id, role=Membership.Role.LEAD)
        .exclude(pk=membership.pk)
        .count()
    )


@transaction.atomic
def team_member_add(*, team: Team, username: str, role: str, by: User) -> Membership:
    _lock_team_for(team, by=by)
    _check_role(role)
    username = username.strip()
    user = get_user_model().objects.filter(**{get_user_model().USERNAME_FIELD: username}).first()
    if user is None:
        raise ValidationError({"username": f"No user is called {username!r}. They need an account first."})
    if Membership.objects.filter(team=team, user=user).exists():
        raise ValidationError({"username": f"{username} is already in {team}."})
    return Membership.objects.create(team=team, user=user, role=role)


@transaction.atomic
def team_member_set_role(*, membership: Membership, role: str, by: User) -> Membership:
    """Change a member's role; demoting the team's last lead is refused."""
    _lock_team_for(membership.team, by=by)
    _check_role(role)
    membership.refresh_from_db()
    if membership.role == Membership.Role.LEAD and role != Membership.Role.LEAD and not _leads_besides(membership):
        raise ValidationError({"role": f"{membership.user} is the last lead of {membership.team}: make someone "
                                       f"else a lead first."})
    membership.role = role
    membership.save(update_fields=["role"])
    return membership


@transaction.atomic
def team_member_remove(*, membership: Membership, by: User) -> None:
    """Remove a member from the team; removing the team's last lead is refused."""
    _lock_team_for(membership.team, by=by)
    membership.refresh_from_db()
    if membership.role == Membership.Role.LEAD and not _leads_besides(membership):
        raise ValidationError(f"{membership.user} is the last lead of {membership.team}: make someone else a "
                              f"lead before removing them.")
    membership.delete()


# --- the team selected in the header (session) -------------------------------------------------------
def user_teams(request: HttpRequest) -> list[Team]:
    """The teams the header's switcher offers (staff: all), read once per request."""
    cached = getattr(request, _REQUEST_CACHE, None)
    if cached is None:
        user = request.user
        cached = list(selectors.team_list(user=user).order_by("name")) if user.is_authenticated else []
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


def select_team(request: HttpRequest, *, team_id: int | None) -> Team | None:
    """Remember ``team_id`` for this session (None: all teams). Raises ValidationError if not one of the user's."""
    if team_id is None:
        request.session.pop(SESSION_KEY, None)
        return None
    team = next((t for t in user_teams(request) if t.pk == team_id), None)
    if team is None:
        raise ValidationError({"team": "You are not in that team."})
    request.session[SESSION_KEY] = team.pk
    return team
