"""Property-based tests (hypothesis) of the scheduler's pure core, ``plan()``.

Invariants, over random pools, quotas, queues and running allocations, and over repeated passes where the
plan is applied (admissions become allocations, preempted allocations are re-queued):

- never over capacity (per pool) nor over quota (per organization: nominal + borrowing, monthly GPU-hours);
- no starvation behind a big job: after a pass, no waiting job would fit in the capacity left within its
  quota (backfill is complete, whatever the order);
- borrowed capacity is given back: once passes settle, no organization waits within its nominal GPUs for
  capacity that other organizations hold on loan in a pool where its job fits;
- admission never preempts: only jobs of organizations above nominal are chosen, never the claimant's own.
"""

from __future__ import annotations

import itertools

from hypothesis import given, settings
from hypothesis import strategies as st

from portal.services.scheduler import AllocationView, JobView, OrgView, PoolView, plan, slots_needed

ids = itertools.count()


@st.composite
def worlds(draw):
    pools = [
        PoolView(name=f"p{i}", slots=draw(st.integers(0, 16)), cpu_slots=draw(st.booleans()), cpus=64)
        for i in range(draw(st.integers(1, 3)))
    ]
    orgs = [
        OrgView(
            id=i,
            nominal_gpus=draw(st.integers(0, 12)),
            borrowing_limit_gpus=draw(st.integers(0, 12)),
            weight=draw(st.sampled_from([0.5, 1.0, 2.0, 5.0])),
            month_gpu_hours=draw(st.sampled_from([0.0, 0.0, 200.0])),
            gpu_hours_per_month=100.0,
            allowed_pools=frozenset(draw(st.sets(st.sampled_from([p.name for p in pools]), max_size=2))),
        )
        for i in range(draw(st.integers(1, 4)))
    ]
    jobs = [
        JobView(
            id=next(ids),
            org=draw(st.integers(0, len(orgs) - 1)),
            gpus=draw(st.sampled_from([0, 1, 1, 2, 4, 8, 20])),
            priority=draw(st.integers(-1, 1)),
            created_at=float(n),
            pool=draw(st.sampled_from(["", "", "", "p0"])),
        )
        for n in range(draw(st.integers(0, 30)))
    ]
    return pools, orgs, jobs


def check_plan(pools, orgs, queued, allocs, result):
    pool_by = {p.name: p for p in pools}
    org_by = {o.id: o for o in orgs}
    job_by = {j.id: j for j in queued}
    preempting = set(result.preempt)
    # Capacity and quota after the pass.
    used = {p.name: sum(a.slots for a in allocs if a.pool == p.name) for p in pools}
    gpus = {o.id: sum(a.gpus for a in allocs if a.org == o.id) for o in orgs}
    for adm in result.admit:
        job = job_by[adm.job]
        org = org_by[job.org]
        pool = pool_by[adm.pool]
        assert adm.slots == slots_needed(job, pool)
        assert not job.pool or job.pool == adm.pool
        assert not org.allowed_pools or adm.pool in org.allowed_pools
        if job.gpus:
            assert org.month_gpu_hours < org.gpu_hours_per_month
        used[adm.pool] += adm.slots
        gpus[job.org] += job.gpus
        assert adm.borrowed == (job.gpus > 0 and gpus[job.org] > org.nominal_gpus)
    for p in pools:
        assert used[p.name] <= p.slots, "over capacity"
    for o in orgs:
        assert gpus[o.id] <= max(o.gpu_limit, sum(a.gpus for a in allocs if a.org == o.id)), "over quota"
    # Every queued job is either admitted or has a reason.
    admitted = {a.job for a in result.admit}
    assert admitted.isdisjoint(result.waiting)
    assert admitted | set(result.waiting) == set(job_by)
    # Only borrowed allocations are preempted.
    for a in allocs:
        if a.id in preempting:
            assert a.borrowed and not a.preempting
    # Backfill complete: no waiting job fits the capacity left, within its quota.
    # What the plan holds for owners: at most the slots coming back plus what the claimants need.
    reserved = {p.name: result.reserved.get(p.name, 0) for p in pools}
    claim = sum(
        job_by[j].gpus for j in result.waiting if result.waiting[j].startswith("capacity: reclaiming")
    )
    for p in pools:
        back = sum(a.slots for a in allocs if a.pool == p.name and (a.preempting or a.id in preempting))
        assert reserved[p.name] <= back + claim
    for job_id in result.waiting:
        job = job_by[job_id]
        org = org_by[job.org]
        if job.gpus and (
            org.month_gpu_hours >= org.gpu_hours_per_month or gpus[org.id] + job.gpus > org.gpu_limit
        ):
            continue
        borrowed = job.gpus > 0 and gpus[org.id] + job.gpus > org.nominal_gpus
        for p in pools:
            if (job.pool and p.name != job.pool) or (org.allowed_pools and p.name not in org.allowed_pools):
                continue
            free = p.slots - used[p.name] - (reserved[p.name] if borrowed else 0)
            fits = slots_needed(job, p) <= free
            assert not fits, f"job {job} waits ({result.waiting[job_id]}) but fits pool {p.name}"


