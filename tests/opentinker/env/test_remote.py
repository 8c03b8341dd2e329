"""Remote environments against a tiny OpenEnv-style server (aiohttp, started in the test).

The server keeps one environment per WebSocket session (a counter game: say the next number; reward 1 per
right answer, the episode ends at 3) and builds a fresh one per plain HTTP request, as OpenEnv does.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import threading

import pytest
from aiohttp import WSMsgType, web

from opentinker.env.codec import ByteCodec
from opentinker.env.protocol import Budget, MultiTurnProtocol, StopReason
from opentinker.env.remote import RemoteEnvironment, RemoteEnvironmentError
from tests.opentinker.env.scripted import Scripted

SECRET = "s3cret"
# Every call's timeout where a test waits for one to fire on a hung step: the normal calls before it must
# never reach it, also on a loaded machine, so it is far above a loopback round trip.
TIMEOUT_S = 2.0


class Counter:
    def __init__(self) -> None:
        self.n, self.seed = 0, 0

    def reset(self, seed: int) -> dict:
        self.n, self.seed = 0, seed
        return {"observation": {"prompt": f"count from {seed}"}, "reward": 0.0, "done": False}

    def step(self, action: dict) -> dict:
        expected = str(self.seed + self.n + 1)
        reward = 1.0 if action.get("message") == expected else 0.0
        self.n += 1
        return {"observation": {"prompt": f"said {self.n}"}, "reward": reward, "done": self.n >= 3}


def make_app(state: dict) -> web.Application:
    def authorized(request) -> bool:
        return request.headers.get("Authorization") == f"Bearer {SECRET}"

    async def health(request):
        state["health_calls"] += 1
        if state["health_calls"] <= state["fail_health"]:
            return web.Response(status=503)
        return web.json_response({"status": "healthy"})

    async def schema(request):
        return web.json_response({"action": {"properties": {"message": {"type": "string"}}}})

    async def http_state(request):
        return web.json_response({"step_count": 0})  # a fresh environment per request

    async def ws(request):
        if not authorized(request):
            return web.Response(status=401)
        sock = web.WebSocketResponse()
        await sock.prepare(request)
        env = Counter()
        state["sessions"] += 1
        async for msg in sock:
            if msg.type != WSMsgType.TEXT:
                break
            m = json.loads(msg.data)
            if m["type"] == "reset":
                await sock.send_json({"type": "observation", "data": env.reset(m["data"].get("seed", 0))})
            elif m["type"] == "step":
                if m["data"].get("message") == "hang":
                    # Far past the client's timeout (or until the test ends): a client without one
                    # would get its answer after 30 s and fail the test, not hang it.
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(state["release"].wait(), 30)
                if m["data"].get("message") == "boom":
                    await sock.send_json({"type": "error", "data": {"message": "kaboom"}})
                    continue
                await sock.send_json({"type": "observation", "data": env.step(m["data"])})
            elif m["type"] == "state":
                await sock.send_json({"type": "state", "data": {"step_count": env.n}})
            elif m["type"] == "close":
                break
        await sock.close()
        return sock

    app = web.Application()
    app.add_routes(
        [
            web.get("/health", health),
            web.get("/schema", schema),
            web.get("/state", http_state),
            web.get("/ws", ws),
        ]
    )
    return app


@pytest.fixture
def server():
    state = {"health_calls": 0, "fail_health": 0, "sessions": 0, "release": asyncio.Event()}
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    loop = asyncio.new_event_loop()
    runner = web.AppRunner(make_app(state))
    loop.run_until_complete(runner.setup())
    loop.run_until_complete(web.TCPSite(runner, "127.0.0.1", port).start())
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    state["url"] = f"http://127.0.0.1:{port}"
    yield state
    loop.call_soon_threadsafe(state["release"].set)  # hung handlers end, so the server can shut down
    asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(5)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(5)
    loop.close()


def test_episode_runs_end_to_end_over_one_websocket_session(server):
    with RemoteEnvironment(server["url"], secret=SECRET) as env:
        assert env.health() == {"status": "healthy"}
        assert "message" in env.schema()["action"]["properties"]
        obs = env.reset(10)
        assert obs.text == "count from 10"
        r1 = env.step("11")
        assert (r1.reward, r1.done, r1.observation.text) == (1.0, False, "said 1")
        assert env.state() == {"step_count": 1}  # the session's environment keeps its state
        r2 = env.step("wrong")
        r3 = env.step("13")
        assert (r2.reward, r3.reward, r3.done, r3.observation) == (0.0, 1.0, True, None)


def test_protocol_machine_drives_a_remote_environment(server):
    env = RemoteEnvironment(server["url"], secret=SECRET)
    try:
        ep = MultiTurnProtocol(Budget(max_turns=5)).run(env, Scripted(["1", "2", "9"]), ByteCodec(), seed=0)
    finally:
        env.close()
    assert ep.stop_reason is StopReason.DONE
    assert ep.turn_rewards == [1.0, 1.0, 0.0] and ep.reward == 2.0


def test_wrong_secret_is_refused_without_retrying(server):
    with (
        RemoteEnvironment(server["url"], secret="wrong", retries=3) as env,
        pytest.raises(RemoteEnvironmentError, match="refused the session: HTTP 401"),
    ):
        env.reset(0)
    assert server["sessions"] == 0


def test_stateless_calls_are_retried_and_give_up_with_a_reason(server):
    server["fail_health"] = 2
    with RemoteEnvironment(server["url"], retries=2, backoff_s=0.01) as env:
        assert env.health() == {"status": "healthy"}
    assert server["health_calls"] == 3
    server["fail_health"], server["health_calls"] = 10, 0
    with (
        RemoteEnvironment(server["url"], retries=1, backoff_s=0.01) as env,
        pytest.raises(RemoteEnvironmentError, match="failed after 2 attempts: HTTP 503"),
    ):
        env.health()
    assert server["health_calls"] == 2


def test_step_timeout_and_server_errors_fail_the_episode_not_the_caller(server):
    with RemoteEnvironment(server["url"], secret=SECRET, timeout_s=TIMEOUT_S) as env:
        env.reset(0)
        with pytest.raises(RemoteEnvironmentError, match="kaboom"):
            env.step("boom")
        assert env.step("1").reward == 1.0  # an error answer leaves the session usable
        with pytest.raises(RemoteEnvironmentError, match="step timed out"):
            env.step("hang")
        with pytest.raises(RemoteEnvironmentError, match="step before reset"):
            env.step("2")  # the timed-out session was closed; never silently retried
    env = RemoteEnvironment(server["url"], secret=SECRET, timeout_s=TIMEOUT_S)
    try:
        ep = MultiTurnProtocol(Budget(max_turns=5)).run(env, Scripted(["hang"]), ByteCodec(), seed=0)
    finally:
        env.close()
    assert ep.stop_reason is StopReason.ENV_ERROR and "timed out" in ep.error


def test_unreachable_server():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with (
        RemoteEnvironment(f"http://127.0.0.1:{port}", retries=1, backoff_s=0.01, timeout_s=1) as env,
        pytest.raises(RemoteEnvironmentError, match="failed after 2 attempts"),
    ):
        env.reset(0)
    with pytest.raises(ValueError, match="must start with http"):
        RemoteEnvironment("ftp://x")
