"""The scheduler's inputs, read from PostgreSQL: rows turned into the pure policy's views
(``portal.scheduling.policy``), and the plan made on them. Shared by the scheduling pass
(``portal.services.scheduler``, which locks the pool rows) and the queue explanation (read-only)."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from datetime import datetime

from django.conf import settings
from django.db.models import F

from opentinker.spec import JobState
from portal.models import Allocation, ComputePool, FairShareUsage, Job, Quota, UsageRecord
from portal.scheduling.policy import AllocationView, JobView, OrgView, Plan, PoolView, decay, plan
from portal.services.usage import fair_share_half_life_s, month_start


@dataclass
class Inputs:
    pool_rows: list[ComputePool]  # the rows, for the pass that writes allocations on them
    pools: list[PoolView]
    orgs: list[OrgView]
    queued: list[JobView]
    allocations: list[AllocationView]
    half_life_s: float


def load(now: datetime, *, lock: bool) -> Inputs:
    """Pools, quotas with usage, live allocations and queued jobs as the policy's views, as of ``now``
    (``lock``: the pool rows are locked until the transaction ends, as a real pass needs)."""
    pools_qs = ComputePool.objects.order_by("id")
    if lock:
        pools_qs = pools_qs.select_for_update()
    pool_rows = list(pools_qs)
    pools = {
        p.id: PoolView(
            name=p.name,
            slots=p.total_gpus,
            cpu_slots=p.cpu_slots,
            cpus=p.cpus,
            # A pool is used once a driver has read its capacity and found it healthy.
            schedulable=p.enabled and p.health == ComputePool.Health.HEALTHY,
        )
        for p in pool_rows
    }
    allocs = []
    org_used_gpus: dict[int, int] = defaultdict(int)
    org_used_slots: dict[int, int] = defaultdict(int)
    for a in Allocation.objects.filter(released_at__isnull=True).values(
        "id",
        "job_id",
        "job__organization_id",
        "pool_id",
        "gpus",
        "slots",
        "cpus",
        "borrowed",
        "preempt_requested_at",
        "admitted_at",
    ):
        pool = pools.get(a["pool_id"])
        if pool is not None:
            pool.used_slots += a["slots"]
            if a["gpus"] == 0 and not pool.cpu_slots:
                pool.used_cpus += a["cpus"]
        org = a["job__organization_id"]
        org_used_gpus[org] += a["gpus"]
        org_used_slots[org] += a["slots"]
        allocs.append(
            AllocationView(
                id=a["id"],
                job=a["job_id"],
                org=org,
                pool=pool.name if pool else "",
                gpus=a["gpus"],
                slots=a["slots"],
                borrowed=a["borrowed"],
                preempting=a["preempt_requested_at"] is not None,
                admitted_at=a["admitted_at"].timestamp(),
            )
        )
    queued = [
        JobView(
            id=j["id"],
            org=j["organization_id"],
            gpus=j["gpus"],
            cpus=int(j["cpus"] or 1),
            ranks=int(j["ranks"] or 1),  # specs stored before trainer_ranks have none: one rank
            priority=j["priority"],
            created_at=j["created_at"].timestamp(),
            pool=j["pool"],
        )
        for j in Job.objects.filter(state=JobState.QUEUED).values(
            "id",
            "organization_id",
            "gpus",
            "priority",
            "created_at",
            "pool",
            cpus=F("spec__resources__cpus"),
            ranks=F("spec__resources__trainer_ranks"),
        )
    ]
    org_ids = {j.org for j in queued} | set(org_used_gpus)
    month = month_start(now)
    hours = dict(
        UsageRecord.objects.filter(organization_id__in=org_ids, month=month).values_list(
            "organization_id", "gpu_seconds"
        )
    )
    half_life = fair_share_half_life_s()
    history = {
        f.organization_id: decay(f.decayed_gpu_seconds, f.decayed_at, now, half_life)
        for f in FairShareUsage.objects.filter(organization_id__in=org_ids)
    }
    orgs = [
        OrgView(
            id=q.organization_id,
            nominal_gpus=q.max_gpus,
            borrowing_limit_gpus=q.borrowing_limit_gpus,
            weight=q.fair_share_weight,
            used_gpus=org_used_gpus[q.organization_id],
            used_slots=org_used_slots[q.organization_id],
            decayed_slot_seconds=history.get(q.organization_id, 0.0),
            month_gpu_hours=hours.get(q.organization_id, 0.0) / 3600,
            gpu_hours_per_month=q.gpu_hours_per_month,
            allowed_pools=frozenset(q.allowed_pools or ()),
        )
        for q in Quota.objects.filter(organization_id__in=org_ids)
    ]
    return Inputs(pool_rows, list(pools.values()), orgs, queued, allocs, half_life)


def reserve_after_s() -> float:
    """How long a job waits before it may reserve capacity (``OPENTINKER_RESERVE_AFTER_S``, seconds; ``inf``
    turns reservations off)."""
    return settings.OPENTINKER_RESERVE_AFTER_S


def plan_at(now: datetime, *, lock: bool) -> tuple[Inputs, Plan]:
    """Load the inputs (locking the pool rows for a real pass) and plan on them."""
    inputs = load(now, lock=lock)
    decided = plan(
        inputs.pools,
        inputs.orgs,
        inputs.queued,
        inputs.allocations,
        half_life_s=inputs.half_life_s,
        now=now.timestamp(),
        reserve_after_s=reserve_after_s(),
    )
    return inputs, decided
