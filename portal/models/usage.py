"""Resource usage per organization per calendar month (UTC), charged while jobs hold capacity."""

from __future__ import annotations

from django.db import models

from portal.models.orgs import Organization


class UsageRecord(models.Model):
    organization = models.ForeignKey(Organization, on_delete=models.CASCADE, related_name="usage_records")
    month = models.DateField(help_text="First day of the month (UTC).")
    gpu_seconds = models.FloatField(default=0)
    cpu_seconds = models.FloatField(default=0)
    # The Tinker-compatible API: tokens its model servers processed (forward/backward rows, sampled prompts
    # and completions) and the model-server time its calls took (a shared pass split by tokens).
    tinker_tokens = models.BigIntegerField(default=0, db_default=0)  # db_default: raw upserts omit it
    model_server_seconds = models.FloatField(default=0, db_default=0)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["organization", "-month"]
        constraints = [models.UniqueConstraint(fields=["organization", "month"], name="uniq_usage_org_month")]

    def __str__(self) -> str:
        return f"{self.organization_id} {self.month:%Y-%m}: {self.gpu_seconds / 3600:.1f} GPU-h"


class FairShareUsage(models.Model):
    """An organization's exponentially decayed GPU usage, the history term of its fair-share priority."""

    organization = models.OneToOneField(Organization, on_delete=models.CASCADE, related_name="fair_share")
    decayed_gpu_seconds = models.FloatField(default=0)
    decayed_at = models.DateTimeField()

    def __str__(self) -> str:
        return f"{self.organization_id}: {self.decayed_gpu_seconds:.0f} decayed GPU-s"
