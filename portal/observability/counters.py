"""Counters of events that happen in any process of the platform, kept in Valkey so one scrape sees them all.

Admissions and preemptions are counted by the scheduling pass, which runs in Celery workers; ingested metric
points by whichever web worker took the batch. Those processes live in other containers (often other hosts)
than the web process a scrape reaches, so a per-process counter would show only a slice, and prometheus'
multiprocess directory only works between processes that share a disk. One ``HINCRBY`` per pass or batch
(never per request) keeps them exact across the cluster; ``metrics.ClusterCollector`` reads the hash at scrape
time. A Valkey restart resets them to zero, which Prometheus' ``rate()`` reads as a counter reset.
Counting never fails the work it counts: an unreachable Valkey loses the increment and logs it.
"""

from __future__ import annotations

import logging

import redis

from portal.services.live import valkey

KEY = "opentinker:metrics:counters"
# The counters; a field of the hash is "<name>" or "<name>|<label value>" (at most one label).
ADMISSIONS = "scheduler_admissions"
PREEMPTIONS = "scheduler_preemptions"
POINTS_INGESTED = "ingest_metric_points"

log = logging.getLogger(__name__)


def count(increments: dict[tuple[str, str], int]) -> None:
    """Add to counters: {(name, label value or ""): n}; zeros are skipped, all in one round trip."""
    increments = {k: n for k, n in increments.items() if n}
    if not increments:
        return
    try:
        pipe = valkey().pipeline(transaction=False)
        for (name, label), n in increments.items():
            pipe.hincrby(KEY, f"{name}|{label}" if label else name, n)
        pipe.execute()
    except redis.RedisError as exc:
        log.warning("metrics counters not updated (Valkey unreachable): %s", exc)


def read() -> dict[tuple[str, str], int]:
    """Every counter: {(name, label value or ""): total}."""
    out: dict[tuple[str, str], int] = {}
    for field, value in valkey().hgetall(KEY).items():
        name, _, label = field.decode().partition("|")
        out[(name, label)] = int(value)
    return out
