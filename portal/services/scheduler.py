"""The scheduler: which queued jobs start now, where, and why the others wait.

Two layers:

- ``plan()`` is pure (plain dataclasses in, decisions out). It is what ``schedule_pass()`` runs, what the
  admin queue view runs read-only to explain each wait, what ``bench/scheduler.py`` times, and what the
  property test checks.
- ``schedule_pass()`` loads the state from PostgreSQL, runs ``plan()`` and writes the admissions, all inside
  one transaction holding a transaction-level advisory lock and the pool rows: two passes at once serialize,
  so capacity and quotas are never over-admitted however many schedulers run.

Policy (in order):

1. **Quotas** per organization: concurrent GPUs (nominal ``max_gpus`` plus ``borrowing_limit_gpus``), monthly
   GPU-hours (UsageRecord of the current month), pools the organization may use.
2. **Weighted fair share**: organizations take turns; the next turn goes to the one with the smallest
   ``(slots in use + decayed past usage) / weight``. History decays with a half-life, like Slurm's fair-share
   factor, so a tenant that ran a lot yesterday yields to one that did not, and forgets it after a few days.
3. **Priority** orders jobs *within* an organization (a tenant's priority never beats another tenant's share),
   then submission time.
4. **Backfill**: a job that cannot start is skipped, never waited on: every later job that fits still starts.
5. **Borrowing**: above nominal GPUs an organization may borrow idle capacity up to its borrowing limit. Such
   allocations are marked ``borrowed``; when a job within its organization's nominal GPUs cannot fit, enough
   borrowed allocations in a pool are chosen for preemption (checkpoint, then re-queue) and the freed slots
   are held for the owner: no new borrowing goes into that pool while owners wait there.
"""

from __future__ import annotations

import heapq
import math
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime

from django.db.models import F

from opentinker.spec import JobState

# ---------------------------------------------------------------------------------------------------------
# The pure core


@dataclass
class PoolView:
    name: str
    slots: int  # schedulable GPU slots (or CPU slots on a CPU-slot pool)
    used_slots: int = 0
    cpu_slots: bool = False
    cpus: int = 0
    used_cpus: int = 0
    schedulable: bool = True  # enabled and healthy

    @property
    def free(self) -> int:
        return self.slots - self.used_slots


@dataclass
class OrgView:
    id: int
    nominal_gpus: int
    borrowing_limit_gpus: int = 0
    weight: float = 1.0
    used_gpus: int = 0  # GPUs held by its live allocations
    used_slots: int = 0  # slots held by its live allocations (GPUs, or CPU slots)
    decayed_slot_seconds: float = 0.0
    month_gpu_hours: float = 0.0
    gpu_hours_per_month: float = math.inf
    allowed_pools: frozenset[str] = frozenset()  # empty: every pool

    @property
    def gpu_limit(self) -> int:
        return self.nominal_gpus + self.borrowing_limit_gpus


@dataclass
class JobView:
    id: object
    org: int
    gpus: int
    cpus: int = 1
    priority: int = 0
    created_at: float = 0.0  # any monotone number (epoch seconds)
    pool: str = ""  # requested pool; empty lets the scheduler choose


@dataclass
class AllocationView:
    id: object
    job: object
    org: int
    pool: str
    gpus: int
    slots: int
    borrowed: bool
    preempting: bool = False
    admitted_at: float = 0.0


@dataclass
class Admission:
    job: object
    pool: str
    gpus: int
    slots: int
    cpus: int
    borrowed: bool


@dataclass
class Plan:
    admit: list[Admission] = field(default_factory=list)
    preempt: list[object] = field(default_factory=list)  # AllocationView ids
    # Why each queued job waits: "<category>: <sentence>", category in quota|capacity|fair-share|pool
    waiting: dict[object, str] = field(default_factory=dict)
    # Free or reclaimed slots per pool held for organizations within nominal: no borrowing goes there.
    reserved: dict[str, int] = field(default_factory=dict)


# Past usage enters the fair-share key as "decayed slot-seconds / half-life" (about 1.44 x the slots held on
# average lately) times this factor: history dominates, so a tenant that got more than its share (a big job
# is indivisible) yields until its decayed usage is back in line. 10 measured best in bench/scheduler.py.
HISTORY_FACTOR = 10.0


