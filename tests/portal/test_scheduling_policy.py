"""The scheduler's pure policy (``portal.scheduling.policy``) on small hand-made situations, with the exact
decisions expected: quota limits, fair-share order, backfill, placement by capacity, borrowing. No database,
no Django: the policy is plain data in, a plan out (and ``bench/scheduler.py`` runs without Django at all)."""

from __future__ import annotations

import copy
import math
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from portal.scheduling.policy import (
    Admission,
    AllocationView,
    JobView,
    OrgView,
    PoolView,
    Wait,
    Why,
    decay,
    fair_caps,
    fair_targets,
    plan,
)

ROOT = Path(__file__).resolve().parents[2]


def admitted(result) -> list[tuple[object, str]]:
    return [(a.job, a.pool) for a in result.admit]


# --- quotas -------------------------------------------------------------------------------------------


def test_concurrent_gpus_nominal_plus_borrowing_and_the_borrowed_mark():
    # Org 0 may hold 2 nominal + 2 borrowed GPUs and holds 1: a 2-GPU job starts borrowed (1 + 2 > 2), then
    # the 1-GPU job behind it would take it over 4, and the 5-GPU job can never fit its quota.
    pools = [PoolView("p", 8, used_slots=1)]
    orgs = [OrgView(0, nominal_gpus=2, borrowing_limit_gpus=2, used_gpus=1, used_slots=1)]
    queue = [JobView("two", 0, 2, created_at=1), JobView("two-more", 0, 2, created_at=2)]
    queue.append(JobView("five", 0, 5, created_at=3))
    result = plan(pools, orgs, queue)
    assert result.admit == [Admission("two", "p", gpus=2, slots=2, cpus=1, borrowed=True)]
    assert result.waiting == {
        "two-more": Wait(
            Why.QUOTA, "the organization holds 3 of its 4 concurrent GPUs; this job needs 2 more"
        ),
        "five": Wait(
            Why.QUOTA, "asks for 5 GPUs; the organization may hold at most 4 (2 nominal + 2 borrowed)"
        ),
    }


def test_monthly_gpu_hours_stop_gpu_jobs_not_cpu_jobs():
    pools = [PoolView("cpu", 4, cpu_slots=True, cpus=16)]
    orgs = [OrgView(0, nominal_gpus=4, month_gpu_hours=100.0, gpu_hours_per_month=100.0)]
    queue = [JobView("gpu", 0, 1, created_at=1), JobView("cpu-only", 0, 0, cpus=2, created_at=2)]
    result = plan(pools, orgs, queue)
    assert result.admit == [Admission("cpu-only", "cpu", gpus=0, slots=1, cpus=2, borrowed=False)]
    assert result.waiting == {
        "gpu": Wait(
            Why.QUOTA, "monthly GPU-hours used up (100.0 of 100 h); waits for next month or a higher quota"
        )
    }


def test_allowed_pools_and_named_pools():
    pools = [PoolView("big", 16), PoolView("small", 2), PoolView("down", 8, schedulable=False)]
    orgs = [OrgView(0, nominal_gpus=8, allowed_pools=frozenset({"small"})), OrgView(1, nominal_gpus=8)]
    queue = [
        JobView("allowed", 0, 2, created_at=1),  # only "small" is allowed, though "big" has more room
        JobView("not-allowed", 0, 1, created_at=2, pool="big"),
        JobView("disabled", 1, 1, created_at=3, pool="down"),
        JobView("unknown", 1, 1, created_at=4, pool="nowhere"),
        JobView("too-big", 1, 17, created_at=5),
    ]
    result = plan(pools, orgs, queue)
    assert admitted(result) == [("allowed", "small")]
    assert result.waiting == {
        "not-allowed": Wait(Why.QUOTA, "none of the pools the organization may use is available"),
        "disabled": Wait(Why.POOL, "pool 'down' is disabled or unhealthy"),
        "unknown": Wait(Why.POOL, "no pool named 'nowhere'"),
        "too-big": Wait(
            Why.QUOTA, "asks for 17 GPUs; the organization may hold at most 8 (8 nominal + 0 borrowed)"
        ),
    }


