"""Reads of jobs and their metrics, events and checkpoints, always within one organization."""

from __future__ import annotations

import uuid
from dataclasses import dataclass

from django.db import connection
from django.db.models import QuerySet

from portal.errors import NotFound
from portal.models import Checkpoint, Job, JobEvent, Metric, Organization, RolloutStep

MAX_POINTS = 5000


def job_list(
    organization: Organization,
    *,
    state: list[str] | None = None,
    kind: str | None = None,
    name: str | None = None,
) -> QuerySet:
    qs = Job.objects.filter(organization=organization).select_related("organization", "created_by")
    if state:
        qs = qs.filter(state__in=state)
    if kind:
        qs = qs.filter(kind=kind)
    if name:
        qs = qs.filter(name__icontains=name)
    return qs.order_by("-created_at", "id")


# Above this many jobs an organization's list has no version (job_list_version): reading every job row's
# xmin is a scan of the organization's rows (EXPLAIN ANALYZE, vacuumed table, loaded 2-core box: ~40 ms for
# 50,000 jobs against ~4 ms for the index-only count it replaced; ~8 ms for 5,000), more database time per
# request than a stored page saves in the web process (~8 ms of CPU for a page of 50).
VERSIONED_MAX_JOBS = 2000


def job_list_version(organization: Organization) -> tuple[int, tuple | None]:
    """The organization's job count and a version of everything its job list shows, in one query.

    The version sums the row versions (PostgreSQL's `xmin`, the id of the transaction that wrote the row) of
    the organization's jobs, of their creators and of the organization itself: any insert, update or delete
    of one of those rows changes it, however it was written (save(), a queryset's update(), raw SQL), so a
    page stored under one version is the page as the database holds it. None (and no row read for it) when
    the organization has more than VERSIONED_MAX_JOBS jobs: then only the count is read, from the index.
    """
    job, user = Job._meta.db_table, Job._meta.get_field("created_by").related_model._meta.db_table
    org = Organization._meta.db_table
    sql = f"""
        SELECT c.n, c.n <= %s, v.jobs, v.users, v.org
        FROM (SELECT count(*) AS n FROM "{job}" WHERE organization_id = %s) c
        LEFT JOIN LATERAL (
            SELECT sum(j.xmin::text::bigint) AS jobs, sum(u.xmin::text::bigint) AS users,
                   (SELECT o.xmin::text::bigint FROM "{org}" o WHERE o.id = %s) AS org
            FROM "{job}" j LEFT JOIN "{user}" u ON u.id = j.created_by_id
            WHERE j.organization_id = %s AND c.n <= %s
        ) v ON true
    """  # noqa: S608 (table names from the models' metadata; values are parameters)
    pk = organization.pk
    with connection.cursor() as cursor:
        cursor.execute(sql, [VERSIONED_MAX_JOBS, pk, pk, pk, VERSIONED_MAX_JOBS])
        count, versioned, *version = cursor.fetchone()
    return count, tuple(version) if versioned else None


def job_get(organization: Organization, job_id: str | uuid.UUID) -> Job:
    try:
        job_uuid = uuid.UUID(str(job_id))
    except ValueError:
        raise NotFound("no such job") from None
    try:
        return job_list(organization).get(pk=job_uuid)
    except Job.DoesNotExist:
        raise NotFound("no such job") from None


@dataclass
class MetricSeries:
    name: str
    steps: list[int]
    values: list[float]
    downsampled: bool


def metric_series(
    job: Job,
    *,
    names: list[str] | None = None,
    step_min: int | None = None,
    step_max: int | None = None,
    max_points: int = 1000,
) -> list[MetricSeries]:
    """Points per metric name; a series longer than max_points is averaged into max_points equal step buckets.

    Bucketing runs in PostgreSQL (width_bucket) so a million-point series never leaves the database.
    """
    max_points = max(1, min(max_points, MAX_POINTS))
    where = ["job_id = %s"]
    params: list = [job.pk]
    if names:
        where.append("name = ANY(%s)")
        params.append(list(names))
    if step_min is not None:
        where.append("step >= %s")
        params.append(step_min)
    if step_max is not None:
        where.append("step <= %s")
        params.append(step_max)
    cond = " AND ".join(where)
    sql = f"""
        WITH pts AS (SELECT name, step, value FROM portal_metric WHERE {cond}),
        bounds AS (SELECT name, min(step) AS lo, max(step) AS hi, count(*) AS n FROM pts GROUP BY name)
        SELECT p.name, b.n > %s AS down,
               CASE WHEN b.n > %s THEN width_bucket(p.step, b.lo, b.hi + 1, %s) ELSE p.step END AS bucket,
               max(p.step) AS step, avg(p.value) AS value
        FROM pts p JOIN bounds b USING (name)
        GROUP BY p.name, down, bucket
        ORDER BY p.name, step
    """  # noqa: S608 -- only fixed fragments are formatted in; every value is a bound parameter
    series: dict[str, MetricSeries] = {}
    with connection.cursor() as cur:
        cur.execute(sql, [*params, max_points, max_points, max_points])
        for name, down, _bucket, step, value in cur.fetchall():
            s = series.setdefault(name, MetricSeries(name=name, steps=[], values=[], downsampled=down))
            s.steps.append(step)
            s.values.append(value)
    return list(series.values())


def event_list(job: Job, *, after: int = 0, limit: int = 100) -> list[JobEvent]:
    return list(
        JobEvent.objects.filter(job=job, seq__gt=after).select_related("actor_user").order_by("seq")[:limit]
    )


def checkpoint_list(job: Job) -> QuerySet:
    return Checkpoint.objects.filter(job=job).order_by("step")


def checkpoint_get(job: Job, checkpoint_id: int) -> Checkpoint:
    try:
        return checkpoint_list(job).get(pk=checkpoint_id)
    except Checkpoint.DoesNotExist:
        raise NotFound("no such checkpoint") from None


def last_metric_values(jobs: list[Job], name: str) -> dict:
    """Each job's value of metric `name` at its last step (jobs without it are left out): one query."""
    rows = (
        Metric.objects.filter(job__in=jobs, name=name)
        .order_by("job_id", "-step")
        .distinct("job_id")  # PostgreSQL's DISTINCT ON: the first row per job, i.e. its last step
        .values_list("job_id", "step", "value")
    )
    return {job_id: (step, value) for job_id, step, value in rows}


def rollout_steps(job: Job) -> list[int]:
    """The steps whose episodes are stored, in order."""
    return list(RolloutStep.objects.filter(job=job).order_by("step").values_list("step", flat=True))


def rollout_get(job: Job, step: int | None = None) -> RolloutStep:
    """The episodes of `step`, or of the latest stored step."""
    qs = RolloutStep.objects.filter(job=job)
    row = qs.filter(step=step).first() if step is not None else qs.order_by("-step").first()
    if row is None:
        raise NotFound(f"no rollouts recorded at step {step}" if step is not None else "no rollouts recorded")
    return row
