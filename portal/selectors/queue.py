"""Reads for the platform admin: pools with what runs on them, and the queue with why each job waits."""

from __future__ import annotations

from django.db.models import Count, Q, Sum
from django.utils import timezone

from portal.errors import NotFound
from portal.models import Allocation, ComputePool, Job
from portal.scheduling.explanation import queue_explanation


def pool_list():
    live = Q(allocations__released_at__isnull=True)
    return ComputePool.objects.annotate(
        used_slots=Sum("allocations__slots", filter=live, default=0),
        running_jobs=Count("allocations", filter=live),
        borrowed_slots=Sum("allocations__slots", filter=live & Q(allocations__borrowed=True), default=0),
    ).order_by("name")


def pool_get(name: str) -> ComputePool:
    pool = pool_list().filter(name=name).first()
    if pool is None:
        raise NotFound("no such pool")
    return pool


def queue_explain(*, limit: int = 200, offset: int = 0) -> tuple[int, list[dict]]:
    """Queued jobs in the order the scheduler weighs them, each with why it waits right now: the admin
    queue, computed fresh (staff act on it; the result is shared with the job pages' window).

    The reason comes from a read-only run of the same plan the scheduler would make (see
    portal/scheduling/): its category (``policy.Why``: ``quota``, ``capacity``, ``fair-share``,
    ``pool``, ``reservation`` or ``starting``) and ``reason``, "<category>: <the scheduler's sentence>".
    Only the page's jobs are read from the database.
    """
    explanation = queue_explanation(fresh=True)
    page = explanation.order[offset : offset + limit]
    jobs = {
        j.pk: j
        for j in Job.objects.filter(pk__in=list(page))
        .select_related("organization")
        .only("id", "name", "organization__slug", "gpus", "priority", "created_at", "pool", "attempt", "spec")
    }
    now = timezone.now()
    rows = []
    for job_id in page:
        job, why = jobs.get(job_id), explanation.why.get(job_id)
        if job is None or why is None:  # deleted since the plan read it
            continue
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
                "category": why.category.value,
                "reason": str(why),
            }
        )
    return len(explanation.order), rows


def queue_position(job_id) -> dict | None:
    """Where one queued job stands in the scheduler's order and why it waits, from the explanation every
    viewer shares (at most one plan per ``OPENTINKER_QUEUE_EXPLAIN_S``). A job queued after it was computed
    triggers one recomputation; None if the job is still not in it (queued this very moment)."""
    explanation = queue_explanation()
    if explanation.position(job_id) is None:
        explanation = queue_explanation(fresh=True)
    position = explanation.position(job_id)
    why = explanation.why.get(job_id)
    if position is None or why is None:
        return None
    return {
        "position": position,
        "of": len(explanation.order),
        "category": why.category.value,
        "reason": str(why),
    }


def running_allocations(pool: ComputePool):
    return Allocation.objects.filter(pool=pool, released_at__isnull=True).select_related("job__organization")
