"""Why each queued job waits, as data: every category the scheduler produces (``Why``) on the job it belongs
to, read from ``Wait.category`` and never from the words; and the settings the scheduler reads, with a
clear error for a bad value."""

from __future__ import annotations

import math

import pytest

from portal.scheduling.inputs import reserve_after_s
from portal.scheduling.policy import (
    STARTING,
    AllocationView,
    JobView,
    OrgView,
    PoolView,
    Wait,
    Why,
    plan,
)


def constructed_queue():
    """Two pools: p0 (8 GPUs, 6 held by org 0's three 2-GPU jobs) and p1 (4 GPUs, free). Reservations after
    600 s; the pass runs at 700 s, so only `holder` (submitted at 0) has waited long enough."""
    pools = [PoolView("p0", 8, used_slots=6), PoolView("p1", 4)]
    orgs = [
        OrgView(0, nominal_gpus=8, borrowing_limit_gpus=8, used_gpus=6, used_slots=6),
        OrgView(1, nominal_gpus=8),
        OrgView(3, nominal_gpus=8),
        OrgView(4, nominal_gpus=1),
        # org 2 has no quota row at all
    ]
    running = [AllocationView(i, f"r{i}", 0, "p0", 2, 2, False) for i in range(3)]
    queue = [
        JobView("holder", 1, 8, created_at=0.0, pool="p0"),  # reserves p0's 2 free slots
        JobView("backfiller", 0, 1, created_at=100.0, pool="p0"),  # would fit p0 but for the reservation
        JobView("over-share", 0, 4, created_at=110.0, pool="p1"),  # org 0 holds 6, its share is 3.7
        JobView("starts", 3, 1, created_at=120.0),  # p1 is free
        JobView("too-big", 3, 8, created_at=130.0, pool="p1"),  # p1 has 4 GPUs
        JobView("no-quota", 2, 1, created_at=140.0),
        JobView("over-quota", 4, 2, created_at=150.0),  # org 4 may hold 1 GPU
        JobView("no-pool", 3, 1, created_at=160.0, pool="gpu-z"),
    ]
    return pools, orgs, queue, running


def test_every_category_appears_on_the_right_job():
    pools, orgs, queue, running = constructed_queue()
    result = plan(pools, orgs, queue, running, half_life_s=0, now=700.0, reserve_after_s=600.0)
    assert [a.job for a in result.admit] == ["starts"] and result.held == {"p0": ("holder", 2)}
    categories = {job_id: wait.category for job_id, wait in result.waiting.items()}
    categories.update({a.job: STARTING.category for a in result.admit})
    assert categories == {
        "holder": Why.RESERVATION,
        "backfiller": Why.RESERVATION,
        "over-share": Why.FAIR_SHARE,
        "starts": Why.STARTING,
        "too-big": Why.CAPACITY,
        "no-quota": Why.QUOTA,
        "over-quota": Why.QUOTA,
        "no-pool": Why.POOL,
    }
    assert set(categories.values()) == set(Why)  # every category the scheduler has, none left out
    # Both sides of the reservation: the backfiller names the job it waits behind; the holder waits behind
    # nobody. A drain names its job too; the other waits name none.
    assert result.waiting["backfiller"].behind == "holder"
    assert {j for j, w in result.waiting.items() if w.behind is not None} == {"backfiller"}
    # The sentences, whole (a reservation is worded as the capacity wait it is).
    assert result.waiting["holder"] == Wait(
        Why.RESERVATION,
        "reserved for this job after waiting 700 s: 2 of its 8 slots held in pool 'p0'; smaller jobs "
        "backfill only onto the rest; it starts when 6 more are freed there",
    )
    assert str(result.waiting["holder"]).startswith("capacity: reserved for this job")
    # 12 GPUs among 4 organizations with demand: org 4 asks for 1 (its limit), the other three get 11 / 3.
    assert str(result.waiting["over-share"]) == (
        "fair-share: the organization holds 6 slots, above its fair share of 3.7; others go first while "
        "capacity is short"
    )
    assert str(result.waiting["too-big"]) == "capacity: needs 8 GPUs; the largest pool it may use has 4"
    assert str(result.waiting["no-quota"]) == "quota: the organization has no quota"
    assert str(result.waiting["over-quota"]) == (
        "quota: asks for 2 GPUs; the organization may hold at most 1 (1 nominal + 0 borrowed)"
    )
    assert str(result.waiting["no-pool"]) == "pool: no pool named 'gpu-z'"


def test_without_reservations_the_small_jobs_take_what_the_big_one_needs():
    pools, orgs, queue, running = constructed_queue()
    result = plan(pools, orgs, queue, running, half_life_s=0, now=700.0, reserve_after_s=math.inf)
    # Work-conserving: the small jobs take p0's free slots (best fit) and org 0 borrows p1.
    assert result.held == {} and [a.job for a in result.admit] == ["starts", "backfiller", "over-share"]
    assert Why.RESERVATION not in {w.category for w in result.waiting.values()}
    assert result.waiting["holder"] == Wait(Why.CAPACITY, "needs 8 slots; at most 0 free now")


def test_a_drain_names_its_job_and_says_when_it_starts():
    # Org 1 (weight 0.5 of 1.5) has a 4-GPU job over its fair share (2 GPUs of 6): it drains for it. It holds
    # nothing, so the job reserves p0, and org 1's small job waits behind it, saying which job it is.
    pools = [PoolView("p0", 6, used_slots=4)]
    orgs = [OrgView(0, 6, used_gpus=4, used_slots=4), OrgView(1, 6, weight=0.5)]
    running = [AllocationView(i, f"r{i}", 0, "p0", 1, 1, False) for i in range(4)]
    queue = [JobView("big", 1, 4, created_at=0.0), JobView("small", 1, 1, created_at=5.0)]
    queue.append(JobView("more", 0, 2, created_at=1.0))
    result = plan(pools, orgs, queue, running, half_life_s=0, now=10.0, reserve_after_s=0.0)
    assert result.admit == [] and result.held == {"p0": ("big", 2)}
    assert result.waiting["small"] == Wait(
        Why.FAIR_SHARE,
        "the organization drains for its job big that has waited long; its other jobs start after it",
        behind="big",
    )
    assert result.waiting["big"].category == Why.RESERVATION
    assert result.waiting["more"].category == Why.RESERVATION and result.waiting["more"].behind == "big"
    # Two of org 0's jobs end: the big job fits, starts in this pass, and the small one's reason says so.
    freed = [PoolView("p0", 6, used_slots=2)]
    orgs[0] = OrgView(0, 6, used_gpus=2, used_slots=2)
    result = plan(freed, orgs, queue, running[:2], half_life_s=0, now=11.0, reserve_after_s=0.0)
    assert [a.job for a in result.admit] == ["big"]
    assert result.waiting["small"] == Wait(
        Why.FAIR_SHARE,
        "the organization drains for its job big that has waited long; it starts now (it fits), its other "
        "jobs start after it",
        behind="big",
    )


@pytest.mark.parametrize("value", [300.0, 12.0, 0.0, math.inf])  # the default, a setting, no wait, never
def test_reserve_after_is_the_django_setting(settings, value):
    # Parsed and validated from OPENTINKER_RESERVE_AFTER_S at start (tests/portal/test_settings_declared.py).
    settings.OPENTINKER_RESERVE_AFTER_S = value
    assert reserve_after_s() == value
