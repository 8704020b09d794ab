"""The API's permission: authenticated, and within the token's scope."""

from __future__ import annotations

from rest_framework import permissions
from rest_framework.request import Request

from .models import ApiToken


class TokenScopePermission(permissions.IsAuthenticated):
    """An authenticated request; one made with a read-only token may only read (GET, HEAD, OPTIONS)."""

    message = (
        "This token is read-only: it may only read (GET). "
        "Create a read-and-write token on the API token page."
    )

    def has_permission(self, request: Request, view) -> bool:
        if not super().has_permission(request, view):
            return False
        token = request.auth
        if isinstance(token, ApiToken) and token.read_only:
            return request.method in permissions.SAFE_METHODS
        return True
