"""Fault tests with the real pieces: a `celery worker` (embedded beat) on the real Valkey broker, runners and
the real ``python -m gpu_runtime run`` reporting to a live uvicorn's ingest API.

- Valkey restarts in the middle of a job: the job is not lost (it finishes ``succeeded`` on its first
  attempt, every metric step there once), and the worker carries on with the restarted broker.
- The whole node is lost in the middle of a job (``kill -9`` of the Celery worker AND of the job's runner and
  runtime): a new worker's reaper re-queues the job, the new attempt resumes from the last checkpoint and
  completes; the metric steps are exactly 1..N, none missing, none twice.

(``kill -9`` of the worker alone, where the job's detached runner finishes it, is in test_celery_worker.py.)

The runtime is the real one, held after a given step until the test opens a gate (gated_runtime.py): the
fault is injected while the job is certainly mid-way, however fast the machine runs it.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

import psutil
import pytest
from django.utils import timezone

from opentinker.spec import AlgorithmSpec, CheckpointSpec, ResourcesSpec, example_rl_spec
from portal.actors import Actor
from portal.celery import app
from portal.models import Allocation, Checkpoint, ComputePool, Job, JobEvent, JobLog, Metric
from portal.services.jobs import job_submit
from tests.api.test_stream import uvicorn_url  # noqa: F401 (fixture)
from tests.workers.conftest import set_quota
from tests.workers.test_celery_worker import start_worker
from tests.workers.test_local_driver import wait_for

pytestmark = [
    pytest.mark.django_db(transaction=True),
    pytest.mark.usefixtures("builtin_envs"),
    pytest.mark.slow,
    pytest.mark.timeout(240),
]
STEPS = 6
GATED_RUNTIME = str(Path(__file__).with_name("gated_runtime.py"))


@pytest.fixture
def real_job(acme, uvicorn_url):  # noqa: F811
    app.control.purge()
    set_quota(acme, max_gpus=0)
    spec = example_rl_spec().model_copy(
        update={
            "algorithm": AlgorithmSpec(
                name="grpo", steps=STEPS, batch_size=2, group_size=2, max_new_tokens=4
            ),
            "checkpoint": CheckpointSpec(every_steps=2, keep_last=3),
            "resources": ResourcesSpec(gpus=0, cpus=1, memory_gb=2, max_hours=0.2),
        }
    )
    return lambda: job_submit(organization=acme, actor=Actor.system("test"), spec=spec)[0]


def worker_env(uvicorn_url, gate: Path, hold_after: int, **extra):  # noqa: F811
    """The real runtime, waiting after step `hold_after` until the file `gate` exists."""
    return {
        "OPENTINKER_RUNTIME_COMMAND": json.dumps([sys.executable, GATED_RUNTIME, str(gate), str(hold_after)]),
        "INGEST_BASE_URL": uvicorn_url,
        "OPENTINKER_POOLS_REFRESH_EVERY_S": "1",
        **extra,
    }


def steps_of(job) -> list[int]:
    return list(
        Metric.objects.filter(job=job, name="reward/mean").order_by("step").values_list("step", flat=True)
    )


def stop(worker) -> None:
    if worker.poll() is None:
        os.killpg(worker.pid, signal.SIGKILL)
        worker.wait(timeout=10)


def logs(job) -> str:
    return "\n".join(JobLog.objects.filter(job=job).order_by("seq").values_list("line", flat=True))[-3000:]


def test_valkey_restart_mid_job_loses_nothing(real_job, uvicorn_url, tmp_path):  # noqa: F811
    from tests import embedded_services

    services = embedded_services._services
    if services is None:
        pytest.skip("REDIS_URL given from outside: this test restarts only the Valkey it started itself")
    gate = tmp_path / "gate"
    worker = start_worker(tmp_path, "worker.log", **worker_env(uvicorn_url, gate, hold_after=1))
    try:
        job = real_job()
        wait_for(lambda: steps_of(job), timeout=90, what="a first metric")  # the runtime waits after it
        services._stop_valkey()  # the broker, the result/live streams: all gone for a moment
        try:
            assert Job.objects.get(pk=job.pk).state == "running" and steps_of(job) == [1]  # mid-job
            gate.touch()  # the job goes on while Valkey is down
            time.sleep(2)
        finally:
            services._start_valkey()  # same port, its AOF replayed
        restarted = timezone.now()
        wait_for(
            lambda: Job.objects.get(pk=job.pk).state in ("succeeded", "failed", "cancelled"),
            timeout=150,
            what="the job's end",
        )
        job.refresh_from_db()
        assert job.state == "succeeded", f"{job.state_reason}\n{logs(job)}"
        # The worker reconnected: beat and tasks run again (the pool refresh heartbeats the pool).
        wait_for(
            lambda: ComputePool.objects.get(name="local").last_heartbeat > restarted,
            timeout=30,
            what="the worker working after the restart",
        )
    finally:
        gate.touch()
        stop(worker)
    states = list(
        JobEvent.objects.filter(job=job, kind="state").order_by("seq").values_list("to_state", flat=True)
    )
    assert states == ["queued", "admitted", "running", "succeeded"]  # never lost, never re-queued
    assert job.attempt == 0
    assert steps_of(job) == list(range(1, STEPS + 1))


def test_node_lost_mid_job_is_requeued_and_resumes_from_its_checkpoint(real_job, uvicorn_url, tmp_path):  # noqa: F811
    gate = tmp_path / "gate"
    worker = start_worker(tmp_path, "worker-1.log", **worker_env(uvicorn_url, gate, hold_after=3))
    try:
        job = real_job()
        # Lose the node after a checkpoint and a metric past it: some work after the checkpoint is lost. The
        # runtime waits after step 3 (the checkpoint is step 2's), so the node is lost mid-job.
        wait_for(
            lambda: Checkpoint.objects.filter(job=job).exists() and len(steps_of(job)) >= 3,
            timeout=120,
            what="a checkpoint and three steps",
        )
        alloc = Allocation.objects.get(job=job, released_at__isnull=True)
        runtime = psutil.Process(int(alloc.runtime_handle))
        runner = runtime.parent()
        os.killpg(worker.pid, signal.SIGKILL)  # the worker and its beat,
        runner.kill()  # the runner,
        os.killpg(runtime.pid, signal.SIGKILL)  # and the runtime with its process group
        worker.wait(timeout=10)
        psutil.wait_procs([runner, runtime], timeout=10)
        before = steps_of(job)
        last_ck = Checkpoint.objects.filter(job=job).order_by("-step").first()
    finally:
        gate.touch()  # the next attempt does not wait
        stop(worker)

    # A new worker: its supervisor finds the allocation silent, reaps it, the scheduler re-admits the job.
    # 10 s of silence: 20 of the new runner's 0.5 s heartbeats, so a live runner on a loaded machine is
    # never taken for a lost one (the dead allocation has been silent since the kill anyway).
    worker = start_worker(
        tmp_path,
        "worker-2.log",
        **worker_env(uvicorn_url, gate, hold_after=3, OPENTINKER_HEARTBEAT_TIMEOUT_S="10"),
    )
    try:
        wait_for(
            lambda: Job.objects.get(pk=job.pk).state in ("succeeded", "failed", "cancelled"),
            timeout=150,
            what="the resumed job's end",
        )
    finally:
        stop(worker)
    job.refresh_from_db()
    assert job.state == "succeeded", f"{job.state_reason}\n{logs(job)}"
    assert job.attempt == 1
    events = JobEvent.objects.filter(job=job, kind="state").order_by("seq")
    assert list(events.values_list("to_state", flat=True)) == [
        *("queued", "admitted", "running"),
        *("queued", "admitted", "running", "succeeded"),
    ]
    assert events.filter(to_state="queued", data__requeue="lost").get().message == "runtime process lost"
    # The second attempt started from the last checkpoint: its spec says so, and it began after that step.
    spec = (tmp_path / "jobs" / str(job.pk) / "attempt-1" / "spec.json").read_text()
    assert last_ck.uri in spec
    assert before == [1, 2, 3] and last_ck.step == 2  # lost mid-job, one step past its checkpoint
    assert steps_of(job) == list(range(1, STEPS + 1))  # none missing, none twice
    assert Allocation.objects.filter(job=job).count() == 2
    assert Allocation.objects.filter(job=job, released_at__isnull=True).count() == 0
