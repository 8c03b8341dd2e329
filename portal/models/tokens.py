"""API tokens for programs. The secret is never stored: only its HMAC-SHA256 under a server-side pepper."""

from __future__ import annotations

from django.conf import settings
from django.contrib.postgres.fields import ArrayField
from django.db import models

from portal.models.orgs import Organization


class Scope(models.TextChoices):
    JOBS_READ = "jobs:read", "Read jobs, metrics, events and checkpoints"
    JOBS_WRITE = "jobs:write", "Submit and cancel jobs"
    ENVS_READ = "envs:read", "Read environments"
    ENVS_WRITE = "envs:write", "Publish environments"
    ORG_ADMIN = "org:admin", "Manage members, invitations and tokens of the organization"
    TINKER = "tinker", "Train and sample through the Tinker-compatible API (key: tml-<token>)"
    # Not tied to the organization: lets a platform staff member's token change quotas. A staff member's
    # everyday token lacks it, so a leaked CI token cannot raise anyone's GPU quota.
    PLATFORM_ADMIN = "platform:admin", "Platform staff: quotas and pools of every organization"


class ApiToken(models.Model):
    organization = models.ForeignKey(Organization, on_delete=models.CASCADE, related_name="api_tokens")
    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="api_tokens")
    name = models.CharField(max_length=100)
    # Public part of `otk_<lookup>_<secret>`: finds the row without scanning hashes.
    lookup = models.CharField(max_length=16, unique=True)
    secret_hash = models.CharField(max_length=64)
    # Which of settings.TOKEN_PEPPERS keyed secret_hash ("0": the single TOKEN_PEPPER of before rotation).
    pepper_id = models.CharField(max_length=16, default="0")
    scopes = ArrayField(models.CharField(max_length=20, choices=Scope.choices), default=list)
    created_at = models.DateTimeField(auto_now_add=True)
    expires_at = models.DateTimeField(null=True, blank=True)
    last_used_at = models.DateTimeField(null=True, blank=True)
    revoked_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at"]

    def __str__(self) -> str:
        return f"{self.name} (otk_{self.lookup}_…)"
