"""API tokens. Only a hash of each token is stored: the token itself is shown once, when it is created."""

from __future__ import annotations

from django.conf import settings
from django.db import models
from django.utils import timezone


class ApiToken(models.Model):
    """A personal access token: ``Authorization: Bearer <token>`` acts as its user, within the token's limits:

    - ``expires_at``: from then on the token is refused (401); none: it lasts until revoked;
    - ``scope``: a read-only token may only read (every other method answers 403);
    - ``team``: the token sees and creates only that team's records (the user must still be in the team).
    """

    class Scope(models.TextChoices):
        WRITE = "write", "read and write"
        READ = "read", "read only"

    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="api_tokens")
    name = models.CharField(max_length=100, help_text="What the token is for, e.g. 'laptop CLI' or 'CI'")
    prefix = models.CharField(
        max_length=16, help_text="The token's first characters, to recognise it in lists"
    )
    key_hash = models.CharField(max_length=64, unique=True, help_text="sha256 of the token (hex)")
    created_at = models.DateTimeField(auto_now_add=True)
    last_used_at = models.DateTimeField(null=True, blank=True)
    expires_at = models.DateTimeField(
        null=True, blank=True, help_text="Refused from then on; empty: never expires"
    )
    scope = models.CharField(max_length=8, choices=Scope.choices, default=Scope.WRITE)
    team = models.ForeignKey(
        "experiments.Team",
        null=True,
        blank=True,
        on_delete=models.CASCADE,
        related_name="api_tokens",
        help_text="Only this team's records; empty: all the user's teams",
    )

    class Meta:
        ordering = ["-created_at", "-id"]
        constraints = [models.UniqueConstraint(fields=["user", "name"], name="apitoken_unique_user_name")]

    def __str__(self) -> str:
        return f"{self.name} ({self.prefix}…)"

    @property
    def read_only(self) -> bool:
        return self.scope == self.Scope.READ

    def is_expired(self, now=None) -> bool:
        return self.expires_at is not None and self.expires_at <= (now or timezone.now())
