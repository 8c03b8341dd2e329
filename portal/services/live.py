"""The live feed of a job: what live viewers (SSE, api/views/stream.py) get, through Redis/Valkey.

Every ingested metric batch, event, state change and log batch is appended, after its transaction commits, to
one Redis Stream per job, ``job:<id>:live`` (``XADD ... MAXLEN ~ LIVE_STREAM_MAXLEN``, expiring
``LIVE_STREAM_TTL_SECONDS`` after the last entry). An entry has two fields: ``t`` (its type: ``metrics``,
``event``, ``state``, ``log``, or ``gap``) and ``d`` (its JSON payload, exactly as an SSE ``data:`` line sends
it). Entry ids are the SSE event ids, so a viewer resumes with ``XREAD`` from its ``Last-Event-ID``.

The database stays the truth. Publishing never fails an ingest request: when Redis is unreachable the entry is
dropped, and the next successful publication of that job (in this process) is preceded by a ``gap`` entry
saying since when entries may be missing, so viewers fill it from the database (``replay_*`` below). Anything
older than the stream keeps is also served from the database.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from datetime import datetime
from typing import Any

import redis
from django.conf import settings
from django.db import transaction
from django.db.models import Q

from portal.models import Job, JobEvent, JobLog, Metric

logger = logging.getLogger(__name__)

TYPES = ("metrics", "event", "state", "log", "gap")


def stream_key(job_id: Any) -> str:
    return f"job:{job_id}:live"


def maxlen() -> int:
    return settings.LIVE_STREAM_MAXLEN


def ttl_seconds() -> int:
    return settings.LIVE_STREAM_TTL_SECONDS


_client: redis.Redis | None = None
_client_lock = threading.Lock()
# job id -> time.time() of the first publication that failed since the last one that worked
_failed_since: dict[str, float] = {}


def valkey() -> redis.Redis:
    """The process's client for short writes (live feeds, metrics counters): short timeouts, made once."""
    global _client
    if _client is None:
        with _client_lock:
            if _client is None:
                # Short timeouts: an unreachable Valkey must slow an ingest request by seconds, not hang it.
                _client = redis.Redis.from_url(
                    settings.REDIS_URL, socket_timeout=2, socket_connect_timeout=2, health_check_interval=30
                )
    return _client


def dumps(data: Any) -> str:
    # One line (json escapes newlines inside strings), compact; datetimes as ISO 8601.
    return json.dumps(data, separators=(",", ":"), default=_default, allow_nan=False)


def _default(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat().replace("+00:00", "Z")
    return str(value)


def publish(job_id: Any, kind: str, data: Any, meta: dict[str, str] | None = None) -> str | None:
    """Append one entry to the job's live stream now; its id, or None when Redis could not take it.

    ``meta`` adds fields that let a follower act without decoding the payload: ``s`` (an event's seq, or a log
    batch's ``first-last`` seqs) and ``x`` (the new state of a state entry).
    """
    assert kind in TYPES, kind
    jid = str(job_id)
    key = stream_key(jid)
    payload = data if isinstance(data, str) else dumps(data)
    try:
        pipe = valkey().pipeline(transaction=False)
        since = _failed_since.get(jid)
        if since is not None:
            pipe.xadd(key, {"t": "gap", "d": dumps({"since": since})}, maxlen=maxlen(), approximate=True)
        pipe.xadd(key, {"t": kind, "d": payload, **(meta or {})}, maxlen=maxlen(), approximate=True)
        pipe.expire(key, ttl_seconds())
        result = pipe.execute()
    except redis.RedisError as exc:
        _failed_since.setdefault(jid, time.time())
        logger.warning(
            "live feed of job %s: could not publish %s (%s); viewers will refill from the database",
            jid,
            kind,
            exc,
        )
        return None
    _failed_since.pop(jid, None)
    entry_id = result[-2]
    return entry_id.decode() if isinstance(entry_id, bytes) else entry_id


def publish_on_commit(job_id: Any, kind: str, data: Any, meta: dict[str, str] | None = None) -> None:
    """Publish once the current transaction commits (at once outside one): viewers never see a rollback."""
    payload = data if isinstance(data, str) else dumps(data)
    transaction.on_commit(lambda: publish(job_id, kind, payload, meta))


# --- payloads (the SSE `data:` of each type) ---


def event_type(event: JobEvent) -> str:
    return "state" if event.kind == JobEvent.Kind.STATE else "event"


def event_payload(event: JobEvent) -> dict[str, Any]:
    payload = {
        "seq": event.seq,
        "kind": event.kind,
        "created_at": event.created_at,
        "actor": event.actor_label,
        "from_state": event.from_state,
        "to_state": event.to_state,
        "message": event.message,
        "data": event.data,
    }
    if event.kind == JobEvent.Kind.STATE:
        payload["state"] = event.to_state
    return payload


def event_meta(event: JobEvent) -> dict[str, str]:
    meta = {"s": str(event.seq)}
    if event.kind == JobEvent.Kind.STATE:
        meta["x"] = event.to_state
    return meta


def publish_event_on_commit(event: JobEvent) -> None:
    publish_on_commit(event.job_id, event_type(event), event_payload(event), event_meta(event))


def log_payload(lines: list[JobLog]) -> dict[str, Any]:
    return {
        "lines": [
            {"seq": x.seq, "stream": x.stream, "line": x.line, "created_at": x.created_at} for x in lines
        ]
    }


def metrics_payload(points: list[tuple[str, int, float]]) -> dict[str, Any]:
    return {"points": [{"step": step, "name": name, "value": value} for name, step, value in points]}


# --- the database side: what a viewer missed ---


def replay_events(job_id: Any, *, after_seq: int, limit: int = 500) -> list[JobEvent]:
    return list(JobEvent.objects.filter(job_id=job_id, seq__gt=after_seq).order_by("seq")[:limit])


def replay_logs(job_id: Any, *, after_seq: int, max_lines: int) -> list[JobLog]:
    """Lines after ``after_seq``; at most the last ``max_lines`` of them, oldest first."""
    newest = list(JobLog.objects.filter(job_id=job_id, seq__gt=after_seq).order_by("-seq")[:max_lines])
    newest.reverse()
    return newest


def replay_metrics_page(
    job_id: Any, *, since: datetime | None = None, after: tuple[str, int] | None = None, chunk: int = 5000
) -> list[tuple[str, int, float]]:
    """One page of points (written at or after ``since``) ordered by (name, step), after the ``after`` key."""
    qs = Metric.objects.filter(job_id=job_id)
    if since is not None:
        qs = qs.filter(created_at__gte=since)
    if after is not None:
        name, step = after
        qs = qs.filter(Q(name__gt=name) | Q(name=name, step__gt=step))
    return list(qs.order_by("name", "step").values_list("name", "step", "value")[:chunk])


def job_state(job_id: Any) -> tuple[str, int] | None:
    row = Job.objects.filter(pk=job_id).values_list("state", "next_event_seq").first()
    return (row[0], row[1] - 1) if row else None
