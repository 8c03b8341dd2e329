"""What a job's runtime reports (api/views/ingest.py): metrics, events, logs, checkpoints, heartbeats, state.

Each write happens only while the job can still take it: not finished, and still at the attempt its token
was issued for (a re-queued job's earlier runtime is refused with 409 even inside its token's lifetime). Each
write is published to the job's live feed (portal/services/live.py) after it commits.

Metric batches are validated in one tight loop rather than with DRF serializers (a batch holds up to
MAX_POINTS points, and serializers cost tens of microseconds per field), and written with one
``INSERT ... SELECT FROM unnest(...) ON CONFLICT (job, name, step) DO NOTHING RETURNING``: a retried batch or
a resumed job never duplicates a point, the first value written for a (name, step) wins, and only the points
actually inserted are published.
"""

from __future__ import annotations

import math
import re
from typing import Any

from django.db import connection, transaction
from django.db.models import Max
from django.utils import timezone

from opentinker.spec import TERMINAL_STATES, JobState
from portal import storage
from portal.actors import Actor
from portal.errors import Conflict, DomainError
from portal.models import Allocation, Checkpoint, Job, JobEvent, JobLog, Metric
from portal.observability import counters
from portal.services import live
from portal.services.jobs import job_event_add, job_transition

MAX_POINTS = 5000
MAX_LINES = 1000
MAX_LINE_CHARS = 4000
MAX_NAME = 100
MAX_STEP = 2**31 - 1
MAX_FILES = 10_000
RUNTIME = "runtime"
LOG_STREAMS = ("stdout", "stderr")
EVENT_KINDS = (JobEvent.Kind.INFO.value, JobEvent.Kind.WARNING.value, JobEvent.Kind.ERROR.value)
# What the runtime may report; admission, re-queueing and cancel requests belong to the platform.
RUNTIME_STATES = (JobState.RUNNING, JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED)
_SHA256 = re.compile(r"[0-9a-f]{64}")
_POINT_KEYS = frozenset({"step", "name", "value"})


def _actor() -> Actor:
    return Actor.system(RUNTIME)


def _check_writable(state: str, attempt: int, job: Job) -> None:
    if attempt != job.attempt:
        raise Conflict("this attempt of the job is over (the job was re-queued): stop")
    if JobState(state) in TERMINAL_STATES:
        raise Conflict(f"the job already finished ({state}): stop")


def ingest_lock(job: Job, *, share: bool = False) -> Job:
    """Re-read the job under a row lock (call it inside ``transaction.atomic()``) and check it still takes
    writes from its runtime (not finished, same attempt: else Conflict, which tells the runtime to stop).
    A runtime's writes (here and in portal.services.rollouts) take it first. ``share``: a
    FOR SHARE lock, for writes that may run side by side (metric batches); returns the given job then,
    else the locked row."""
    if share:
        # FOR SHARE: metric batches run side by side, but a state change waits for them (and they for it),
        # so no point is accepted after the job has finished.
        with connection.cursor() as cur:
            cur.execute(f"SELECT state, attempt FROM {Job._meta.db_table} WHERE id = %s FOR SHARE", [job.pk])  # noqa: S608
            row = cur.fetchone()
        if row is None:
            raise Conflict("the job no longer exists: stop")
        _check_writable(row[0], row[1], job)
        return job
    locked = Job.objects.select_for_update().select_related("organization").get(pk=job.pk)
    _check_writable(locked.state, locked.attempt, job)
    return locked


# --- metrics ---


def _point_error(i: int, field: str, message: str) -> DomainError:
    return DomainError(message, field=f"points.{i}.{field}")


