"""Teams and their membership: creating a team, adding a member, changing a role, removing a member, and the
team selected in the header.

Roles (``Membership.Role``): a *member* sees and creates the team's records; a *lead* also manages the team's
membership. Staff may do everything a lead may, in every team. A team always keeps at least one lead: the last
one can be neither demoted nor removed. Every membership write locks the team's row first, so two leads who
demote each other at the same moment are serialised and the second one is refused."""

from __future__ import annotations

from collections.abc import Iterable

from django.contrib.auth import get_user_model
from django.core.exceptions import PermissionDenied, ValidationError
from django.db import transaction
from django.http import HttpRequest
from django.utils.text import slugify

from experiments.models import (
    Membership,
    Team,
)
from experiments.selectors import teams as teams_reads


@transaction.atomic
def team_create(*, name: str, members: Iterable = (), leads: Iterable = ()) -> Team:
    team = Team.objects.create(name=name, slug=slugify(name)[:100] or "team")
    Membership.objects.bulk_create(
        [Membership(team=team, user=u, role=Membership.Role.MEMBER) for u in members]
        + [Membership(team=team, user=u, role=Membership.Role.LEAD) for u in leads]
    )
    return team


def _lock_team_for(team: Team, *, by: teams_reads.User) -> None:
    """Lock the team's row for this transaction and check, under the lock, that ``by`` may manage it."""
    Team.objects.select_for_update().get(pk=team.pk)
    if not teams_reads.can_manage(user=by, team=team):
        raise PermissionDenied("Only a lead of this team can change its members.")


def _check_role(role: str) -> None:
    if role not in Membership.Role.values:
        raise ValidationError(
            {"role": f"Unknown role {role!r}: choose one of {', '.join(Membership.Role.values)}."}
        )


def _leads_besides(membership: Membership) -> int:
    return (
        Membership.objects.filter(team_id=membership.team_id, role=Membership.Role.LEAD)
        .exclude(pk=membership.pk)
        .count()
    )


@transaction.atomic
def team_member_add(*, team: Team, username: str, role: str, by: teams_reads.User) -> Membership:
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
def team_member_set_role(*, membership: Membership, role: str, by: teams_reads.User) -> Membership:
    """Change a member's role; demoting the team's last lead is refused."""
    _lock_team_for(membership.team, by=by)
    _check_role(role)
    membership.refresh_from_db()
    if (
        membership.role == Membership.Role.LEAD
        and role != Membership.Role.LEAD
        and not _leads_besides(membership)
    ):
        raise ValidationError(
            {
                "role": f"{membership.user} is the last lead of {membership.team}: make someone "
                f"else a lead first."
            }
        )
    membership.role = role
    membership.save(update_fields=["role"])
    return membership


@transaction.atomic
def team_member_remove(*, membership: Membership, by: teams_reads.User) -> None:
    """Remove a member from the team; removing the team's last lead is refused."""
    _lock_team_for(membership.team, by=by)
    membership.refresh_from_db()
    if membership.role == Membership.Role.LEAD and not _leads_besides(membership):
        raise ValidationError(f"{membership.user} is the last lead of {membership.team}: make someone else a "
                              f"lead before removing them.")
    membership.delete()


def select_team(request: HttpRequest, *, team_id: int | None) -> Team | None:
    """Remember ``team_id`` for this session (None: all teams). Raises ValidationError if not one of the
    user's."""
    if team_id is None:
        request.session.pop(teams_reads.SESSION_KEY, None)
        return None
    team = next((t for t in teams_reads.user_teams(request) if t.pk == team_id), None)
    if team is None:
        raise ValidationError({"team": "You are not in that team."})
    request.session[teams_reads.SESSION_KEY] = team.pk
    return team
