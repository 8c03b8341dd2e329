"""Jobs and what they produce: state-change events, metric points and checkpoints."""

from __future__ import annotations

import uuid

from django.conf import settings
from django.db import models

from opentinker.spec import JobKind, JobState
from portal.models.orgs import Organization
from portal.models.tokens import ApiToken

# A model server of the Tinker API (portal/services/model_servers.py): a job of the platform organization
# whose spec is {"kind": "tinker", "model_server": {...}, "resources": {...}}, not a JobSpec. Never submitted
# by a tenant.
MODEL_SERVER_KIND = "tinker"
LIVE_STATES = (JobState.QUEUED, JobState.ADMITTED, JobState.RUNNING, JobState.CANCELLING)


class Job(models.Model):
    # UUIDs, not sequential ids: an id reveals nothing about other tenants' job counts.
    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    organization = models.ForeignKey(Organization, on_delete=models.CASCADE, related_name="jobs")
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.SET_NULL, null=True, blank=True, related_name="+"
    )
    name = models.CharField(max_length=100)
    kind = models.CharField(
        max_length=10,
        choices=[*((k.value, k.value) for k in JobKind), (MODEL_SERVER_KIND, "model server")],
    )
    state = models.CharField(
        max_length=12, choices=[(s.value, s.value) for s in JobState], default=JobState.QUEUED.value
    )
    state_reason = models.CharField(max_length=500, blank=True, default="")
    spec = models.JSONField(help_text="The validated JobSpec, exactly as the runtime will receive it.")
    spec_version = models.PositiveSmallIntegerField()
    priority = models.SmallIntegerField(default=0)
    gpus = models.PositiveIntegerField(default=0)
    pool = models.CharField(max_length=64, blank=True, default="")
    attempt = models.PositiveIntegerField(default=0)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)
    # Set from the Idempotency-Key header: a retried submission returns this job instead of a second one.
    idempotency_key = models.CharField(max_length=100, blank=True, default="")
    # Next JobEvent.seq; kept on the row so events of one job are numbered without gaps under concurrency.
    next_event_seq = models.PositiveIntegerField(default=1)
    # Last sign of life from the runtime (ingest heartbeat); the reaper re-queues a running job gone silent.
    last_heartbeat_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at"]
        indexes = [
            models.Index(fields=["organization", "state"]),
            models.Index(fields=["organization", "-created_at"]),
            models.Index(fields=["state", "priority", "created_at"]),
        ]
        constraints = [
            models.UniqueConstraint(
                fields=["organization", "idempotency_key"],
                condition=~models.Q(idempotency_key=""),
                name="uniq_job_idempotency_key",
            ),
            # One live model server per base model (its name): two API workers asking at once make one job.
            models.UniqueConstraint(
                fields=["name"],
                condition=models.Q(kind=MODEL_SERVER_KIND, state__in=[s.value for s in LIVE_STATES]),
                name="uniq_live_model_server",
            ),
        ]

    def __str__(self) -> str:
        return f"{self.name} ({self.id})"


class JobEvent(models.Model):
    class Kind(models.TextChoices):
        STATE = "state", "State change"
        INFO = "info", "Information"
        WARNING = "warning", "Warning"
        ERROR = "error", "Error"

    job = models.ForeignKey(Job, on_delete=models.CASCADE, related_name="events")
    seq = models.PositiveIntegerField()
    kind = models.CharField(max_length=10, choices=Kind.choices)
    created_at = models.DateTimeField(auto_now_add=True)
    # Who: a user (browser), a token (program) or the system (empty both: scheduler, reaper, runtime).
    actor_user = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.SET_NULL, null=True, blank=True, related_name="+"
    )
    actor_token = models.ForeignKey(
        ApiToken, on_delete=models.SET_NULL, null=True, blank=True, related_name="+"
    )
    actor_label = models.CharField(max_length=100, default="system")
    from_state = models.CharField(max_length=12, blank=True, default="")
    to_state = models.CharField(max_length=12, blank=True, default="")
    message = models.CharField(max_length=2000, blank=True, default="")
    data = models.JSONField(default=dict, blank=True)

    class Meta:
        ordering = ["job", "seq"]
        constraints = [models.UniqueConstraint(fields=["job", "seq"], name="uniq_job_event_seq")]

    def __str__(self) -> str:
        return f"{self.job_id} #{self.seq} {self.kind}"


class Metric(models.Model):
    """One point of one metric at one step.

    Unique per (job, name, step), so a retried batch or a resumed job never duplicates a point.
    """

    id = models.BigAutoField(primary_key=True)
    job = models.ForeignKey(Job, on_delete=models.CASCADE, related_name="metrics")
    name = models.CharField(max_length=100)
    step = models.PositiveIntegerField()
    value = models.FloatField()
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["job", "name", "step"], name="uniq_metric_point")]

    def __str__(self) -> str:
        return f"{self.name}@{self.step}={self.value}"


class Checkpoint(models.Model):
    job = models.ForeignKey(Job, on_delete=models.CASCADE, related_name="checkpoints")
    step = models.PositiveIntegerField()
    uri = models.CharField(max_length=1024, help_text="Object-store prefix holding the checkpoint's files.")
    files = models.JSONField(default=list, help_text='[{"name", "size", "sha256"}] relative to uri.')
    size_bytes = models.PositiveBigIntegerField(default=0)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["job", "step"]
        constraints = [models.UniqueConstraint(fields=["job", "step"], name="uniq_checkpoint_step")]

    def __str__(self) -> str:
        return f"checkpoint of {self.job_id} at step {self.step}"
