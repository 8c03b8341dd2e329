"""Environments served by their owners over HTTP/WebSocket, compatible with OpenEnv's protocol.

An OpenEnv server offers `GET /health`, `GET /schema`, `GET /state`, `POST /reset`, `POST /step`, and a
WebSocket at `/ws` speaking JSON messages `{"type": "reset"|"step"|"state"|"close", "data": {...}}`, answered
by `{"type": "observation"|"state"|"error", "data": {...}}` where an observation's data is
`{"observation": ..., "reward": ..., "done": ...}`. The plain HTTP `reset`/`step` build a fresh environment
per request, so episodes run over one WebSocket session per `RemoteEnvironment`; HTTP serves the stateless
calls (health, schema, state).

Every call has a timeout; connecting, the stateless calls and a reset refused because the server is at its
session limit (OpenEnv's `CAPACITY_REACHED`) are retried with backoff; a step is never retried (it is not
idempotent): a dropped connection mid-episode raises `RemoteEnvironmentError`, which the protocol records as a
failed episode (`StopReason.ENV_ERROR`). Server errors (`{message, code, errors}`) are reported readably.
An OpenEnv action is the environment's own pydantic model, so the field that carries the generated text is
read from `/schema` unless `action_field` is given. Tested against `openenv-core` 0.3's own server
(tests/opentinker/env/test_remote_openenv.py). An optional secret travels as `Authorization: Bearer`.
Uses aiohttp (client and WebSocket); each instance owns a private event loop, so callers stay synchronous.

With an `egress` (`opentinker.egress.Egress`; the runtime always gives one) every connection is checked
against the egress policy: the URL before the first request, each redirect's target before it is followed,
and every connection connects only to the addresses that were checked (`_PinnedConnector`: no second DNS
resolution; the Host header and TLS SNI keep the URL's name).

With a `gate` (`SessionGate`, shared by all the instances of one job) episodes queue for the server's
session slots instead of failing: a reset waits for a free slot, and a server at capacity teaches the gate
its limit (OpenEnv's CAPACITY_REACHED error carries `max_sessions`; else "n/m sessions" in its message).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import socket
import threading
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from contextvars import ContextVar
from typing import Any

import aiohttp
from yarl import URL

from opentinker.egress import Egress, EgressRefused
from opentinker.env.base import Environment, Observation, StepResult

TEXT_KEYS = ("text", "prompt", "message", "echoed_message", "content")


class RemoteEnvironmentError(RuntimeError):
    """The remote environment failed: unreachable, timed out, refused, or answered with an error."""


# Set by a caller that batches episodes (gpu_runtime's collector): a context manager entered while an
# episode's thread waits for a session slot, so the batcher does not wait for that episode meanwhile.
WAITING: ContextVar[Callable[[], AbstractContextManager[Any]] | None] = ContextVar(
    "opentinker_remote_waiting", default=None
)
CAPACITY_RE = re.compile(r"(\d+)\s*/\s*(\d+)\s*sessions")


class SessionGate:
    """The session slots of one remote server, shared by a job's episodes: at most `limit` sessions at once
    (None: not known yet, no limit). The limit is learned from the server's capacity errors."""

    def __init__(self, limit: int | None = None) -> None:
        self.limit = limit if limit is None else max(1, int(limit))
        self.active = 0
        self.cv = threading.Condition()

    def acquire(self, deadline: float) -> bool:
        """Wait (until `deadline`, time.monotonic()) for a free slot and take it; False if none came."""
        with self.cv:
            if self.limit is None or self.active < self.limit:
                self.active += 1
                return True
        hook = WAITING.get()
        with hook() if hook is not None else nullcontext(), self.cv:
            while self.limit is not None and self.active >= self.limit:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self.cv.wait(left)
            self.active += 1
            return True

    def release(self) -> None:
        with self.cv:
            self.active = max(0, self.active - 1)
            self.cv.notify_all()

    def learn(self, max_sessions: int | None) -> None:
        """The server said it is full: its limit is `max_sessions`, or (unknown) fewer than our sessions."""
        with self.cv:
            if max_sessions is not None and max_sessions > 0:
                self.limit = max_sessions if self.limit is None else min(self.limit, max_sessions)
            else:
                self.limit = max(1, self.active - 1)

    def pause(self, seconds: float) -> None:
        """Wait up to `seconds` for a slot to be released (the server is full with sessions not ours)."""
        hook = WAITING.get()
        with hook() if hook is not None else nullcontext(), self.cv:
            self.cv.wait(seconds)


