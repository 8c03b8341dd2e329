"""How the ``ray`` driver copies a Ray job's log into the job's log, pass by pass (real PostgreSQL).

The cluster side is a stand-in (``LogCluster``: a Ray job's status and its log as the Job API serves it,
the whole log every time), so the cases that a real cluster cannot produce on demand are exact: a line still
being written, a log longer than one pass may copy, two passes racing with different copies of the log. The
real cluster's path is in test_ray_driver.py.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from django.utils import timezone

from portal.models import Allocation, Job, JobLog
from portal.services.scheduler import schedule_pass
from tests.workers.conftest import make_pool, set_quota, submit
from workers.drivers import ray as ray_driver
from workers.drivers.ray import RayDriver

pytestmark = pytest.mark.django_db


class LogCluster:
    def __init__(self) -> None:
        self.status = "RUNNING"
        self.log = ""
        self.exit_code: int | None = None

    def get_job_info(self, sid):
        return SimpleNamespace(status=self.status, driver_exit_code=self.exit_code, message="")

    def get_job_logs(self, sid):
        return self.log

    def get_job_status(self, sid):
        return self.status

    def stop_job(self, sid):
        return True


@pytest.fixture
def running(acme):
    set_quota(acme, max_gpus=0)
    pool = make_pool("ray-x", 2, cpu_slots=True, cpus=2, driver="ray", ray_address="http://ray.invalid:8265")
    job = submit(acme, pool="ray-x")
    assert job.pk in schedule_pass().admitted
    alloc = Allocation.objects.get(job=job, released_at__isnull=True)
    Allocation.objects.filter(pk=alloc.pk).update(
        runtime_handle=f"otk-{job.pk}-0", launched_at=timezone.now(), heartbeat_at=timezone.now()
    )
    Job.objects.filter(pk=job.pk).update(state="running")
    alloc.refresh_from_db()
    cluster = LogCluster()
    driver = RayDriver(pool)
    driver._client = cluster
    return driver, cluster, alloc, job


def lines(job) -> list[str]:
    return list(JobLog.objects.filter(job=job).order_by("seq").values_list("line", flat=True))


def test_lines_reach_the_job_log_while_it_runs_once_each_and_a_half_line_waits(running):
    driver, cluster, alloc, job = running
    cluster.log = "first\n"
    assert driver.follow(alloc) is False
    assert lines(job) == ["first"]
    assert driver.follow(alloc) is False  # nothing new: nothing appended again
    assert lines(job) == ["first"]
    cluster.log += "second\nthird, half writ"
    driver.follow(alloc)
    assert lines(job) == ["first", "second"]  # the unfinished line waits for its newline
    cluster.log += "ten\n"
    driver.follow(alloc)
    assert lines(job) == ["first", "second", "third, half written"]
    alloc.refresh_from_db()
    assert alloc.log_offset == len(cluster.log) == 33 and alloc.released_at is None

    # It ends: the last line is copied even without a newline, then the outcome is recorded.
    cluster.log += "bye"
    cluster.status, cluster.exit_code = "SUCCEEDED", 0
    assert driver.follow(alloc) is True
    assert lines(job) == ["first", "second", "third, half written", "bye"]
    assert Job.objects.get(pk=job.pk).state == "succeeded"


def test_a_long_log_is_copied_a_bounded_chunk_per_pass_and_drained_before_the_outcome(running, monkeypatch):
    driver, cluster, alloc, job = running
    monkeypatch.setattr(ray_driver, "LOG_LINES_PER_PASS", 4)
    cluster.log = "".join(f"line {i}\n" for i in range(10))
    driver.follow(alloc)
    assert lines(job) == [f"line {i}" for i in range(4)]
    cluster.status, cluster.exit_code = "FAILED", 3
    assert driver.follow(alloc) is False  # ended, but 2 lines are still to copy: the outcome waits
    assert len(lines(job)) == 8 and Job.objects.get(pk=job.pk).state == "running"
    assert driver.follow(alloc) is True
    assert lines(job) == [f"line {i}" for i in range(10)]
    job.refresh_from_db()
    assert job.state == "failed" and "line 9" in job.state_reason


def test_a_pass_holding_an_older_copy_of_the_log_appends_nothing_twice(running):
    driver, cluster, alloc, job = running
    cluster.log = "a\nb\n"
    stale = cluster.log
    cluster.log += "c\n"
    driver.follow(alloc)  # the newer pass went first
    cluster.log = stale  # the racing pass fetched before "c" was written
    driver.follow(alloc)
    cluster.log = "a\nb\nc\nd\n"
    driver.follow(alloc)
    assert lines(job) == ["a", "b", "c", "d"]
