"""Reads for the platform admin: pools with what runs on them, and the queue with why each job waits."""

from __future__ import annotations

from django.db.models import Count, Q, Sum
from django.utils import timezone

from portal.models import Allocation, ComputePool, Job
from portal.services.scheduler import queue_plan


def pool_list():
    live = Q(allocations__released_at__isnull=True)
    return ComputePool.objects.annotate(
        used_slots=Sum("allocations__slots", filter=live, default=0),
        running_jobs=Count("allocations", filter=live),
        borrowed_slots=Sum("allocations__slots", filter=live & Q(allocations__borrowed=True), default=0),
    ).order_by("name")


def pool_get(name: str) -> ComputePool:
    from portal.errors import NotFound

    pool = pool_list().filter(name=name).first()
    if pool is None:
        raise NotFound("no such pool")
    return pool


def queue_explain(*, limit: int = 200, offset: int = 0) -> tuple[int, list[dict]]:
    """Queued jobs in the order the scheduler weighs them, each with why it waits right now.

    The reason comes from a read-only run of the same plan the scheduler would make (see
    portal/services/scheduler.py): category ``quota``, ``capacity``, ``fair-share``, ``pool``,
    ``reservation`` (capacity held for this long-waiting job, or this job backfilling around such a hold)
    or ``starting``, then a sentence (the scheduler's own words).
    """
    plan, queued = queue_plan()
    order = {j.id: i for i, j in enumerate(sorted(queued, key=lambda j: (-j.priority, j.created_at)))}
    jobs = {
        j.pk: j
        for j in Job.objects.filter(pk__in=list(order))
        .select_related("organization")
        .only("id", "name", "organization__slug", "gpus", "priority", "created_at", "pool", "attempt", "spec")
    }
    now = timezone.now()
    rows = []
    starting = {a.job for a in plan.admit}
    holders = {job_id for job_id, _ in plan.held.values()}
    for job_id in sorted(order, key=order.get):
        job = jobs.get(job_id)
        if job is None:
            continue
        reason = plan.waiting.get(job_id) or (
            "starting: admitted at the next scheduler pass" if job_id in starting else ""
        )
        rows.append(
            {
                "id": job.pk,
                "name": job.name,
                "organization": job.organization.slug,
                "gpus": job.gpus,
                "cpus": int(job.spec.get("resources", {}).get("cpus", 1)),
                "priority": job.priority,
                "pool": job.pool or None,
                "attempt": job.attempt,
                "created_at": job.created_at,
                "waiting_seconds": round((now - job.created_at).total_seconds(), 1),
                "category": _category(reason, holds=job_id in holders),
                "reason": reason,
            }
        )
    return len(rows), rows[offset : offset + limit]


# How the scheduler says a job waits behind another's reservation (ctx.try_place in the scheduler).
BACKFILL_MARK = "reserved for a job that has waited long"


def _category(reason: str, *, holds: bool) -> str:
    """The reason's own category, except that a reservation is one of its own: the scheduler words both
    sides of it as capacity, but an admin acts differently on a job that holds slots (it starts as they
    free up) and one that backfills around them (it waits for the rest)."""
    category = reason.split(":", 1)[0]
    if category == "capacity" and (holds or BACKFILL_MARK in reason):
        return "reservation"
    return category


def running_allocations(pool: ComputePool):
    return Allocation.objects.filter(pool=pool, released_at__isnull=True).select_related("job__organization")
