"""Environment packages and their immutable versions.

Uploading, validation in the sandbox, stars and forks are built on these rows by the environments work;
jobs resolve their `owner/name@version` reference against them at submission.
"""

from __future__ import annotations

from django.contrib.postgres.fields import ArrayField
from django.db import models

from portal.models import Organization


class Visibility(models.TextChoices):
    PRIVATE = "private", "Private (its publisher and the organization's admins)"
    ORGANIZATION = "organization", "Organization"
    PUBLIC = "public", "Public (marketplace)"


class EnvironmentPackage(models.Model):
    organization = models.ForeignKey(Organization, on_delete=models.CASCADE, related_name="environments")
    name = models.CharField(max_length=64)
    description = models.CharField(max_length=500, blank=True, default="")
    visibility = models.CharField(max_length=12, choices=Visibility.choices, default=Visibility.PRIVATE)
    tags = ArrayField(models.CharField(max_length=32), default=list, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["organization__slug", "name"]
        constraints = [models.UniqueConstraint(fields=["organization", "name"], name="uniq_env_package")]

    def __str__(self) -> str:
        return f"{self.organization.slug}/{self.name}"


class EnvironmentVersion(models.Model):
    class Status(models.TextChoices):
        PENDING = "pending", "Waiting for validation"
        VALID = "valid", "Valid"
        INVALID = "invalid", "Failed validation"

    package = models.ForeignKey(EnvironmentPackage, on_delete=models.CASCADE, related_name="versions")
    version = models.CharField(max_length=64)
    manifest = models.JSONField(default=dict)
    # Built-ins ship with the SDK and have no archive; uploaded packages have one, checked by its sha256.
    archive_uri = models.CharField(max_length=1024, blank=True, default="")
    sha256 = models.CharField(max_length=64, blank=True, default="")
    status = models.CharField(max_length=10, choices=Status.choices, default=Status.PENDING)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["package", "-created_at"]
        constraints = [models.UniqueConstraint(fields=["package", "version"], name="uniq_env_version")]

    def __str__(self) -> str:
        return f"{self.package}@{self.version}"
