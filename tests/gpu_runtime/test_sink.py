"""JSONL and HTTP sinks; the HTTP sink against a real local http.server."""

from __future__ import annotations

import io
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from gpu_runtime.sink import HttpSink, IngestError, JsonlSink


class Ingest:
    """A tiny ingest server: records requests; can fail the first N posts of a path; can request cancel."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, dict, str]] = []
        self.fail: dict[str, list[int]] = {}
        self.cancel = False
        ingest = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                path = self.path.rsplit("/", 1)[-1]
                codes = ingest.fail.get(path)
                if codes:
                    self.send_response(codes.pop(0))
                    self.end_headers()
                    return
                ingest.requests.append((self.path, body, self.headers["Authorization"]))
                out = json.dumps({"cancel": ingest.cancel} if path == "heartbeat" else {"ok": True}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(out)))
                self.end_headers()
                self.wfile.write(out)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/api/v1/ingest"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


@pytest.fixture
def ingest():
    srv = Ingest()
    yield srv
    srv.server.shutdown()


def test_jsonl_sink_lines():
    buf = io.StringIO()
    s = JsonlSink(buf)
    s.metrics(3, {"reward/mean": 0.5, "kl": float("nan")})
    s.checkpoint(3, "file:///x/step_000003", [{"name": "a", "size": 1, "sha256": "00"}])
    lines = [json.loads(line) for line in buf.getvalue().splitlines()]
    assert lines[0] == {"type": "metrics", "step": 3, "reward/mean": 0.5, "kl": None}
    assert lines[1]["uri"] == "file:///x/step_000003"
    assert not s.should_cancel()


def test_http_sink_posts_with_job_token(ingest):
    s = HttpSink(ingest.url, "job-token-1", heartbeat_every_s=0)
    s.metrics(2, {"reward/mean": 0.25, "kl": 0.01})
    s.log("hello")
    s.event("started", step=0)
    s.checkpoint(2, "file:///c/step_000002", [{"name": "model.safetensors", "size": 9, "sha256": "ab"}])
    s.heartbeat()
    paths = [p.rsplit("/", 1)[-1] for p, _, _ in ingest.requests]
    assert paths == ["metrics", "logs", "events", "checkpoints", "heartbeat"]
    assert {a for _, _, a in ingest.requests} == {"Bearer job-token-1"}
    assert ingest.requests[0][1] == {
        "points": [
            {"step": 2, "name": "reward/mean", "value": 0.25},
            {"step": 2, "name": "kl", "value": 0.01},
        ]
    }
    assert ingest.requests[3][1]["files"][0]["sha256"] == "ab"


def test_http_sink_retries_5xx_then_succeeds(ingest):
    ingest.fail["metrics"] = [503, 502]
    s = HttpSink(ingest.url, "t", backoff_s=0.01)
    s.metrics(1, {"x": 1.0})
    assert len(ingest.requests) == 1


def test_http_sink_does_not_retry_4xx(ingest):
    ingest.fail["metrics"] = [401, 200]
    s = HttpSink(ingest.url, "bad", backoff_s=0.01)
    with pytest.raises(IngestError, match="401"):
        s.metrics(1, {"x": 1.0})


def test_http_sink_gives_up_after_retries():
    s = HttpSink("http://127.0.0.1:9/ingest", "t", retries=2, backoff_s=0.01, timeout_s=0.5)
    with pytest.raises(IngestError, match="3 attempts"):
        s.log("x")


def test_cancel_comes_from_heartbeat(ingest):
    s = HttpSink(ingest.url, "t", heartbeat_every_s=0)
    s.heartbeat()
    assert not s.should_cancel()
    ingest.cancel = True
    s.heartbeat()
    assert s.should_cancel()