def slots_needed(job: JobView, pool: PoolView) -> int:
    if job.gpus:
        return job.gpus
    return 1 if pool.cpu_slots else 0


def _fits(job: JobView, pool: PoolView, free: int) -> bool:
    need = slots_needed(job, pool)
    if need > free:
        return False
    if not pool.cpu_slots and job.gpus == 0:  # a CPU-only job on a GPU pool: bounded by the pool's CPUs
        return pool.used_cpus + job.cpus <= pool.cpus
    return True


def plan(
    pools: Iterable[PoolView],
    orgs: Iterable[OrgView],
    queued: Iterable[JobView],
    allocations: Iterable[AllocationView] = (),
    *,
    half_life_s: float = 7 * 86400,
    allow_preemption: bool = True,
) -> Plan:
    """One scheduling pass. Mutates nothing it is given; O(jobs x log orgs + jobs x pools)."""
    pools = {p.name: PoolView(**p.__dict__) for p in pools}
    orgs = {o.id: OrgView(**o.__dict__) for o in orgs}
    allocations = list(allocations)
    result = Plan()

    by_org: dict[int, list[JobView]] = defaultdict(list)
    for job in queued:
        if job.org in orgs:
            by_org[job.org].append(job)
        else:
            result.waiting[job.id] = "quota: the organization has no quota"
    for jobs in by_org.values():
        jobs.sort(key=lambda j: (-j.priority, j.created_at, str(j.id)))

    live_pools = [p for p in pools.values() if p.schedulable]
    total_slots = sum(p.slots for p in live_pools) or 1
    total_weight = sum(orgs[o].weight for o in by_org) or 1.0
    # Slots held for owners waiting on preemption: borrowing may not take them.
    reserved: dict[str, int] = defaultdict(int)
    preemptible: dict[str, list[AllocationView]] = defaultdict(list)
    for a in allocations:
        if a.borrowed and not a.preempting:
            preemptible[a.pool].append(a)
        if a.preempting:
            reserved[a.pool] += a.slots  # coming back soon: keep it for owners
    for lst in preemptible.values():
        lst.sort(key=lambda a: -a.admitted_at)  # newest borrowers first: least work lost

    def key(o: OrgView) -> float:
        history = o.decayed_slot_seconds / half_life_s if half_life_s else 0.0
        return (o.used_slots + HISTORY_FACTOR * history) / o.weight

    heap = [(key(orgs[o]), o) for o in by_org]
    heapq.heapify(heap)
    cursor = dict.fromkeys(by_org, 0)
    any_free = any(p.free > 0 for p in live_pools)

    while heap:
        _, org_id = heapq.heappop(heap)
        org = orgs[org_id]
        jobs = by_org[org_id]
        # Skip quickly through this organization's jobs until one starts (backfill within the organization).
        started = False
        while cursor[org_id] < len(jobs):
            job = jobs[cursor[org_id]]
            cursor[org_id] += 1
            reason = _try_place(
                job,
                org,
                pools,
                live_pools,
                reserved,
                preemptible,
                result,
                allow_preemption,
                any_free,
                fair=total_slots * org.weight / total_weight if len(by_org) > 1 else math.inf,
            )
            if reason is None:
                started = True
                any_free = any(p.free > 0 for p in live_pools)
                break
            result.waiting[job.id] = reason
        if started and cursor[org_id] < len(jobs):
            heapq.heappush(heap, (key(org), org_id))
    result.reserved = {name: n for name, n in reserved.items() if n}
    return result


