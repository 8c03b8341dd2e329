"""The per-user API rate limit (`API_RATE_LIMIT`): one Valkey round trip per request.

DRF's UserRateThrottle keeps each user's request times as a pickled list in the cache and reads and writes it
on every request: two round trips and a list of up to the whole limit's floats, a fifth of a detail request's
CPU in the production server. This counts instead, in two fixed windows of the rate's period, and weighs the
previous window by the part of it still inside the sliding period (the usual sliding-window estimate):

    estimate = previous * (period - elapsed) / period + current

One Lua call increments the current window's counter and reads the previous one; a refused request is taken
back (a second call, only then), so a client that keeps retrying while limited is limited no longer than one
that waits. The identity is DRF's (the user's id, else the client address), the answer is DRF's (429 with
`Retry-After`). Time comes from `timer` (tests move it). When Valkey cannot be reached the request goes
through and the error is logged, as for the sign-in guard (portal/services/throttle.py).
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable

import redis
from rest_framework import throttling
from rest_framework.settings import api_settings

from portal.services import throttle

logger = logging.getLogger(__name__)

PREFIX = "otk:api-rate:"
# KEYS: the current window's counter, the previous one's. ARGV: the counter's lifetime (two periods).
_COUNT = """
local current = redis.call('INCR', KEYS[1])
if current == 1 then redis.call('EXPIRE', KEYS[1], ARGV[1]) end
return {current, tonumber(redis.call('GET', KEYS[2]) or '0')}
"""

_client: redis.Redis | None = None
_script = None
_lock = threading.Lock()


def _count():
    global _client, _script
    if _script is None:
        with _lock:
            if _script is None:
                _client = throttle.redis_client()
                _script = _client.register_script(_COUNT)
    return _client, _script


class UserRateThrottle(throttling.UserRateThrottle):
    timer: Callable[[], float] = staticmethod(time.time)

    def get_rate(self):
        # Read on each use (not once at import as DRF's THROTTLE_RATES is), so a changed setting applies.
        return api_settings.DEFAULT_THROTTLE_RATES.get(self.scope)

    def allow_request(self, request, view):
        if self.rate is None:
            return True
        ident = self.get_cache_key(request, view)
        if ident is None:
            return True
        period = self.duration
        now = self.timer()
        window = int(now // period)
        elapsed = now - window * period
        current_key = f"{PREFIX}{ident}:{window}"
        try:
            client, script = _count()
            current, previous = script(keys=[current_key, f"{PREFIX}{ident}:{window - 1}"], args=[2 * period])
        except redis.RedisError:
            logger.exception("the API rate limit could not reach Valkey; the request goes through")
            return True
        weight = (period - elapsed) / period
        if previous * weight + current <= self.num_requests:
            return True
        try:
            client.decr(current_key)  # a refused request does not count
        except redis.RedisError:
            logger.exception("the API rate limit could not reach Valkey")
        self._wait = self._retry_after(current - 1, previous, elapsed, period)
        return False

    def _retry_after(self, current: int, previous: int, elapsed: float, period: float) -> float:
        """Seconds until one more request fits, if no other is made meanwhile."""
        room = self.num_requests - 1 - current  # what the previous window's weighted share must drop to
        if room >= 0 and previous:
            # previous * (period - elapsed - t) / period <= room
            return max(0.0, (period - elapsed) - room * period / previous)
        # The current window alone is full: at its end it becomes the previous one, then weighs less and less.
        until_end = period - elapsed
        if not current:
            return until_end
        return until_end + max(0.0, period - (self.num_requests - 1) * period / current)

    def wait(self):
        return math.ceil(getattr(self, "_wait", 1.0)) or 1
