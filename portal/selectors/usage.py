"""Reads of usage: GPU- and CPU-seconds per organization per month, against the monthly quota."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date

from django.db.models import Sum
from django.utils import timezone

from portal.models import Allocation, Organization, Quota, UsageRecord
from portal.services.usage import month_start


@dataclass
class MonthUsage:
    month: date
    gpu_hours: float
    cpu_hours: float
    gpu_hours_quota: int | None = None
    running_gpus: int = 0


def organization_usage(organization: Organization, *, months: int = 12) -> list[MonthUsage]:
    """The organization's last `months` months with usage, newest first; the current month always."""
    quota = Quota.objects.filter(organization=organization).first()
    current = month_start(timezone.now())
    rows = {
        r.month: r
        for r in UsageRecord.objects.filter(organization=organization).order_by("-month")[: max(1, months)]
    }
    out = []
    running = (
        Allocation.objects.filter(job__organization=organization, released_at__isnull=True).aggregate(
            g=Sum("gpus")
        )["g"]
        or 0
    )
    for month in sorted({current, *rows}, reverse=True)[:months]:
        r = rows.get(month)
        out.append(
            MonthUsage(
                month=month,
                gpu_hours=round((r.gpu_seconds if r else 0.0) / 3600, 4),
                cpu_hours=round((r.cpu_seconds if r else 0.0) / 3600, 4),
                gpu_hours_quota=quota.gpu_hours_per_month if quota and month == current else None,
                running_gpus=running if month == current else 0,
            )
        )
    return out


def usage_by_organization(month: date) -> list[dict]:
    """Every organization's usage in one month (platform admin), biggest GPU user first."""
    rows = (
        UsageRecord.objects.filter(month=month_start(month))
        .select_related("organization", "organization__quota")
        .order_by("-gpu_seconds", "organization__slug")
    )
    return [
        {
            "organization": r.organization.slug,
            "month": r.month,
            "gpu_hours": round(r.gpu_seconds / 3600, 4),
            "cpu_hours": round(r.cpu_seconds / 3600, 4),
            "gpu_hours_quota": getattr(getattr(r.organization, "quota", None), "gpu_hours_per_month", None),
        }
        for r in rows
    ]
