"""Live stream of a job over Server-Sent Events: ``GET /api/v1/jobs/{job_id}/stream``.

Authentication, scope (jobs:read) and tenancy are those of every job read (an outsider gets 404): the view is
a plain DRF view that checks them and answers with a streaming response whose body is an async generator,
which uvicorn (ASGI) serves from its event loop: no thread works for the stream while it waits (Django's ASGI
handler keeps each request's own thread parked until the request ends, a stream included: an idle thread per
viewer, no slot of a pool, no database connection).

Events (``event:`` names; ``data:`` is one line of JSON):
    metrics  {"points": [{"step", "name", "value"}]}      new metric points; "replay": true when read from the
             database (history, a refill): ordered by (name, step), so later frames may bring earlier steps
    event    {"seq", "kind", "created_at", "actor", "from_state", "to_state", "message", "data"}: info,
             warning or error
    state    the same fields plus "state": a state change of the job
    log      {"lines": [{"seq", "stream", "line", "created_at"}]}
    sync     {"replayed": bool}: everything before this point came from history; live from here on
    end      {"state": final state}: the job finished and everything was sent; the server closes the stream
plus a ``: keep-alive`` comment every SSE_HEARTBEAT_SECONDS.

Event ids are cursors ``<stream entry id>:<event seq>:<log seq>``: the Redis Stream entry the viewer has
reached (portal/services/live.py) and how far it has the job's events and log lines. Reconnecting with that
id in ``Last-Event-ID`` (or ``?last_event_id=``) resumes exactly there: XREAD after the entry, events and log
lines after those seqs. When the stream no longer holds the entry (trimmed, expired, Valkey lost its data),
the gap is filled from the database first, then the stream continues; without an id the viewer first gets the
job's history from the database (every event and metric point, the last LIVE_LOG_REPLAY_LINES log lines).

Nothing is lost even if a publication to Redis failed: the database is polled for events every few seconds
(state changes made outside the ingest path included), and a failed publication leaves a ``gap`` entry that
makes every follower refill metrics and logs from the database. A metric point may be delivered twice around
a refill: (name, step) identifies it (likewise seq for events and log lines).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime

import redis
import redis.asyncio as aioredis
from asgiref.sync import sync_to_async
from django.conf import settings
from django.db import InterfaceError, OperationalError, connection
from django.http import HttpResponse, StreamingHttpResponse
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, OpenApiResponse, extend_schema
from rest_framework import serializers
from rest_framework.renderers import JSONRenderer
from rest_framework.views import APIView

from api.tenancy import tenant_of
from opentinker.spec import TERMINAL_STATES
from portal.models import Scope
from portal.observability import metrics
from portal.selectors.jobs import job_get
from portal.services import live

CONTENT_TYPE = "text/event-stream"
_CURSOR = re.compile(r"(\d{1,20})-(\d{1,20}):(\d{1,10}):(\d{1,10})")
_TERMINAL = frozenset(s.value for s in TERMINAL_STATES)
READ_COUNT = 200
# SSE's "retry:": how long a browser waits before reconnecting on its own.
RETRY_MS = 2000


# One event of the stream, as an SSE client reads it (Open API 3.1 has a text/event-stream `schema` describe
# each event; 3.2 calls that `itemSchema`).
SSE_EVENT_SCHEMA = {
    "type": "object",
    "required": ["event", "data"],
    "properties": {
        "event": {"type": "string", "enum": ["metrics", "event", "state", "log", "sync", "end"]},
        "data": {"type": "string", "contentMediaType": "application/json", "description": "A line of JSON."},
        "id": {"type": "string", "description": "<stream entry id>:<event seq>:<log seq> (Last-Event-ID)."},
        "retry": {"type": "integer", "description": "Reconnection delay in milliseconds (first event)."},
    },
}


@dataclass
class Cursor:
    entry: str = "0-0"
    event_seq: int = 0
    log_seq: int = 0

    def __str__(self) -> str:
        return f"{self.entry}:{self.event_seq}:{self.log_seq}"

    @classmethod
    def parse(cls, raw: str) -> Cursor:
        m = _CURSOR.fullmatch(raw.strip())
        if m is None:
            raise serializers.ValidationError(
                {"Last-Event-ID": ["not an id this stream sent (expected <entry id>:<event seq>:<log seq>)"]}
            )
        return cls(f"{m[1]}-{m[2]}", int(m[3]), int(m[4]))

    @property
    def entry_seconds(self) -> float:
        return int(self.entry.split("-")[0]) / 1000


class JobStreamApi(APIView):
    read_scope = Scope.JOBS_READ
    # Its response is an async generator that may wait for hours: the production server keeps this route on
    # the event loop, where an open stream holds no thread (portal/asgi_split.py).
    asgi_only = True

    def perform_content_negotiation(self, request, force=False):
        # Errors are JSON whatever the Accept header says (EventSource sends Accept: text/event-stream).
        return JSONRenderer(), "application/json"

    @extend_schema(
        operation_id="jobs_stream",
        parameters=[
            OpenApiParameter(
                "Last-Event-ID",
                OpenApiTypes.STR,
                OpenApiParameter.HEADER,
                description="Resume after this event id (browsers send it by themselves on reconnect).",
            ),
            OpenApiParameter(
                "last_event_id",
                OpenApiTypes.STR,
                description="The same, for clients that cannot set headers.",
            ),
        ],
        responses={
            (200, CONTENT_TYPE): OpenApiResponse(
                SSE_EVENT_SCHEMA,
                description="Server-Sent Events: `metrics`, `event`, `state`, `log`, `sync`, `end` (see the "
                "module docs of api/views/stream.py); ids resume with Last-Event-ID.",
            ),
        },
        description="Follow a job live: metric points, events, state changes and log lines as they are "
        "ingested. Without Last-Event-ID the job's history comes first. The stream ends (`end`) once the job "
        "has finished and everything was sent.",
    )
    def get(self, request, job_id):
        job = job_get(tenant_of(request).organization, job_id)
        raw = request.headers.get("Last-Event-ID") or request.query_params.get("last_event_id") or ""
        cursor = Cursor.parse(raw) if raw.strip() else None
        if not connection.in_atomic_block:
            # Done with the database for this request; the stream may last hours and must not hold it.
            connection.close()
        if request.method == "HEAD":
            response = HttpResponse(content_type=CONTENT_TYPE)
        else:
            response = StreamingHttpResponse(Follower(job.pk, cursor).frames(), content_type=CONTENT_TYPE)
        response["Cache-Control"] = "no-cache"
        response["X-Accel-Buffering"] = "no"  # nginx: do not buffer the stream
        return response


def _frame(cursor: Cursor, kind: str, data: bytes | str) -> bytes:
    if isinstance(data, str):
        data = data.encode()
    return b"id: " + str(cursor).encode() + b"\nevent: " + kind.encode() + b"\ndata: " + data + b"\n\n"


def _db(fn):
    """Run a query off the event loop, in asgiref's shared pool. Not thread_sensitive: that would run it in
    the request's own thread, whose connection then stays open as long as the stream (one per viewer); the
    pool's few threads keep a connection each, shared by every viewer. With a pool of connections
    (DB_POOL_MAX_SIZE) a thread gives its connection back after each query instead: the loop's executor has
    up to min(32, cores + 4) threads, more than the pool holds, and a thread never hands back a connection it
    keeps (the other requests of the process would wait for the pool, then fail)."""

    def run(*args, **kwargs):
        try:
            try:
                return fn(*args, **kwargs)
            except (InterfaceError, OperationalError):
                connection.close()  # the database dropped it (restart): once more, on a new connection
                return fn(*args, **kwargs)
        finally:
            if settings.DB_POOL_MAX_SIZE:
                connection.close()  # back to the pool

    return sync_to_async(run, thread_sensitive=False)


@dataclass
class Follower:
    """One viewer's position in the job's feed, and the generator of its frames."""

    job_id: object
    start: Cursor | None
    cursor: Cursor = field(init=False)
    events_ahead: set[int] = field(default_factory=set)  # seqs > cursor.event_seq already sent
    logs_ahead: list[tuple[int, int]] = field(default_factory=list)  # (first, last) batches past log_seq
    final_state: str | None = None

    def __post_init__(self) -> None:
        self.cursor = Cursor(**vars(self.start)) if self.start else Cursor()
        self.key = live.stream_key(self.job_id)

    # -- bookkeeping: what the viewer has --

    def _take_event(self, seq: int) -> bool:
        if seq <= self.cursor.event_seq or seq in self.events_ahead:
            return False
        self.events_ahead.add(seq)
        while self.cursor.event_seq + 1 in self.events_ahead:
            self.cursor.event_seq += 1
            self.events_ahead.discard(self.cursor.event_seq)
        return True

    def _take_logs(self, first: int, last: int) -> bool:
        if last <= self.cursor.log_seq:
            return False
        self.logs_ahead.append((first, last))
        self.logs_ahead.sort()
        while self.logs_ahead and self.logs_ahead[0][0] <= self.cursor.log_seq + 1:
            self.cursor.log_seq = max(self.cursor.log_seq, self.logs_ahead.pop(0)[1])
        return True

    def _event_frame(self, kind: str, seq: int, state: str | None, data: bytes | str) -> bytes | None:
        if not self._take_event(seq):
            return None
        if kind == "state" and state in _TERMINAL:
            self.final_state = state
        return _frame(self.cursor, kind, data)

    # -- the database side --

    async def _poll_events(self) -> AsyncIterator[bytes]:
        while True:
            events = await _db(live.replay_events)(self.job_id, after_seq=self.cursor.event_seq)
            for ev in events:
                kind = live.event_type(ev)
                state = ev.to_state if kind == "state" else None
                frame = self._event_frame(kind, ev.seq, state, live.dumps(live.event_payload(ev)))
                if frame:
                    yield frame
            if len(events) < 500:
                return

    async def _replay(self, r: aioredis.Redis, since: float | None, *, fresh: bool) -> AsyncIterator[bytes]:
        """History from the database, then continue the stream from where it stood before reading it."""
        # Read the stream's end BEFORE the database: whatever was published after it comes from XREAD, and
        # whatever was published before it had committed, so the queries below see it.
        last = await r.xrevrange(self.key, count=1)
        resume = last[0][0].decode() if last else "0-0"
        async for frame in self._poll_events():
            yield frame
        max_lines = settings.LIVE_LOG_REPLAY_LINES if fresh else 100_000
        logs = await _db(live.replay_logs)(self.job_id, after_seq=self.cursor.log_seq, max_lines=max_lines)
        for i in range(0, len(logs), 500):
            chunk = logs[i : i + 500]
            self.cursor.log_seq = max(self.cursor.log_seq, chunk[-1].seq)
            yield _frame(self.cursor, "log", live.dumps(live.log_payload(chunk)))
        after = None
        if since is not None:
            after = datetime.fromtimestamp(max(0.0, since - settings.LIVE_REPLAY_MARGIN_SECONDS), UTC)
        async for frame in self._metrics_since(after):
            yield frame
        self.cursor.entry = resume
        yield _frame(self.cursor, "sync", b'{"replayed":true}')

    # -- the stream side --

    def _entry_frame(self, entry_id: bytes, fields: dict[bytes, bytes]) -> bytes | None:
        self.cursor.entry = entry_id.decode()
        kind = fields.get(b"t", b"").decode()
        data = fields.get(b"d", b"{}")
        if kind == "metrics":
            return _frame(self.cursor, kind, data)
        if kind in ("event", "state"):
            state = fields[b"x"].decode() if b"x" in fields else None
            return self._event_frame(kind, int(fields.get(b"s", b"0")), state, data)
        if kind == "log":
            first, _, last = fields.get(b"s", b"0-0").decode().partition("-")
            return _frame(self.cursor, kind, data) if self._take_logs(int(first), int(last or 0)) else None
        return None

    async def _holds(self, r: aioredis.Redis, entry: str) -> bool:
        return entry != "0-0" and bool(await r.xrange(self.key, min=entry, max=entry, count=1))

    async def frames(self) -> AsyncIterator[bytes]:
        yield f"retry: {RETRY_MS}\n\n".encode()  # sent at once: the client sees the stream is open
        heartbeat = settings.SSE_HEARTBEAT_SECONDS
        poll = settings.LIVE_POLL_SECONDS
        r = aioredis.Redis.from_url(
            settings.REDIS_URL, socket_connect_timeout=5, socket_timeout=poll + 10, health_check_interval=30
        )
        metrics.STREAM_CLIENTS.inc()
        try:
            state = await _db(live.job_state)(self.job_id)
            if state is None:
                yield _frame(self.cursor, "end", live.dumps({"state": None}))
                return
            if state[0] in _TERMINAL:
                self.final_state = state[0]
            need_replay = True
            last_sent = last_poll = time.monotonic()
            while True:
                try:
                    if need_replay:
                        if self.start is not None and await self._holds(r, self.cursor.entry):
                            pass  # the stream still holds the viewer's place: continue right after it
                        else:
                            since = self.cursor.entry_seconds if self.start is not None else None
                            async for frame in self._replay(r, since, fresh=self.start is None):
                                yield frame
                            last_sent = time.monotonic()
                        need_replay = False
                    block = 300 if self.final_state else int(min(poll, heartbeat) * 1000)
                    got = await r.xread({self.key: self.cursor.entry}, count=READ_COUNT, block=block)
                except (redis.ConnectionError, redis.TimeoutError, OSError):
                    # Valkey restarted or is unreachable: keep the viewer, retry, then check our place still
                    # exists (a restart may have lost the stream; the database fills the gap).
                    yield b": live feed unavailable, retrying\n\n"
                    await asyncio.sleep(1)
                    need_replay = True
                    self.start = self.start or Cursor(**vars(self.cursor))
                    continue
                entries = got[0][1] if got else []
                for entry_id, fields in entries:
                    if fields.get(b"t") == b"gap":
                        since = float(live_json(fields.get(b"d", b"{}")).get("since", 0))
                        async for frame in self._refill(r, since):
                            yield frame
                        self.cursor.entry = entry_id.decode()
                        continue
                    frame = self._entry_frame(entry_id, fields)
                    if frame:
                        yield frame
                now = time.monotonic()
                if entries:
                    last_sent = now
                if not entries or self.final_state or now - last_poll >= poll:
                    async for frame in self._poll_events():
                        last_sent = now
                        yield frame
                    last_poll = now
                if self.final_state and not entries:
                    # Finished, nothing left in the stream, events caught up: done.
                    yield _frame(self.cursor, "end", live.dumps({"state": self.final_state}))
                    return
                if now - last_sent >= heartbeat:
                    last_sent = now
                    yield b": keep-alive\n\n"
        finally:
            metrics.STREAM_CLIENTS.dec()
            with contextlib.suppress(Exception):
                await r.aclose()

    async def _refill(self, r: aioredis.Redis, since: float) -> AsyncIterator[bytes]:
        """A publication failed at ``since``: send metrics and log lines from then on from the database."""
        async for frame in self._poll_events():
            yield frame
        logs = await _db(live.replay_logs)(self.job_id, after_seq=self.cursor.log_seq, max_lines=100_000)
        for i in range(0, len(logs), 500):
            chunk = logs[i : i + 500]
            self.cursor.log_seq = max(self.cursor.log_seq, chunk[-1].seq)
            yield _frame(self.cursor, "log", live.dumps(live.log_payload(chunk)))
        after = datetime.fromtimestamp(max(0.0, since - settings.LIVE_REPLAY_MARGIN_SECONDS), UTC)
        async for frame in self._metrics_since(after):
            yield frame

    async def _metrics_since(self, since: datetime | None) -> AsyncIterator[bytes]:
        key = None
        while True:
            page = await _db(live.replay_metrics_page)(self.job_id, since=since, after=key, chunk=5000)
            if page:
                payload = {**live.metrics_payload(page), "replay": True}
                yield _frame(self.cursor, "metrics", live.dumps(payload))
            if len(page) < 5000:
                return
            key = (page[-1][0], page[-1][1])


def live_json(raw: bytes) -> dict:
    try:
        value = json.loads(raw)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}
