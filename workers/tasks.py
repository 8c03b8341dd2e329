"""Celery tasks: thin adapters that call services. The database row is the truth; a message only nudges.

Every task is idempotent (it re-reads the rows and acts only if the state still calls for it), so
``acks_late`` is safe: a message redelivered after a worker died (visibility timeout) just runs again.
Every task has time limits and an expiry on its messages, so a backlog of stale nudges never piles up work.
"""

from __future__ import annotations

from celery import shared_task
from celery.signals import worker_ready
from django.db import transaction

from portal.celery import app
from portal.services.scheduler import schedule_pass
from workers import health as _health  # noqa: F401  (beat's and the workers' heartbeats, /readyz)
from workers.beat import beat_schedule
from workers.supervisor import launch, pools_refresh, stop_allocation, supervise

# Beat reads this after the tasks are imported; settings.CELERY_BEAT_SCHEDULE entries win.
app.conf.beat_schedule = {**beat_schedule(), **(app.conf.beat_schedule or {})}

COMMON = {"acks_late": True, "reject_on_worker_lost": True, "ignore_result": True}


@shared_task(name="workers.schedule", time_limit=60, soft_time_limit=50, **COMMON)
def schedule_task() -> dict:
    result = schedule_pass()
    return {"admitted": len(result.admitted), "preempted": len(result.preempted), "seconds": result.seconds}


@shared_task(name="workers.launch", time_limit=120, soft_time_limit=100, **COMMON)
def launch_task(allocation_id: int) -> str:
    return launch(allocation_id)


@shared_task(name="workers.stop_allocation", time_limit=60, soft_time_limit=50, **COMMON)
def stop_allocation_task(allocation_id: int, why: str = "stop") -> str:
    return stop_allocation(allocation_id, why)


@shared_task(name="workers.supervise", time_limit=120, soft_time_limit=100, **COMMON)
def supervise_task() -> dict:
    return supervise()


@shared_task(name="workers.pools_refresh", time_limit=60, soft_time_limit=50, **COMMON)
def pools_refresh_task() -> int:
    return pools_refresh()


def schedule_soon() -> None:
    """Nudge the scheduler once the current transaction commits (job_submit calls this)."""
    transaction.on_commit(lambda: schedule_task.apply_async(expires=30), robust=True)


@worker_ready.connect
def _register_pools(**_kwargs) -> None:
    # The embedded default pool exists as soon as a worker is up, then the scheduler looks at the queue.
    try:
        pools_refresh_task.apply_async(expires=60)
        schedule_task.apply_async(expires=30)
    except Exception:  # noqa: S110 -- beat repeats both within seconds
        pass
