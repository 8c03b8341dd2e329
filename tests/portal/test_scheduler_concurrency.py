"""Racing schedulers and submissions on real PostgreSQL: capacity and quotas are never exceeded."""

from __future__ import annotations

import contextlib
import threading

import pytest
from django.db import connection

from portal.models import Allocation, Job
from portal.services.scheduler import schedule_pass
from tests.workers.conftest import make_pool, set_quota, submit

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.timeout(120)]


def run_threads(n, target):
    errors: list[BaseException] = []
    barrier = threading.Barrier(n)

    def body(i):
        try:
            barrier.wait()
            target(i)
        except BaseException as e:  # surfaced below
            errors.append(e)
        finally:
            connection.close()

    threads = [threading.Thread(target=body, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors


def test_racing_scheduler_passes_and_submissions_never_over_admit(acme, globex):
    make_pool("gpu-a", 6)
    make_pool("gpu-b", 4)
    set_quota(acme, max_gpus=4, borrowing_limit_gpus=3, max_queued_jobs=100)
    set_quota(globex, max_gpus=5, borrowing_limit_gpus=0, max_queued_jobs=100)
    for i in range(12):
        submit(acme, gpus=1 + i % 3, name=f"a{i}")

    def work(i):
        if i % 2:
            for k in range(4):
                submit(globex, gpus=1 + k % 2, name=f"g{i}-{k}")
        for _ in range(3):
            schedule_pass()

    run_threads(6, work)
    live = Allocation.objects.filter(released_at__isnull=True)
    per_pool = {p: sum(a.slots for a in live if a.pool.name == p) for p in ("gpu-a", "gpu-b")}
    assert per_pool["gpu-a"] <= 6 and per_pool["gpu-b"] <= 4
    acme_gpus = sum(a.gpus for a in live if a.job.organization_id == acme.pk)
    globex_gpus = sum(a.gpus for a in live if a.job.organization_id == globex.pk)
    assert acme_gpus <= 7 and globex_gpus <= 5
    assert sum(per_pool.values()) >= 8  # and the racing passes did fill the pools
    # Every admitted job has exactly one live allocation, every allocation an admitted job.
    admitted = set(Job.objects.filter(state="admitted").values_list("pk", flat=True))
    assert admitted == {a.job_id for a in live}
    assert live.count() == len(admitted)


def test_racing_submissions_respect_the_queue_limit(acme):
    set_quota(acme, max_queued_jobs=5)
    from portal.errors import QuotaExceeded

    accepted = []

    def work(i):
        with contextlib.suppress(QuotaExceeded):
            accepted.append(submit(acme, name=f"r{i}").pk)

    run_threads(8, work)
    assert len(accepted) == 5 == Job.objects.filter(organization=acme).count()
