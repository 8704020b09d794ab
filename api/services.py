"""Writes owned by the API app: tokens. Records, experiments and runs are written by experiments.services."""

from __future__ import annotations

import hashlib
import secrets
from datetime import datetime, timedelta

from django.core.exceptions import ValidationError
from django.db import IntegrityError, transaction
from django.utils import timezone

from experiments.models import Team
from experiments.selectors import teams

from .models import ApiToken

TOKEN_PREFIX = "dw_"
MAX_TOKENS_PER_USER = 20
# Refresh "last used" at most this often, so authenticating is not a write on every request.
LAST_USED_RESOLUTION = timedelta(minutes=1)


def token_hash(token: str) -> str:
    """The stored form of a token. Tokens carry 240 random bits, so a plain sha256 is enough (no salt or
    slow hash: nothing can be guessed), and the lookup stays one indexed equality."""
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()


@transaction.atomic
def api_token_create(
    *,
    user,
    name: str,
    expires_at: datetime | None = None,
    scope: str = ApiToken.Scope.WRITE,
    team: Team | None = None,
) -> tuple[ApiToken, str]:
    """Create a token for ``user``; returns the record and the token itself, which is never stored.

    ``expires_at`` (None: never), ``scope`` (read only, or read and write) and ``team`` (None: all the user's
    teams) limit what the token may do. Raises ValidationError keyed by field when the user already has a
    token of that name or too many tokens, the expiry is not in the future, or the team is not one of the
    user's.
    """
    name = name.strip()
    if not name:
        raise ValidationError({"name": "Give the token a name, e.g. 'laptop CLI'."})
    if ApiToken.objects.filter(user=user).count() >= MAX_TOKENS_PER_USER:
        raise ValidationError({"name": f"You have {MAX_TOKENS_PER_USER} tokens; revoke one first."})
    if scope not in ApiToken.Scope.values:
        raise ValidationError({"scope": f"Choose one of {', '.join(ApiToken.Scope.values)}."})
    if expires_at is not None and expires_at <= timezone.now():
        raise ValidationError({"expires_at": "Choose an expiry in the future."})
    if team is not None and not teams.team_list(user=user).filter(pk=team.pk).exists():
        raise ValidationError({"team": "You are not in that team."})
    token = TOKEN_PREFIX + secrets.token_urlsafe(30)
    record = ApiToken(
        user=user,
        name=name,
        prefix=token[:10],
        key_hash=token_hash(token),
        expires_at=expires_at,
        scope=scope,
        team=team,
    )
    try:
        with transaction.atomic():
            record.save()
    except IntegrityError:
        raise ValidationError({"name": f"You already have a token named {name!r}."}) from None
    return record, token


def api_token_revoke(*, token: ApiToken) -> None:
    token.delete()


def api_token_authenticate(*, token: str) -> ApiToken | None:
    """The token record for ``token`` (with its user), or None; notes when it was last used. An expired record
    is returned too (the caller refuses it with a message saying so) but is not marked as used."""
    record = ApiToken.objects.select_related("user", "team").filter(key_hash=token_hash(token)).first()
    if record is None or record.is_expired():
        return record
    now = timezone.now()
    if record.last_used_at is None or now - record.last_used_at > LAST_USED_RESOLUTION:
        ApiToken.objects.filter(pk=record.pk).update(last_used_at=now)
        record.last_used_at = now
    return record