def _try_place(
    job: JobView,
    org: OrgView,
    pools: dict[str, PoolView],
    live_pools: list[PoolView],
    reserved: dict[str, int],
    preemptible: dict[str, list[AllocationView]],
    result: Plan,
    allow_preemption: bool,
    any_free: bool,
    *,
    fair: float,
) -> str | None:
    """Admit the job (append to result, update the views) or return why it waits."""
    if job.gpus > org.gpu_limit:
        return (
            f"quota: asks for {job.gpus} GPUs; the organization may hold at most {org.gpu_limit} "
            f"({org.nominal_gpus} nominal + {org.borrowing_limit_gpus} borrowed)"
        )
    if job.gpus and org.month_gpu_hours >= org.gpu_hours_per_month:
        return (
            f"quota: monthly GPU-hours used up ({org.month_gpu_hours:.1f} of {org.gpu_hours_per_month:g} h); "
            "waits for next month or a higher quota"
        )
    if job.gpus and org.used_gpus + job.gpus > org.gpu_limit:
        return (
            f"quota: the organization holds {org.used_gpus} of its {org.gpu_limit} concurrent GPUs; "
            f"this job needs {job.gpus} more"
        )
    borrowed = bool(job.gpus) and org.used_gpus + job.gpus > org.nominal_gpus
    if job.pool:
        candidates = [pools[job.pool]] if job.pool in pools else []
        if not candidates:
            return f"pool: no pool named {job.pool!r}"
        if not candidates[0].schedulable:
            return f"pool: pool {job.pool!r} is disabled or unhealthy"
    else:
        candidates = live_pools
    if org.allowed_pools:
        candidates = [p for p in candidates if p.name in org.allowed_pools]
        if not candidates:
            return "quota: none of the pools the organization may use is available"
    if not candidates:
        return "capacity: no pool is available"
    if all(slots_needed(job, p) > p.slots for p in candidates):
        biggest = max(p.slots for p in candidates)
        return f"capacity: needs {job.gpus} GPUs; the largest pool it may use has {biggest}"

    if any_free or job.gpus == 0:
        best: tuple[int, PoolView] | None = None
        for p in candidates:
            free = p.free - (reserved[p.name] if borrowed else 0)
            if _fits(job, p, free):
                left = free - slots_needed(job, p)
                if best is None or left < best[0]:
                    best = (left, p)  # best fit: keep big holes for big jobs
        if best is not None:
            pool = best[1]
            need = slots_needed(job, pool)
            pool.used_slots += need
            if job.gpus == 0 and not pool.cpu_slots:
                pool.used_cpus += job.cpus
            org.used_gpus += job.gpus
            org.used_slots += need
            result.admit.append(Admission(job.id, pool.name, job.gpus, need, job.cpus, borrowed))
            return None

    # It does not fit now. An owner within nominal may reclaim borrowed capacity.
    if allow_preemption and job.gpus and not borrowed:
        for p in candidates:
            victims = [a for a in preemptible[p.name] if a.org != org.id]
            need = slots_needed(job, p) - max(0, p.free - reserved[p.name])
            chosen, got = [], 0
            for a in victims:
                if got >= need:
                    break
                chosen.append(a)
                got += a.slots
            if chosen and got >= need:
                for a in chosen:
                    preemptible[p.name].remove(a)
                    result.preempt.append(a.id)
                reserved[p.name] += slots_needed(job, p)
                return (
                    f"capacity: reclaiming {got} borrowed GPUs in pool {p.name!r} "
                    f"({len(chosen)} jobs checkpoint and re-queue); starts when they stop"
                )
        for p in candidates:
            if reserved[p.name] and slots_needed(job, p) <= p.slots:
                return f"capacity: borrowed GPUs in pool {p.name!r} are being reclaimed; starts when freed"
    if org.used_slots >= fair:
        return (
            f"fair-share: the organization holds {org.used_slots} slots, above its fair share of "
            f"{fair:.1f}; others go first while capacity is short"
        )
    free = max((p.free for p in candidates), default=0)
    if borrowed and any(reserved[p.name] for p in candidates):
        return "capacity: free GPUs are held for owners reclaiming their nominal share"
    return f"capacity: needs {max(slots_needed(job, p) for p in candidates)} slots; at most {free} free now"


def decay(value: float, since: datetime, now: datetime, half_life_s: float) -> float:
    dt = max(0.0, (now - since).total_seconds())
    return value * 0.5 ** (dt / half_life_s) if half_life_s else 0.0


# ---------------------------------------------------------------------------------------------------------
# The database pass

SCHEDULER_LOCK = 0x0_7E_5C_4E_D0  # pg advisory lock key: one scheduling pass at a time, cluster-wide


