"""The scheduler's admission policy, pure: which queued jobs start now, where, and why the others wait.

Plain dataclasses in (pools, organizations with their quotas and usage, queued jobs, live allocations),
decisions out (``Plan``: admissions, preemptions, why each other job waits). No Django and no I/O: the
database pass (``portal.services.scheduler.schedule_pass``) builds these inputs from PostgreSQL and applies
the plan; the queue explanation (``portal.scheduling.explanation``) runs it read-only; ``bench/scheduler.py``
times it and ``tests/portal/test_scheduler_properties.py`` checks its invariants. An import-linter contract
in pyproject.toml keeps Django out of it.

Policy (in order):

1. **Quotas** per organization: concurrent GPUs (nominal ``max_gpus`` plus ``borrowing_limit_gpus``), monthly
   GPU-hours (UsageRecord of the current month), pools the organization may use.
2. **Weighted fair share**: each organization with demand gets a target, the capacity split by weight with
   water-filling (an organization asking for less keeps only what it asks; Kueue / Slurm fair tree), then
   corrected by its decayed past usage (history decays with a half-life, like Slurm's fair-share factor): one
   that held more than its share lately gets a lower cap, one that held less a higher one. Organizations
   fill up to their caps first, then the remainder goes one slot over the cap at a time to whoever is
   furthest below (largest remainder), then anything that fits: indivisible jobs and rounding even out over
   time instead of favouring the same tenants every pass.
3. **Priority** orders jobs *within* an organization (a tenant's priority never beats another tenant's share),
   then submission time.
4. **Backfill with reservations**: a job that cannot start is skipped, never waited on: every later job that
   fits still starts. So that a big job is not starved by a stream of small ones, a job that has waited
   ``OPENTINKER_RESERVE_AFTER_S`` reserves a pool (the head job of each organization, in fair-share order, one
   reservation per pool): the pool's free slots are held for it as they free up, smaller jobs backfill only
   onto what it does not need, and it starts as soon as enough of the pool's running jobs end.
5. **Borrowing**: above nominal GPUs an organization may borrow idle capacity up to its borrowing limit. Such
   allocations are marked ``borrowed``; when a job within its organization's nominal GPUs cannot fit, enough
   borrowed allocations in a pool are chosen for preemption (checkpoint, then re-queue) and the freed slots
   are held for the owner: no new borrowing goes into that pool while owners wait there. Fair share and
   reservations never override this: a job within nominal whose organization drains for it (rule 4) still
   reclaims borrowed capacity, and the free slots it needs are not lent meanwhile. Nor are the free slots
   owners within nominal can start on now (those a preemption just gave back): borrowers get what owners
   leave in the pass, never what they came back for (else borrow, preempt, borrow again, pass after pass).
"""

from __future__ import annotations

import dataclasses
import heapq
import math
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum


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
    ranks: int = 1  # trainer ranks: on a CPU-slot pool each takes a slot
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


class Why(StrEnum):
    """Why a queued job does not start: the kind of wait an admin acts on (the admin queue's ``category``)."""

    QUOTA = "quota"  # the organization's quota rules it out now (GPUs, GPU-hours, pools it may use)
    CAPACITY = "capacity"  # the pools it may use have no room (or owners are reclaiming what it would borrow)
    FAIR_SHARE = "fair-share"  # other organizations go first, or its organization drains for a long waiter
    POOL = "pool"  # the pool it names does not exist, or is disabled or unhealthy
    # Both sides of a reservation: slots of a pool are held for this long-waiting job (it starts as the rest
    # free up), or this job waits behind such a hold and may only backfill onto what it does not need.
    RESERVATION = "reservation"
    STARTING = "starting"  # this pass admits it

    @property
    def heading(self) -> str:
        """The word a reason starts with: a reservation is worded as the capacity wait it is."""
        return Why.CAPACITY.value if self is Why.RESERVATION else self.value


@dataclass(frozen=True)
class Wait:
    """Why one queued job waits: its category and the scheduler's sentence, kept apart so that nobody reads
    the category back out of the words."""

    category: Why
    sentence: str
    behind: object = None  # the long-waiting job it waits for (a drain or a reservation), if any

    def __str__(self) -> str:
        return f"{self.category.heading}: {self.sentence}"


