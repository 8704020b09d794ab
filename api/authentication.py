"""``Authorization: Bearer <token>`` (or ``Token <token>``) with the personal tokens of api.models.ApiToken.

A token's limits: an expired token is refused here (401); a team-scoped one limits the request's user to that
team (see experiments.selectors.teams.team_scope); a read-only one is refused any unsafe method by
api.permissions.TokenScopePermission (403)."""

from __future__ import annotations

from rest_framework import authentication, exceptions
from rest_framework.request import Request

from . import services

SCHEMES = ("bearer", "token")


class BearerTokenAuthentication(authentication.BaseAuthentication):
    """A request without an Authorization header is left to the next authenticator (the session)."""

    keyword = "Bearer"

    def authenticate(self, request: Request):
        header = authentication.get_authorization_header(request).split()
        if not header or header[0].decode("latin-1").lower() not in SCHEMES:
            return None
        if len(header) != 2:
            raise exceptions.AuthenticationFailed("Send the header as 'Authorization: Bearer <token>'.")
        try:
            token = header[1].decode("ascii")
        except UnicodeDecodeError:
            raise exceptions.AuthenticationFailed("Invalid token.") from None
        record = services.api_token_authenticate(token=token)
        if record is None or not record.user.is_active:
            raise exceptions.AuthenticationFailed("Invalid or revoked token.")
        if record.is_expired():
            raise exceptions.AuthenticationFailed(
                f"This token expired on {record.expires_at:%Y-%m-%d %H:%M} UTC: "
                "create a new one on the API token page."
            )
        user = record.user
        if record.team_id is not None:
            # Every team-scoped read goes through experiments.selectors, which honour this
            # (selectors.team_scope): the request sees, and its forms offer, only this team's records.
            user.scope_team_id = record.team_id
        return user, record

    def authenticate_header(self, request: Request) -> str:
        return f'{self.keyword} realm="api"'