@dataclass
class PassResult:
    admitted: list = field(default_factory=list)  # job ids
    preempted: list = field(default_factory=list)  # allocation ids
    waiting: dict = field(default_factory=dict)  # job id -> reason
    seconds: float = 0.0


def _load(now: datetime, *, lock: bool):
    from portal.models import Allocation, ComputePool, FairShareUsage, Job, Quota, UsageRecord
    from portal.services.usage import fair_share_half_life_s, month_start

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
            priority=j["priority"],
            created_at=j["created_at"].timestamp(),
            pool=j["pool"],
        )
        for j in Job.objects.filter(state=JobState.QUEUED).values(
            "id", "organization_id", "gpus", "priority", "created_at", "pool", cpus=F("spec__resources__cpus")
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
    return pool_rows, list(pools.values()), orgs, queued, allocs, half_life


def queue_plan(now: datetime | None = None) -> tuple[Plan, list[JobView]]:
    """The plan a pass would make now, read-only (no locks, no writes): the admin queue's explanations."""
    from django.utils import timezone

    now = now or timezone.now()
    _, pools, orgs, queued, allocs, half_life = _load(now, lock=False)
    return plan(pools, orgs, queued, allocs, half_life_s=half_life), queued


def schedule_pass(now: datetime | None = None) -> PassResult:
    """Admit what can start now; request preemption of borrowed capacity owners need. Safe to run anywhere,
    any number of times at once."""
    import time

    from django.db import connection, transaction
    from django.utils import timezone

    from portal.actors import Actor
    from portal.models import Allocation, Job
    from portal.services.jobs import job_transition
    from portal.services.supervision import allocation_preempt_request, enqueue

    started = time.perf_counter()
    actor = Actor.system("scheduler")
    result = PassResult()
    with transaction.atomic():
        with connection.cursor() as cur:
            cur.execute("SELECT pg_advisory_xact_lock(%s)", [SCHEDULER_LOCK])
        now = now or timezone.now()
        pool_rows, pools, orgs, queued, allocs, half_life = _load(now, lock=True)
        decided = plan(pools, orgs, queued, allocs, half_life_s=half_life)
        pool_by_name = {p.name: p for p in pool_rows}
        used_indices: dict[int, set[int]] = defaultdict(set)
        for pool_id, indices in Allocation.objects.filter(released_at__isnull=True).values_list(
            "pool_id", "gpu_indices"
        ):
            used_indices[pool_id].update(indices or [])
        for adm in decided.admit:
            # The job may have been cancelled since it was read: skip it (its slots stay free this pass).
            job = (
                Job.objects.select_for_update(skip_locked=True)
                .filter(pk=adm.job, state=JobState.QUEUED)
                .first()
            )
            if job is None:
                continue
            pool = pool_by_name[adm.pool]
            indices: list[int] = []
            if adm.gpus and not pool.cpu_slots:
                free = [i for i in range(pool.total_gpus) if i not in used_indices[pool.id]]
                indices = free[: adm.gpus]
                used_indices[pool.id].update(indices)
            alloc = Allocation.objects.create(
                job=job,
                pool=pool,
                attempt=job.attempt,
                gpus=adm.gpus,
                slots=adm.slots,
                cpus=adm.cpus,
                gpu_indices=indices,
                borrowed=adm.borrowed,
            )
            what = f"{adm.gpus} GPUs" if adm.gpus else f"{adm.cpus} CPUs"
            job_transition(
                job=job,
                to=JobState.ADMITTED,
                actor=actor,
                reason=f"admitted to pool {pool.name} ({what}{', borrowed' if adm.borrowed else ''})",
                data={"pool": pool.name, "gpus": adm.gpus, "borrowed": adm.borrowed, "allocation": alloc.pk},
            )
            Job.objects.filter(pk=job.pk).update(pool=pool.name)
            enqueue("workers.launch", alloc.pk, expires=300)
            result.admitted.append(job.pk)
        for alloc_id in decided.preempt:
            alloc = Allocation.objects.select_related("job").get(pk=alloc_id)
            allocation_preempt_request(
                alloc,
                reason="an organization within its nominal GPUs needs this borrowed capacity",
                actor=actor,
            )
            result.preempted.append(alloc_id)
        result.waiting = decided.waiting
    result.seconds = time.perf_counter() - started
    return result
