"""The scheduler's database pass: quotas, fair share, priority, backfill, borrowing and preemption, wait
reasons. Real PostgreSQL; the Celery nudges are not run here (tests/workers covers launching)."""

from __future__ import annotations

import pytest

from opentinker.spec import JobState
from portal.models import Allocation, Job, JobEvent, UsageRecord
from portal.scheduling.explanation import queue_plan
from portal.services.scheduler import schedule_pass
from portal.services.supervision import job_process_exited
from portal.services.usage import month_start
from tests.workers.conftest import make_pool, set_quota, submit

pytestmark = pytest.mark.django_db


def running_gpus(org) -> int:
    return sum(
        Allocation.objects.filter(job__organization=org, released_at__isnull=True).values_list(
            "gpus", flat=True
        )
    )


def test_admits_within_capacity_and_quota_and_records_why(acme):
    make_pool("gpu-a", 8)
    set_quota(acme, max_gpus=4, borrowing_limit_gpus=0)
    jobs = [submit(acme, gpus=2, name=f"j{i}") for i in range(3)]
    result = schedule_pass()
    assert len(result.admitted) == 2  # 4 GPUs nominal, no borrowing
    first, second, third = (Job.objects.get(pk=j.pk) for j in jobs)
    assert (first.state, second.state, third.state) == ("admitted", "admitted", "queued")
    assert first.pool == "gpu-a"
    event = JobEvent.objects.filter(job=first).last()
    assert (event.from_state, event.to_state, event.actor_label) == ("queued", "admitted", "scheduler")
    assert event.message == "admitted to pool gpu-a (2 GPUs)"
    alloc = Allocation.objects.get(job=first)
    assert (alloc.gpus, alloc.slots, alloc.borrowed, alloc.attempt) == (2, 2, False, 0)
    assert sorted(alloc.gpu_indices + Allocation.objects.get(job=second).gpu_indices) == [0, 1, 2, 3]
    assert str(result.waiting[third.pk]).startswith(
        "quota: the organization holds 4 of its 4 concurrent GPUs"
    )
    # A second pass changes nothing: admission is idempotent on the rows.
    assert schedule_pass().admitted == []


def test_backfill_a_big_job_never_blocks_small_ones_behind_it(acme):
    make_pool("gpu-a", 4)
    set_quota(acme, max_gpus=16)
    big = submit(acme, gpus=8, name="big", priority=5)  # can never fit a 4-GPU pool
    mid = submit(acme, gpus=3, name="mid", priority=5)
    smalls = [submit(acme, gpus=1, name=f"s{i}") for i in range(3)]
    result = schedule_pass()
    assert set(result.admitted) == {mid.pk, smalls[0].pk}
    assert str(result.waiting[big.pk]) == "capacity: needs 8 GPUs; the largest pool it may use has 4"
    assert str(result.waiting[smalls[1].pk]).startswith("capacity: needs 1 slots; at most 0 free")


def test_priority_orders_jobs_within_an_organization(acme):
    make_pool("gpu-a", 2)
    set_quota(acme, max_gpus=8)
    low = submit(acme, gpus=2, name="low", priority=-1)
    high = submit(acme, gpus=2, name="high", priority=3)
    assert schedule_pass().admitted == [high.pk]
    assert Job.objects.get(pk=low.pk).state == "queued"


def test_weighted_fair_share_between_organizations(acme, globex):
    make_pool("gpu-a", 8)
    set_quota(acme, max_gpus=8, max_queued_jobs=50, fair_share_weight=1)
    set_quota(globex, max_gpus=8, max_queued_jobs=50, fair_share_weight=3)
    for i in range(10):  # acme submitted first: FIFO would give it everything
        submit(acme, gpus=1, name=f"a{i}")
    for i in range(10):
        submit(globex, gpus=1, name=f"g{i}")
    schedule_pass()
    assert (running_gpus(acme), running_gpus(globex)) == (2, 6)
    waiting = queue_plan()[0].waiting
    assert len(waiting) == 12
    acme_waiting = Job.objects.filter(organization=acme, state="queued").first()
    assert str(waiting[acme_waiting.pk]) == (
        "fair-share: the organization holds 2 slots, above its fair share of 2.0; "
        "others go first while capacity is short"
    )


