"""Why each queued job waits, as the admin queue and the job pages show it: a read-only run of the
scheduler's own plan (``portal.scheduling.policy``) on the current inputs, shared by every viewer through the
Django cache (Valkey) for a short window and dropped by each scheduling pass."""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass
from datetime import datetime

from django.conf import settings
from django.core.cache import cache
from django.utils import timezone

from portal.scheduling.inputs import plan_at
from portal.scheduling.policy import STARTING, JobView, Plan, Wait

# Read-only plans computed to explain the queue (``queue_plan``): what the explanation cache saves.
READ_ONLY_PLANS: Counter[str] = Counter()


def queue_plan(now: datetime | None = None) -> tuple[Plan, list[JobView]]:
    """The plan a pass would make now, read-only (no locks, no writes): the admin queue's explanations."""
    READ_ONLY_PLANS["computed"] += 1
    inputs, decided = plan_at(now or timezone.now(), lock=False)
    return decided, inputs.queued


# The queue's explanation, shared by every viewer through the Django cache (Valkey) for a short window.
# v2: the classes moved from portal.services.scheduler (a v1 entry would not unpickle).
EXPLANATION_KEY = "scheduler:queue-explanation:v2"


@dataclass(frozen=True)
class Explanation:
    """Every queued job in scheduling order with why it waits, as of ``computed_at`` (epoch seconds)."""

    computed_at: float
    order: tuple[object, ...]  # job ids: highest priority first, then oldest
    why: dict[object, Wait | None]  # job id -> Wait (STARTING for what the next pass admits)

    def position(self, job_id: object) -> int | None:
        """1-based place of the job in the order, None when it was not queued at ``computed_at``."""
        try:
            return self.order.index(job_id) + 1
        except ValueError:
            return None


def queue_explanation(*, fresh: bool = False) -> Explanation:
    """Why each queued job waits, computed at most once per ``OPENTINKER_QUEUE_EXPLAIN_S`` (default 5 s)
    for everybody: a plan costs O(queue x pools) and job pages refresh every few seconds per viewer.
    ``fresh`` recomputes (and shares the result): the admin queue, where staff act on what they see.
    A scheduling pass drops it (admissions change every wait), so it is never older than the last pass."""
    # Capped: a longer window would show waits that no longer hold.
    window = min(settings.OPENTINKER_QUEUE_EXPLAIN_S, 60.0)
    if not fresh and window:
        cached = cache.get(EXPLANATION_KEY)
        if isinstance(cached, Explanation):
            return cached
    decided, queued = queue_plan()
    order = tuple(j.id for j in sorted(queued, key=lambda j: (-j.priority, j.created_at, str(j.id))))
    starting = {a.job for a in decided.admit}
    why = {
        job_id: decided.waiting.get(job_id) or (STARTING if job_id in starting else None) for job_id in order
    }
    explanation = Explanation(computed_at=time.time(), order=order, why=why)
    if window:
        cache.set(EXPLANATION_KEY, explanation, timeout=window)
    return explanation


def forget_explanation() -> None:
    """Drop the shared explanation: a committed pass changed every wait."""
    cache.delete(EXPLANATION_KEY)
