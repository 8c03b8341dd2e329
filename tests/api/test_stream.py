"""Live job streams (SSE) under a real uvicorn server on the test database, fed by the real ingest API.

Actors: alice (owner of acme, follows her job), bob (member of acme, follows it too), charlie (outsider, owner
of globex: 404). The fault test: a viewer that reconnects with Last-Event-ID misses no event, whether the
stream still holds its place, lost it (Valkey restart without data, trimming), or a publication failed.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis
from django.conf import settings
from django.db import connection

from opentinker.spec import JobState, example_rl_spec
from portal.actors import Actor
from portal.models import Job
from portal.services import ingest, live
from portal.services.job_tokens import job_token_issue
from portal.services.jobs import job_cancel, job_submit, job_transition
from tests.uvicorn_ready import wait_listening

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.usefixtures("builtin_envs")]
BASE = Path(__file__).resolve().parents[2]
TIMEOUT = 15


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def uvicorn_url(django_db_setup) -> Iterator[str]:
    """uvicorn serving portal.asgi on the test database (committed data only: transactional tests)."""
    with running_uvicorn() as url:
        yield url


@contextlib.contextmanager
def running_uvicorn(
    *extra_args: str, app: str = "portal.asgi:application", **extra_env: str
) -> Iterator[str]:
    """A uvicorn server on the test database, with more arguments and environment variables for it (and
    another application: the production server's is portal.asgi_split:application)."""
    db = connection.settings_dict
    port = _free_port()
    env = {
        **os.environ,
        "DATABASE_URL": f"postgres://{db['USER']}@{db['HOST']}:{db['PORT']}/{db['NAME']}",
        "REDIS_URL": settings.REDIS_URL,
        "SECRET_KEY": settings.SECRET_KEY,
        "TOKEN_PEPPER": settings.TOKEN_PEPPER,
        "OPENTINKER_MODE": "embedded",
        **extra_env,
    }
    proc = subprocess.Popen(
        [
            *(sys.executable, "-m", "uvicorn", app, "--host", "127.0.0.1"),
            *("--port", str(port), "--lifespan", "off", "--log-level", "info", "--no-access-log"),
            *extra_args,
        ],
        cwd=BASE,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    args = list(extra_args)
    workers = int(args[args.index("--workers") + 1]) if "--workers" in args else 1
    wait_listening(proc, workers=workers, port=port)
    try:
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()


class Viewer:
    """A raw SSE client in a thread: frames go to a queue as (id, event, data)."""

    def __init__(self, url: str, token: str, last_event_id: str | None = None) -> None:
        self.frames: queue.Queue = queue.Queue()
        self.last_id = last_event_id
        self.status: int | None = None
        self.stop = threading.Event()
        headers = {"Authorization": f"Bearer {token}", "Accept": "text/event-stream"}
        if last_event_id:
            headers["Last-Event-ID"] = last_event_id
        self._client = httpx.Client(timeout=httpx.Timeout(30, read=60))
        self._ctx = self._client.stream("GET", url, headers=headers)
        self.response = self._ctx.__enter__()
        self.status = self.response.status_code
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        fields: dict[str, str] = {}
        try:
            for line in self.response.iter_lines():
                if self.stop.is_set():
                    return
                if not line:
                    if "data" in fields:
                        self.frames.put((fields.get("id"), fields.get("event"), json.loads(fields["data"])))
                    fields = {}
                elif not line.startswith(":"):
                    name, _, value = line.partition(": ")
                    fields[name] = value
        except httpx.HTTPError:
            pass
        finally:
            self.frames.put(None)  # closed

    def take_until(self, predicate, timeout: float = TIMEOUT) -> list[tuple]:
        """Frames up to and including the first one matching predicate."""
        got = []
        deadline = time.monotonic() + timeout
        while True:
            frame = self.frames.get(timeout=max(0.01, deadline - time.monotonic()))
            assert frame is not None, f"stream closed early after {got}"
            got.append(frame)
            if frame[0]:
                self.last_id = frame[0]
            if predicate(frame):
                return got

    def close(self) -> None:
        self.stop.set()
        self.response.close()
        self._client.close()


@pytest.fixture
def world(uvicorn_url, alice, bob, charlie, acme, globex, make_token):
    job, _ = job_submit(organization=acme, actor=Actor.for_request(alice), spec=example_rl_spec())
    job = job_transition(job=job, to=JobState.ADMITTED, actor=Actor.system("scheduler"))
    runtime = httpx.Client(
        base_url=f"{uvicorn_url}/api/v1/ingest/jobs/{job.id}",
        headers={"Authorization": f"Bearer {job_token_issue(job)}"},
        timeout=30,
    )
    tokens = {
        "alice": make_token(alice, acme),
        "bob": make_token(bob, acme),
        "charlie": make_token(charlie, globex),
        "alice-envs": make_token(alice, acme, scopes=["envs:read"]),
    }
    viewers: list[Viewer] = []

    class W:
        pass

    w = W()
    w.job, w.runtime, w.tokens, w.url = job, runtime, tokens, f"{uvicorn_url}/api/v1/jobs/{job.id}/stream"

    def view(who="alice", last_event_id=None):
        v = Viewer(w.url, tokens[who], last_event_id)
        viewers.append(v)
        return v

    w.view = view
    yield w
    for v in viewers:
        v.close()
    runtime.close()
    redis.Redis.from_url(settings.REDIS_URL).delete(live.stream_key(job.id))


def send(w, endpoint, body):
    resp = w.runtime.post(f"/{endpoint}", json=body)
    assert resp.status_code in (200, 201), resp.text
    return resp.json()


def pts(steps, name="reward"):
    return [{"step": s, "name": name, "value": s / 4} for s in steps]


def is_type(kind):
    return lambda f: f[1] == kind


def collect(frames):
    """(metric points as (name, step) list, event seqs, log seqs, types) of some frames."""
    points, events, logs = [], [], []
    for _id, kind, data in frames:
        if kind == "metrics":
            points += [(p["name"], p["step"]) for p in data["points"]]
        elif kind in ("event", "state"):
            events.append(data["seq"])
        elif kind == "log":
            logs += [x["seq"] for x in data["lines"]]
    return points, events, logs


def test_history_then_live_then_end(world):
    w = world
    send(w, "state", {"state": "running"})
    send(w, "metrics", {"points": pts(range(3))})
    v = w.view("bob")
    assert v.status == 200 and v.response.headers["content-type"].startswith("text/event-stream")
    history = v.take_until(is_type("sync"))
    points, events, _ = collect(history)
    assert points == [("reward", 0), ("reward", 1), ("reward", 2)]
    assert [d["state"] for _i, k, d in history if k == "state"] == ["queued", "admitted", "running"]
    assert events == [1, 2, 3]
    # Live: each write shows up, with the cursor moving on (within take_until's deadline, which only catches
    # a hang: a bound near the server's 2 s poll would measure the machine's speed, not the stream).
    send(w, "metrics", {"points": pts([3, 4]) + pts([3], name="loss")})
    (frame,) = v.take_until(is_type("metrics"))
    assert frame[2] == {"points": pts([3, 4]) + pts([3], name="loss")}
    send(w, "events", {"kind": "warning", "message": "hot", "data": {"gpu": 0}})
    (frame,) = v.take_until(is_type("event"))
    assert (frame[2]["seq"], frame[2]["kind"], frame[2]["message"], frame[2]["actor"]) == (
        4,
        "warning",
        "hot",
        "runtime",
    )
    send(w, "logs", {"lines": [{"line": "step 4 done"}, {"line": "oops", "stream": "stderr"}]})
    (frame,) = v.take_until(is_type("log"))
    assert [(x["seq"], x["stream"], x["line"]) for x in frame[2]["lines"]] == [
        (1, "stdout", "step 4 done"),
        (2, "stderr", "oops"),
    ]
    assert frame[0].endswith(":4:2")  # the cursor: entry id, event seq 4, log seq 2
    send(w, "state", {"state": "succeeded"})
    rest = v.take_until(is_type("end"))
    assert [(k, d.get("state")) for _i, k, d in rest] == [("state", "succeeded"), ("end", "succeeded")]
    assert v.frames.get(timeout=TIMEOUT) is None  # the server closed the stream


def test_stream_tenancy(world, uvicorn_url):
    w = world
    job_token = w.runtime.headers["Authorization"]
    cases = [
        ({"Authorization": f"Bearer {w.tokens['charlie']}"}, w.url, 404),
        (
            {"Authorization": f"Bearer {w.tokens['charlie']}"},
            w.url.replace(str(w.job.id), "0" * 8 + "-0000-4000-8000-" + "0" * 12),
            404,
        ),
        ({"Authorization": f"Bearer {w.tokens['alice-envs']}"}, w.url, 403),
        ({}, w.url, 401),
        ({"Authorization": job_token}, w.url, 401),
        ({"Authorization": f"Bearer {w.tokens['alice']}", "Last-Event-ID": "garbage"}, w.url, 400),
    ]
    bodies = []
    for headers, url, expected in cases:
        resp = httpx.get(url, headers={**headers, "Accept": "text/event-stream"}, timeout=10)
        assert resp.status_code == expected, (headers, resp.text)
        assert resp.headers["content-type"] == "application/json"
        bodies.append(resp.json())
    assert bodies[0] == bodies[1]  # charlie cannot tell acme's job from no job
    assert str(w.job.id) not in json.dumps(bodies[0])


def test_reconnect_with_last_event_id_misses_no_event(world):
    """The browser's EventSource drops (network blip) and reconnects with Last-Event-ID: nothing is missed,
    nothing is repeated, including a state change made meanwhile outside the ingest path (a cancel)."""
    w = world
    send(w, "state", {"state": "running"})
    v1 = w.view()
    seen = v1.take_until(is_type("sync"))
    send(w, "metrics", {"points": pts(range(0, 5))})
    send(w, "logs", {"lines": [{"line": "a"}]})
    seen += v1.take_until(is_type("log"))
    last = v1.last_id
    v1.close()
    # While disconnected: metrics, events, logs, and alice cancels (API, not ingest).
    send(w, "metrics", {"points": pts(range(5, 10))})
    send(w, "events", {"kind": "info", "message": "while away"})
    send(w, "logs", {"lines": [{"line": "b"}, {"line": "c"}]})
    job_cancel(job=Job.objects.get(pk=w.job.pk), actor=Actor.system("alice"), reason="enough")
    assert send(w, "heartbeat", {}) == {"cancel": True, "state": "cancelling"}
    send(w, "metrics", {"points": pts(range(10, 12))})
    v2 = w.view(last_event_id=last)
    resumed = v2.take_until(lambda f: f[1] == "state" and f[2]["state"] == "cancelling")
    # Even after its place in the stream, the viewer keeps following: the runtime stops.
    send(w, "metrics", {"points": pts([12])})
    send(w, "state", {"state": "cancelled"})
    resumed += v2.take_until(is_type("end"))
    assert not any(k == "sync" for _i, k, _d in resumed)  # resumed from the stream: no history replay
    points, events, logs = collect(seen + resumed)
    assert sorted(points) == sorted(set(points)) == [("reward", s) for s in range(13)]
    n_events = Job.objects.get(pk=w.job.pk).next_event_seq - 1
    assert sorted(events) == sorted(set(events)) == list(range(1, n_events + 1))
    assert sorted(logs) == [1, 2, 3]
    assert resumed[-1][2] == {"state": "cancelled"}


@pytest.mark.parametrize("loss", ["stream lost", "connection to valkey killed"])
def test_viewer_recovers_when_valkey_loses_the_stream(world, loss):
    """Valkey restarted without its data (the stream key is gone) or dropped the viewer's connection: the
    viewer's gap is filled from the database; every point, event and line arrives at least once."""
    w = world
    r = redis.Redis.from_url(settings.REDIS_URL)
    send(w, "state", {"state": "running"})
    send(w, "metrics", {"points": pts(range(3))})
    if loss == "stream lost":
        v1 = w.view()
        seen = v1.take_until(is_type("sync"))
        last = v1.last_id
        v1.close()
        send(w, "metrics", {"points": pts(range(3, 6))})
        send(w, "logs", {"lines": [{"line": "a"}]})
        r.delete(live.stream_key(w.job.id))
        send(w, "metrics", {"points": pts(range(6, 8))})
        v = w.view(last_event_id=last)
    else:
        v = w.view()
        seen = v.take_until(is_type("sync"))
        r.client_kill_filter(_type="normal", skipme=True)
        send(w, "metrics", {"points": pts(range(3, 6))})
        send(w, "logs", {"lines": [{"line": "a"}]})
        send(w, "metrics", {"points": pts(range(6, 8))})
    send(w, "events", {"kind": "info", "message": "after"})
    send(w, "state", {"state": "succeeded"})
    seen += v.take_until(is_type("end"))
    points, events, logs = collect(seen)
    assert sorted(set(points)) == [("reward", s) for s in range(8)]
    assert sorted(events) == sorted(set(events)) == list(range(1, 6))
    assert logs == [1]


def test_points_whose_publication_failed_still_reach_viewers(world, monkeypatch):
    """Ingest goes on while Valkey is unreachable; the next publication marks the gap, viewers refill it."""
    w = world
    send(w, "state", {"state": "running"})
    v = w.view()
    v.take_until(is_type("sync"))
    job = Job.objects.get(pk=w.job.pk)
    monkeypatch.setattr(live, "_client", redis.Redis(host="127.0.0.1", port=1, socket_connect_timeout=0.2))
    assert ingest.metrics_ingest(job=job, points=pts(range(4))) == (4, 4)  # stored, not published
    monkeypatch.setattr(live, "_client", None)
    ingest.metrics_ingest(job=job, points=pts([4]))
    got = v.take_until(
        lambda f: f[1] == "metrics" and ["reward", 4] in [[p["name"], p["step"]] for p in f[2]["points"]]
    )
    points, _, _ = collect(got)
    assert sorted(set(points)) == [("reward", s) for s in range(5)]
