"""Heartbeats of Celery beat and workers, for the readiness check (portal/health.py, ``/readyz``).

- beat: each time the beat process publishes a periodic task (the scheduler pass runs every few seconds);
- a worker: each time it finishes a task (beat's passes give every live worker one every few seconds).

Each is one Valkey SET, at most every MIN_INTERVAL_S per process; a failed write is ignored (the readiness
check reports Valkey itself).
"""

from __future__ import annotations

import logging
import socket
import time

from celery.signals import beat_init, before_task_publish, task_postrun

from portal import health

logger = logging.getLogger(__name__)
MIN_INTERVAL_S = 2.0

_in_beat = False
_last: dict[str, float] = {}


def _beat(key: str, who: str) -> None:
    now = time.monotonic()
    if now - _last.get(key, -MIN_INTERVAL_S) < MIN_INTERVAL_S:
        return
    _last[key] = now
    try:
        health.heartbeat_record(key, who)
    except Exception as exc:  # Valkey away: /readyz says so on its own
        logger.debug("heartbeat %s not recorded: %s", key, exc)


@beat_init.connect
def _beat_started(**_kwargs) -> None:
    global _in_beat
    _in_beat = True  # the beat process (alone, or the child process a worker started with -B)
    _beat(health.BEAT_KEY, f"beat@{socket.gethostname()}")


@before_task_publish.connect
def _published(sender=None, **_kwargs) -> None:
    if _in_beat:
        _beat(health.BEAT_KEY, f"beat@{socket.gethostname()}")


@task_postrun.connect
def _task_done(sender=None, **_kwargs) -> None:
    hostname = getattr(getattr(sender, "request", None), "hostname", None) or socket.gethostname()
    _beat(health.WORKER_KEY, str(hostname))