STARTING = Wait(Why.STARTING, "admitted at the next scheduler pass")
# place() found no pool with room: try_place() says which kind of capacity wait it is.
_NO_ROOM = Wait(Why.CAPACITY, "no pool has room now")


@dataclass
class Plan:
    admit: list[Admission] = field(default_factory=list)
    preempt: list[object] = field(default_factory=list)  # AllocationView ids
    # Why each queued job that does not start waits.
    waiting: dict[object, Wait] = field(default_factory=dict)
    # Free or reclaimed slots per pool held for organizations within nominal: no borrowing goes there.
    reserved: dict[str, int] = field(default_factory=dict)
    # Slots held for a long-waiting job, per pool: pool -> (job id, slots held). Nobody else takes them.
    held: dict[str, tuple[object, int]] = field(default_factory=dict)


# Past usage corrects the fair share: an organization that held more than its share lately (a big job is
# indivisible, integers round) gets a lower cap until its decayed average is back in line, one that held
# less gets a higher one. The gain sets how fast: with 1 a weight-1 tenant entitled to 3.79 GPUs held 4 for
# hours; 6 brings every time-averaged share within 2% in bench/scheduler.py (3: 3%, 12: 1.5%).
HISTORY_GAIN = 6.0
# Fair-share phases: first every organization fills up to its cap, then up to one, two, ... slots over it
# (rounding: the organization furthest below its cap goes first), then anything that fits (work-conserving).
SLACKS = (0.0, 1.0, 2.0, 4.0, 8.0, math.inf)
LN2 = math.log(2)


def slots_needed(job: JobView, pool: PoolView) -> int:
    if job.gpus:
        return job.gpus  # a GPU per trainer rank (and rollout worker) is in the spec's gpus already
    return job.ranks if pool.cpu_slots else 0


def _fits(job: JobView, pool: PoolView, free: int) -> bool:
    need = slots_needed(job, pool)
    if need > free:
        return False
    if not pool.cpu_slots and job.gpus == 0:  # a CPU-only job on a GPU pool: bounded by the pool's CPUs
        return pool.used_cpus + job.cpus <= pool.cpus
    return True


def fair_targets(weights: dict[int, float], demand: dict[int, float], capacity: float) -> dict[int, float]:
    """Weighted max-min fair shares (water-filling, as Kueue and Slurm's fair tree split a cluster): the
    capacity is split by weight; an organization asking for less than its split gets what it asks and the rest
    is split again among the others. Fractional: the caller rounds by taking turns."""
    targets: dict[int, float] = {}
    active = {o: w for o, w in weights.items() if demand.get(o, 0) > 0 and w > 0}
    left = float(capacity)
    while active:
        rate = left / sum(active.values())
        capped = [o for o, w in active.items() if demand[o] <= rate * w]
        if not capped:
            targets.update({o: rate * w for o, w in active.items()})
            break
        for o in capped:
            targets[o] = float(demand[o])
            left -= demand[o]
            del active[o]
    return targets


def fair_caps(
    orgs: dict[int, OrgView],
    by_org: dict[int, list[JobView]],
    live_pools: list[PoolView],
    half_life_s: float,
) -> tuple[dict[int, float], dict[int, float]]:
    """How many slots each organization should hold now: its weighted fair target among the organizations
    with demand (running or queued), and its cap: the target corrected by how far its decayed recent usage
    is from it."""
    cpu_pool = any(p.cpu_slots for p in live_pools)
    demand: dict[int, float] = {}
    for o in set(by_org) | {o.id for o in orgs.values() if o.used_slots}:
        org = orgs[o]
        jobs = by_org.get(o, ())
        gpus = sum(j.gpus for j in jobs)
        cpu_only = sum(j.ranks for j in jobs if not j.gpus) if cpu_pool else 0  # a CPU slot per rank
        demand[o] = org.used_slots + min(gpus, max(0, org.gpu_limit - org.used_gpus)) + cpu_only
    capacity = sum(p.slots for p in live_pools)
    targets = fair_targets({o: orgs[o].weight for o in demand}, demand, capacity)
    if not half_life_s:
        return targets, targets
    # Recent average slots held: decayed slot-seconds of a steady holding s converge to s * half-life / ln 2.
    recent = {o: orgs[o].decayed_slot_seconds * LN2 / half_life_s for o in targets}
    total_recent, total_target = sum(recent.values()), sum(targets.values())
    if total_recent <= 0 or total_target <= 0:
        return targets, targets  # no history (a fresh fleet): the targets as they are
    caps = {}
    for o, t in targets.items():
        expected = total_recent * t / total_target  # what a fair past would have given it
        caps[o] = min(demand[o], max(0.0, t + HISTORY_GAIN * (expected - recent[o])))
    return targets, caps