def metric_points_validate(points: Any) -> list[tuple[str, int, float]]:
    """(name, step, value) triples; a (name, step) repeated within the batch keeps its first value."""
    if not isinstance(points, list) or not points:
        raise DomainError("expected a non-empty list of {step, name, value}", field="points")
    if len(points) > MAX_POINTS:
        raise DomainError(f"at most {MAX_POINTS} points per request (got {len(points)})", field="points")
    out: list[tuple[str, int, float]] = []
    seen: set[tuple[str, int]] = set()
    for i, p in enumerate(points):
        if type(p) is not dict:
            raise DomainError("expected an object {step, name, value}", field=f"points.{i}")
        if p.keys() != _POINT_KEYS:
            extra = sorted(set(p) - _POINT_KEYS)
            if extra:
                raise _point_error(i, extra[0], "unknown field")
            raise _point_error(i, sorted(_POINT_KEYS - set(p))[0], "this field is required")
        step, name, value = p["step"], p["name"], p["value"]
        if type(step) is not int or not 0 <= step <= MAX_STEP:
            raise _point_error(i, "step", f"expected an integer from 0 to {MAX_STEP}")
        if (
            type(name) is not str
            or not 0 < len(name) <= MAX_NAME
            or not name.isprintable()
            or name.strip() != name
        ):
            raise _point_error(
                i, "name", f"expected 1 to {MAX_NAME} printable characters without surrounding spaces"
            )
        if type(value) is int:
            value = float(value)
        elif type(value) is not float:
            raise _point_error(i, "value", "expected a number")
        if not math.isfinite(value):
            raise _point_error(i, "value", "must be finite (no NaN or infinity)")
        key = (name, step)
        if key in seen:
            continue
        seen.add(key)
        out.append((name, step, value))
    return out


def metrics_ingest(*, job: Job, points: Any) -> tuple[int, int]:
    """Store a batch; returns (received, inserted). Points stored before for a (name, step) are kept."""
    triples = metric_points_validate(points)
    names = [t[0] for t in triples]
    steps = [t[1] for t in triples]
    values = [t[2] for t in triples]
    table = Metric._meta.db_table
    with transaction.atomic():
        ingest_lock(job, share=True)
        with connection.cursor() as cur:
            cur.execute(
                f"""
                INSERT INTO {table} (job_id, name, step, value, created_at)
                SELECT %s, t.name, t.step, t.value, now()
                FROM unnest(%s::varchar[], %s::integer[], %s::double precision[]) AS t(name, step, value)
                ON CONFLICT (job_id, name, step) DO NOTHING
                RETURNING name, step, value
                """,  # noqa: S608 - the table name is ours, every value a parameter
                [job.pk, names, steps, values],
            )
            inserted = cur.fetchall()
        if inserted:
            live.publish_on_commit(job.pk, "metrics", live.metrics_payload(inserted))
            transaction.on_commit(lambda: counters.count({(counters.POINTS_INGESTED, ""): len(inserted)}))
    return len(points), len(inserted)


# --- events, logs, checkpoints ---


def event_ingest(*, job: Job, kind: str, message: str, data: dict[str, Any] | None = None) -> JobEvent:
    if kind not in EVENT_KINDS:
        raise DomainError(f"expected one of {', '.join(EVENT_KINDS)}", field="kind")
    with transaction.atomic():
        locked = ingest_lock(job)
        event = job_event_add(job=locked, actor=_actor(), kind=kind, message=message, data=data or {})
    return event


def logs_ingest(*, job: Job, lines: list[dict[str, str]]) -> list[JobLog]:
    """Append lines (each {"line", "stream"}), numbered after the job's last line; overlong lines are cut."""
    if not lines:
        return []
    with transaction.atomic():
        ingest_lock(job)  # the row lock numbers concurrent batches one after the other
        last = JobLog.objects.filter(job_id=job.pk).aggregate(m=Max("seq"))["m"] or 0
        rows = [
            JobLog(
                job_id=job.pk,
                seq=last + i,
                stream=item.get("stream") or "stdout",
                line=item["line"].rstrip("\r\n")[:MAX_LINE_CHARS],
            )
            for i, item in enumerate(lines, start=1)
        ]
        JobLog.objects.bulk_create(rows)
        live.publish_on_commit(
            job.pk, "log", live.log_payload(rows), meta={"s": f"{rows[0].seq}-{rows[-1].seq}"}
        )
    return rows


def checkpoint_prefix(job: Job) -> str:
    """Where the job's checkpoints must live: ``<organization prefix>/jobs/<job id>``."""
    return f"{storage.organization_prefix(job.organization.slug)}/jobs/{job.id}"


def _file_error(i: int, field: str, message: str) -> DomainError:
    return DomainError(message, field=f"files.{i}.{field}")


