"""The per-user API rate limit (api/throttling.py): exact counts in a sliding window, per user, in Valkey.

The rate is 3/min here; the throttle's clock is moved, never waited for. Every test starts at a random
window of its own, so counters left in the session's Valkey by another test never meet it.
"""

from __future__ import annotations

import random

import pytest
import redis

from api import throttling

pytestmark = pytest.mark.django_db

PATH = "/api/v1/jobs?limit=1"


@pytest.fixture
def clock(settings, monkeypatch):
    settings.REST_FRAMEWORK = {**settings.REST_FRAMEWORK, "DEFAULT_THROTTLE_RATES": {"user": "3/min"}}
    now = [60.0 * random.randrange(10**6, 10**7)]  # the start of a window
    monkeypatch.setattr(throttling.UserRateThrottle, "timer", staticmethod(lambda: now[0]))
    return now


def test_each_user_gets_the_rate_then_a_429_with_retry_after(as_alice, as_bob, as_charlie, clock):
    assert [as_alice.get(PATH).status_code for _ in range(3)] == [200, 200, 200]
    refused = as_alice.get(PATH)
    assert refused.status_code == 429
    assert refused.json()["error"]["code"] == "throttled"
    # At the window's end its 3 requests weigh 3 * (60 - t) / 60; one more fits once that is 2: 20 s later.
    assert refused["Retry-After"] == "80"
    # A teammate and another organization's user have limits of their own.
    assert [as_bob.get(PATH).status_code for _ in range(3)] == [200, 200, 200]
    assert [as_charlie.get(PATH).status_code for _ in range(3)] == [200, 200, 200]
    assert as_bob.get(PATH).status_code == 429


def test_the_window_slides_and_refused_requests_do_not_count(as_alice, clock):
    start = clock[0]
    assert [as_alice.get(PATH).status_code for _ in range(3)] == [200, 200, 200]
    for t in (1, 30, 59, 60, 79):  # retrying while limited does not push the limit further away
        clock[0] = start + t
        assert as_alice.get(PATH).status_code == 429, t
    clock[0] = start + 80
    assert as_alice.get(PATH).status_code == 200
    assert as_alice.get(PATH).status_code == 429  # 3 * 40/60 + 2 > 3
    clock[0] = start + 180  # both windows over
    assert [as_alice.get(PATH).status_code for _ in range(3)] == [200, 200, 200]


def test_without_valkey_requests_go_through(as_alice, clock, monkeypatch):
    import socket

    with socket.socket() as s:  # a loopback port that nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    down = redis.Redis(port=port, socket_connect_timeout=1)
    monkeypatch.setattr(throttling, "_client", down)
    monkeypatch.setattr(throttling, "_script", down.register_script(throttling._COUNT))
    assert [as_alice.get(PATH).status_code for _ in range(5)] == [200] * 5