class _PinnedConnector(aiohttp.TCPConnector):
    """Connects only to the addresses the egress policy checked for a host (literal IPs included), never
    resolving again; the request keeps the URL's host name for the Host header and TLS SNI."""

    def __init__(self, egress: Egress, **kwargs: Any) -> None:
        super().__init__(use_dns_cache=False, **kwargs)
        self._egress = egress

    async def _resolve_host(self, host: str, port: int, traces: Any = None) -> list[Any]:
        loop = asyncio.get_running_loop()
        try:
            addresses = await loop.run_in_executor(None, self._egress.pinned, host, port)
        except EgressRefused as e:
            raise RemoteEnvironmentError(f"egress policy: {e}") from None
        return [
            {
                "hostname": host,
                "host": a,
                "port": port,
                "family": socket.AF_INET6 if ":" in a else socket.AF_INET,
                "proto": 0,
                "flags": socket.AI_NUMERICHOST | socket.AI_NUMERICSERV,
            }
            for a in addresses
        ]


def _error_text(data: Any) -> str:
    """OpenEnv's error data `{message, code, errors: [pydantic errors]}` as one readable line."""
    if not isinstance(data, dict):
        return str(data)[:500]
    text = str(data.get("message") or "error")
    if data.get("code"):
        text += f" ({data['code']})"
    details = [
        f"{'.'.join(map(str, e.get('loc') or [])) or 'action'}: {e.get('msg')}"
        for e in data.get("errors") or []
        if isinstance(e, dict)
    ]
    return (text + (": " + "; ".join(details) if details else ""))[:500]


def _max_sessions(data: dict[str, Any]) -> int | None:
    """The session limit a capacity error states: OpenEnv's `max_sessions`, else "n/m sessions"."""
    value = data.get("max_sessions")
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    m = CAPACITY_RE.search(str(data.get("message") or ""))
    return int(m.group(2)) if m and int(m.group(2)) > 0 else None


def _ws_url(url: str) -> str:
    base = url.rstrip("/")
    if base.startswith("https://"):
        return "wss://" + base[len("https://") :] + "/ws"
    if base.startswith("http://"):
        return "ws://" + base[len("http://") :] + "/ws"
    raise ValueError(f"a remote environment URL must start with http:// or https:// (got {url!r})")


