"""Per-organization quotas. Enforced at submission (request size, queue length) and by the scheduler."""

from __future__ import annotations

from django.contrib.postgres.fields import ArrayField
from django.core.validators import MaxValueValidator, MinValueValidator
from django.db import models

from portal.models.orgs import Organization


class Quota(models.Model):
    organization = models.OneToOneField(Organization, on_delete=models.CASCADE, related_name="quota")
    max_gpus = models.PositiveIntegerField(
        default=1, validators=[MaxValueValidator(4096)], help_text="Nominal concurrent GPUs."
    )
    borrowing_limit_gpus = models.PositiveIntegerField(
        default=0,
        validators=[MaxValueValidator(4096)],
        help_text="GPUs above nominal the organization may use while a pool is idle (preemptible).",
    )
    gpu_hours_per_month = models.PositiveIntegerField(default=100, validators=[MaxValueValidator(10_000_000)])
    max_queued_jobs = models.PositiveIntegerField(default=20, validators=[MaxValueValidator(100_000)])
    max_cpus_per_job = models.PositiveIntegerField(
        default=8, validators=[MinValueValidator(1), MaxValueValidator(1024)]
    )
    fair_share_weight = models.FloatField(
        default=1.0, validators=[MinValueValidator(0.01), MaxValueValidator(1000)]
    )
    allowed_pools = ArrayField(
        models.CharField(max_length=64), default=list, blank=True, help_text="Empty means every pool."
    )
    updated_at = models.DateTimeField(auto_now=True)

    def __str__(self) -> str:
        return f"quota of {self.organization}"

    @property
    def max_gpus_per_job(self) -> int:
        return self.max_gpus + self.borrowing_limit_gpus
