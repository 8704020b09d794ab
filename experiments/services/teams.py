"""Teams and their membership: creating a team, adding a member, changing a role, removing a member, and the
team selected in the header.

Roles (``Membership.Role``): a *member* sees and creates the team's records; a *lead* also manages the team's
membership. Staff may do everything a lead may, in every team. A team always keeps at least one lead: the last
one can be neither demoted nor removed. Every membership write locks the team's row first, so two leads who
demote each other at the same moment are serialised and the second one is refused.

Invites: a lead (or staff) makes a one-time link that lets whoever opens it join the team with a given role.
The link's token comes from ``secrets`` and only its SHA-256 is stored, so the link is shown once, to the
lead.
Accepting locks the invite's row and consumes it, so two people who open the same link at once cannot both
join; a used, revoked or expired invite is refused with a message that says which."""

from __future__ import annotations

import secrets
from collections.abc import Iterable
from datetime import timedelta

from django.contrib.auth import get_user_model
from django.contrib.auth.password_validation import validate_password
from django.core.exceptions import PermissionDenied, ValidationError
from django.db import IntegrityError, transaction
from django.http import HttpRequest
from django.utils import timezone
from django.utils.text import slugify

from experiments.models import (
    Membership,
    Team,
    TeamInvite,
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


@transaction.atomic
def team_create_by_staff(*, name: str, lead_username: str = "", by: teams_reads.User) -> Team:
    """A staff user creates a team from the product, optionally with its first lead (an existing account; the
    lead can also be invited by a link from the team's page). Names are unique without regard to case."""
    if not (by.is_authenticated and by.is_staff):
        raise PermissionDenied("Only staff can create teams.")
    name = " ".join(name.split())
    if not name:
        raise ValidationError({"name": "Give the team a name."})
    if Team.objects.filter(name__iexact=name).exists():
        raise ValidationError({"name": f"A team called {name!r} exists already."})
    leads = []
    if lead_username := lead_username.strip():
        user_model = get_user_model()
        lead = user_model.objects.filter(**{user_model.USERNAME_FIELD: lead_username}).first()
        if lead is None:
            raise ValidationError(
                {"lead_username": f"No user is called {lead_username!r}: leave it empty and invite the lead "
                                  f"by a link from the team's page."}
            )
        leads.append(lead)
    base = slugify(name)[:90] or "team"
    slug, n = base, 1
    while Team.objects.filter(slug=slug).exists():
        n += 1
        slug = f"{base}-{n}"
    try:
        with transaction.atomic():  # a concurrent create of the same name loses here, not with a 500
            team = Team.objects.create(name=name, slug=slug)
    except IntegrityError:
        raise ValidationError({"name": f"A team called {name!r} exists already."}) from None
    Membership.objects.bulk_create([Membership(team=team, user=u, role=Membership.Role.LEAD) for u in leads])
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


# --- invites ---------------------------------------------------------------------------------------
INVITE_VALID_FOR = timedelta(days=7)
INVITE_MAX_VALID_FOR = timedelta(days=30)


class InviteRefused(ValidationError):
    """An invite link that cannot be used: ``reason`` is "invalid", a used, revoked or expired invite's
    status, or "member" (the user is in the team already)."""

    def __init__(self, message: str, *, reason: str, invite: TeamInvite | None = None):
        super().__init__(message)
        self.reason = reason
        self.invite = invite


@transaction.atomic
def team_invite_create(
    *, team: Team, role: str, by: teams_reads.User, note: str = "", valid_for: timedelta = INVITE_VALID_FOR
) -> tuple[TeamInvite, str]:
    """Make a one-time invite; returns it with its token, which is not stored and cannot be shown again."""
    _lock_team_for(team, by=by)
    _check_role(role)
    if not timedelta(0) < valid_for <= INVITE_MAX_VALID_FOR:
        raise ValidationError({"valid_for": f"An invite is valid for 1 to {INVITE_MAX_VALID_FOR.days} days."})
    token = secrets.token_urlsafe(32)
    invite = TeamInvite.objects.create(
        team=team, role=role, token_hash=teams_reads.invite_token_hash(token), note=note.strip()[:200],
        created_by=by, expires_at=timezone.now() + valid_for,
    )
    return invite, token


@transaction.atomic
def team_invite_revoke(*, invite: TeamInvite, by: teams_reads.User) -> TeamInvite:
    """Revoke a pending invite; one already used or revoked is refused (an expired one may still be revoked,
    which only tidies the list)."""
    _lock_team_for(invite.team, by=by)
    invite = TeamInvite.objects.select_for_update().get(pk=invite.pk)
    if invite.accepted_at is not None:
        raise ValidationError(f"This invite was already used by {invite.accepted_by or 'a deleted user'}.")
    if invite.revoked_at is not None:
        raise ValidationError("This invite was already revoked.")
    invite.revoked_at = timezone.now()
    invite.save(update_fields=["revoked_at"])
    return invite


def _usable_invite(invite_id: int, *, user=None) -> TeamInvite:
    """The invite, locked for this transaction, if it can still be accepted (by ``user`` if given)."""
    locked = TeamInvite.objects.select_for_update(of=("self",)).select_related("team")
    invite = locked.filter(pk=invite_id).first()
    refusal = teams_reads.invite_refusal(invite)
    if refusal is not None:
        raise InviteRefused(refusal[1], reason=refusal[0], invite=invite)
    if user is not None and Membership.objects.filter(team=invite.team, user=user).exists():
        raise InviteRefused(f"You are already in {invite.team}.", reason="member", invite=invite)
    return invite


def _consume(invite: TeamInvite, user) -> Membership:
    membership = Membership.objects.create(team=invite.team, user=user, role=invite.role)
    invite.accepted_at = timezone.now()
    invite.accepted_by = user
    invite.save(update_fields=["accepted_at", "accepted_by"])
    return membership


@transaction.atomic
def team_invite_accept(*, invite_id: int, user) -> Membership:
    """An existing (signed-in) user joins the invite's team with its role; the invite is used up. A user who
    is in the team already is told so, and the invite stays pending for someone else. (The caller has checked
    the link's token: ``teams_reads.invite_for_token``.)"""
    return _consume(_usable_invite(invite_id, user=user), user)


@transaction.atomic
def team_invite_accept_new_user(*, invite_id: int, username: str, password: str):
    """Create an account and join the invite's team in one step: if the invite cannot be used, no account is
    made. The password goes through the site's password validators."""
    invite = _usable_invite(invite_id)
    user_model = get_user_model()
    username = user_model.normalize_username(username.strip())
    if user_model.objects.filter(**{f"{user_model.USERNAME_FIELD}__iexact": username}).exists():
        raise ValidationError(
            {"username": "That username is taken: choose another, or log in if it is yours."}
        )
    user = user_model(**{user_model.USERNAME_FIELD: username})
    try:
        validate_password(password, user)
    except ValidationError as exc:
        raise ValidationError({"password": exc.messages}) from None
    user.set_password(password)
    try:
        with transaction.atomic():
            user.save()
    except IntegrityError:
        raise ValidationError({"username": "That username is taken: choose another."}) from None
    return _consume(invite, user)