def test_decayed_history_gives_a_light_user_the_turn(acme, globex):
    from django.utils import timezone

    from portal.models import FairShareUsage

    make_pool("gpu-a", 2)
    set_quota(acme, max_gpus=2)
    set_quota(globex, max_gpus=2)
    FairShareUsage.objects.create(organization=acme, decayed_gpu_seconds=50 * 3600, decayed_at=timezone.now())
    a = submit(acme, gpus=2, name="a")
    g = submit(globex, gpus=2, name="g")
    assert schedule_pass().admitted == [g.pk]
    assert Job.objects.get(pk=a.pk).state == "queued"


def test_monthly_gpu_hours_quota(acme):
    from django.utils import timezone

    make_pool("gpu-a", 8)
    set_quota(acme, max_gpus=8, gpu_hours_per_month=10)
    UsageRecord.objects.create(organization=acme, month=month_start(timezone.now()), gpu_seconds=10 * 3600)
    gpu_job = submit(acme, gpus=1, name="gpu", max_hours=1)
    cpu_job = submit(acme, gpus=0, name="cpu")  # CPU-only work is not GPU-hours
    result = schedule_pass()
    assert result.admitted == [cpu_job.pk]
    assert str(result.waiting[gpu_job.pk]).startswith("quota: monthly GPU-hours used up (10.0 of 10 h)")


def test_borrowing_then_preemption_gives_capacity_back_to_its_owner(acme, globex):
    make_pool("gpu-a", 8)
    set_quota(acme, max_gpus=2, borrowing_limit_gpus=6, max_queued_jobs=50)
    set_quota(globex, max_gpus=4, borrowing_limit_gpus=0)
    acme_jobs = [submit(acme, gpus=2, name=f"a{i}") for i in range(4)]
    assert len(schedule_pass().admitted) == 4  # the pool is idle: acme borrows 6 GPUs
    borrowed = Allocation.objects.filter(borrowed=True, released_at__isnull=True)
    assert borrowed.count() == 3 and running_gpus(acme) == 8

    owner_job = submit(globex, gpus=4, name="owner")
    result = schedule_pass()
    assert result.admitted == []
    assert len(result.preempted) == 2  # two 2-GPU borrowed jobs make room for 4 GPUs
    assert str(result.waiting[owner_job.pk]).startswith(
        "capacity: reclaiming 4 borrowed GPUs in pool 'gpu-a'"
    )
    preempted = Allocation.objects.filter(preempt_requested_at__isnull=False)
    assert {a.borrowed for a in preempted} == {True}
    warning = JobEvent.objects.filter(job=preempted[0].job, kind="warning").get()
    assert warning.message.startswith("preemption requested")
    # A second pass does not preempt more while those stop.
    assert schedule_pass().preempted == []

    # The runtimes checkpoint and exit: the jobs are re-queued (not failed), the capacity goes to the owner.
    for alloc in preempted:
        Job.objects.filter(pk=alloc.job_id).update(state="running")
        job_process_exited(allocation_id=alloc.pk, exit_code=0)
    requeued = Job.objects.filter(pk__in=[a.job_id for a in preempted])
    assert {j.state for j in requeued} == {"queued"} and {j.attempt for j in requeued} == {1}
    assert schedule_pass().admitted == [owner_job.pk]
    assert running_gpus(globex) == 4 and running_gpus(acme) == 4
    assert {j.pk for j in requeued} <= {j.pk for j in acme_jobs}


def test_requested_and_allowed_pools(acme):
    make_pool("gpu-a", 8)
    make_pool("gpu-b", 8)
    set_quota(acme, max_gpus=8)
    nowhere = submit(acme, gpus=1, name="named", pool="gpu-c")
    set_quota(acme, allowed_pools=["gpu-b", "gpu-c"])
    job = submit(acme, gpus=1, name="anywhere")
    result = schedule_pass()
    assert result.admitted == [job.pk]
    assert Job.objects.get(pk=job.pk).pool == "gpu-b"
    assert str(result.waiting[nowhere.pk]) == "pool: no pool named 'gpu-c'"


def test_cpu_slot_pool_takes_one_slot_per_cpu_job(acme):
    make_pool("local", 2, cpu_slots=True, cpus=2)
    set_quota(acme, max_gpus=0)
    jobs = [submit(acme, gpus=0, name=f"c{i}") for i in range(3)]
    assert len(schedule_pass().admitted) == 2
    assert Job.objects.get(pk=jobs[2].pk).state == JobState.QUEUED