@settings(max_examples=200, deadline=None)
@given(worlds())
def test_single_pass_invariants(world):
    pools, orgs, jobs = world
    result = plan(pools, orgs, jobs)
    check_plan(pools, orgs, jobs, [], result)
    assert result.preempt == []  # nothing is running: nothing to preempt


@settings(max_examples=80, deadline=None)
@given(worlds(), st.randoms(use_true_random=False))
def test_repeated_passes_with_completions_and_preemption(world, rnd):
    pools, orgs, queue = world
    allocs: list[AllocationView] = []
    org_by = {o.id: o for o in orgs}
    rounds = 12
    for round_ in range(rounds):
        for a in allocs:  # what the database pass does: the views carry what is in use
            a.admitted_at = a.admitted_at or float(round_)
        live_pools = [
            PoolView(p.name, p.slots, sum(a.slots for a in allocs if a.pool == p.name), p.cpu_slots, p.cpus)
            for p in pools
        ]
        live_orgs = [
            OrgView(
                **{
                    **o.__dict__,
                    "used_gpus": sum(a.gpus for a in allocs if a.org == o.id),
                    "used_slots": sum(a.slots for a in allocs if a.org == o.id),
                }
            )
            for o in orgs
        ]
        result = plan(live_pools, live_orgs, queue, allocs)
        check_plan(pools, live_orgs, queue, allocs, result)
        job_by = {j.id: j for j in queue}
        for adm in result.admit:
            job = job_by[adm.job]
            allocs.append(
                AllocationView(
                    next(ids),
                    job.id,
                    job.org,
                    adm.pool,
                    adm.gpus,
                    adm.slots,
                    adm.borrowed,
                    admitted_at=float(round_),
                )
            )
        queue = [j for j in queue if j.id not in {a.job for a in result.admit}]
        if round_ == rounds - 1:
            break
        # Preempted runtimes checkpoint and stop: their jobs go back to the queue.
        preempted = set(result.preempt)
        for a in allocs:
            if a.id in preempted:
                a.preempting = True
        if round_ % 2:
            for a in [a for a in allocs if a.preempting]:
                allocs.remove(a)
                queue.append(JobView(a.job, a.org, a.gpus, created_at=1000.0 + round_))
        # Now and then an unborrowed job finishes (only in the first rounds, so that passes settle).
        if round_ < 4 and allocs and rnd.random() < 0.5:
            allocs.remove(rnd.choice(allocs))
    # Settled (no preemption in flight or asked): borrowed capacity was given back to waiting owners.
    if result.preempt or any(a.preempting for a in allocs):
        return
    for job in queue:
        org = org_by[job.org]
        used_gpus = sum(a.gpus for a in allocs if a.org == org.id)
        if (
            not job.gpus
            or used_gpus + job.gpus > org.nominal_gpus
            or org.month_gpu_hours >= org.gpu_hours_per_month
        ):
            continue
        for p in pools:
            if (job.pool and p.name != job.pool) or (org.allowed_pools and p.name not in org.allowed_pools):
                continue
            free = p.slots - sum(a.slots for a in allocs if a.pool == p.name)
            lent = sum(a.slots for a in allocs if a.pool == p.name and a.borrowed and a.org != org.id)
            assert slots_needed(job, p) > free + lent, f"{job} waits though {lent} borrowed slots in {p.name}"
