"""Compute pools (where jobs run) and allocations (which job holds which capacity in which pool)."""

from __future__ import annotations

from django.core.validators import RegexValidator
from django.db import models

from portal.models.jobs import Job

POOL_NAME_VALIDATOR = RegexValidator(
    r"^[a-z0-9](?:[a-z0-9-]{0,62}[a-z0-9])?$",
    "Use 1-64 lowercase letters, digits or dashes, not starting or ending with a dash.",
)


class ComputePool(models.Model):
    class Driver(models.TextChoices):
        LOCAL = "local", "Local subprocesses"
        RAY = "ray", "Ray cluster (Job Submission API)"

    class Health(models.TextChoices):
        UNKNOWN = "unknown", "Unknown"
        HEALTHY = "healthy", "Healthy"
        DEGRADED = "degraded", "Degraded"
        DOWN = "down", "Down"

    name = models.CharField(max_length=64, unique=True, validators=[POOL_NAME_VALIDATOR])
    driver = models.CharField(max_length=10, choices=Driver.choices, default=Driver.LOCAL)
    ray_address = models.CharField(
        max_length=300, blank=True, default="", help_text="Ray dashboard/Job Submission URL (ray driver)."
    )
    # Capacity is read from the pool itself (nvidia-smi / os.cpu_count for local, cluster resources for Ray).
    gpus_by_type = models.JSONField(default=dict, blank=True, help_text='e.g. {"H100": 8}; {"cpu-slot": 2}.')
    total_gpus = models.PositiveIntegerField(
        default=0, help_text="Schedulable GPU slots (sum of gpus_by_type)."
    )
    cpus = models.PositiveIntegerField(default=0)
    memory_bytes = models.PositiveBigIntegerField(default=0)
    # True when the "GPUs" are CPU slots (a machine without GPUs): jobs get no CUDA devices.
    cpu_slots = models.BooleanField(default=False)
    health = models.CharField(max_length=10, choices=Health.choices, default=Health.UNKNOWN)
    health_message = models.CharField(max_length=500, blank=True, default="")
    last_heartbeat = models.DateTimeField(null=True, blank=True)
    enabled = models.BooleanField(default=True, help_text="A disabled pool admits no new jobs.")
    labels = models.JSONField(default=dict, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return f"{self.name} ({self.driver})"


class Allocation(models.Model):
    """The capacity one attempt of a job holds. At most one live allocation per job (released_at null)."""

    job = models.ForeignKey(Job, on_delete=models.CASCADE, related_name="allocations")
    pool = models.ForeignKey(ComputePool, on_delete=models.PROTECT, related_name="allocations")
    attempt = models.PositiveIntegerField(default=0)
    gpus = models.PositiveIntegerField(default=0)
    # Scheduling slots taken in the pool: the GPUs, or one CPU slot for a CPU-only job on a CPU-slot pool.
    slots = models.PositiveIntegerField(default=0)
    cpus = models.PositiveIntegerField(default=0)
    gpu_indices = models.JSONField(default=list, blank=True, help_text="Device indices given to the job.")
    # Part of the allocation above the organization's nominal GPUs: preemptible.
    borrowed = models.BooleanField(default=False)
    admitted_at = models.DateTimeField(auto_now_add=True)
    launched_at = models.DateTimeField(null=True, blank=True)
    heartbeat_at = models.DateTimeField(null=True, blank=True)
    # Where the attempt runs: a pid on a host (local) or a Ray submission id (ray).
    runtime_handle = models.CharField(max_length=200, blank=True, default="")
    runtime_host = models.CharField(max_length=200, blank=True, default="")
    log_path = models.CharField(max_length=500, blank=True, default="")
    # Characters of the runtime's log already copied into the job's log (Ray: the cluster keeps the log).
    log_offset = models.PositiveBigIntegerField(default=0)
    # A Ray job's single-use start-up credential (portal.services.job_bootstrap): its keyed hash until it
    # is redeemed (then blank), and when it expires.
    bootstrap_digest = models.CharField(max_length=64, blank=True, default="", db_index=True)
    bootstrap_expires_at = models.DateTimeField(null=True, blank=True)
    exit_code = models.IntegerField(null=True, blank=True)
    preempt_requested_at = models.DateTimeField(null=True, blank=True)
    released_at = models.DateTimeField(null=True, blank=True)
    release_reason = models.CharField(max_length=200, blank=True, default="")
    # GPU-seconds (or CPU-seconds) already charged to UsageRecord for this allocation.
    accounted_until = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-admitted_at"]
        indexes = [models.Index(fields=["pool", "released_at"])]
        constraints = [
            models.UniqueConstraint(
                fields=["job"], condition=models.Q(released_at__isnull=True), name="uniq_live_allocation"
            )
        ]

    def __str__(self) -> str:
        return f"{self.job_id} on {self.pool_id} ({self.gpus} GPUs)"