def plan(
    pools: Iterable[PoolView],
    orgs: Iterable[OrgView],
    queued: Iterable[JobView],
    allocations: Iterable[AllocationView] = (),
    *,
    half_life_s: float = 7 * 86400,
    allow_preemption: bool = True,
    now: float = 0.0,
    reserve_after_s: float = math.inf,
) -> Plan:
    """One scheduling pass. Mutates nothing it is given; O(jobs x pools x phases).

    ``now`` and ``reserve_after_s`` (same clock as ``JobView.created_at``): a job waiting that long may
    reserve capacity in a pool (see ``_reserve``)."""
    pool_views = {p.name: dataclasses.replace(p) for p in pools}  # copies: the pass updates them
    org_views = {o.id: dataclasses.replace(o) for o in orgs}
    result = Plan()

    by_org: dict[int, list[JobView]] = defaultdict(list)
    for job in queued:
        if job.org in org_views:
            by_org[job.org].append(job)
        else:
            result.waiting[job.id] = Wait(Why.QUOTA, "the organization has no quota")
    for jobs in by_org.values():
        jobs.sort(key=lambda j: (-j.priority, j.created_at, str(j.id)))

    live_pools = [p for p in pool_views.values() if p.schedulable]
    ctx = _Pass(pool_views, live_pools, result, allow_preemption)
    for a in allocations:
        if a.borrowed and not a.preempting:
            ctx.preemptible[a.pool].append(a)
        if a.preempting:
            ctx.reserved[a.pool] += a.slots  # coming back soon: keep it for owners
    for lst in ctx.preemptible.values():
        lst.sort(key=lambda a: -a.admitted_at)  # newest borrowers first: least work lost

    targets, caps = fair_caps(org_views, by_org, live_pools, half_life_s)
    contended = len(by_org) > 1

    def key(o: OrgView) -> float:
        # The organization furthest below its cap goes first, in slots: rounding by largest remainder
        # (Hamilton), so with the history correction each one's time-averaged share converges to its target.
        return o.used_slots - caps.get(o.id, 0.0)

    admitted: set[object] = set()
    ctx.hold_for_owners(org_views, by_org)
    _reserve(ctx, org_views, by_org, targets, caps, now, reserve_after_s, admitted)

    def phase(slack: float, *, skip: Iterable[object] = ()) -> None:
        final = slack == math.inf
        heap = [(key(org_views[o]), o) for o in by_org]
        heapq.heapify(heap)
        cursor = dict.fromkeys(by_org, 0)
        while heap:
            _, org_id = heapq.heappop(heap)
            org, jobs = org_views[org_id], by_org[org_id]
            limit = caps.get(org_id, 0.0) + slack if contended else math.inf
            started = False
            # Skip through this organization's jobs until one starts (backfill within the organization).
            # Within a phase what did not fit stays unfit (capacity only shrinks), so one scan per phase.
            while cursor[org_id] < len(jobs):
                job = jobs[cursor[org_id]]
                cursor[org_id] += 1
                if job.id in admitted or job.id in ctx.holders or job.id in skip:
                    continue
                if ctx.draining.get(org_id, job.id) != job.id:
                    drain = ctx.draining[org_id]
                    starts = " (it fits)" if drain in admitted else ""
                    result.waiting[job.id] = _drain_wait(drain, starts=starts)
                    continue
                if not final:
                    if org.used_slots + max(job.gpus, job.ranks) > limit + 1e-9:
                        continue
                    if ctx.place(job, org) is None:
                        started = True
                        break
                    continue
                reason = ctx.try_place(job, org, fair=caps.get(org_id, 0.0) if contended else math.inf)
                if reason is None:
                    started = True
                    break
                result.waiting[job.id] = reason
            if started:
                admitted.add(job.id)
                result.waiting.pop(job.id, None)
                if cursor[org_id] < len(jobs):
                    heapq.heappush(heap, (key(org), org_id))

    for slack in SLACKS:
        phase(slack)
    if ctx.owner_blocked:
        # Owners had their turn; what they did not take (one lost it to another owner, one waits on a drain)
        # is lent after all: the pass stays work-conserving.
        ctx.for_owners.clear()
        phase(math.inf, skip=ctx.claimed)  # an owner that already had borrowed jobs preempted keeps its wait
    ctx.finish_drained(admitted)
    for job_id in ctx.holders:
        result.waiting.setdefault(job_id, ctx.holder_reason[job_id])
    result.reserved = {name: n for name, n in ctx.reserved.items() if n}
    result.held = {name: (job, n) for name, (job, n) in ctx.held.items()}
    return result


