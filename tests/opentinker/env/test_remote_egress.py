"""The egress policy end to end, in the runtime's client (RemoteEnvironment with an `Egress`): only loopback
targets, and each refused one is a listener that counts what reaches it, so a test shows that nothing did.

- a loopback URL without an allow-list is refused before any connection;
- a host name that resolves to 127.0.0.1 through a resolver the test controls is refused;
- an allow-listed loopback server that redirects to another loopback port is refused AT the redirect (the
  second port never sees a request), for plain HTTP calls and for the WebSocket handshake;
- an allow-listed name connects to the address that was checked, keeping its Host header, even when the
  resolver answers differently afterwards (no second resolution).
"""

from __future__ import annotations

import asyncio
import socket
import threading

import pytest
from aiohttp import web

from opentinker.egress import Egress, EgressPolicy, EgressRefused, parse_allow_list
from opentinker.env.remote import RemoteEnvironment, RemoteEnvironmentError


def start(routes_for):
    """An aiohttp server on a free loopback port; `routes_for(state)` gives its routes. Yields its state."""
    state: dict = {"requests": [], "hosts": [], "auth": []}
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    state["port"] = port

    @web.middleware
    async def record(request, handler):
        state["requests"].append(request.path)
        state["hosts"].append(request.headers.get("Host"))
        state["auth"].append(request.headers.get("Authorization"))
        return await handler(request)

    app = web.Application(middlewares=[record])
    app.add_routes(routes_for(state))
    loop = asyncio.new_event_loop()
    runner = web.AppRunner(app)
    loop.run_until_complete(runner.setup())
    loop.run_until_complete(web.TCPSite(runner, "127.0.0.1", port).start())
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    return state, (loop, runner, thread)


def stop(handle) -> None:
    loop, runner, thread = handle
    asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(5)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(5)
    loop.close()


async def healthy(request):
    return web.json_response({"status": "healthy"})


@pytest.fixture
def forbidden():
    """The target the policy must keep the client from: it counts every request that reaches it."""
    state, handle = start(lambda st: [web.get("/health", healthy), web.get("/ws", healthy)])
    yield state
    stop(handle)


@pytest.fixture
def redirector(forbidden):
    """An allowed server whose /health and /ws redirect to the forbidden port."""

    def routes(st):
        async def away(request):
            raise web.HTTPFound(f"http://127.0.0.1:{forbidden['port']}{request.path}")

        return [web.get("/health", away), web.get("/ws", away), web.get("/schema", healthy)]

    state, handle = start(routes)
    yield state
    stop(handle)


class Hosts:
    """A resolver the test controls (never DNS): answers from a dict, counts its calls."""

    def __init__(self, table: dict[str, list[str]]) -> None:
        self.table, self.calls = table, 0

    def __call__(self, host: str, port: int) -> list[str]:
        self.calls += 1
        return self.table[host]


def egress(allow: str = "", hosts: Hosts | None = None) -> Egress:
    return Egress(EgressPolicy(parse_allow_list(allow)), hosts or Hosts({}))


def test_a_loopback_url_is_refused_before_any_connection(forbidden):
    url = f"http://127.0.0.1:{forbidden['port']}"
    with RemoteEnvironment(url, egress=egress(), retries=0) as env:
        with pytest.raises(RemoteEnvironmentError, match=r"egress policy refused.*(loopback|plain http)"):
            env.health()
        with pytest.raises(RemoteEnvironmentError, match="egress policy refused"):
            env.reset(0)
    for spelling in ("https://2130706433", "https://0x7f000001", "https://0177.0.0.1", "https://127.1"):
        env = RemoteEnvironment(f"{spelling}:{forbidden['port']}", egress=egress(), retries=0)
        with env, pytest.raises(RemoteEnvironmentError, match="loopback"):
            env.reset(0)
    assert forbidden["requests"] == []


def test_a_name_resolving_to_loopback_through_the_injected_resolver_is_refused(forbidden):
    hosts = Hosts({"innocent.example": ["127.0.0.1"]})
    url = f"https://innocent.example:{forbidden['port']}"
    with RemoteEnvironment(url, egress=egress(hosts=hosts), retries=0) as env:
        why = r"innocent\.example resolves to 127\.0\.0\.1.*loopback"
        with pytest.raises(RemoteEnvironmentError, match=why):
            env.reset(0)
        with pytest.raises(RemoteEnvironmentError, match="loopback"):
            env.health()
    assert hosts.calls >= 1 and forbidden["requests"] == []


def test_a_redirect_to_a_forbidden_port_is_refused_at_the_redirect(redirector, forbidden):
    allowed = f"127.0.0.1:{redirector['port']}"  # only the first server's port is allow-listed
    with RemoteEnvironment(f"http://{allowed}", egress=egress(allowed), retries=0) as env:
        assert env.schema() == {"status": "healthy"}  # the allowed server itself is reachable
        with pytest.raises(RemoteEnvironmentError, match=r"refused the redirect to http://127\.0\.0\.1:"):
            env.health()
        with pytest.raises(RemoteEnvironmentError, match="refused the redirect"):
            env.reset(0)  # the WebSocket handshake's redirect too
    assert redirector["requests"] == ["/schema", "/health", "/ws"]
    assert forbidden["requests"] == []


def test_the_secret_does_not_follow_a_redirect_to_another_origin(redirector, forbidden):
    """Both servers allow-listed: the redirect is followed, but the environment's secret stays with the
    server it was given for (aiohttp drops Authorization when a redirect changes the origin)."""
    both = f"127.0.0.1:{redirector['port']} 127.0.0.1:{forbidden['port']}"
    url = f"http://127.0.0.1:{redirector['port']}"
    with RemoteEnvironment(url, egress=egress(both), secret="s3cret", retries=0) as env:
        assert env.health() == {"status": "healthy"}  # answered by the second server, after the redirect
    assert redirector["requests"] == forbidden["requests"] == ["/health"]
    assert redirector["auth"] == ["Bearer s3cret"]
    assert forbidden["auth"] == [None]


def test_an_allow_listed_name_connects_to_the_checked_address_with_its_host_header(forbidden):
    port = forbidden["port"]
    hosts = Hosts({"env.internal": ["127.0.0.1"]})
    with RemoteEnvironment(
        f"http://env.internal:{port}", egress=egress(f"env.internal:{port}", hosts), retries=0
    ) as env:
        assert env.health() == {"status": "healthy"}
        hosts.table["env.internal"] = ["::1"]  # a second answer would now go elsewhere: never asked for
        assert env.egress.pinned("env.internal", port) == ("127.0.0.1",)
    assert forbidden["hosts"] == [f"env.internal:{port}"]
    # The same name on a port that is not allow-listed is refused.
    with pytest.raises(EgressRefused):
        egress(f"env.internal:{port}", hosts).check(f"http://env.internal:{port + 1}")
