"""One model server per base model (gpu_runtime/model_server/serve.py `Lease`) on the real Valkey the tests
start: a second server is refused while the first holds the lease, touching nothing of the first's (its
claimed calls stay claimed); once the lease lapses the second takes over and the first, on its next renewal,
finds it lost and stops. The lease's expiry is played by deleting the key (no waiting on a TTL)."""

from __future__ import annotations

import json
import uuid

import pytest
import redis
from django.conf import settings

from gpu_runtime.model_server.serve import (
    LOST_IN_FLIGHT,
    Lease,
    LeaseHeld,
    Transport,
    claimed_key,
    lease_key,
    ops_key,
    serve,
    take_base,
)


@pytest.fixture
def valkey():
    client = redis.Redis.from_url(settings.REDIS_URL)
    base = f"test-lease-{uuid.uuid4().hex[:8]}"
    yield client, base
    client.delete(ops_key(base), claimed_key(base), lease_key(base))


def test_a_second_server_is_refused_until_the_first_ones_lease_lapses(valkey):
    client, base = valkey
    first_posts: list[list[dict]] = []
    first = Transport(client, base, first_posts.append)
    first_lease = Lease(client, base, "first", ttl_s=30)
    take_base(first_lease, first)
    assert client.get(lease_key(base)) == b"first" and 0 < client.pttl(lease_key(base)) <= 30_000
    op = {"op": "optim_step", "future": "f1", "model_id": "m", "seq_id": 1}
    client.rpush(ops_key(base), json.dumps(op))
    assert first.drain() == [op]  # the first server runs f1

    second_posts: list[list[dict]] = []
    second = Transport(client, base, second_posts.append)
    second_lease = Lease(client, base, "second", ttl_s=30)
    with pytest.raises(
        LeaseHeld, match=r"another model server \(first\) serves 'test-lease-.*': one per base"
    ):
        take_base(second_lease, second)
    # Refused before recover(): the first server's call is neither failed nor unclaimed.
    assert second_posts == [] and client.llen(claimed_key(base)) == 1
    assert first_lease.renew() and not second_lease.renew()  # renewing is the holder's only
    second_lease.release()  # not the holder: releases nothing
    assert client.get(lease_key(base)) == b"first"

    client.delete(lease_key(base))  # the first server stalled past its TTL: its lease lapsed
    take_base(second_lease, second)
    assert second_posts == [[{"future": "f1", "error": LOST_IN_FLIGHT, "category": "server"}]]
    assert client.get(lease_key(base)) == b"second"
    assert not first_lease.renew()  # the first finds out at its next renewal...
    first_lease.release()  # ...and its release leaves the second's lease alone
    assert client.get(lease_key(base)) == b"second"
    second_lease.release()
    assert client.get(lease_key(base)) is None


class IdleTransport:
    def __init__(self) -> None:
        self.waits = 0

    def drain(self) -> list[dict]:
        return []

    def wait(self, timeout: float) -> list[dict]:
        self.waits += 1
        assert self.waits < 100, "serve() never stopped"
        return []

    def post(self, outcomes: list[dict]) -> None:
        pass


def test_serve_stops_once_its_lease_is_lost():
    from gpu_runtime.model_server import ModelServer
    from gpu_runtime.model_server.serve import ServeLoop

    transport = IdleTransport()
    renewals = iter([True, True, False])
    serve(
        ServeLoop(ModelServer("tiny-qwen2")),
        transport,  # type: ignore[arg-type]
        should_stop=lambda: False,
        clock=lambda: float(transport.waits),  # one wait = one second
        renew=lambda: next(renewals),
        renew_every_s=2,
    )
    assert transport.waits == 6  # renewed at 2 and 4, lost at 6


def test_a_lease_needs_a_positive_ttl(valkey):
    client, base = valkey
    with pytest.raises(ValueError, match="TTL must be positive, not 0"):
        Lease(client, base, "x", ttl_s=0)
