"""API tokens. Only a hash of each token is stored: the token itself is shown once, when it is created."""

from __future__ import annotations

from django.conf import settings
from django.db import models


class ApiToken(models.Model):
    """A personal access token: ``Authorization: Bearer <token>`` acts as its user."""

    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="api_tokens")
    name = models.CharField(max_length=100, help_text="What the token is for, e.g. 'laptop CLI' or 'CI'")
    prefix = models.CharField(max_length=16, help_text="The token's first characters, to recognise it in lists")
    key_hash = models.CharField(max_length=64, unique=True, help_text="sha256 of the token (hex)")
    created_at = models.DateTimeField(auto_now_add=True)
    last_used_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at", "-id"]
        constraints = [models.UniqueConstraint(fields=["user", "name"], name="apitoken_unique_user_name")]

    def __str__(self) -> str:
        return f"{self.name} ({self.prefix}…)"