class RemoteEnvironment(Environment):
    """A single-agent `Environment` whose `reset`/`step` run on an OpenEnv-compatible server."""

    def __init__(
        self,
        url: str,
        *,
        secret: str | None = None,
        timeout_s: float = 10.0,
        retries: int = 2,
        backoff_s: float = 0.2,
        action_field: str | None = None,
        text_field: str | None = None,
        egress: Egress | None = None,
        gate: SessionGate | None = None,
        queue_timeout_s: float = 600.0,
        **config: Any,
    ) -> None:
        super().__init__(**config)
        self.url = url.rstrip("/")
        self.ws_url = _ws_url(url)
        self.egress = egress
        self.gate = gate
        self.queue_timeout_s = queue_timeout_s
        self._holding = False  # a slot of `gate`
        self.timeout_s = timeout_s
        self.retries = max(retries, 0)
        self.backoff_s = backoff_s
        self.action_field = action_field  # None: read from the server's action schema at the first step
        self.text_field = text_field
        self._headers = {"Authorization": f"Bearer {secret}"} if secret else {}
        self._loop = asyncio.new_event_loop()
        self._session: aiohttp.ClientSession | None = None
        self._ws: aiohttp.ClientWebSocketResponse | None = None

    # -- the stateless HTTP calls ------------------------------------------------------------------------

    def health(self) -> dict[str, Any]:
        return self._run(self._get("/health"))

    def schema(self) -> dict[str, Any]:
        return self._run(self._get("/schema"))

    def state(self) -> dict[str, Any]:
        """The episode's state: over the session's WebSocket when one is open, else over HTTP."""
        if self._ws is not None and not self._ws.closed:
            return self._run(self._message({"type": "state"}, expect="state"))
        return self._run(self._get("/state"))

    # -- the episode, over one WebSocket session ---------------------------------------------------------

    def reset(self, seed: int) -> Observation:
        if self.egress is not None:
            self._check(self.url)
        if self.gate is None:
            return self._observation(self._run(self._reset(seed)))
        # Queue for one of the server's session slots; a server still full (its limit was not known yet,
        # or sessions that are not ours) teaches the gate and the episode waits again, up to queue_timeout_s.
        deadline = time.monotonic() + self.queue_timeout_s
        pause = self.backoff_s
        while True:
            if not self._holding:
                if not self.gate.acquire(deadline):
                    raise RemoteEnvironmentError(
                        f"no session slot on {self.url} within {self.queue_timeout_s:.0f}s "
                        f"(the server allows {self.gate.limit} at once)"
                    )
                self._holding = True
            try:
                return self._observation(self._run(self._reset(seed, queued=True)))
            except RemoteEnvironmentError as e:
                self._run(self._close_ws())
                self._release()
                if getattr(e, "code", None) != "CAPACITY_REACHED" or time.monotonic() >= deadline:
                    raise
                self.gate.learn(getattr(e, "max_sessions", None))
                self.gate.pause(min(pause, max(deadline - time.monotonic(), 0)))
                pause = min(pause * 2, 5.0)

    def _release(self) -> None:
        if self._holding and self.gate is not None:
            self._holding = False
            self.gate.release()

    def _check(self, url: str) -> None:
        assert self.egress is not None
        try:
            self.egress.check(url)
        except EgressRefused as e:
            raise RemoteEnvironmentError(f"egress policy refused {url}: {e}") from None

    def step(self, action: str) -> StepResult:
        if self._ws is None or self._ws.closed:
            raise RemoteEnvironmentError("step before reset (or the session was closed)")
        field = self.action_field or self._action_field_from_schema()
        data = self._run(self._message({"type": "step", "data": {field: action}}))
        done = bool(data.get("done", False))
        return StepResult(
            None if done else self._observation(data),
            float(data.get("reward") or 0.0),
            done,
            {"remote": data.get("observation")},
        )

    def close(self) -> None:
        if self._loop.is_closed():
            return
        try:
            self._run(self._close())
        finally:
            self._release()
            self._loop.close()

    def __enter__(self) -> RemoteEnvironment:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _action_field_from_schema(self) -> str:
        """The action field that takes the generated text. OpenEnv actions are each environment's own
        pydantic model (`message`, `command`, `guess`, ...), so it is read from `/schema`: the one required
        field (OpenEnv's own `metadata` aside), else `message`, else the only field."""
        action = self.schema().get("action") or {}
        props = [p for p in action.get("properties") or {} if p != "metadata"]
        required = [r for r in action.get("required") or [] if r != "metadata"]
        if len(required) == 1:
            self.action_field = required[0]
        elif "message" in props or not props:
            self.action_field = "message"
        elif len(props) == 1:
            self.action_field = props[0]
        else:
            raise RemoteEnvironmentError(
                f"cannot tell which action field of {self.url} takes the text (fields: {', '.join(props)}); "
                "set action_field"
            )
        return self.action_field

    # -- plumbing ----------------------------------------------------------------------------------------

    def _run(self, coro):
        try:
            return self._loop.run_until_complete(asyncio.wait_for(coro, self.timeout_s * (self.retries + 2)))
        except TimeoutError:
            raise RemoteEnvironmentError(f"{self.url} timed out") from None

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            extra: dict[str, Any] = {}
            if self.egress is not None:
                trace = aiohttp.TraceConfig()
                trace.on_request_redirect.append(self._check_redirect)
                extra = {"connector": _PinnedConnector(self.egress), "trace_configs": [trace]}
            self._session = aiohttp.ClientSession(
                headers=self._headers, timeout=aiohttp.ClientTimeout(total=self.timeout_s), **extra
            )
        return self._session

    async def _check_redirect(self, session: Any, ctx: Any, params: Any) -> None:
        """Each redirect's target passes the egress policy before it is followed (scheme, host, port)."""
        location = params.response.headers.get("Location") or ""
        target = str(params.response.url.join(URL(location)))
        try:
            await asyncio.get_running_loop().run_in_executor(None, self.egress.check, target)
        except EgressRefused as e:
            err = RemoteEnvironmentError(f"egress policy refused the redirect to {target}: {e}")
            raise err from None

    async def _retrying(self, what: str, attempt_fn):
        last: Exception | None = None
        for attempt in range(self.retries + 1):
            try:
                return await attempt_fn()
            except RemoteEnvironmentError as e:
                if not getattr(e, "retryable", False):
                    raise
                last = e
            except (aiohttp.ClientError, TimeoutError, OSError) as e:
                last = e
            if attempt < self.retries:
                await asyncio.sleep(self.backoff_s * 2**attempt)
        detail = str(last) or type(last).__name__
        raise RemoteEnvironmentError(f"{what} {self.url} failed after {self.retries + 1} attempts: {detail}")

    async def _get(self, path: str) -> dict[str, Any]:
        async def once():
            async with self._http().get(self.url + path) as resp:
                if resp.status in (502, 503, 504):
                    err = RemoteEnvironmentError(f"HTTP {resp.status}")
                    err.retryable = True  # type: ignore[attr-defined]
                    raise err
                if resp.status >= 400:
                    raise RemoteEnvironmentError(f"GET {path} answered HTTP {resp.status}")
                return await resp.json(content_type=None)

        if self.egress is not None:
            await asyncio.get_running_loop().run_in_executor(None, self._check, self.url + path)
        return await self._retrying(f"GET {path} on", once)

    async def _connect(self) -> None:
        await self._close_ws()

        async def once():
            try:
                self._ws = await self._http().ws_connect(
                    self.ws_url, timeout=aiohttp.ClientWSTimeout(ws_close=self.timeout_s), heartbeat=None
                )
            except aiohttp.WSServerHandshakeError as e:
                if e.status in (401, 403, 404):
                    raise RemoteEnvironmentError(
                        f"{self.ws_url} refused the session: HTTP {e.status}"
                    ) from None
                raise

        await self._retrying("connecting to", once)

    async def _reset(self, seed: int, queued: bool = False) -> dict[str, Any]:
        # A reset starts a new session: safe to retry (reconnecting) if the first attempt fails, and when an
        # OpenEnv server is at its session limit (CAPACITY_REACHED: another episode will end soon). Queued
        # (a gate): a capacity error goes straight back to the gate, which waits for a slot.
        last: Exception | None = None
        for attempt in range(self.retries + 1):
            await self._connect()
            try:
                return await self._message({"type": "reset", "data": {"seed": seed}})
            except RemoteEnvironmentError as e:
                busy = getattr(e, "code", None) == "CAPACITY_REACHED"
                if busy and queued:
                    raise
                if not busy and self._ws is not None and not self._ws.closed:
                    raise  # the server answered with an error: not a transport problem
                last = e
                await self._close_ws()
            if attempt < self.retries:
                await asyncio.sleep(self.backoff_s * 2**attempt)
        raise RemoteEnvironmentError(f"reset on {self.url} failed after {self.retries + 1} attempts: {last}")

    async def _message(self, payload: dict[str, Any], expect: str = "observation") -> dict[str, Any]:
        ws = self._ws
        assert ws is not None
        started = time.monotonic()
        try:
            await ws.send_str(json.dumps(payload))
            msg = await asyncio.wait_for(ws.receive(), self.timeout_s)
        except TimeoutError:
            await self._close_ws()
            raise RemoteEnvironmentError(
                f"{payload['type']} timed out after {time.monotonic() - started:.1f}s"
            ) from None
        except (aiohttp.ClientError, ConnectionError) as e:
            await self._close_ws()
            raise RemoteEnvironmentError(f"{payload['type']}: connection lost ({e})") from None
        if msg.type != aiohttp.WSMsgType.TEXT:
            await self._close_ws()
            raise RemoteEnvironmentError(f"{payload['type']}: connection closed by the server")
        try:
            reply = json.loads(msg.data)
        except ValueError:
            raise RemoteEnvironmentError(f"{payload['type']}: the server sent invalid JSON") from None
        if reply.get("type") == "error":
            err = RemoteEnvironmentError(
                f"{payload['type']} failed on the server: {_error_text(reply.get('data'))}"
            )
            data = reply.get("data") if isinstance(reply.get("data"), dict) else {}
            err.code = data.get("code")  # type: ignore[attr-defined]
            err.max_sessions = _max_sessions(data)  # type: ignore[attr-defined]
            raise err
        if reply.get("type") != expect or not isinstance(reply.get("data"), dict):
            raise RemoteEnvironmentError(f"{payload['type']}: unexpected reply {str(reply)[:200]}")
        return reply["data"]

    def _observation(self, data: dict[str, Any]) -> Observation:
        obs = data.get("observation")
        if isinstance(obs, str):
            return Observation(obs)
        if isinstance(obs, dict):
            keys = (self.text_field,) if self.text_field else TEXT_KEYS
            for key in keys:
                if isinstance(obs.get(key), str):
                    return Observation(obs[key], info={"remote": obs})
            return Observation(json.dumps(obs, sort_keys=True), info={"remote": obs})
        raise RemoteEnvironmentError(f"the server sent no observation: {str(data)[:200]}")

    async def _close_ws(self) -> None:
        ws, self._ws = self._ws, None
        if ws is not None and not ws.closed:
            with contextlib.suppress(TimeoutError, aiohttp.ClientError, ConnectionError, RuntimeError):
                await asyncio.wait_for(ws.send_str(json.dumps({"type": "close"})), 1.0)
            await ws.close()

    async def _close(self) -> None:
        await self._close_ws()
        if self._session is not None:
            await self._session.close()
            self._session = None
