"""Periodic work for Celery beat. Each period is a setting: embedded mode runs them every few seconds."""

from __future__ import annotations

import os


def _period(name: str, default: float) -> float:
    try:
        from django.conf import settings

        return float(os.environ.get(name) or getattr(settings, name, default))
    except Exception:  # settings not configured (a bare import)
        return default


def beat_schedule() -> dict:
    return {
        "scheduler-pass": {
            "task": "workers.schedule",
            "schedule": _period("OPENTINKER_SCHEDULE_EVERY_S", 5),
            "options": {"expires": 10},
        },
        "supervisor-pass": {
            "task": "workers.supervise",
            "schedule": _period("OPENTINKER_SUPERVISE_EVERY_S", 5),
            "options": {"expires": 10},
        },
        "pools-refresh": {
            "task": "workers.pools_refresh",
            "schedule": _period("OPENTINKER_POOLS_REFRESH_EVERY_S", 30),
            "options": {"expires": 60},
        },
    }