def _drain_wait(drain: object, *, starts: str = "") -> Wait:
    """Why a job waits while its organization drains for its long-waiting job ``drain`` (``starts``: how
    that job starts in this pass, if it does)."""
    starts = f" it starts now{starts}," if starts else ""
    return Wait(
        Why.FAIR_SHARE,
        f"the organization drains for its job {drain} that has waited long;{starts} its other jobs start "
        "after it",
        behind=drain,
    )


def _reserve(
    ctx: _Pass,
    orgs: dict[int, OrgView],
    by_org: dict[int, list[JobView]],
    targets: dict[int, float],
    caps: dict[int, float],
    now: float,
    reserve_after_s: float,
    admitted: set[object],
) -> None:
    """Backfill with reservations (Slurm's idea, counted in waiting time). Each organization puts forward
    its head job among those that have waited ``reserve_after_s``; in fair-share order, each takes one pool
    (at most one reservation per pool): it starts now if it fits, else it holds what is free there for
    itself, and holds more as jobs there finish, until it fits. Other jobs backfill only onto what it does
    not need, so a big job is never starved by a stream of small ones.

    A job bigger than its organization's fair share (a weight-1 tenant's 8-GPU job on a busy fleet) would
    never fit within it: its organization drains instead (none of its other jobs start) and the job
    reserves once the organization holds nothing, having saved up the credit its history then pays back."""
    if reserve_after_s == math.inf:
        return
    heads = []
    for org_id, jobs in by_org.items():
        org = orgs[org_id]
        for j in jobs:
            if now - j.created_at >= reserve_after_s and not isinstance(ctx.eligible(j, org), Wait):
                heads.append(
                    (org.used_slots - caps.get(org_id, 0.0), -j.priority, j.created_at, str(j.id), j)
                )
                break
    heads.sort(key=lambda t: t[:4])

    def drains(job: JobView) -> bool:
        org, cap = orgs[job.org], caps.get(job.org, 0.0)
        return max(job.gpus, job.ranks) > cap + 1 and bool(org.used_slots or cap < targets.get(job.org, 0.0))

    # Organizations that drain first: what their owners claim (reclaimed or kept free slots) is settled
    # before any other head job may borrow.
    heads.sort(key=lambda t: not drains(t[-1]))
    for below, *_, job in heads:
        org = orgs[job.org]
        need = max(job.gpus, job.ranks)
        if need > caps.get(org.id, 0.0) + 1:  # bigger than its share
            ctx.draining[org.id] = job.id
            # It reserves once drained and once the organization's recent usage is no longer above its fair
            # share (the history correction leaves its cap at or above its target): big jobs back to back
            # would take a small tenant far over its share.
            if org.used_slots or caps.get(org.id, 0.0) < targets.get(org.id, 0.0):
                ctx.holders.add(job.id)
                ctx.holder_reason[job.id] = Wait(
                    Why.FAIR_SHARE,
                    f"needs {need} slots, more than the organization's fair share of "
                    f"{caps.get(org.id, 0.0):.1f}; waited {now - job.created_at:.0f} s, so the organization "
                    f"drains for it (holds {org.used_slots}; its other jobs wait) and it reserves once "
                    "drained and its recent usage is back to its share",
                )
                ctx.drained[job.id] = (job, org, "", 0)  # starts at the end on what nobody else took
                # The fair share decides between owners; it never makes an owner wait for what others only
                # borrowed: a job within its organization's nominal GPUs still reclaims borrowed capacity.
                candidates, borrowed = ctx.eligible_pools(job, org)
                if job.gpus and not borrowed:
                    ctx.claim_for_owner(job, org, candidates)
                continue
        elif below >= 0:
            continue  # at its fair share: its turn comes when it is below again
        if len(ctx.held) >= len(ctx.live_pools):
            continue
        candidates, borrowed = ctx.eligible_pools(job, org)
        open_pools = [p for p in candidates if p.name not in ctx.held and slots_needed(job, p) <= p.slots]
        if not open_pools:
            continue
        pool = max(open_pools, key=lambda p: (ctx.free_for(job, p, borrowed), -p.slots))
        need = slots_needed(job, pool)
        reason = ctx.try_place(job, org, fair=math.inf)
        if reason is None:
            admitted.add(job.id)
            continue
        if job.id in ctx.reclaiming:  # it waits on borrowed capacity being reclaimed: held for owners already
            ctx.holders.add(job.id)
            ctx.holder_reason[job.id] = reason
            continue
        if not need:
            continue
        # A borrower's reservation holds no slots owners can start on now.
        free = ctx.free_for(job, pool, borrowed) - (ctx.for_owners[pool.name] if borrowed else 0)
        hold = max(0, min(need, free))
        ctx.held[pool.name] = (job.id, hold)
        ctx.holders.add(job.id)
        ctx.holder_reason[job.id] = Wait(
            Why.RESERVATION,
            f"reserved for this job after waiting {now - job.created_at:.0f} s: {hold} of its {need} slots "
            f"held in pool {pool.name!r}; smaller jobs backfill only onto the rest; it starts when "
            f"{need - hold} more are freed there",
        )


