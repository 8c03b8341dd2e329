"""Admin API for pools, the queue (with why each job waits), preemption and usage; the org usage endpoint.
Actors: alice (owner of acme), bob (member), charlie (owner of globex), and a platform staffer."""

from __future__ import annotations

import pytest
from django.utils import timezone

from portal.models import Allocation, ComputePool, Job, UsageRecord
from portal.services.orgs import organization_create
from portal.services.scheduler import schedule_pass
from portal.services.usage import month_start, usage_charge
from tests.conftest import client_for
from tests.workers.conftest import make_pool, set_quota, submit

pytestmark = pytest.mark.django_db
V1 = "/api/v1"


@pytest.fixture
def as_staff(make_user, make_token):
    staffer = make_user("staffer", staff=True)
    ops = organization_create(slug="ops", name="Ops", owner=staffer)
    return client_for(make_token(staffer, ops, scopes=["platform:admin"]))


def test_pools_crud_and_capacity(as_staff, as_alice, acme):
    r = as_staff.post(f"{V1}/admin/pools", {"name": "ray-a", "driver": "ray"}, format="json")
    assert r.status_code == 400 and "ray_address" in r.json()["error"]["fields"]
    r = as_staff.post(
        f"{V1}/admin/pools",
        {"name": "ray-a", "driver": "ray", "ray_address": "http://10.0.0.5:8265"},
        format="json",
    )
    assert r.status_code == 201, r.json()
    assert r.json()["health"] == "unknown" and r.json()["total_gpus"] == 0
    assert as_staff.post(f"{V1}/admin/pools", {"name": "ray-a"}, format="json").status_code == 409
    make_pool("gpu-a", 8)
    set_quota(acme, max_gpus=8)
    submit(acme, gpus=3, name="big")
    schedule_pass()
    pools = {p["name"]: p for p in as_staff.get(f"{V1}/admin/pools").json()}
    assert (pools["gpu-a"]["used_slots"], pools["gpu-a"]["running_jobs"], pools["gpu-a"]["total_gpus"]) == (
        3,
        1,
        8,
    )
    r = as_staff.patch(f"{V1}/admin/pools/gpu-a", {"enabled": False}, format="json")
    assert r.status_code == 200 and r.json()["enabled"] is False
    assert as_staff.delete(f"{V1}/admin/pools/gpu-a").status_code == 409  # still runs a job
    assert as_staff.delete(f"{V1}/admin/pools/ray-a").status_code == 204
    assert as_staff.get(f"{V1}/admin/pools/ray-a").status_code == 404
    # Not staff: the endpoints do not exist.
    assert as_alice.get(f"{V1}/admin/pools").status_code == 404
    assert as_alice.post(f"{V1}/admin/pools", {"name": "x"}, format="json").status_code == 404
    assert ComputePool.objects.filter(name="x").count() == 0


def test_queue_says_why_each_job_waits(as_staff, as_alice, acme, globex):
    make_pool("gpu-a", 4)
    set_quota(acme, max_gpus=2, gpu_hours_per_month=100)
    set_quota(globex, max_gpus=8, gpu_hours_per_month=100)
    running = submit(acme, gpus=2, name="running")
    schedule_pass()
    over_quota = submit(acme, gpus=1, name="over-quota")
    too_big = submit(globex, gpus=8, name="too-big")
    fits_later = submit(globex, gpus=2, name="fits-now")
    body = as_staff.get(f"{V1}/admin/queue").json()
    assert body["count"] == 3
    rows = {row["name"]: row for row in body["results"]}
    assert rows["over-quota"]["category"] == "quota"
    assert rows["over-quota"]["reason"].startswith("quota: the organization holds 2 of its 2 concurrent GPUs")
    assert rows["too-big"]["reason"] == "capacity: needs 8 GPUs; the largest pool it may use has 4"
    assert rows["too-big"]["category"] == "capacity"  # no reservation involved
    assert rows["fits-now"]["category"] == "starting"
    assert rows["fits-now"]["organization"] == "globex" and rows["fits-now"]["gpus"] == 2
    assert running.pk not in {row["id"] for row in body["results"]}
    assert {over_quota.pk, too_big.pk, fits_later.pk} == {Job.objects.get(name=n).pk for n in rows}
    assert as_staff.get(f"{V1}/admin/queue?limit=1").json()["results"][0]["name"] in rows
    assert as_staff.get(f"{V1}/admin/queue?limit=0").status_code == 400
    assert as_alice.get(f"{V1}/admin/queue").status_code == 404


def test_admin_preempts_a_job(as_staff, as_alice, acme):
    make_pool("gpu-a", 4)
    set_quota(acme, max_gpus=4)
    job = submit(acme, gpus=2, name="victim")
    schedule_pass()
    assert as_alice.post(f"{V1}/admin/jobs/{job.pk}/preempt", {}, format="json").status_code == 404
    # Admitted, not started: re-queued at once, not counted as a failure.
    r = as_staff.post(f"{V1}/admin/jobs/{job.pk}/preempt", {"reason": "maintenance"}, format="json")
    assert r.status_code == 202 and r.json()["state"] == "queued" and r.json()["attempt"] == 1
    assert Allocation.objects.get(job=job).released_at is not None
    # Running: asked to checkpoint and stop; re-queued when it does.
    schedule_pass()
    alloc = Allocation.objects.get(job=job, released_at__isnull=True)
    Allocation.objects.filter(pk=alloc.pk).update(launched_at=timezone.now(), runtime_handle="1")
    Job.objects.filter(pk=job.pk).update(state="running")
    r = as_staff.post(f"{V1}/admin/jobs/{job.pk}/preempt", {}, format="json")
    assert r.status_code == 202 and r.json()["state"] == "running"
    alloc.refresh_from_db()
    assert alloc.preempt_requested_at is not None
    Job.objects.filter(pk=job.pk).update(state="succeeded")
    assert as_staff.post(f"{V1}/admin/jobs/{job.pk}/preempt", {}, format="json").status_code == 409
    assert as_staff.post(f"{V1}/admin/jobs/not-a-uuid/preempt", {}, format="json").status_code == 404


