"""Reads of usage: GPU- and CPU-seconds per organization per month, against the monthly quota."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date

from django.db.models import Sum
from django.utils import timezone

from portal.models import Allocation, Organization, Quota, UsageRecord
from portal.services.usage import month_bounds, month_start


@dataclass
class MonthUsage:
    month: date
    gpu_hours: float
    cpu_hours: float
    gpu_hours_quota: int | None = None
    running_gpus: int = 0
    tinker_tokens: int = 0
    model_server_hours: float = 0.0


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
                tinker_tokens=r.tinker_tokens if r else 0,
                model_server_hours=round((r.model_server_seconds if r else 0.0) / 3600, 6),
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


@dataclass
class JobUsage:
    job_id: object
    name: str
    state: str
    gpu_hours: float
    cpu_hours: float


def job_usage_for_month(organization: Organization, month: date) -> list[JobUsage]:
    """What each of the organization's jobs was charged in one month, biggest first.

    Counted from its allocations exactly as usage_charge counts them (GPUs x seconds, CPUs x seconds, from
    launch to the last accounting tick), so the jobs of a month add up to its UsageRecord.
    """
    start, end = month_bounds(month_start(month))
    allocs = (
        Allocation.objects.filter(
            job__organization=organization,
            launched_at__isnull=False,
            launched_at__lt=end,
            accounted_until__gt=start,
        )
        .select_related("job")
        .only("gpus", "cpus", "launched_at", "accounted_until", "job__id", "job__name", "job__state")
    )
    totals: dict[object, JobUsage] = {}
    for a in allocs:
        seconds = (min(a.accounted_until, end) - max(a.launched_at, start)).total_seconds()
        row = totals.setdefault(a.job_id, JobUsage(a.job_id, a.job.name, a.job.state, 0.0, 0.0))
        row.gpu_hours += a.gpus * seconds / 3600
        row.cpu_hours += a.cpus * seconds / 3600
    rows = sorted(totals.values(), key=lambda r: (-r.gpu_hours, -r.cpu_hours, r.name))
    for r in rows:
        r.gpu_hours, r.cpu_hours = round(r.gpu_hours, 4), round(r.cpu_hours, 4)
    return rows
