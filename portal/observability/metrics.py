"""The Prometheus metrics of the platform, and what ``GET /metrics`` answers (README "Observability").

Three sources, chosen by where the truth lives:

- **Per process, in memory** (prometheus_client): request count and latency per route, live stream clients.
  They change on every request, so they must cost nanoseconds, not a round trip. With several server
  processes behind one port (uvicorn ``--workers``, gunicorn) a scrape reaches one of them at random, so
  ``PROMETHEUS_MULTIPROC_DIR`` makes every process write its values to files in a directory they share and the
  answering process sums them all (prometheus_client's multiprocess mode).
- **Cluster-wide counters in Valkey** (``counters``): admissions, preemptions and ingested metric points,
  which happen in Celery workers or any web process, possibly on other hosts.
- **The database, read at scrape time** (``ClusterCollector``): jobs by state, the queue per pool and its
  oldest wait, the latest step time and tokens/s of each running job. Three indexed queries per scrape; the
  rows are the truth, so every replica answers the same.

Labels are bounded: routes are URL patterns (``api/v1/jobs/<str:job_id>``, never a raw path), methods the
standard ones, pools the configured pools, per-job series only for running jobs.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import prometheus_client
from django.conf import settings
from django.db import connection
from django.db.models import Count
from django.utils import timezone
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector

from opentinker.spec import JobState
from portal.models import Job, Organization
from portal.models import Metric as MetricPoint
from portal.observability import counters

log = logging.getLogger(__name__)

UNMATCHED_ROUTE = "<unmatched>"
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
# Web latencies: a few ms for reads, up to seconds for uploads; 11 buckets per route and method.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
# The runtime's step metrics (gpu_runtime/phases.py, controller.py) exposed per running job.
RUNTIME_POINTS = {
    "time/step": "opentinker_job_step_seconds",
    "tokens_per_s": "opentinker_job_tokens_per_second",
}

REQUESTS = Counter(
    "opentinker_http_requests",
    "HTTP requests served, by route pattern, method and status.",
    ["route", "method", "status"],
)
LATENCY = Histogram(
    "opentinker_http_request_duration_seconds",
    "Time to the response (for a stream: to its first byte), by route pattern and method.",
    ["route", "method"],
    buckets=LATENCY_BUCKETS,
)
STREAM_CLIENTS = Gauge(
    "opentinker_stream_clients",
    "Live job streams (Server-Sent Events) open now.",
    multiprocess_mode="livesum",
)

_COUNTER_HELP = {
    counters.ADMISSIONS: (
        "opentinker_scheduler_admissions",
        "Jobs admitted by the scheduler, by pool.",
        "pool",
    ),
    counters.PREEMPTIONS: (
        "opentinker_scheduler_preemptions",
        "Borrowed allocations the scheduler asked to preempt, by pool.",
        "pool",
    ),
    counters.POINTS_INGESTED: (
        "opentinker_ingest_metric_points",
        "Metric points stored by the ingest API (duplicates not counted).",
        "",
    ),
}


def observe_request(route: str, method: str, status: int, seconds: float) -> None:
    method = method if method in METHODS else "other"
    REQUESTS.labels(route, method, str(status)).inc()
    LATENCY.labels(route, method).observe(seconds)


def _jobs_by_state() -> Iterator[Metric]:
    counts = {state.value: 0 for state in JobState}
    counts.update(dict(Job.objects.order_by().values_list("state").annotate(n=Count("id"))))
    family = GaugeMetricFamily("opentinker_jobs", "Jobs by state (all organizations).", labels=["state"])
    for state, n in sorted(counts.items()):
        family.add_metric([state], n)
    yield family


def _queue() -> Iterator[Metric]:
    """Queued jobs per requested pool ("": any, the scheduler chooses), and how long the oldest has waited."""
    length = GaugeMetricFamily("opentinker_queue_length", "Queued jobs, by requested pool.", labels=["pool"])
    wait = GaugeMetricFamily(
        "opentinker_queue_oldest_wait_seconds",
        "Age of the oldest queued job, by requested pool.",
        labels=["pool"],
    )
    now = timezone.now()
    with connection.cursor() as cur:
        cur.execute(
            f"SELECT pool, count(*), min(created_at) FROM {Job._meta.db_table} "  # noqa: S608 - our table
            "WHERE state = %s GROUP BY pool",
            [JobState.QUEUED.value],
        )
        for pool, n, oldest in cur.fetchall():
            length.add_metric([pool], n)
            wait.add_metric([pool], max(0.0, (now - oldest).total_seconds()))
    yield length
    yield wait


def _running_jobs() -> Iterator[Metric]:
    """The latest step time and tokens/s of each running job: one index probe per (job, metric)."""
    families = {
        point: GaugeMetricFamily(
            name,
            f"Latest {point!r} reported by the job's runtime (running jobs only).",
            labels=["job", "organization"],
        )
        for point, name in RUNTIME_POINTS.items()
    }
    with connection.cursor() as cur:
        cur.execute(
            f"""
            SELECT j.id, o.slug, n.name, (
                SELECT m.value FROM {MetricPoint._meta.db_table} m
                WHERE m.job_id = j.id AND m.name = n.name ORDER BY m.step DESC LIMIT 1
            )
            FROM {Job._meta.db_table} j
            JOIN {Organization._meta.db_table} o ON o.id = j.organization_id
            CROSS JOIN unnest(%s::varchar[]) AS n(name)
            WHERE j.state = %s
            """,  # noqa: S608 - table names are ours, values parameters
            [list(RUNTIME_POINTS), JobState.RUNNING.value],
        )
        for job_id, slug, name, value in cur.fetchall():
            if value is not None:
                families[name].add_metric([str(job_id), slug], value)
    yield from families.values()


def _cluster_counters() -> Iterator[Metric]:
    totals = counters.read()
    for key, (name, help_text, label) in _COUNTER_HELP.items():
        family = CounterMetricFamily(name, help_text, labels=[label] if label else [])
        for (counter, value), n in sorted(totals.items()):
            if counter == key:
                family.add_metric([value] if label else [], n)
        yield family


class ClusterCollector:
    """What every replica answers the same: read from PostgreSQL and Valkey at scrape time.

    A source that cannot be read is left out and ``opentinker_metrics_source_up`` says which, so a scrape
    still returns the per-process metrics while the database is down.
    """

    SOURCES = {"database": (_jobs_by_state, _queue, _running_jobs), "valkey": (_cluster_counters,)}

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily(
            "opentinker_metrics_source_up", "1 when the scrape could read this source.", labels=["source"]
        )
        for source, readers in self.SOURCES.items():
            try:
                families = [family for reader in readers for family in reader()]
            except Exception:
                log.exception("metrics: could not read the %s", source)
                up.add_metric([source], 0)
                continue
            up.add_metric([source], 1)
            yield from families
        yield up


class _ThisProcess:
    """The default registry's families (ours and the process/GC collectors), when not in multiprocess mode."""

    def collect(self) -> Iterator[Metric]:
        yield from prometheus_client.REGISTRY.collect()


def exposition() -> bytes:
    """The text exposition format of every metric, as ``GET /metrics`` answers it."""
    registry = CollectorRegistry(auto_describe=False)
    if settings.PROMETHEUS_MULTIPROC_DIR:
        MultiProcessCollector(registry, path=settings.PROMETHEUS_MULTIPROC_DIR)
    else:
        registry.register(_ThisProcess())
    registry.register(ClusterCollector())
    return prometheus_client.generate_latest(registry)
