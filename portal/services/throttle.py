"""Sign-in lock-out and sign-up throttling, counted in Valkey (shared by every web worker).

- Sign-in: at most ``SIGNIN_MAX_FAILURES`` failed passwords for one username from one address within
  ``SIGNIN_LOCKOUT_SECONDS``; then that username is locked for that address until the oldest of those
  failures is that old, and even the right password is refused meanwhile. Every attempt is counted *before*
  the password is checked and uncounted if it was right, so parallel guesses cannot overshoot the limit. A
  right password clears the username's failures from that address. Another address, or another username,
  is not affected (an address that fails ``SIGNIN_MAX_FAILURES_PER_IP`` times over any usernames is locked
  for all of them).
- Sign-up: at most ``SIGNUP_MAX_PER_IP`` attempts from one address within ``SIGNUP_WINDOW_SECONDS``.

Windows slide (a sorted set of attempt times per key). Time comes from ``clock`` (tests replace it), never
from Valkey, so a test moves time without sleeping. If Valkey cannot be reached the guard lets requests
through and logs it: a cache outage must not lock every user out.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

import redis
from django.conf import settings
from redis.backoff import NoBackoff
from redis.retry import Retry

from portal.errors import DomainError

logger = logging.getLogger(__name__)

clock: Callable[[], float] = time.time  # injectable: tests move time forward instead of sleeping
PREFIX = "otk:throttle:"

_client: redis.Redis | None = None
_client_lock = threading.Lock()


class Throttled(DomainError):
    status = 429
    code = "throttled"

    def __init__(self, message: str, *, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = max(1, int(retry_after + 0.999))


def redis_client() -> redis.Redis:
    """The process's Valkey client for rate limits (this guard's and the API's, api/throttling.py)."""
    global _client
    if _client is None:
        with _client_lock:
            if _client is None:
                # No retries: when Valkey is down a sign-in waits at most a connect timeout, then goes on.
                _client = redis.Redis.from_url(
                    settings.REDIS_URL,
                    socket_timeout=2,
                    socket_connect_timeout=2,
                    retry=Retry(NoBackoff(), 0),
                )
    return _client


def _key(kind: str, *parts: str) -> str:
    # Hashed: usernames are user input (any length, any characters), and keys need not reveal them.
    digest = hashlib.sha256("\x00".join(parts).encode()).hexdigest()[:40]
    return f"{PREFIX}{kind}:{digest}"


def _wait(times: list[float], limit: int, window: float, now: float) -> float:
    """Seconds until fewer than `limit` of these attempt times lie within the window (0: not over)."""
    if len(times) < limit:
        return 0.0
    return max(0.0, sorted(times)[len(times) - limit] + window - now)


@dataclass
class _Attempt:
    keys: list[str]
    member: str


def _take(keys: list[tuple[str, int]], window: float) -> tuple[_Attempt, float]:
    """Count one attempt under every key; the wait if any key is now over its limit (then the attempt is
    taken back, so refused attempts never lengthen a lock)."""
    now = clock()
    member = f"{now:.6f}:{uuid.uuid4().hex[:8]}"
    pipe = redis_client().pipeline(transaction=True)
    for key, _ in keys:
        pipe.zremrangebyscore(key, "-inf", now - window)
        pipe.zadd(key, {member: now})
        pipe.zrange(key, 0, -1, withscores=True)
        pipe.expire(key, int(window) + 60)
    results = pipe.execute()
    wait = 0.0
    for i, (_, limit) in enumerate(keys):
        times = [score for _, score in results[i * 4 + 2]]
        # Over the limit once this attempt is one more than allowed.
        wait = max(wait, _wait(times, limit + 1, window, now))
    attempt = _Attempt([k for k, _ in keys], member)
    if wait > 0:
        _forget(attempt)
    return attempt, wait


def _forget(attempt: _Attempt) -> None:
    pipe = redis_client().pipeline(transaction=True)
    for key in attempt.keys:
        pipe.zrem(key, attempt.member)
    pipe.execute()


def _minutes(seconds: float) -> str:
    minutes = max(1, int(seconds / 60 + 0.999))
    return "a minute" if minutes == 1 else f"{minutes} minutes"


# --- sign-in ------------------------------------------------------------------------------------------------


def signin_begin(username: str, ip: str | None) -> _Attempt | None:
    """Count an attempt before its password is checked; raises Throttled while the username is locked for
    this address. Returns the attempt to end with ``signin_end`` (None: Valkey unreachable, not counted)."""
    window = float(settings.SIGNIN_LOCKOUT_SECONDS)
    address = ip or "unknown"
    keys = [
        (_key("signin", username.strip().lower(), address), settings.SIGNIN_MAX_FAILURES),
        (_key("signin-ip", address), settings.SIGNIN_MAX_FAILURES_PER_IP),
    ]
    try:
        attempt, wait = _take(keys, window)
    except redis.RedisError as exc:
        logger.warning("sign-in throttle unavailable (%s): not counting this attempt", exc)
        return None
    if wait > 0:
        raise Throttled(
            f"Too many failed sign-ins. Try again in {_minutes(wait)}.",
            retry_after=wait,
        )
    return attempt


def signin_end(attempt: _Attempt | None, *, succeeded: bool) -> None:
    """A failed attempt stays counted; a right password takes it back and clears the username's failures
    from this address (the address-wide count keeps its other failures)."""
    if attempt is None or not succeeded:
        return
    try:
        _forget(attempt)
        redis_client().delete(attempt.keys[0])
    except redis.RedisError as exc:
        logger.warning("sign-in throttle unavailable (%s)", exc)


# --- sign-up ------------------------------------------------------------------------------------------------


def signup_check(ip: str | None) -> None:
    """Count a sign-up attempt from this address; raises Throttled past the limit."""
    window = float(settings.SIGNUP_WINDOW_SECONDS)
    try:
        _, wait = _take([(_key("signup", ip or "unknown"), settings.SIGNUP_MAX_PER_IP)], window)
    except redis.RedisError as exc:
        logger.warning("sign-up throttle unavailable (%s): not counting this attempt", exc)
        return
    if wait > 0:
        message = f"Too many sign-ups from your address. Try again in {_minutes(wait)}."
        raise Throttled(message, retry_after=wait)


def throttle_reset() -> None:
    """Forget every count (tests start from none; an operator may use it to lift every lock at once)."""
    client = redis_client()
    keys = list(client.scan_iter(match=f"{PREFIX}*", count=1000))
    if keys:
        client.delete(*keys)