def test_an_organization_without_a_quota_waits():
    result = plan([PoolView("p", 4)], [], [JobView("j", 7, 1)])
    assert result.admit == [] and result.waiting == {"j": Wait(Why.QUOTA, "the organization has no quota")}


# --- fair share ---------------------------------------------------------------------------------------
def test_trainer_ranks_count_as_slots_in_the_fair_share():
    """A CPU job with N trainer ranks takes N slots: its organization's demand and fair-share limit count
    them, so a busy tenant's multi-rank jobs (once counted as 1 slot each) do not crowd out another's."""
    pools = [PoolView("cpu", 8, cpu_slots=True, cpus=64)]
    orgs = [OrgView(0, nominal_gpus=0), OrgView(1, nominal_gpus=0)]
    busy = [("a", 1), ("b", 3), ("c", 1), ("d", 1), ("e", 4), ("f", 3)]
    queue = [JobView(n, 0, 0, cpus=r, ranks=r, created_at=i) for i, (n, r) in enumerate(busy)]
    queue.append(JobView("small", 1, 0, cpus=3, ranks=3, created_at=2.5))
    targets, _ = fair_caps({o.id: o for o in orgs}, {0: queue[:-1], 1: queue[-1:]}, pools, 0)
    assert targets == {0: 5.0, 1: 3.0}  # demand 13 and 3 slots
    result = plan(pools, orgs, queue, half_life_s=0)
    assert [(a.job, a.slots) for a in result.admit] == [("a", 1), ("b", 3), ("small", 3), ("c", 1)]


def test_fair_targets_water_fill_by_weight():
    # 9 slots: org 1 asks for 1 and keeps only that; the other 8 split 1:2 between orgs 2 and 3.
    targets = fair_targets({1: 1.0, 2: 1.0, 3: 2.0}, {1: 1, 2: 10, 3: 10}, 9)
    assert targets == pytest.approx({1: 1.0, 2: 8 / 3, 3: 16 / 3})
    # No demand, or no weight: no share.
    assert fair_targets({1: 1.0, 2: 0.0}, {1: 0, 2: 5}, 4) == {}


def test_weighted_shares_and_priority_only_within_an_organization():
    # 4 slots, weights 1 and 3: org 0 gets 1 and org 1 gets 3, though org 0's jobs have the higher priority
    # and were submitted first. Within org 0 the priority-5 job goes before its older priority-0 job.
    pools = [PoolView("p", 4)]
    orgs = [OrgView(0, nominal_gpus=4, weight=1.0), OrgView(1, nominal_gpus=4, weight=3.0)]
    queue = [JobView(f"a{i}", 0, 1, priority=0, created_at=i) for i in range(3)]
    queue.append(JobView("a-urgent", 0, 1, priority=5, created_at=10))
    queue += [JobView(f"b{i}", 1, 1, priority=-1, created_at=20 + i) for i in range(4)]
    result = plan(pools, orgs, queue, half_life_s=0)
    assert sorted(a.job for a in result.admit) == ["a-urgent", "b0", "b1", "b2"]
    assert result.waiting["b3"] == Wait(
        Why.FAIR_SHARE,
        "the organization holds 3 slots, above its fair share of 3.0; others go first while capacity "
        "is short",
    )
    assert result.waiting["a0"] == Wait(
        Why.FAIR_SHARE,
        "the organization holds 1 slots, above its fair share of 1.0; others go first while capacity "
        "is short",
    )


