"""Environment secrets: an organization's credentials for its remote environment servers."""

from __future__ import annotations

from django.conf import settings
from django.db import models


class EnvironmentSecret(models.Model):
    """A credential a job sends to its remote environment server (portal/services/env_secrets.py encrypts it).

    Only the Fernet ciphertext is stored; no API or page ever shows the value after creation.
    """

    organization = models.ForeignKey(
        "portal.Organization", on_delete=models.CASCADE, related_name="env_secrets"
    )
    name = models.CharField(max_length=63)
    ciphertext = models.TextField()
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        # The table keeps the name it had when the model lived in env_registry (moved state-only).
        db_table = "env_registry_environmentsecret"
        ordering = ["organization", "name"]
        constraints = [models.UniqueConstraint(fields=["organization", "name"], name="uniq_env_secret")]

    def __str__(self) -> str:
        return f"{self.organization_id}:{self.name}"
