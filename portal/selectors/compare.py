"""Reads for comparing runs: several jobs of one organization, their curves by step and by wall time, and
the keys of their specs that differ."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from django.db import connection

from portal.errors import DomainError
from portal.models import Job, Organization
from portal.selectors.jobs import job_get

MAX_JOBS = 8
MAX_POINTS = 1000  # per series: enough for a chart a few hundred pixels wide
MISSING = "—"  # a key one spec has and another lacks


def compare_jobs(organization: Organization, job_ids: list[str]) -> list[Job]:
    """The jobs, in the order asked, each once. Another organization's id is a 404 like an unknown one."""
    unique = list(dict.fromkeys(i.strip() for i in job_ids if i.strip()))
    if len(unique) > MAX_JOBS:
        raise DomainError(f"compare at most {MAX_JOBS} jobs at a time ({len(unique)} picked)", field="job")
    return [job_get(organization, i) for i in unique]


def metric_names(jobs: list[Job]) -> list[str]:
    if not jobs:
        return []
    with connection.cursor() as cur:
        cur.execute(
            "SELECT DISTINCT name FROM portal_metric WHERE job_id = ANY(%s) ORDER BY name",
            [[j.pk for j in jobs]],
        )
        return [r[0] for r in cur.fetchall()]


@dataclass
class Curve:
    """One job's series of one metric: steps, seconds since the job's first point, values."""

    steps: list[int]
    seconds: list[float]
    values: list[float]
    downsampled: bool


def compare_curves(
    jobs: list[Job], names: list[str], max_points: int = MAX_POINTS
) -> dict[str, dict[str, Curve]]:
    """{job id: {metric: Curve}}. A series longer than max_points is averaged into equal step buckets (as the
    job page's), in PostgreSQL. Wall time is when the platform received a point (its ingest time), counted
    from the job's first point, so runs that started days apart line up at 0."""
    out: dict[str, dict[str, Curve]] = {str(j.pk): {} for j in jobs}
    if not jobs or not names:
        return out
    sql = """
        WITH pts AS (
            SELECT job_id, name, step, value, created_at FROM portal_metric
            WHERE job_id = ANY(%s) AND name = ANY(%s)
        ),
        bounds AS (
            SELECT job_id, name, min(step) AS lo, max(step) AS hi, count(*) AS n
            FROM pts GROUP BY job_id, name
        ),
        origin AS (SELECT job_id, min(created_at) AS t0 FROM pts GROUP BY job_id)
        SELECT p.job_id, p.name, b.n > %s AS down,
               CASE WHEN b.n > %s THEN width_bucket(p.step, b.lo, b.hi + 1, %s) ELSE p.step END AS bucket,
               max(p.step) AS step, avg(p.value) AS value,
               extract(epoch FROM max(p.created_at) - o.t0)::float8 AS seconds
        FROM pts p JOIN bounds b USING (job_id, name) JOIN origin o USING (job_id)
        GROUP BY p.job_id, p.name, down, bucket, o.t0
        ORDER BY p.job_id, p.name, step
    """
    with connection.cursor() as cur:
        cur.execute(sql, [[j.pk for j in jobs], list(names), max_points, max_points, max_points])
        for job_id, name, down, _bucket, step, value, seconds in cur.fetchall():
            c = out[str(job_id)].setdefault(name, Curve([], [], [], down))
            c.steps.append(step)
            c.seconds.append(round(seconds, 3))
            c.values.append(value)
    return out


def _flat(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, dict) and d:
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(_flat(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: d}


def _show(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, sort_keys=True)


def spec_diff(jobs: list[Job]) -> list[dict[str, Any]]:
    """[{"key": "algorithm.learning_rate", "values": ["0.0001", "0.0003"]}] for each dotted key of the specs
    whose values are not all equal, in key order; a key a spec lacks shows as MISSING."""
    flats = [_flat(j.spec) for j in jobs]
    keys = sorted(set().union(*flats)) if flats else []
    rows = []
    for key in keys:
        values = [_show(f[key]) if key in f else MISSING for f in flats]
        if len(set(values)) > 1:
            rows.append({"key": key, "values": values})
    return rows