def test_decayed_history_lowers_the_cap_of_who_held_more_lately():
    # Equal weights, 4 slots, both organizations want all 4. Org 0 held all 4 for a long time (decayed
    # slot-seconds at the steady value 4 x half-life / ln 2), org 1 nothing: org 1's cap rises to 4, org 0's
    # falls to 0 (target 2 + gain 6 x (2 expected - 4 held)), so this pass gives org 1 everything.
    half_life = 3600.0
    pools = [PoolView("p", 4)]
    orgs = [
        OrgView(0, nominal_gpus=4, decayed_slot_seconds=4 * half_life / math.log(2)),
        OrgView(1, nominal_gpus=4),
    ]
    queue = [JobView(f"{o}-{i}", o, 1, created_at=i) for o in (0, 1) for i in range(4)]
    by_org = {o: [j for j in queue if j.org == o] for o in (0, 1)}
    targets, caps = fair_caps({o.id: o for o in orgs}, by_org, pools, half_life)
    assert targets == {0: 2.0, 1: 2.0}
    assert caps == pytest.approx({0: 0.0, 1: 4.0})
    result = plan(pools, orgs, queue, half_life_s=half_life)
    assert sorted(a.job for a in result.admit) == ["1-0", "1-1", "1-2", "1-3"]
    assert result.waiting["0-0"].category == Why.FAIR_SHARE
    # Without history (half-life 0) the same queue splits evenly.
    even = plan(pools, orgs, queue, half_life_s=0)
    assert sorted(a.job for a in even.admit) == ["0-0", "0-1", "1-0", "1-1"]


def test_decay_halves_per_half_life():
    t0 = datetime(2026, 1, 1, tzinfo=UTC)
    assert decay(100.0, t0, t0 + timedelta(hours=2), 3600.0) == pytest.approx(25.0)
    assert decay(100.0, t0, t0 - timedelta(hours=1), 3600.0) == 100.0  # a clock step back decays nothing
    assert decay(100.0, t0, t0, 0.0) == 0.0  # no half-life: no history


# --- backfill -----------------------------------------------------------------------------------------


def test_a_job_that_does_not_fit_is_skipped_and_later_ones_backfill():
    # 2 of 4 slots free: the older 4-GPU job at the head waits, the 1-GPU jobs behind it start (and take
    # the last free slots: nothing is held for the big job before it has waited long).
    pools = [PoolView("p", 4, used_slots=2)]
    orgs = [OrgView(0, nominal_gpus=8, used_gpus=2, used_slots=2)]
    queue = [JobView("big", 0, 4, created_at=1), JobView("s1", 0, 1, created_at=2)]
    queue.append(JobView("s2", 0, 1, created_at=3))
    result = plan(pools, orgs, queue)
    assert admitted(result) == [("s1", "p"), ("s2", "p")]
    assert result.waiting == {"big": Wait(Why.CAPACITY, "needs 4 slots; at most 0 free now")}


def test_a_long_waiting_job_reserves_and_small_jobs_backfill_only_onto_the_rest():
    # Pool of 4 slots, 2 held by org 1. Org 0 (weight 3: a share of 3, so its 4-GPU job is no reason to
    # drain) has a 4-GPU job waiting past the threshold: it holds the 2 free slots, and the later 1-GPU job
    # may not take them.
    pools = [PoolView("p", 4, used_slots=2)]
    orgs = [OrgView(0, nominal_gpus=4, weight=3.0), OrgView(1, nominal_gpus=4, used_gpus=2, used_slots=2)]
    running = [AllocationView("r", "running", 1, "p", 2, 2, borrowed=False)]
    queue = [JobView("big", 0, 4, created_at=0.0), JobView("small", 0, 1, created_at=50.0)]
    result = plan(pools, orgs, queue, running, half_life_s=0, now=100.0, reserve_after_s=60.0)
    assert result.admit == [] and result.held == {"p": ("big", 2)}
    assert result.waiting["big"] == Wait(
        Why.RESERVATION,
        "reserved for this job after waiting 100 s: 2 of its 4 slots held in pool 'p'; smaller jobs backfill "
        "only onto the rest; it starts when 2 more are freed there",
    )
    assert result.waiting["small"].category == Why.RESERVATION and result.waiting["small"].behind == "big"
    # Before the threshold nothing is held: the small job starts.
    early = plan(pools, orgs, queue, running, half_life_s=0, now=30.0, reserve_after_s=60.0)
    assert admitted(early) == [("small", "p")] and early.held == {}