def checkpoint_record(
    *, job: Job, step: int, uri: str, files: list[dict[str, Any]]
) -> tuple[Checkpoint, bool]:
    """Record (or, for a step recorded before, replace) a checkpoint; returns (checkpoint, created).

    The URI must lie strictly inside the job's own prefix, so a runtime can never point the platform at
    another job's or another organization's objects.
    """
    prefix = checkpoint_prefix(job)
    normalized = storage.normalize(uri) if "://" in uri else ""
    if not normalized.startswith(storage.normalize(prefix) + "/"):
        raise DomainError(f"must lie under this job's prefix {prefix}/", field="uri")
    if len(files) > MAX_FILES:
        raise DomainError(f"at most {MAX_FILES} files", field="files")
    names: set[str] = set()
    for i, f in enumerate(files):
        name = f["name"]
        parts = name.split("/")
        if name.startswith("/") or any(p in ("", ".", "..") for p in parts) or not name.isprintable():
            raise _file_error(i, "name", "expected a relative path inside the checkpoint (no '..', no '//')")
        if name in names:
            raise _file_error(i, "name", "listed twice")
        names.add(name)
        if not _SHA256.fullmatch(f["sha256"]):
            raise _file_error(i, "sha256", "expected 64 lowercase hexadecimal digits")
    clean = [{"name": f["name"], "size": f["size"], "sha256": f["sha256"]} for f in files]
    with transaction.atomic():
        locked = ingest_lock(job)
        checkpoint, created = Checkpoint.objects.update_or_create(
            job=locked,
            step=step,
            defaults={"uri": normalized, "files": clean, "size_bytes": sum(f["size"] for f in clean)},
        )
        job_event_add(
            job=locked,
            actor=_actor(),
            kind=JobEvent.Kind.INFO,
            message=f"checkpoint {'saved' if created else 'replaced'} at step {step}",
            data={
                "checkpoint_id": checkpoint.pk,
                "step": step,
                "uri": normalized,
                "size_bytes": checkpoint.size_bytes,
                "files": len(clean),
            },
        )
    return checkpoint, created


# --- heartbeat and state ---


def heartbeat_record(*, job: Job) -> tuple[bool, str]:
    """Note the runtime is alive; returns (cancel, state). ``cancel`` asks the runtime to stop at its next
    step boundary: the job is being cancelled, has finished, or has moved on to another attempt."""
    now = timezone.now()
    alive = Job.objects.filter(pk=job.pk, attempt=job.attempt).exclude(
        state__in=[s.value for s in TERMINAL_STATES]
    )
    if alive.update(last_heartbeat_at=now):
        Allocation.objects.filter(job_id=job.pk, attempt=job.attempt, released_at__isnull=True).update(
            heartbeat_at=now
        )
    row = Job.objects.filter(pk=job.pk).values_list("state", "attempt").first()
    if row is None:
        return True, JobState.CANCELLED.value
    state, attempt = row
    cancel = state == JobState.CANCELLING or JobState(state) in TERMINAL_STATES or attempt != job.attempt
    return cancel, state


def state_report(*, job: Job, state: JobState, reason: str = "") -> tuple[bool, str]:
    """The runtime says the job is running, or finished; returns (cancel, state) as the heartbeat does.

    Reporting the state the job is already in is a no-op (a retried report); so is ``running`` while a cancel
    request is pending (the answer tells the runtime to stop).
    """
    if state not in RUNTIME_STATES:
        raise DomainError(
            f"the runtime reports one of {', '.join(s.value for s in RUNTIME_STATES)}", field="state"
        )
    with transaction.atomic():
        locked = Job.objects.select_for_update().get(pk=job.pk)
        if locked.attempt != job.attempt:
            raise Conflict("this attempt of the job is over (the job was re-queued): stop")
        current = JobState(locked.state)
        if current is state or (state is JobState.RUNNING and current is JobState.CANCELLING):
            return current is JobState.CANCELLING or current in TERMINAL_STATES, current.value
        if current in TERMINAL_STATES:
            raise Conflict(f"the job already finished ({current.value}): stop")
        locked = job_transition(job=locked, to=state, actor=_actor(), reason=reason)
    new = JobState(locked.state)
    return new is JobState.CANCELLING or new in TERMINAL_STATES, new.value
