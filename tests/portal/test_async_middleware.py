"""The middleware chain under ASGI: every middleware serves Django's async handler on the event loop
(portal/async_middleware.py), and each behaves the same on both handlers.

The hop count is the pin: a request to a sync view makes as many sync<->async thread hops with the whole
MIDDLEWARE as with none (a sync-only middleware adds two; a Django MiddlewareMixin hook one each). The parity
tests send the same requests through the sync handler (the test Client) and the async one (AsyncClient):
same status, same headers, the request id in the log context and the request in the audit context inside
sync and async views.
"""

from __future__ import annotations

import asyncio
import json
import re

import pytest
from asgiref.sync import AsyncToSync, SyncToAsync, sync_to_async
from django.contrib.staticfiles import finders
from django.core.handlers.asgi import ASGIHandler
from django.db import connection
from django.http import JsonResponse
from django.test import AsyncClient, Client
from django.urls import path

from portal.observability import context
from portal.services import audit

# Headers whose values differ per response, whatever the handler.
VARYING = {"date", "x-request-id", "set-cookie", "last-modified"}


def _probe(request):
    return {
        "audit_request_is_this_one": audit._request.get() is request,
        "log_request_id": context.current().get("request_id"),
        "request_id": getattr(request, "request_id", None),
    }


def sync_probe(request):
    return JsonResponse(_probe(request))


async def async_probe(request):
    return JsonResponse(_probe(request))


urlpatterns = [path("probe/sync", sync_probe), path("probe/async", async_probe)]


async def _asgi_get(app, path_: str) -> list[dict]:
    """One GET through an ASGI app, as a server would send it; the ASGI messages it sent back."""
    body_sent = False
    never = asyncio.Event()

    async def receive():
        nonlocal body_sent
        if not body_sent:
            body_sent = True
            return {"type": "http.request", "body": b"", "more_body": False}
        await never.wait()  # Django listens for a disconnect until the response is sent

    sent: list[dict] = []

    async def send(message):
        sent.append(message)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": path_,
        "raw_path": path_.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [(b"host", b"testserver")],
        "client": ("127.0.0.1", 40000),
        "server": ("testserver", 80),
    }
    await app(scope, receive, send)
    return sent


def _hops(monkeypatch, app, path_: str) -> tuple[list[dict], list[str]]:
    hops: list[str] = []
    to_thread, to_loop = SyncToAsync.__call__, AsyncToSync.__call__

    async def counted_to_thread(self, *args, **kwargs):
        hops.append(f"to thread: {getattr(self.func, '__qualname__', self.func)}")
        return await to_thread(self, *args, **kwargs)

    def counted_to_loop(self, *args, **kwargs):
        hops.append(f"to loop: {getattr(self.awaitable, '__qualname__', self.awaitable)}")
        return to_loop(self, *args, **kwargs)

    monkeypatch.setattr(SyncToAsync, "__call__", counted_to_thread)
    monkeypatch.setattr(AsyncToSync, "__call__", counted_to_loop)
    try:
        sent = asyncio.run(_asgi_get(app, path_))
    finally:
        monkeypatch.undo()
    assert sent[0]["status"] == 200, sent
    return sent, hops


@pytest.mark.urls(__name__)
@pytest.mark.parametrize("view", ["sync", "async"])
def test_the_middlewares_add_no_thread_hop_under_asgi(monkeypatch, settings, view):
    full = ASGIHandler()
    sent, hops_full = _hops(monkeypatch, full, f"/probe/{view}")
    headers = {k.lower(): v for k, v in sent[0]["headers"]}
    assert b"x-request-id" in headers and headers[b"x-frame-options"] == b"DENY"  # the chain did run
    settings.MIDDLEWARE = []
    _, hops_bare = _hops(monkeypatch, ASGIHandler(), f"/probe/{view}")
    assert len(hops_full) == len(hops_bare), (hops_full, hops_bare)


@pytest.mark.urls(__name__)
@pytest.mark.parametrize("view", ["sync", "async"])
def test_log_and_audit_context_reach_the_view_on_both_handlers(view):
    for client in (Client(), AsyncClient()):
        r = client.get(f"/probe/{view}", headers={"X-Request-ID": "probe-1"})
        if asyncio.iscoroutine(r):
            r = asyncio.run(r)
        assert r.status_code == 200
        assert json.loads(r.content) == {
            "audit_request_is_this_one": True,
            "log_request_id": "probe-1",
            "request_id": "probe-1",
        }, type(client).__name__
        assert r["X-Request-ID"] == "probe-1"


def _both(method: str, path_: str, **kwargs):
    sync = getattr(Client(), method)(path_, **kwargs)
    asynchronous = asyncio.run(getattr(AsyncClient(), method)(path_, **kwargs))
    return sync, asynchronous


def _same(sync, asynchronous) -> None:
    assert sync.status_code == asynchronous.status_code
    names = {k.lower() for k in sync.headers} | {k.lower() for k in asynchronous.headers}
    for name in sorted(names - VARYING):
        assert sync.headers.get(name) == asynchronous.headers.get(name), name
    assert sync.headers.keys() - asynchronous.headers.keys() == set()
    assert sorted(sync.cookies) == sorted(asynchronous.cookies)