# --- capacity and placement ---------------------------------------------------------------------------


def test_best_fit_keeps_the_big_hole_for_the_big_job():
    pools = [PoolView("wide", 8), PoolView("narrow", 2)]
    orgs = [OrgView(0, nominal_gpus=10)]
    queue = [JobView("two", 0, 2, created_at=1), JobView("eight", 0, 8, created_at=2)]
    result = plan(pools, orgs, queue)
    assert admitted(result) == [("two", "narrow"), ("eight", "wide")]
    assert result.waiting == {}


def test_a_cpu_only_job_on_a_gpu_pool_is_bounded_by_the_pool_cpus():
    pools = [PoolView("g", 4, cpus=4, used_cpus=3)]
    orgs = [OrgView(0, nominal_gpus=4)]
    queue = [JobView("wide", 0, 0, cpus=2, created_at=1), JobView("narrow", 0, 0, cpus=1, created_at=2)]
    result = plan(pools, orgs, queue)
    assert result.admit == [Admission("narrow", "g", gpus=0, slots=0, cpus=1, borrowed=False)]
    assert result.waiting["wide"].category == Why.CAPACITY


def test_an_owner_reclaims_borrowed_capacity_newest_borrower_first():
    # Org 0 (nominal 0) borrows the whole 4-slot pool in four 1-GPU jobs; org 1 (nominal 4) asks for 2. The
    # two newest borrowed allocations are preempted and their slots held for owners.
    pools = [PoolView("p", 4, used_slots=4)]
    orgs = [
        OrgView(0, nominal_gpus=0, borrowing_limit_gpus=4, used_gpus=4, used_slots=4),
        OrgView(1, nominal_gpus=4),
    ]
    running = [AllocationView(f"a{i}", f"r{i}", 0, "p", 1, 1, borrowed=True, admitted_at=i) for i in range(4)]
    result = plan(pools, orgs, [JobView("owner", 1, 2)], running)
    assert result.admit == [] and result.preempt == ["a3", "a2"] and result.reserved == {"p": 2}
    assert result.waiting == {
        "owner": Wait(
            Why.CAPACITY,
            "reclaiming 2 borrowed GPUs in pool 'p' (2 jobs checkpoint and re-queue); starts when they stop",
        )
    }
    # Preemption off: it only waits.
    assert plan(pools, orgs, [JobView("owner", 1, 2)], running, allow_preemption=False).preempt == []


def test_plan_mutates_nothing_it_is_given():
    pools = [PoolView("p", 4, used_slots=1)]
    orgs = [OrgView(0, nominal_gpus=4, used_gpus=1, used_slots=1)]
    queue = [JobView("j", 0, 2)]
    before = copy.deepcopy((pools, orgs, queue))
    assert admitted(plan(pools, orgs, queue)) == [("j", "p")]
    assert (pools, orgs, queue) == before


# --- no Django ----------------------------------------------------------------------------------------


def test_the_policy_and_the_bench_run_without_django():
    # `import django` fails in this process: the policy imports and the benchmark runs (a small world) all
    # the same, and neither leaves Django loaded.
    code = (
        "import runpy, sys\n"
        "sys.modules['django'] = None\n"
        "import portal.scheduling.policy\n"
        "sys.argv = ['bench/scheduler.py', '--jobs', '200', '--orgs', '5', '--rounds', '3']\n"
        "try:\n"
        "    runpy.run_path('bench/scheduler.py', run_name='__main__')\n"
        "except SystemExit as e:\n"
        "    assert not e.code, e.code\n"
        "assert sys.modules['django'] is None\n"
        "print('no django')\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300, check=False
    )
    assert done.returncode == 0, done.stderr
    assert "Steady state" in done.stdout and done.stdout.endswith("no django\n")
