"""portal/asgi_split.py, the production server's application: sync views through Django's WSGI handler on a
thread pool, async views (the live stream, Tinker's long-polled retrieve_future) on the event loop."""

from __future__ import annotations

import asyncio
import io
import json
import socket
import threading

import httpx
import pytest

from opentinker.spec import example_rl_spec
from portal.asgi_split import SplitApplication, _wants_loop
from tests.loopback_asgi import serving
from tests.workers.test_local_driver import wait_for

SPEC = example_rl_spec().model_dump(mode="json")


def test_only_async_routes_stay_on_the_loop():
    from django.urls import get_resolver

    resolver = get_resolver()
    assert _wants_loop("/api/v1/jobs/abc/stream", resolver)  # asgi_only: an async generator
    assert _wants_loop("/tinker/api/v1/retrieve_future", resolver)  # an async view
    for path in ("/api/v1/jobs", "/api/v1/jobs/abc", "/healthz", "/tinker/api/v1/forward_backward", "/nope/"):
        assert not _wants_loop(path, resolver), path


@pytest.fixture
def app():
    split = SplitApplication(threads=2)
    seen: list[tuple[str, str]] = []  # (handler, path)
    asgi, wsgi = split.asgi, split.wsgi

    async def asgi_spy(scope, receive, send):
        if scope["type"] == "http":  # not the server's lifespan messages
            seen.append(("asgi", scope["path"]))
        await asgi(scope, receive, send)

    def wsgi_spy(environ, start_response):
        seen.append(("wsgi", environ["PATH_INFO"]))
        assert threading.current_thread().name.startswith("wsgi")  # a pool thread, not the loop's
        return wsgi(environ, start_response)

    split.asgi, split.wsgi = asgi_spy, wsgi_spy
    split.seen = seen
    yield split
    split.pool.shutdown(wait=True)


@pytest.mark.django_db(transaction=True)
def test_the_api_answers_the_same_through_the_wsgi_path(app, alice, acme, make_token):
    headers = {"Authorization": f"Bearer {make_token(alice, acme)}"}
    with serving(app) as base, httpx.Client(base_url=base, headers=headers, timeout=60) as http:
        # A body in the request (a job submitted), then read back: list, detail, a query string, a 404.
        created = http.post("/api/v1/jobs", json={**SPEC, "name": "through-wsgi"})
        assert created.status_code == 201, created.text
        job_id = created.json()["id"]
        page = http.get("/api/v1/jobs", params={"limit": 1})
        assert page.status_code == 200 and page.headers["content-type"].startswith("application/json")
        assert [j["id"] for j in page.json()["results"]] == [job_id]
        assert http.get(f"/api/v1/jobs/{job_id}").json()["name"] == "through-wsgi"
        assert http.get("/api/v1/jobs/00000000-0000-0000-0000-000000000000").status_code == 404
        bad = http.post("/api/v1/jobs", content=b"{not json", headers={"Content-Type": "application/json"})
        assert bad.status_code == 400
        # A streaming response (the audit export, a sync generator) is sent chunk by chunk from the thread.
        export = http.get("/api/v1/org/audit/export", params={"as": "jsonl"})
        assert export.status_code == 200, export.text
        lines = export.content.splitlines()
        assert lines, export.content
        assert all(json.loads(line)["organization"] == "acme" for line in lines), export.content[:300]
        assert http.get("/api/v1/jobs", headers={"Authorization": "Bearer otk_nope_nope"}).status_code == 401
    assert {h for h, _ in app.seen} == {"wsgi"}
    assert ("wsgi", f"/api/v1/jobs/{job_id}") in app.seen


@pytest.mark.django_db(transaction=True)
def test_async_routes_go_to_the_asgi_handler(app, alice, acme, make_token):
    headers = {"Authorization": f"Bearer {make_token(alice, acme)}"}
    with serving(app) as base, httpx.Client(base_url=base, headers=headers, timeout=60) as http:
        job_id = http.post("/api/v1/jobs", json={**SPEC, "name": "s"}).json()["id"]
        # HEAD answers at once (no stream), through the same view and so through the same handler.
        assert http.head(f"/api/v1/jobs/{job_id}/stream").status_code == 200
        r = http.post("/tinker/api/v1/retrieve_future", json={"request_id": "nope"})
        assert r.status_code in (400, 401, 403, 404), r.text  # answered by the async view, not held
    assert ("asgi", f"/api/v1/jobs/{job_id}/stream") in app.seen
    assert ("asgi", "/tinker/api/v1/retrieve_future") in app.seen
    assert ("wsgi", f"/api/v1/jobs/{job_id}/stream") not in app.seen


def _scope(path="/api/v1/jobs", headers=(), root_path=""):
    return {
        "type": "http",
        "method": "POST",
        "path": path,
        "root_path": root_path,
        "query_string": b"",
        "headers": list(headers),
        "server": ("127.0.0.1", 8000),
        "client": ("127.0.0.1", 5000),
    }


def test_a_header_name_with_an_underscore_is_dropped_as_django_asgi_does():
    from portal.asgi_split import _environ

    # The proxy's X-Forwarded-Proto says http; a client's X_Forwarded_Proto must not read as the same header
    # (joined first, "https,http" would pass SECURE_PROXY_SSL_HEADER's check of the first value).
    environ = _environ(
        _scope(headers=[(b"x_forwarded_proto", b"https"), (b"x-forwarded-proto", b"http"), (b"x_a", b"1")]),
        io.BytesIO(),
    )
    assert environ["HTTP_X_FORWARDED_PROTO"] == "http"
    assert "HTTP_X_A" not in environ