class _Pass:
    """The mutable state of one pass: pool and organization views, held and reserved slots, the plan."""

    def __init__(
        self, pools: dict[str, PoolView], live_pools: list[PoolView], result: Plan, allow_preemption: bool
    ) -> None:
        self.pools = pools
        self.live_pools = live_pools
        self.result = result
        self.allow_preemption = allow_preemption
        # Slots held for owners waiting on preemption: borrowing may not take them.
        self.reserved: dict[str, int] = defaultdict(int)
        self.preemptible: dict[str, list[AllocationView]] = defaultdict(list)
        # Slots held for one long-waiting job per pool (pool -> (job, slots)): nobody else may take them.
        self.held: dict[str, tuple[object, int]] = {}
        self.holders: set[object] = set()
        # Organizations draining for a long-waiting job bigger than their share: org -> that job.
        self.draining: dict[int, object] = {}
        self.holder_reason: dict[object, Wait] = {}
        # Jobs whose wait is about borrowed capacity being reclaimed (an owner's, for it; a borrower's, held
        # for owners): the slots are held for owners already, so they reserve nothing.
        self.reclaiming: set[object] = set()
        # Free slots per pool that owners' jobs (within their nominal GPUs) can start on now, and each such
        # job's share (job -> (pool, slots)): no borrowing takes them while those owners have their turn.
        self.for_owners: dict[str, int] = defaultdict(int)
        self.owner_slots: dict[object, tuple[str, int]] = {}
        self.owner_blocked = False  # a borrower did not fit because of them: lend what owners leave
        self.claimed: set[object] = set()  # owners' jobs for which this pass preempts borrowed allocations
        # Jobs their organizations drain for, with the free slots an owner's keeps from borrowing:
        # job id -> (job, org, pool, slots).
        self.drained: dict[object, tuple[JobView, OrgView, str, int]] = {}

    def free_for(self, job: JobView, p: PoolView, borrowed: bool) -> int:
        free = p.free - (self.reserved[p.name] if borrowed else 0)
        holder = self.held.get(p.name)
        if holder is not None and holder[0] != job.id:
            free -= holder[1]
        return free

    def eligible(self, job: JobView, org: OrgView) -> tuple[list[PoolView], bool] | Wait:
        """The pools the job may use and whether it would borrow, or why quota or pools rule it out."""
        if job.gpus > org.gpu_limit:
            return Wait(
                Why.QUOTA,
                f"asks for {job.gpus} GPUs; the organization may hold at most {org.gpu_limit} "
                f"({org.nominal_gpus} nominal + {org.borrowing_limit_gpus} borrowed)",
            )
        if job.gpus and org.month_gpu_hours >= org.gpu_hours_per_month:
            return Wait(
                Why.QUOTA,
                f"monthly GPU-hours used up ({org.month_gpu_hours:.1f} of {org.gpu_hours_per_month:g} h); "
                "waits for next month or a higher quota",
            )
        if job.pool:
            candidates = [self.pools[job.pool]] if job.pool in self.pools else []
            if not candidates:
                return Wait(Why.POOL, f"no pool named {job.pool!r}")
            if not candidates[0].schedulable:
                return Wait(Why.POOL, f"pool {job.pool!r} is disabled or unhealthy")
        else:
            candidates = self.live_pools
        if org.allowed_pools:
            candidates = [p for p in candidates if p.name in org.allowed_pools]
            if not candidates:
                return Wait(Why.QUOTA, "none of the pools the organization may use is available")
        if not candidates:
            return Wait(Why.CAPACITY, "no pool is available")
        if all(slots_needed(job, p) > p.slots for p in candidates):
            biggest = max(p.slots for p in candidates)
            if job.gpus:
                return Wait(Why.CAPACITY, f"needs {job.gpus} GPUs; the largest pool it may use has {biggest}")
            return Wait(
                Why.CAPACITY,
                f"needs {job.ranks} CPU slots (a slot per trainer rank); the largest pool it may use has "
                f"{biggest}",
            )
        # What changes from pass to pass comes last: the permanent reasons above explain a wait better.
        if job.gpus and org.used_gpus + job.gpus > org.gpu_limit:
            return Wait(
                Why.QUOTA,
                f"the organization holds {org.used_gpus} of its {org.gpu_limit} concurrent GPUs; "
                f"this job needs {job.gpus} more",
            )
        borrowed = bool(job.gpus) and org.used_gpus + job.gpus > org.nominal_gpus
        return candidates, borrowed

    def eligible_pools(self, job: JobView, org: OrgView) -> tuple[list[PoolView], bool]:
        """``eligible`` where the caller knows it passes: it passed earlier in this pass and none of the
        organization's jobs has started since (quotas and pools do not change within a pass)."""
        eligible = self.eligible(job, org)
        if isinstance(eligible, Wait):
            raise AssertionError(f"job {job.id} was eligible earlier in this pass: {eligible}")
        return eligible

    def hold_for_owners(self, orgs: dict[int, OrgView], by_org: dict[int, list[JobView]]) -> None:
        """Rule 5 holds when borrowed capacity comes back, too: once a preempted borrower's slots are free,
        its organization (below its fair share) would take them again before the owner that reclaimed them
        (above its share, so it goes later) and be preempted again, pass after pass, the owner never
        starting. So the free slots owners' jobs within their nominal GPUs can start on now are kept from
        borrowing while owners have their turn (best fit, each organization's jobs in its order)."""
        free = {p.name: p.free for p in self.live_pools if p.free > 0}
        for org_id, jobs in by_org.items():
            org = orgs[org_id]
            headroom = org.nominal_gpus - org.used_gpus
            for job in jobs:
                if not free:
                    return  # a full fleet (the steady state): nothing to keep
                if not job.gpus or job.gpus > headroom or job.gpus > max(free.values()):
                    continue
                eligible = self.eligible(job, org)
                if isinstance(eligible, Wait) or eligible[1]:
                    continue
                best: tuple[int, PoolView] | None = None
                for p in eligible[0]:
                    left = free.get(p.name, 0)
                    if _fits(job, p, left) and (best is None or left < best[0]):
                        best = (left, p)
                if best is not None:
                    pool = best[1].name
                    self.for_owners[pool] += job.gpus
                    self.owner_slots[job.id] = (pool, job.gpus)
                    headroom -= job.gpus
                    free[pool] -= job.gpus
                    if free[pool] <= 0:
                        del free[pool]

    def place(self, job: JobView, org: OrgView) -> Wait | None:
        """Admit the job where it fits best (append to the plan, update the views), or say why it waits
        (``_NO_ROOM`` where no pool has room: ``try_place`` tells which capacity wait that is)."""
        eligible = self.eligible(job, org)
        if isinstance(eligible, Wait):
            return eligible
        candidates, borrowed = eligible
        best: tuple[int, PoolView] | None = None
        for p in candidates:
            free = self.free_for(job, p, borrowed)
            if borrowed and self.for_owners[p.name] and _fits(job, p, free):
                free -= self.for_owners[p.name]  # owners start there first
                self.owner_blocked = self.owner_blocked or not _fits(job, p, free)
            if _fits(job, p, free):
                left = free - slots_needed(job, p)
                if best is None or left < best[0]:
                    best = (left, p)  # best fit: keep big holes for big jobs
        if best is None:
            return _NO_ROOM
        pool = best[1]
        need = slots_needed(job, pool)
        pool.used_slots += need
        if job.gpus == 0 and not pool.cpu_slots:
            pool.used_cpus += job.cpus
        org.used_gpus += job.gpus
        org.used_slots += need
        holder = self.held.get(pool.name)
        if holder is not None and holder[0] == job.id:  # the reservation is used up
            del self.held[pool.name]
            self.holders.discard(job.id)
        if job.id in self.owner_slots:  # an owner started: what was kept for it may be lent again
            kept_in, n = self.owner_slots.pop(job.id)
            self.for_owners[kept_in] = max(0, self.for_owners[kept_in] - n)
        self.result.admit.append(Admission(job.id, pool.name, job.gpus, need, job.cpus, borrowed))
        return None

    def lent(self, org: OrgView, p: PoolView) -> int:
        """Slots other organizations hold on loan in the pool (borrowed, not already being preempted)."""
        return sum(a.slots for a in self.preemptible[p.name] if a.org != org.id)

    def reclaim(self, job: JobView, org: OrgView, candidates: list[PoolView]) -> Wait | None:
        """For an owner's job (within its organization's nominal GPUs) that does not fit: choose enough
        borrowed allocations of other organizations in one pool to make room, ask their preemption and hold
        the slots for owners. Returns the wait reason, or None where no pool has enough on loan."""
        for p in candidates:
            need = slots_needed(job, p) - max(0, self.free_for(job, p, True))
            chosen, got = [], 0
            for a in self.preemptible[p.name]:
                if got >= need:
                    break
                if a.org != org.id:
                    chosen.append(a)
                    got += a.slots
            if chosen and got >= need:
                for a in chosen:
                    self.preemptible[p.name].remove(a)
                    self.result.preempt.append(a.id)
                self.reserved[p.name] += slots_needed(job, p)
                self.reclaiming.add(job.id)
                self.claimed.add(job.id)
                return Wait(
                    Why.CAPACITY,
                    f"reclaiming {got} borrowed GPUs in pool {p.name!r} ({len(chosen)} jobs checkpoint and "
                    "re-queue); starts when they stop",
                )
        return None

    def claim_for_owner(self, job: JobView, org: OrgView, candidates: list[PoolView]) -> None:
        """A job within its organization's nominal GPUs that fair share holds back (its organization drains
        for it) still owns the capacity others only borrow. In the pool where it is closest to fitting:
        if reclaiming borrowed slots makes it fit, they are preempted; otherwise the free slots it needs
        there are kept from new borrowing (an owner waits there, so the pool is not idle), or borrowers
        would take them, be preempted for it and take them again, pass after pass. Owners still take those
        slots by fair share; ``finish_drained`` starts the job on what nobody else took."""
        pools = [p for p in candidates if slots_needed(job, p) <= p.slots]
        if not pools:
            return
        pool = max(pools, key=lambda p: (max(0, self.free_for(job, p, True)) + self.lent(org, p), -p.slots))
        need, free = slots_needed(job, pool), max(0, self.free_for(job, pool, True))
        if free < need <= free + self.lent(org, pool) and self.allow_preemption:
            reclaiming = self.reclaim(job, org, [pool])  # enough is on loan there: never None
            if reclaiming is not None:
                self.holder_reason[job.id] = reclaiming
            del self.drained[job.id]  # it starts once they stop
            return
        hold = min(need, free)
        self.reserved[pool.name] += hold
        self.drained[job.id] = (job, org, pool.name, hold)
        if hold:
            why = self.holder_reason[job.id]
            self.holder_reason[job.id] = dataclasses.replace(
                why,
                sentence=f"{why.sentence}; {hold} free slots in pool {pool.name!r} are not lent to other "
                "organizations meanwhile",
            )

    def finish_drained(self, admitted: set[object]) -> None:
        """After every other job had its turn, a job its organization drains for starts on what is still
        free (the pass is work-conserving: nobody else could use it); otherwise an owner's keeps its slots
        from borrowing."""
        for job, org, pool, hold in self.drained.values():
            self.reserved[pool] -= hold
            if self.place(job, org) is None:
                admitted.add(job.id)
                self.holders.discard(job.id)
                started = _drain_wait(job.id, starts=" on capacity nobody else could use")
                for job_id, why in self.result.waiting.items():
                    if why.category == Why.FAIR_SHARE and why.behind == job.id:
                        self.result.waiting[job_id] = started
            else:
                self.reserved[pool] += hold

    def try_place(self, job: JobView, org: OrgView, *, fair: float) -> Wait | None:
        """Admit the job, or reclaim borrowed capacity for it, or return why it waits."""
        reason = self.place(job, org)
        if reason is not _NO_ROOM:
            return reason
        candidates, borrowed = self.eligible_pools(job, org)
        reserved = self.reserved
        # It does not fit now. An owner within nominal may reclaim borrowed capacity.
        if self.allow_preemption and job.gpus and not borrowed:
            reclaiming = self.reclaim(job, org, candidates)
            if reclaiming is not None:
                return reclaiming
            for p in candidates:
                if reserved[p.name] and slots_needed(job, p) <= p.slots:
                    self.reclaiming.add(job.id)
                    return Wait(
                        Why.CAPACITY,
                        f"borrowed GPUs in pool {p.name!r} are being reclaimed; starts when freed",
                    )
        for p in candidates:
            holder = self.held.get(p.name)
            if holder and holder[1] and p.free >= slots_needed(job, p):
                return Wait(
                    Why.RESERVATION,
                    f"{holder[1]} free slots in pool {p.name!r} are reserved for a job that has waited long; "
                    "this one backfills onto what the reservation does not need",
                    behind=holder[0],
                )
        if org.used_slots >= fair:
            return Wait(
                Why.FAIR_SHARE,
                f"the organization holds {org.used_slots} slots, above its fair share of {fair:.1f}; others "
                "go first while capacity is short",
            )
        free = max((p.free for p in candidates), default=0)
        if borrowed and any(reserved[p.name] or self.for_owners[p.name] for p in candidates):
            self.reclaiming.add(job.id)  # it waits on the owners' reclaim too: no reservation for it
            return Wait(Why.CAPACITY, "free GPUs are held for owners reclaiming their nominal share")
        return Wait(
            Why.CAPACITY,
            f"needs {max(slots_needed(job, p) for p in candidates)} slots; at most {free} free now",
        )


def decay(value: float, since: datetime, now: datetime, half_life_s: float) -> float:
    dt = max(0.0, (now - since).total_seconds())
    return value * 0.5 ** (dt / half_life_s) if half_life_s else 0.0
