"""Reads for platform staff, shared by the admin API (api/views/admin.py) and the admin console
(portal/web/console.py): any organization, any job, what runs where.

Unlike the other selectors these are not scoped to a caller's organization, so only staff-only views may
use them. An unknown slug or id is NotFound, as everywhere; pools and the queue are in selectors/queue.py.
"""

from __future__ import annotations

import uuid

from django.db.models import Count, QuerySet

from portal.errors import NotFound
from portal.models import Allocation, Job, Organization


def organization_list() -> QuerySet[Organization]:
    """Every organization by slug, with its quota and `members` (how many memberships) in one query."""
    return (
        Organization.objects.select_related("quota").annotate(members=Count("memberships")).order_by("slug")
    )


def organization_get(slug: str) -> Organization:
    org = Organization.objects.select_related("quota").filter(slug=slug).first()
    if org is None:
        raise NotFound("no such organization")
    return org


def job_get_any(job_id: str | uuid.UUID) -> Job:
    """A job of any organization; an id that is not a UUID is NotFound too (it names no job)."""
    try:
        return Job.objects.select_related("organization", "created_by").get(pk=uuid.UUID(str(job_id)))
    except (ValueError, Job.DoesNotExist):
        raise NotFound("no such job") from None


def job_list_running() -> QuerySet[Job]:
    """Jobs that hold or are about to hold an allocation, of every organization, by organization."""
    return (
        Job.objects.filter(state__in=["admitted", "running", "cancelling"])
        .select_related("organization")
        .order_by("organization__slug", "created_at")
    )


def allocation_list_live() -> QuerySet[Allocation]:
    """Allocations not yet released, by pool and admission time, with their job and its organization."""
    return (
        Allocation.objects.filter(released_at__isnull=True)
        .select_related("job__organization", "pool")
        .order_by("pool__name", "admitted_at")
    )