def test_a_chunked_body_reaches_the_view_through_the_wsgi_path():
    from django.core.handlers.wsgi import WSGIRequest

    split = SplitApplication(threads=1)
    django_wsgi = split.wsgi

    def echo(environ, start_response):  # what Django's request reads of the body, before any view
        if not environ["PATH_INFO"].startswith("/api/"):
            start_response("200 OK", [("Content-Type", "application/octet-stream")])
            return [WSGIRequest(environ).body]
        return django_wsgi(environ, start_response)

    split.wsgi = echo
    sent = b"x" * 5000 + b"end"
    try:
        with serving(split) as base, httpx.Client(base_url=base, timeout=60) as http:
            # An iterator body goes out chunked (no Content-Length): the request must carry all of it.
            r = http.post("/tinker/api/v1/create_session", content=iter([sent[:2500], sent[2500:]]))
            assert r.request.headers.get("transfer-encoding") == "chunked" and r.content == sent
            # The API still refuses a chunked body by its header (411), as on Django's ASGI handler.
            refused = http.post(
                "/api/v1/jobs", content=iter([b"{}"]), headers={"Content-Type": "application/json"}
            )
            assert refused.status_code == 411 and refused.json()["error"]["code"] == "length_required"
    finally:
        split.pool.shutdown(wait=True)


class _Endless:
    """A streaming WSGI response that yields until closed (or the test ends), counting its chunks."""

    streaming = True

    def __init__(self):
        self.chunks, self.closed, self.stop = 0, threading.Event(), threading.Event()

    def __iter__(self):
        while not (self.closed.is_set() or self.stop.is_set()):
            self.chunks += 1
            yield b"x" * 1024

    def close(self):
        self.closed.set()


def test_a_streaming_response_ends_when_its_client_leaves():
    split = SplitApplication(threads=1)
    response = _Endless()

    def endless(environ, start_response):
        start_response("200 OK", [("Content-Type", "application/octet-stream")])
        return response

    split.wsgi = endless
    try:
        with serving(split) as base:
            port = int(base.rsplit(":", 1)[1])
            with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
                sock.sendall(b"GET /api/v1/org/audit/export HTTP/1.1\r\nHost: x\r\n\r\n")
                assert sock.recv(4096).startswith(b"HTTP/1.1 200")  # streaming has begun
            # The client is gone: the pool thread stops at the next chunk and closes the response (Django's
            # request_finished: its database connection back to the pool), rather than streaming on forever.
            wait_for(response.closed.is_set, timeout=30, what="the response closed after the disconnect")
            assert not response.stop.is_set()
    finally:
        response.stop.set()
        split.pool.shutdown(wait=True)


def test_under_a_root_path_the_stream_still_stays_on_the_loop(app):
    """Served under a prefix (uvicorn --root-path /ot), ASGI's path includes it; the route is the rest."""

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(_message):
        pass

    async def asgi_spy(scope, _receive, _send):
        app.seen.append(("asgi", scope["path"]))

    app.asgi = asgi_spy  # answers nothing: which handler gets the request is all this test asks
    scope = {**_scope(path="/ot/api/v1/jobs/abc/stream", root_path="/ot"), "method": "GET"}
    asyncio.run(app(scope, receive, send))
    assert app.seen == [("asgi", "/ot/api/v1/jobs/abc/stream")]


def test_a_file_download_goes_out_in_the_asgi_handlers_chunks(tmp_path):
    from django.core.handlers.asgi import ASGIHandler
    from django.http import FileResponse

    path = tmp_path / "checkpoint.bin"
    path.write_bytes(bytes(range(256)) * 1024)  # 256 KiB
    split = SplitApplication(threads=1)

    def download(environ, start_response):  # what Django's WSGI handler returns for a download view
        response = FileResponse(path.open("rb"))
        start_response("200 OK", list(response.items()))
        return response

    split.wsgi = download
    sent: list[dict] = []
    bodies = [{"type": "http.request", "body": b"", "more_body": False}]

    async def receive():  # the request, then nothing: the client stays
        if bodies:
            return bodies.pop()
        await asyncio.Event().wait()

    async def send(message):
        sent.append(message)

    try:
        asyncio.run(split({**_scope(path="/download"), "method": "GET"}, receive, send))
    finally:
        split.pool.shutdown(wait=True)
    chunks = [m["body"] for m in sent if m["type"] == "http.response.body" and m["body"]]
    assert b"".join(chunks) == path.read_bytes()
    # One hop from the pool thread to the loop per chunk: Django's 64 KiB, not FileResponse's own 4 KiB.
    assert len(chunks) == path.stat().st_size // ASGIHandler.chunk_size


def test_a_body_the_api_refuses_by_its_length_is_not_read_first():
    """Django's handlers read a whole body before any middleware: a request declaring 1 GiB would be
    written to a temporary file before the guard's 413. The split application lets the guard answer first."""
    split = SplitApplication(threads=1)
    try:
        with serving(split) as base:
            port = int(base.rsplit(":", 1)[1])
            with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
                head = b"POST /api/v1/jobs HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                sock.sendall(head + b"Content-Length: %d\r\n\r\n{" % (1 << 30))  # and no more of the body
                answer = b""
                while not answer.endswith(b"\r\n0\r\n\r\n"):  # a chunked answer ends so
                    chunk = sock.recv(65536)
                    if not chunk:
                        break
                    answer += chunk
        assert answer.startswith(b"HTTP/1.1 413"), answer
        assert b'"code": "payload_too_large"' in answer, answer
    finally:
        split.pool.shutdown(wait=True)
