"""The supervisor pass (beat, every few seconds): launch what was admitted, reap what was lost, charge usage.

Every decision is re-checked under row locks by the services it calls, so passes on several workers at
once, or a pass racing a runner's exit report, are harmless.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from datetime import timedelta

import redis
from django.conf import settings
from django.db import transaction
from django.utils import timezone

from opentinker.spec import TERMINAL_STATES, JobState
from portal.celery import app
from portal.errors import Conflict
from portal.models import Allocation, ComputePool, Job
from portal.observability import context
from portal.services.env_secrets import EnvironmentSecretMissing
from portal.services.jobs import job_transition
from portal.services.model_servers import model_servers_reconcile
from portal.services.pools import pool_ensure, pool_report
from portal.services.supervision import (
    SYSTEM,
    allocation_release,
    job_launched,
    job_process_exited,
    job_requeue,
)
from portal.services.usage import accounting_tick
from workers.drivers import driver_for, job_env, work_dir, write_spec

logger = logging.getLogger(__name__)
S = JobState


def launch(allocation_id: int) -> str:
    """Start the runtime of an admitted job on its pool. Idempotent: a second call finds it launched."""
    with transaction.atomic():
        alloc = (
            Allocation.objects.select_for_update(skip_locked=True, of=("self",))
            .select_related("pool", "job", "job__organization")
            .filter(pk=allocation_id)
            .first()
        )
        if alloc is None:
            return "busy or gone"
        if alloc.released_at is not None or alloc.runtime_handle or alloc.launched_at is not None:
            return "already launched or released"
        if alloc.job.state != S.ADMITTED:
            return f"job is {alloc.job.state}"
        # Claimed: a duplicate message finds this and does nothing. If we die before the start is recorded,
        # the supervisor re-queues the job after OPENTINKER_LAUNCH_TIMEOUT_S.
        Allocation.objects.filter(pk=alloc.pk).update(runtime_handle="launching")
    job = alloc.job
    context.bind(job_id=job.pk, org_id=job.organization_id)  # on this task's log lines
    driver = driver_for(alloc.pool)
    path = work_dir(job, alloc.attempt)
    try:
        spec_path = write_spec(job, path)
        launched = driver.launch(alloc, path, spec_path, job_env(job, alloc))
    except EnvironmentSecretMissing as e:
        # No retry can bring a deleted secret back: fail the job now, saying why.
        allocation_release(alloc, reason="failed: its environment secret is gone")
        with contextlib.suppress(Conflict):  # cancelled meanwhile: that outcome stands
            job_transition(job=job, to=S.FAILED, actor=SYSTEM, reason=e.message)
        return "failed"
    except Exception as e:
        logger.exception("launch of job %s failed", job.pk)
        job_requeue(job=job, why="lost", reason=f"could not start on pool {alloc.pool.name}: {e}"[:400])
        return "failed"
    job_launched(
        allocation_id=alloc.pk, handle=launched.handle, host=launched.host, log_path=str(path / "output.log")
    )
    return "launched"


def stop_allocation(allocation_id: int, why: str) -> str:
    """Ask the runtime to stop (checkpoint and exit). The local runner does this by itself within one
    heartbeat; this speeds it up, and is what stops a Ray job."""
    alloc = (
        Allocation.objects.select_related("pool").filter(pk=allocation_id, released_at__isnull=True).first()
    )
    if alloc is None or not alloc.runtime_handle or alloc.runtime_handle == "launching":
        return "nothing to stop"
    context.bind(job_id=alloc.job_id)
    driver_for(alloc.pool).stop(alloc)
    return "stop requested"


def ensure_local_pool() -> ComputePool | None:
    """The embedded default: one `local` pool for this machine (its GPUs, or CPU slots). Idempotent."""
    name = settings.OPENTINKER_LOCAL_POOL
    if not name:
        return None
    pool, _ = pool_ensure(name=name, driver=ComputePool.Driver.LOCAL, labels={"host": "embedded"})
    return pool


def pools_refresh() -> int:
    """Read each pool's capacity and health from the pool itself."""
    ensure_local_pool()
    n = 0
    for pool in ComputePool.objects.all():
        try:
            capacity = driver_for(pool).capacity()
            pool_report(pool=pool, capacity=capacity, health=ComputePool.Health.HEALTHY)
        except Exception as e:
            pool_report(pool=pool, capacity=None, health=ComputePool.Health.DOWN, message=str(e))
        n += 1
    return n


def supervise(now=None) -> dict:
    now = now or timezone.now()
    stats = {"released": 0, "launched": 0, "requeued": 0, "reaped": 0}
    heartbeat_timeout = timedelta(seconds=settings.OPENTINKER_HEARTBEAT_TIMEOUT_S)
    runtime_timeout = timedelta(seconds=settings.OPENTINKER_RUNTIME_HEARTBEAT_TIMEOUT_S)
    launch_timeout = timedelta(seconds=settings.OPENTINKER_LAUNCH_TIMEOUT_S)
    live = Allocation.objects.filter(released_at__isnull=True).select_related("pool", "job")
    for alloc in live:
        job = alloc.job
        state = S(job.state)
        if state in TERMINAL_STATES or state is S.QUEUED:
            allocation_release(alloc, reason=f"job {state.value}")
            stats["released"] += 1
            continue
        if alloc.launched_at is None:
            if now - alloc.admitted_at > launch_timeout:
                job_requeue(job=job, why="lost", reason="the launch did not complete in time")
                stats["requeued"] += 1
            elif not alloc.runtime_handle:
                # the first message may be lost; sent by name (workers.tasks imports this module)
                app.send_task("workers.launch", args=[alloc.pk], expires=300)
                stats["launched"] += 1
            continue
        driver = driver_for(alloc.pool)
        # Where the supervisor is the runtime's runner (a Ray job), the driver heartbeats a live runtime and
        # records an ended one's outcome here; a local runner does both by itself.
        if driver.follow(alloc):
            stats["reaped"] += 1
            continue
        beat = alloc.heartbeat_at or alloc.launched_at
        if now - beat > heartbeat_timeout:
            # The runner (or its whole node; for Ray, the cluster) is gone: nobody can report this outcome.
            driver.kill(alloc)
            job_process_exited(allocation_id=alloc.pk, exit_code=None, detail=driver.lost_detail)
            stats["reaped"] += 1
            continue
        runtime_beat = job.last_heartbeat_at
        if runtime_beat and runtime_beat > alloc.launched_at and now - runtime_beat > runtime_timeout:
            logger.warning("job %s: runtime silent since %s; killing it", job.pk, job.last_heartbeat_at)
            driver.kill(alloc)  # the runner reports the signal: re-queued as lost
            stats["reaped"] += 1
    accounting_tick(now=now)
    # A Tinker queue with work and no model server gets one (a nudge lost at commit, an idle exit's race).
    try:
        stats["model_servers"] = len(model_servers_reconcile(_valkey(settings.REDIS_URL)))
    except redis.RedisError as e:
        logger.warning("model servers not reconciled: %r", e)
    return stats


@functools.cache
def _valkey(url: str) -> redis.Redis:
    return redis.Redis.from_url(url, socket_timeout=10)


__all__ = ["Job", "launch", "pools_refresh", "stop_allocation", "supervise"]
