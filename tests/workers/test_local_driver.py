"""The local driver end to end: real runner and runtime subprocesses, real PostgreSQL.

The runtime is tests/workers/fake_runtime.py (steps, sleeps, exit codes from the job name)."""

from __future__ import annotations

import os
import signal
import time
from datetime import timedelta

import pytest
from django.utils import timezone

from portal.actors import Actor
from portal.models import Allocation, Job, JobLog, UsageRecord
from portal.services.jobs import job_cancel
from portal.services.scheduler import schedule_pass
from tests.workers.conftest import make_pool, set_quota, submit
from workers.supervisor import launch, supervise

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.timeout(90)]


def wait_for(predicate, timeout=30.0, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def supervised(predicate):
    """`predicate` with the beat's supervisor pass (which follows a pool's runtimes) at most once a second:
    for `wait_for` on what only a supervisor pass brings about (a Ray job's end, its heartbeat, log copy)."""
    last = [0.0]

    def check():
        if time.monotonic() - last[0] >= 1.0:
            supervise()
            last[0] = time.monotonic()
        return predicate()

    return check


def state(job) -> str:
    return Job.objects.get(pk=job.pk).state


def start(job) -> Allocation:
    assert job.pk in schedule_pass().admitted
    alloc = Allocation.objects.get(job=job, released_at__isnull=True)
    assert launch(alloc.pk) == "launched"
    assert launch(alloc.pk) == "already launched or released"  # a duplicated message starts nothing
    alloc.refresh_from_db()
    return alloc


@pytest.fixture
def pool(db):
    return make_pool("local", 2, cpu_slots=True, cpus=2)


def test_job_runs_to_success_with_logs_usage_and_a_clean_environment(acme, pool, runner_env):
    job = submit(acme, name="fake_steps-3_sleep-0.3", cpus=2)
    alloc = start(job)
    assert state(job) == "running"
    assert alloc.runtime_handle.isdigit() and alloc.launched_at is not None
    wait_for(lambda: state(job) == "succeeded", what="success")
    alloc.refresh_from_db()
    assert alloc.exit_code == 0 and alloc.released_at is not None
    lines = list(JobLog.objects.filter(job=job).order_by("seq").values_list("stream", "line"))
    assert ("stdout", "step 3") in lines and ("stderr", "starting") in lines
    env_line = next(line for stream, line in lines if line.startswith("env "))
    # The runtime never sees the platform's credentials, gets no GPU (CPU slot), gets its job token.
    assert "DATABASE_URL=False" in env_line and "CUDA_VISIBLE_DEVICES=''" in env_line
    assert f"job={job.pk}" in env_line and "token=True" in env_line
    usage = UsageRecord.objects.get(organization=acme)
    # 2 CPUs x the allocation's life (from its own timestamps, so at any speed), which holds the runtime's
    # 3 x 0.3 s of sleep.
    life = (alloc.released_at - alloc.launched_at).total_seconds()
    assert usage.gpu_seconds == 0 and usage.cpu_seconds == pytest.approx(2 * life) and life >= 0.9
    assert (runner_env / "jobs" / str(job.pk) / "attempt-0" / "output.log").exists()


def test_nonzero_exit_fails_the_job_with_the_stderr_tail(acme, pool, runner_env):
    job = submit(acme, name="fake_steps-1_sleep-0.1_exit-3")
    start(job)
    wait_for(lambda: state(job) == "failed", what="failure")
    job.refresh_from_db()
    assert job.state_reason == "runtime exited with code 3: starting"
    assert job.attempt == 0


def test_killed_runtime_is_requeued_and_resumes_from_its_checkpoint(acme, pool, runner_env):
    from portal.models import Checkpoint

    job = submit(acme, name="fake_steps-6_sleep-0.1_hold-2")  # the first attempt waits after step 2
    alloc = start(job)
    wait_for(lambda: JobLog.objects.filter(job=job, line="step 2").exists(), what="step 2")
    Checkpoint.objects.create(job=job, step=2, uri=f"file:///tmp/ckpt/{job.pk}/step-2")
    os.kill(int(alloc.runtime_handle), signal.SIGKILL)
    wait_for(lambda: state(job) == "queued", what="re-queue")
    job.refresh_from_db()
    assert job.attempt == 1 and job.state_reason == "runtime killed by signal 9"
    alloc2 = start(job)
    assert alloc2.attempt == 1
    wait_for(lambda: state(job) == "succeeded", what="success after resume")
    lines = list(JobLog.objects.filter(job=job).order_by("seq").values_list("line", flat=True))
    resumed = [line for line in lines if "resume=file:///tmp/ckpt" in line]
    assert len(resumed) == 1
    steps = [int(line.split()[1]) for line in lines if line.startswith("step ")]
    assert steps == [1, 2, 3, 4, 5, 6]  # the second attempt went on from the first one's progress
    assert (runner_env / "jobs" / str(job.pk) / "attempt-1" / "spec.json").read_text().count("step-2") == 1


def test_cancel_stops_a_running_job_at_a_step_boundary(acme, pool, runner_env):
    job = submit(acme, name="fake_steps-3_sleep-0.1_hold-1")  # waits after step 1 until stopped
    start(job)
    wait_for(lambda: JobLog.objects.filter(job=job, line="step 1").exists(), what="step 1")
    job_cancel(job=job, actor=Actor.system("test"))
    assert state(job) == "cancelling"
    wait_for(lambda: state(job) == "cancelled", what="cancelled")
    assert JobLog.objects.filter(job=job, line="stopping before step 2").exists()
    assert Allocation.objects.get(job=job).released_at is not None


def test_lost_runner_is_reaped_then_the_retry_limit_fails_the_job(acme, pool, runner_env, settings):
    settings.OPENTINKER_HEARTBEAT_TIMEOUT_S = 2
    settings.OPENTINKER_JOB_MAX_RETRIES = 1
    job = submit(acme, name="fake_steps-200_sleep-0.2")
    for attempt in range(2):
        alloc = start(job)
        wait_for(
            lambda a=alloc: Allocation.objects.get(pk=a.pk).heartbeat_at > a.launched_at, what="heartbeat"
        )
        runner_pid = _runner_of(int(alloc.runtime_handle))
        os.kill(runner_pid, signal.SIGKILL)  # the node (runner) dies; the runtime is orphaned
        wait_for(lambda p=runner_pid: not _alive(p), what="runner gone")
        # The reaper looks past the heartbeat timeout (now + 3 s) instead of the test sleeping through it.
        stats = supervise(now=timezone.now() + timedelta(seconds=3))
        assert stats["reaped"] == 1
        # The orphaned runtime was killed with its process group.
        wait_for(lambda a=alloc: not _alive(int(a.runtime_handle)), what="runtime killed")
        job.refresh_from_db()
        if attempt == 0:
            assert (job.state, job.attempt, job.state_reason) == ("queued", 1, "runtime process lost")
    assert job.state == "failed"
    assert job.state_reason == "runtime process lost; gave up after 1 retries"


def _runner_of(pid: int) -> int:
    import psutil

    return psutil.Process(pid).ppid()


def _alive(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_admitted_job_whose_launch_never_completed_is_requeued(acme, pool, runner_env, settings):
    settings.OPENTINKER_LAUNCH_TIMEOUT_S = 0
    set_quota(acme, max_gpus=0)
    job = submit(acme, name="fake")
    schedule_pass()
    Allocation.objects.filter(job=job).update(runtime_handle="launching")  # the launcher died mid-way
    supervise()
    job.refresh_from_db()
    assert (job.state, job.attempt, job.state_reason) == ("queued", 1, "the launch did not complete in time")