@pytest.mark.django_db
def test_a_static_file_is_served_alike_with_its_headers():
    assert finders.find("admin/css/base.css")  # precondition: the file WhiteNoise serves
    sync, asynchronous = _both("get", "/static/admin/css/base.css")
    assert sync.status_code == 200 and sync["Content-Type"].startswith("text/css")
    assert "Access-Control-Allow-Origin" in sync.headers and "Cache-Control" in sync.headers
    _same(sync, asynchronous)  # Content-Length included


@pytest.mark.django_db
def test_the_api_guard_refuses_alike(settings):
    settings.API_MAX_BODY_BYTES = 16
    sync, asynchronous = _both(
        "post", "/api/v1/jobs", data={"spec": "x" * 100}, content_type="application/json"
    )
    assert sync.status_code == 413 and sync.json()["error"]["code"] == "payload_too_large"
    _same(sync, asynchronous)
    assert sync.content == asynchronous.content


@pytest.mark.django_db
@pytest.mark.parametrize("path_", ["/healthz", "/", "/accounts/login/", "/no-such-page"])
def test_pages_and_probes_get_the_same_headers(path_):
    sync, asynchronous = _both("get", path_, headers={"X-Request-ID": "same-1"})
    _same(sync, asynchronous)
    assert sync["X-Request-ID"] == asynchronous["X-Request-ID"] == "same-1"
    assert sync["X-Content-Type-Options"] == "nosniff" and sync["X-Frame-Options"] == "DENY"


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("path_", "location"),
    [("/accounts/login", "/accounts/login/"), ("/accounts/login/", "https://testserver/accounts/login/")],
)
def test_redirects_of_the_middlewares_alike(settings, path_, location):
    """CommonMiddleware's APPEND_SLASH (a known path without its slash) and SecurityMiddleware's HTTPS
    redirect, decided inline on the async path, answer as on the sync one."""
    settings.SECURE_SSL_REDIRECT = path_.endswith("/")
    sync, asynchronous = _both("get", path_)
    assert sync.status_code == 301 and sync["Location"] == location
    _same(sync, asynchronous)


def _call(client, method: str, path_: str, **kwargs):
    r = getattr(client, method)(path_, **kwargs)
    return asyncio.run(r) if asyncio.iscoroutine(r) else r


@pytest.mark.django_db(transaction=True)  # the async handler's thread has its own database connection
@pytest.mark.parametrize("csrf_store", ["cookie", "session"])
@pytest.mark.parametrize("handler", ["sync", "async"])
def test_a_login_goes_through_csrf_and_the_session_on_both_handlers(
    alice, acme, settings, handler, csrf_store
):
    """The hooks that may do I/O (the CSRF check of a form post, saving the session) on both paths; with
    CSRF_USE_SESSIONS the CSRF hooks read the session (a query): on the async path they must not run on the
    loop (SynchronousOnlyOperation). The login rotates the CSRF token (a new cookie, or a new session
    value)."""
    settings.CSRF_USE_SESSIONS = csrf_store == "session"
    client = (Client if handler == "sync" else AsyncClient)(enforce_csrf_checks=True)
    try:
        page = _call(client, "get", "/accounts/login/")
        assert page.status_code == 200 and ("csrftoken" in page.cookies) == (csrf_store == "cookie")
        form = {"username": "alice", "password": "correct-horse-battery"}
        assert _call(client, "post", "/accounts/login/", data=form).status_code == 403  # no CSRF token
        token = re.search(rb'name="csrfmiddlewaretoken" value="([^"]+)"', page.content)
        assert token is not None
        form["csrfmiddlewaretoken"] = token.group(1).decode()
        login = _call(client, "post", "/accounts/login/", data=form)
        assert login.status_code == 302 and "sessionid" in login.cookies
        if csrf_store == "cookie":  # rotated at login
            assert login.cookies["csrftoken"].value not in ("", page.cookies["csrftoken"].value)
        home = _call(client, "get", "/")
        assert home.status_code == 200 and b"acme" in home.content.lower()
    finally:
        # The test AsyncClient runs sync code on asgiref's one shared thread, whose connection would outlive
        # the test (and block the test database's teardown).
        if handler == "async":
            asyncio.run(sync_to_async(lambda: connection.close())())


def test_the_deploy_checks_find_the_subclasses(settings):
    """Django's security checks look for its middlewares by dotted path, through private helpers that
    portal/apps.py replaces (deploy_checks_see_subclasses): none is reported missing, and the checks gated
    on each still run. Fails if a Django upgrade renames or drops a helper the patch replaces."""
    from django.core import checks

    settings.SECURE_HSTS_SECONDS = 0  # W004, gated on SecurityMiddleware
    settings.SESSION_COOKIE_SECURE = False  # W012 (app and middleware), gated on SessionMiddleware
    settings.CSRF_COOKIE_SECURE = False  # W016, gated on CsrfViewMiddleware
    settings.X_FRAME_OPTIONS = "SAMEORIGIN"  # W019, gated on XFrameOptionsMiddleware
    found = checks.run_checks(tags=[checks.Tags.security], include_deployment_checks=True)
    ids = {m.id for m in found}
    assert not ids & {"security.W001", "security.W002", "security.W003"}, ids  # "... is not in MIDDLEWARE"
    assert {"security.W004", "security.W012", "security.W016", "security.W019"} <= ids, ids
