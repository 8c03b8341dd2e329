"""Recorded episodes (gpu_runtime.rollout_log): a job's runtime stores a step's episodes; reads page by step.

Idempotent per (job, step): the same step sent again (a retried post, a step re-run after a resume) replaces
the stored one. Retention, applied after each write: the last KEEP_LAST steps, every KEEP_EVERY-th step
before them, and at most MAX_STEPS steps per job (the oldest go first). The step just written always stays:
an old step re-sent after many newer ones is kept by its own write (in place of the oldest other step), so
the 201 answer is true and the step readable; a later write thins it out by the rule. With the ingest API's
body limit (API_MAX_BODY_BYTES, 256 KiB) that bounds a job's rollouts to MAX_STEPS x 256 KiB = 25 MiB of
PostgreSQL.
"""

from __future__ import annotations

import json
from typing import Any

from django.db import transaction

from portal.models import Job, RolloutStep
from portal.services.ingest import ingest_lock

KEEP_LAST = 20
KEEP_EVERY = 10
MAX_STEPS = 100
MAX_EPISODES = 128  # a step's records: per_step <= 64, and a multi-agent game brings its other roles along


def rollouts_record(*, job: Job, step: int, episodes: list[dict[str, Any]]) -> tuple[RolloutStep, bool]:
    """Store (or replace) a step's episodes, validated by the caller; returns (row, created)."""
    size = len(json.dumps(episodes))
    with transaction.atomic():
        locked = ingest_lock(job)
        row, created = RolloutStep.objects.update_or_create(
            job=locked, step=step, defaults={"episodes": episodes, "size_bytes": size}
        )
        rollouts_retain(job=locked, written=step)
    return row, created


def rollouts_retain(*, job: Job, written: int | None = None) -> int:
    """Apply the retention rule (module docstring) to the job's stored steps, never deleting the step
    `written` (the one this call has just stored); how many were deleted."""
    steps = list(RolloutStep.objects.filter(job=job).order_by("-step").values_list("step", flat=True))
    keep = [s for i, s in enumerate(steps) if i < KEEP_LAST or s % KEEP_EVERY == 0][:MAX_STEPS]
    if written is not None and written not in keep:
        keep = [*keep[: MAX_STEPS - 1], written]
    drop = set(steps) - set(keep)
    if not drop:
        return 0
    deleted, _ = RolloutStep.objects.filter(job=job, step__in=drop).delete()
    return deleted
