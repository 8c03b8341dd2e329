"""Sessions, models (training clients and samplers) and futures of the Tinker-compatible API.

Every row belongs to one organization; lookups go through `services` (session_get, model_get, weights_get)
and the views' `_future_of`, which all filter by the caller's organization.
A future is the truth about one call: `pending` until the model server reports its outcome through the ingest
endpoint. A retried call (same model and seq_id) finds its first future again (unique constraint)."""

from __future__ import annotations

import uuid

from django.conf import settings
from django.db import models

from portal.models import Organization


class TinkerSession(models.Model):
    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    organization = models.ForeignKey(Organization, on_delete=models.CASCADE, related_name="tinker_sessions")
    created_by = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.SET_NULL, null=True)
    tags = models.JSONField(default=list)
    sdk_version = models.CharField(max_length=40, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    last_heartbeat_at = models.DateTimeField(auto_now_add=True)
    finished_at = models.DateTimeField(null=True, blank=True)
    finish_reason = models.CharField(max_length=20, blank=True)

    def __str__(self) -> str:
        return f"tinker session {self.pk}"


class TinkerModel(models.Model):
    """A training client (`{session}:train:{n}`, the id the SDK itself computes for load_weights) or a
    sampler (`{session}:sample:{n}`) on one base model."""

    class Kind(models.TextChoices):
        TRAIN = "train"
        SAMPLE = "sample"

    id = models.CharField(primary_key=True, max_length=80)
    organization = models.ForeignKey(Organization, on_delete=models.CASCADE, related_name="tinker_models")
    session = models.ForeignKey(TinkerSession, on_delete=models.CASCADE, related_name="models")
    kind = models.CharField(max_length=10, choices=Kind.choices)
    base_model = models.CharField(max_length=200)
    lora_rank = models.PositiveIntegerField(null=True, blank=True)
    source_path = models.CharField(max_length=500, blank=True)  # a sampler's tinker:// weights
    created_at = models.DateTimeField(auto_now_add=True)

    def __str__(self) -> str:
        return f"{self.pk} ({self.base_model})"


class TinkerFuture(models.Model):
    class State(models.TextChoices):
        PENDING = "pending"
        DONE = "done"
        FAILED = "failed"

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    organization = models.ForeignKey(Organization, on_delete=models.CASCADE, related_name="tinker_futures")
    model = models.ForeignKey(TinkerModel, on_delete=models.CASCADE, related_name="futures")
    operation = models.CharField(max_length=40)
    seq_id = models.BigIntegerField(null=True, blank=True)  # None: create_model, not seq-ordered
    request = models.JSONField(default=dict)  # what the reply needs besides the outcome (a weights name...)
    state = models.CharField(max_length=10, choices=State.choices, default=State.PENDING)
    result = models.JSONField(null=True, blank=True)
    error = models.TextField(blank=True)
    error_category = models.CharField(max_length=10, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    completed_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(
                fields=["model", "seq_id"], condition=models.Q(seq_id__isnull=False), name="tinker_one_call"
            ),
        ]

    def __str__(self) -> str:
        return f"{self.operation} {self.pk} ({self.state})"


class TinkerWeights(models.Model):
    """A saved state (`weights`) or sampler adapter (`sampler_weights`): `tinker://{model}/{kind}/{name}`."""

    organization = models.ForeignKey(Organization, on_delete=models.CASCADE, related_name="tinker_weights")
    model = models.ForeignKey(TinkerModel, on_delete=models.CASCADE, related_name="weights")
    kind = models.CharField(max_length=20)
    name = models.CharField(max_length=200)
    uri = models.CharField(max_length=500)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["model", "kind", "name"], name="tinker_weights_name")]

    def __str__(self) -> str:
        return f"tinker://{self.model_id}/{self.kind}/{self.name}"
