"""Environment packages and their immutable versions.

Uploading, validation in the sandbox, stars and forks are built on these rows by the environments work;
jobs resolve their `owner/name@version` reference against them at submission.
"""

from __future__ import annotations

from django.conf import settings
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
    # The README.md of the newest upload, raw; rendered (escaped) by the API.
    readme = models.TextField(blank=True, default="")
    forked_from = models.ForeignKey(
        "self", null=True, blank=True, on_delete=models.SET_NULL, related_name="forks"
    )
    # Jobs submitted against any version of this package (server-owned).
    usage_count = models.PositiveIntegerField(default=0)
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
    size_bytes = models.PositiveBigIntegerField(default=0)
    status = models.CharField(max_length=10, choices=Status.choices, default=Status.PENDING)
    # Why validation failed (shown to the publisher and to anyone who can see the package).
    validation_error = models.TextField(blank=True, default="")
    validated_at = models.DateTimeField(null=True, blank=True)
    uploaded_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["package", "-created_at"]
        constraints = [models.UniqueConstraint(fields=["package", "version"], name="uniq_env_version")]

    def __str__(self) -> str:
        return f"{self.package}@{self.version}"


class Star(models.Model):
    """One user's star on a package (per user, not per organization); idempotent to add or remove."""

    package = models.ForeignKey(EnvironmentPackage, on_delete=models.CASCADE, related_name="stars")
    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="+")
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["package", "user"], name="uniq_env_star")]

    def __str__(self) -> str:
        return f"{self.user_id} * {self.package}"


# --- an organization's own models and datasets (issue 15) -------------------------------------------------


class ValidationStatus(models.TextChoices):
    PENDING = "pending", "Waiting for validation"
    VALID = "valid", "Valid"
    INVALID = "invalid", "Failed validation"


class Upload(models.Model):
    """A resumable upload in progress: the files it will hold (path, size, sha256) and how many bytes of each
    arrived. Its chunks are objects under `<org prefix>/uploads/<id>/`; completing it checks everything and
    makes a model or dataset version, aborting it (or a refusal) leaves neither row nor object behind."""

    class Kind(models.TextChoices):
        MODEL = "model", "Model"
        DATASET = "dataset", "Dataset"

    id = models.UUIDField(primary_key=True)
    organization = models.ForeignKey(Organization, on_delete=models.CASCADE, related_name="registry_uploads")
    user = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, on_delete=models.SET_NULL, related_name="+")
    kind = models.CharField(max_length=8, choices=Kind.choices)
    name = models.CharField(max_length=64)
    description = models.CharField(max_length=500, blank=True, default="")
    # [{"path", "size", "sha256", "received"}], in the order the client declared them.
    files = models.JSONField(default=list)
    size_bytes = models.PositiveBigIntegerField(default=0)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["-created_at"]

    def __str__(self) -> str:
        return f"{self.kind} upload {self.id} ({self.organization_id}/{self.name})"


class RegisteredModel(models.Model):
    """A model an organization brought: `owner/name`, with immutable numbered versions (`owner/name@3`)."""

    organization = models.ForeignKey(Organization, on_delete=models.CASCADE, related_name="registered_models")
    name = models.CharField(max_length=64)
    description = models.CharField(max_length=500, blank=True, default="")
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["organization__slug", "name"]
        constraints = [models.UniqueConstraint(fields=["organization", "name"], name="uniq_registered_model")]

    def __str__(self) -> str:
        return f"{self.organization.slug}/{self.name}"


class ModelVersion(models.Model):
    model = models.ForeignKey(RegisteredModel, on_delete=models.CASCADE, related_name="versions")
    version = models.PositiveIntegerField()
    # The Hugging Face directory in object storage, under the organization's prefix.
    uri = models.CharField(max_length=1024)
    files = models.JSONField(default=list)  # [{"path", "size", "sha256"}]
    size_bytes = models.PositiveBigIntegerField(default=0)
    # What the checks found: model_type, architectures, parameters, dtypes, vocab_size, tokenizer.
    info = models.JSONField(default=dict)
    status = models.CharField(
        max_length=10, choices=ValidationStatus.choices, default=ValidationStatus.PENDING
    )
    validation_error = models.TextField(blank=True, default="")
    validated_at = models.DateTimeField(null=True, blank=True)
    uploaded_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["model", "-version"]
        constraints = [models.UniqueConstraint(fields=["model", "version"], name="uniq_model_version")]

    def __str__(self) -> str:
        return f"{self.model}@{self.version}"


class RegisteredDataset(models.Model):
    organization = models.ForeignKey(
        Organization, on_delete=models.CASCADE, related_name="registered_datasets"
    )
    name = models.CharField(max_length=64)
    description = models.CharField(max_length=500, blank=True, default="")
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["organization__slug", "name"]
        constraints = [
            models.UniqueConstraint(fields=["organization", "name"], name="uniq_registered_dataset")
        ]

    def __str__(self) -> str:
        return f"{self.organization.slug}/{self.name}"


class DatasetVersion(models.Model):
    class Format(models.TextChoices):
        JSONL = "jsonl", "JSON lines"
        PARQUET = "parquet", "Parquet"
        HF = "hf", "Saved Hugging Face dataset (save_to_disk)"

    dataset = models.ForeignKey(RegisteredDataset, on_delete=models.CASCADE, related_name="versions")
    version = models.PositiveIntegerField()
    format = models.CharField(max_length=8, choices=Format.choices)
    uri = models.CharField(max_length=1024)  # a directory holding the uploaded file(s)
    files = models.JSONField(default=list)
    size_bytes = models.PositiveBigIntegerField(default=0)
    num_rows = models.PositiveBigIntegerField(default=0)
    columns = models.JSONField(default=list)  # [{"name", "type"}]
    preview = models.JSONField(default=list)  # the first rows, long values cut
    uploaded_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["dataset", "-version"]
        constraints = [models.UniqueConstraint(fields=["dataset", "version"], name="uniq_dataset_version")]

    def __str__(self) -> str:
        return f"{self.dataset}@{self.version}"
