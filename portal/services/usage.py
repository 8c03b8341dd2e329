"""Usage accounting: GPU- and CPU-seconds per organization per month, and the decayed fair-share history.

Charges are additive upserts in PostgreSQL (``INSERT ... ON CONFLICT DO UPDATE``), so concurrent charges of
different allocations never lose an update; one allocation is charged under its row lock, from
``accounted_until`` to now, so charging it twice never counts a second twice.
"""

from __future__ import annotations

from datetime import UTC, date, datetime

from django.conf import settings
from django.db import connection, transaction
from django.utils import timezone

from portal.models import Allocation


def month_start(when: datetime | date) -> date:
    return date(when.year, when.month, 1)


def _next_month(d: date) -> date:
    return date(d.year + (d.month == 12), d.month % 12 + 1, 1)


def fair_share_half_life_s() -> float:
    return settings.OPENTINKER_FAIR_SHARE_HALF_LIFE_S


def split_by_month(start: datetime, end: datetime) -> list[tuple[date, float]]:
    """Seconds of [start, end) in each calendar month (UTC)."""
    out: list[tuple[date, float]] = []
    cur = start.astimezone(UTC)
    end = end.astimezone(UTC)
    while cur < end:
        boundary = datetime.combine(_next_month(month_start(cur)), datetime.min.time(), tzinfo=UTC)
        stop = min(end, boundary)
        out.append((month_start(cur), (stop - cur).total_seconds()))
        cur = stop
    return out


def usage_charge(
    *, organization_id: int, start: datetime, end: datetime, gpus: int, cpus: int, slots: int
) -> None:
    if end <= start:
        return
    with connection.cursor() as cur:
        for month, seconds in split_by_month(start, end):
            cur.execute(
                """
                INSERT INTO portal_usagerecord (organization_id, month, gpu_seconds, cpu_seconds, updated_at)
                VALUES (%s, %s, %s, %s, now())
                ON CONFLICT (organization_id, month) DO UPDATE SET
                    gpu_seconds = portal_usagerecord.gpu_seconds + EXCLUDED.gpu_seconds,
                    cpu_seconds = portal_usagerecord.cpu_seconds + EXCLUDED.cpu_seconds,
                    updated_at = now()
                """,
                [organization_id, month, gpus * seconds, cpus * seconds],
            )
        # The fair-share history counts slots (GPUs, or CPU slots on a CPU-slot pool), decayed to `end`.
        cur.execute(
            """
            INSERT INTO portal_fairshareusage (organization_id, decayed_gpu_seconds, decayed_at)
            VALUES (%s, %s, %s)
            ON CONFLICT (organization_id) DO UPDATE SET
                decayed_gpu_seconds = portal_fairshareusage.decayed_gpu_seconds * power(0.5, greatest(0,
                    extract(epoch FROM EXCLUDED.decayed_at - portal_fairshareusage.decayed_at)) / %s)
                    + EXCLUDED.decayed_gpu_seconds,
                decayed_at = greatest(EXCLUDED.decayed_at, portal_fairshareusage.decayed_at)
            """,
            [organization_id, slots * (end - start).total_seconds(), end, fair_share_half_life_s()],
        )


def allocation_account(allocation_id: int, *, now: datetime | None = None) -> float:
    """Charge an allocation's use since it was last charged; returns the GPU-seconds charged."""
    now = now or timezone.now()
    with transaction.atomic():
        alloc = Allocation.objects.select_for_update().select_related("job").filter(pk=allocation_id).first()
        if alloc is None:
            return 0.0
        start = alloc.accounted_until or alloc.launched_at
        end = min(now, alloc.released_at) if alloc.released_at else now
        if start is None or end <= start:
            return 0.0
        usage_charge(
            organization_id=alloc.job.organization_id,
            start=start,
            end=end,
            gpus=alloc.gpus,
            cpus=alloc.cpus,
            slots=alloc.slots,
        )
        alloc.accounted_until = end
        alloc.save(update_fields=["accounted_until"])
        return alloc.gpus * (end - start).total_seconds()


def accounting_tick(*, now: datetime | None = None) -> int:
    """Charge every launched live allocation up to now (beat calls this through the supervisor)."""
    now = now or timezone.now()
    ids = list(
        Allocation.objects.filter(released_at__isnull=True, launched_at__isnull=False).values_list(
            "id", flat=True
        )
    )
    for alloc_id in ids:
        allocation_account(alloc_id, now=now)
    return len(ids)


def tinker_usage_charge(*, organization_id: int, when: datetime, tokens: int, seconds: float) -> None:
    """The Tinker API's metering: tokens a model server processed and its time, added to the month of
    `when` (an additive upsert, like ``usage_charge``)."""
    if tokens <= 0 and seconds <= 0:
        return
    with connection.cursor() as cur:
        cur.execute(
            """
            INSERT INTO portal_usagerecord (organization_id, month, gpu_seconds, cpu_seconds, tinker_tokens,
                model_server_seconds, updated_at)
            VALUES (%s, %s, 0, 0, %s, %s, now())
            ON CONFLICT (organization_id, month) DO UPDATE SET
                tinker_tokens = portal_usagerecord.tinker_tokens + EXCLUDED.tinker_tokens,
                model_server_seconds
                    = portal_usagerecord.model_server_seconds + EXCLUDED.model_server_seconds,
                updated_at = now()
            """,
            [organization_id, month_start(when.astimezone(UTC)), max(tokens, 0), max(seconds, 0.0)],
        )


def month_bounds(month: date) -> tuple[datetime, datetime]:
    start = datetime.combine(month, datetime.min.time(), tzinfo=UTC)
    return start, datetime.combine(_next_month(month), datetime.min.time(), tzinfo=UTC)


__all__ = [
    "accounting_tick",
    "allocation_account",
    "month_bounds",
    "month_start",
    "split_by_month",
    "tinker_usage_charge",
    "usage_charge",
]
