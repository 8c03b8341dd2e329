"""Periodic work for Celery beat. Each period is a setting: embedded mode runs them every few seconds."""

from __future__ import annotations

from django.conf import settings


def beat_schedule() -> dict:
    return {
        "scheduler-pass": {
            "task": "workers.schedule",
            "schedule": settings.OPENTINKER_SCHEDULE_EVERY_S,
            "options": {"expires": 10},
        },
        "supervisor-pass": {
            "task": "workers.supervise",
            "schedule": settings.OPENTINKER_SUPERVISE_EVERY_S,
            "options": {"expires": 10},
        },
        "pools-refresh": {
            "task": "workers.pools_refresh",
            "schedule": settings.OPENTINKER_POOLS_REFRESH_EVERY_S,
            "options": {"expires": 60},
        },
    }
