"""``Authorization: Bearer <token>`` (or ``Token <token>``) with the personal tokens of api.models.ApiToken."""

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
        return record.user, record

    def authenticate_header(self, request: Request) -> str:
        return f'{self.keyword} realm="api"'