def test_usage_for_admins_and_for_the_organization(as_staff, as_alice, as_bob, as_charlie, acme, globex):
    now = timezone.now()
    start = now - timezone.timedelta(hours=2)
    usage_charge(organization_id=acme.pk, start=start, end=now, gpus=4, cpus=8, slots=4)  # 8 GPU-hours
    usage_charge(
        organization_id=globex.pk,
        start=start,
        end=start + timezone.timedelta(minutes=30),
        gpus=1,
        cpus=1,
        slots=1,
    )
    rows = as_staff.get(f"{V1}/admin/usage").json()
    assert [(r["organization"], r["gpu_hours"], r["cpu_hours"]) for r in rows] == [
        ("acme", 8.0, 16.0),
        ("globex", 0.5, 0.5),
    ]
    assert as_staff.get(f"{V1}/admin/usage?month=1999-01").json() == []
    assert as_staff.get(f"{V1}/admin/usage?month=bad").status_code == 400
    for client in (as_alice, as_bob):
        (current,) = client.get(f"{V1}/org/usage").json()
        assert current["month"] == month_start(now).isoformat()
        assert (current["gpu_hours"], current["cpu_hours"], current["gpu_hours_quota"]) == (8.0, 16.0, 100)
    (theirs,) = as_charlie.get(f"{V1}/org/usage").json()
    assert theirs["gpu_hours"] == 0.5  # only globex's own usage
    assert UsageRecord.objects.count() == 2


def test_usage_is_split_at_month_boundaries():
    from datetime import UTC, datetime

    from portal.services.usage import split_by_month

    parts = split_by_month(datetime(2026, 1, 31, 23, 0, tzinfo=UTC), datetime(2026, 2, 1, 1, 30, tzinfo=UTC))
    assert [(m.isoformat(), s) for m, s in parts] == [("2026-01-01", 3600.0), ("2026-02-01", 5400.0)]


def test_queue_explains_a_reservation_and_small_jobs_cannot_take_its_slots(
    as_staff, as_alice, acme, globex, settings
):
    """A big globex job waited past OPENTINKER_RESERVE_AFTER_S while acme's small jobs held the pool: the
    slots acme frees are held for it (acme's next small job waits though a slot is free), the admin queue
    says so, and the big job starts once enough is freed. Alice (not staff) sees no admin queue."""
    from portal.services.supervision import job_process_exited

    settings.OPENTINKER_RESERVE_AFTER_S = 60
    make_pool("gpu-a", 4)
    set_quota(acme, max_gpus=4, max_queued_jobs=50)
    set_quota(globex, max_gpus=4)
    smalls = [submit(acme, gpus=1, name=f"small-{i}") for i in range(4)]
    assert len(schedule_pass().admitted) == 4
    big = submit(globex, gpus=4, name="big")
    later = submit(acme, gpus=1, name="small-later")
    Job.objects.filter(pk=big.pk).update(created_at=timezone.now() - timezone.timedelta(seconds=120))
    for job in smalls[:2]:  # two small jobs finish: 2 slots free
        alloc = Allocation.objects.get(job=job)
        Job.objects.filter(pk=job.pk).update(state="running")
        job_process_exited(allocation_id=alloc.pk, exit_code=0)
    result = schedule_pass()
    assert result.admitted == []  # the free slots are held for the big job, not given to small-later
    rows = {row["name"]: row for row in as_staff.get(f"{V1}/admin/queue").json()["results"]}
    # Both sides of the reservation have a category of their own: the job it holds slots for, and the
    # small job that may only backfill around it.
    assert (rows["big"]["category"], rows["small-later"]["category"]) == ("reservation", "reservation")
    assert rows["big"]["reason"].startswith("capacity: reserved for this job after waiting 12")
    assert rows["big"]["reason"].endswith(
        "2 of its 4 slots held in pool 'gpu-a'; smaller jobs backfill only onto the rest; it starts when 2 "
        "more are freed there"
    )
    assert rows["small-later"]["reason"] == (
        "capacity: 2 free slots in pool 'gpu-a' are reserved for a job that has waited long; this one "
        "backfills onto what the reservation does not need"
    )
    assert as_alice.get(f"{V1}/admin/queue").status_code == 404
    for job in smalls[2:]:
        alloc = Allocation.objects.get(job=job)
        Job.objects.filter(pk=job.pk).update(state="running")
        job_process_exited(allocation_id=alloc.pk, exit_code=0)
    assert schedule_pass().admitted == [big.pk]
    assert Job.objects.get(pk=later.pk).state == "queued"
