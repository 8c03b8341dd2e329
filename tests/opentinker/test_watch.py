"""``client.jobs.watch`` and ``opentinker jobs watch``: typed live events, resumed with Last-Event-ID.

Unit tests run against httpx.MockTransport (a stream cut mid-way, error answers); the live tests against a
real uvicorn server (tests/api/test_stream.py's fixture). Actors: alice (owner of acme) watches her job, bob
(member of acme) watches it through the CLI, charlie (outsider, owner of globex) gets NotFound.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import pytest

from opentinker import errors
from opentinker.client import Client
from opentinker.spec import JobState, example_rl_spec
from opentinker.types import StreamEvent
from portal.actors import Actor
from portal.services.job_tokens import job_token_issue
from portal.services.jobs import job_submit, job_transition
from tests.api.test_stream import uvicorn_url  # noqa: F401 - the server fixture

BASE = Path(__file__).resolve().parents[2]
JOB = "8d7e2a4c-0000-4000-8000-000000000001"


def _sse(*frames: str) -> bytes:
    return "".join(frames).encode()


FIRST = _sse(
    "retry: 10\n\n",
    'id: 1-0:1:0\nevent: state\ndata: {"seq":1,"kind":"state","to_state":"queued","state":"queued"}\n\n',
    'id: 1-0:1:0\nevent: sync\ndata: {"replayed":true}\n\n',
    ": keep-alive\n\n",
    'id: 5-0:1:0\nevent: metrics\ndata: {"points":[{"step":1,"name":"reward","value":0.5}]}\n\n',
)
SECOND = _sse(
    "id: 6-0:1:2\nevent: log\n"
    'data: {"lines":[{"seq":1,"stream":"stdout","line":"a"},{"seq":2,"line":"b"}]}\n\n',
    'id: 7-0:2:2\nevent: state\ndata: {"seq":2,"kind":"state","from_state":"queued","to_state":"failed",'
    '"state":"failed","message":"oom"}\n\n',
    'id: 7-0:2:2\nevent: end\ndata: {"state":"failed"}\n\n',
)


def test_watch_resumes_a_cut_stream_with_last_event_id():
    requests: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        requests.append(request)
        if len(requests) == 1:
            # The connection drops right after the metrics frame (no `end`).
            return httpx.Response(200, headers={"content-type": "text/event-stream"}, content=FIRST)
        if len(requests) == 2:
            raise httpx.ReadError("connection reset")
        return httpx.Response(200, headers={"content-type": "text/event-stream"}, content=SECOND)

    sleeps: list[float] = []
    client = Client("https://api.test", "otk_x_y", transport=httpx.MockTransport(handler), max_retries=0)
    client._sleep = sleeps.append
    events = list(client.jobs.watch(JOB))
    assert [e.type for e in events] == ["state", "sync", "metrics", "log", "state", "end"]
    assert all(isinstance(e, StreamEvent) for e in events)
    assert events[0].event.to_state == "queued" and events[0].state == "queued"
    assert [(p.step, p.name, p.value) for p in events[2].points] == [(1, "reward", 0.5)]
    assert [(x.seq, x.stream, x.line) for x in events[3].lines] == [(1, "stdout", "a"), (2, "stdout", "b")]
    assert events[4].event.message == "oom" and events[5].state == "failed"
    assert [r.url.path for r in requests] == [f"/api/v1/jobs/{JOB}/stream"] * 3
    assert "last-event-id" not in requests[0].headers
    assert [r.headers["last-event-id"] for r in requests[1:]] == ["5-0:1:0", "5-0:1:0"]
    assert requests[0].headers["accept"] == "text/event-stream"
    assert sleeps == [0.01, 0.02]  # the server's retry: 10 ms, doubled on a second failure in a row


def test_watch_gives_up_after_max_reconnects_and_raises_api_errors_at_once():
    calls = []

    def broken(request):
        calls.append(request)
        raise httpx.ConnectError("refused")

    client = Client("https://api.test", "otk_x_y", transport=httpx.MockTransport(broken), max_retries=0)
    client._sleep = lambda s: None
    with pytest.raises(errors.ApiConnectionError):
        list(client.jobs.watch(JOB, max_reconnects=2))
    assert len(calls) == 3

    def missing(request):
        calls.append(request)
        return httpx.Response(
            404, json={"error": {"code": "not_found", "message": "not found", "fields": {}}}
        )

    calls.clear()
    client = Client("https://api.test", "otk_x_y", transport=httpx.MockTransport(missing))
    with pytest.raises(errors.NotFound):
        list(client.jobs.watch(JOB, last_event_id="3-0:1:0"))
    assert len(calls) == 1 and calls[0].headers["last-event-id"] == "3-0:1:0"


# --- against the real server ---


@pytest.fixture
def running_job(alice, acme):
    job, _ = job_submit(organization=acme, actor=Actor.for_request(alice), spec=example_rl_spec())
    return job_transition(job=job, to=JobState.ADMITTED, actor=Actor.system("scheduler"))


def _runtime(url, job):
    return httpx.Client(
        base_url=f"{url}/api/v1/ingest/jobs/{job.id}",
        headers={"Authorization": f"Bearer {job_token_issue(job)}"},
        timeout=30,
    )


@pytest.mark.django_db(transaction=True)
@pytest.mark.usefixtures("builtin_envs")
def test_sdk_and_cli_watch_a_live_job(
    uvicorn_url,  # noqa: F811
    running_job,
    alice,
    bob,
    charlie,
    acme,
    globex,
    make_token,
    tmp_path,
):
    job = running_job
    runtime = _runtime(uvicorn_url, job)
    runtime.post("/state", json={"state": "running"}).raise_for_status()
    runtime.post(
        "/metrics", json={"points": [{"step": 0, "name": "reward", "value": 0.25}]}
    ).raise_for_status()

    with Client(uvicorn_url, make_token(charlie, globex)) as outsider, pytest.raises(errors.NotFound):
        next(outsider.jobs.watch(str(job.id)))

    def finish():
        runtime.post("/metrics", json={"points": [{"step": 1, "name": "reward", "value": 0.5}]})
        runtime.post("/logs", json={"lines": [{"line": "hello from the runtime"}]})
        runtime.post("/state", json={"state": "succeeded"})

    worker = threading.Thread(target=finish)
    events = []
    with Client(uvicorn_url, make_token(alice, acme)) as client:
        for event in client.jobs.watch(str(job.id)):
            events.append(event)
            if event.type == "sync":  # the history is in: the rest of the job happens live
                worker.start()
    worker.join()
    kinds = [e.type for e in events]
    assert kinds.count("sync") == 1 and kinds.index("sync") < kinds.index("log")
    assert kinds[-1] == "end" and events[-1].state == "succeeded"
    steps = [p.step for e in events if e.type == "metrics" for p in e.points]
    assert steps == [0, 1]
    assert [e.state for e in events if e.type == "state"] == ["queued", "admitted", "running", "succeeded"]
    assert [x.line for e in events if e.type == "log" for x in e.lines] == ["hello from the runtime"]
    # Resuming from the last id of a finished job: just the end.
    with Client(uvicorn_url, make_token(alice, acme)) as client:
        assert [e.type for e in client.jobs.watch(str(job.id), last_event_id=events[-1].id)] == ["end"]

    env = {k: v for k, v in os.environ.items() if not k.startswith("OPENTINKER_")}
    env.update(OPENTINKER_URL=uvicorn_url, OPENTINKER_TOKEN=make_token(bob, acme))
    env["OPENTINKER_CONFIG"] = str(tmp_path / "none.json")
    out = subprocess.run(
        [sys.executable, "-m", "opentinker", "jobs", "watch", str(job.id), "--metric", "reward"],
        cwd=BASE,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    # Not a terminal: plain lines, "step n/N" (the spec's 20 steps) and the chosen metric only.
    assert "step 0/20  reward=0.25" in lines and "step 1/20  reward=0.5" in lines
    assert "[stdout] hello from the runtime" in lines
    assert any("running -> succeeded" in line for line in lines)
    assert lines[-1] == "Job finished: succeeded"
    runtime.close()
