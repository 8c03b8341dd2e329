"""One model server per base model (gpu_runtime/model_server/serve.py `Lease`) on the real Valkey the tests
start: a second server is refused while the first holds the lease, touching nothing of the first's (its
claimed calls stay claimed); once the lease lapses the second takes over and the first, on its next renewal,
finds it lost and stops. The lease's expiry is played by deleting the key (no waiting on a TTL)."""

from __future__ import annotations

import json
import socket
import threading
import uuid

import pytest
import redis
from django.conf import settings

from gpu_runtime.model_server.serve import (
    LOST_IN_FLIGHT,
    Lease,
    LeaseHeld,
    LeaseKeeper,
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
    why = serve(
        ServeLoop(ModelServer("tiny-qwen2")),
        transport,  # type: ignore[arg-type]
        should_stop=lambda: False,
        lease_lost=lambda: transport.waits >= 6,  # the keeper's thread finds it lost during the sixth wait
    )
    assert (why, transport.waits) == ("lease lost", 6)  # no seventh wait: it takes no more work


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_the_keeper_renews_on_its_own_thread_and_stops_cleanly(valkey):
    client, base = valkey
    lease = Lease(client, base, "me", ttl_s=30)
    lease.acquire()
    renewed = threading.Event()
    real_renew = lease.renew

    def renew() -> bool:
        held = real_renew()
        renewed.set()
        return held

    lease.renew = renew  # type: ignore[method-assign]
    client.pexpire(lease_key(base), 5_000)  # nearly lapsed: only a renewal gives it its 30 s back
    keeper = LeaseKeeper(lease, every_s=0.01).start()
    assert renewed.wait(60)  # renewed while the main thread does nothing (a long engine pass)
    keeper.stop()
    assert keeper.renewals >= 1 and not keeper.lost.is_set()
    assert 5_000 < client.pttl(lease_key(base)) <= 30_000
    assert not keeper._thread.is_alive()  # stop() joined it
    count = keeper.renewals
    client.pexpire(lease_key(base), 5_000)
    assert keeper.renewals == count and client.pttl(lease_key(base)) <= 5_000  # no renewal after stop


def test_the_keeper_finds_its_lease_taken_over(valkey):
    client, base = valkey
    lease = Lease(client, base, "first", ttl_s=30)
    lease.acquire()
    client.set(lease_key(base), "second")  # it lapsed during a stall and another server took it
    keeper = LeaseKeeper(lease, every_s=0.01).start()
    assert keeper.lost.wait(60)
    keeper.stop()
    assert keeper.why == "the lease was lost: another model server took over the base model"
    assert client.get(lease_key(base)) == b"second"  # untouched


def test_the_keeper_gives_the_lease_up_once_valkey_has_been_away_for_a_ttl(valkey):
    _client, base = valkey
    with socket.socket() as s:  # a loopback port nothing listens on: every renewal fails to connect
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    away = redis.Redis(host="127.0.0.1", port=port, socket_connect_timeout=1)
    clock = Clock()
    keeper = LeaseKeeper(Lease(away, base, "me", ttl_s=30), every_s=0.01, clock=clock)
    failures = threading.Event()
    real_run_renew = keeper.lease.renew

    def renew() -> bool:
        try:
            return real_run_renew()
        finally:
            failures.set()

    keeper.lease.renew = renew  # type: ignore[method-assign]
    keeper.start()
    assert failures.wait(60)  # it failed at least once, and still holds on: less than a TTL has passed
    assert not keeper.lost.is_set()
    clock.now = 30.0  # a whole TTL without a renewal: the lease has lapsed in Valkey by now
    assert keeper.lost.wait(60)
    keeper.stop()
    assert keeper.why.startswith("could not renew the lease for 30 s (Valkey: ")
    assert keeper.why.endswith("ConnectionError): it has lapsed")


def test_a_waiting_start_takes_the_lease_once_the_dead_holders_lapses(valkey):
    client, base = valkey
    client.set(lease_key(base), "dead", px=30_000)
    clock = Clock()
    naps: list[float] = []

    def sleep(s: float) -> None:
        naps.append(s)
        clock.now += s
        if len(naps) == 3:
            client.delete(lease_key(base))  # the TTL runs out

    Lease(client, base, "next", ttl_s=30).acquire(45, clock=clock, sleep=sleep)
    assert client.get(lease_key(base)) == b"next" and naps == [1.0, 1.0, 1.0]
    client.set(lease_key(base), "dead", px=30_000)
    with pytest.raises(LeaseHeld):  # waited 45 s (in fake time) and it is still held: refused
        Lease(client, base, "next", ttl_s=30).acquire(45, clock=clock, sleep=sleep)


def test_a_lease_needs_a_positive_ttl(valkey):
    client, base = valkey
    with pytest.raises(ValueError, match="TTL must be positive, not 0"):
        Lease(client, base, "x", ttl_s=0)


def test_a_server_whose_token_expires_soon_stops_taking_work(valkey, monkeypatch, capsys):
    """Past its model-server token's expiry the ingest refuses every outcome: a busy server (never idle)
    would take calls and drop all their answers. It stops TOKEN_MARGIN_S before the expiry instead, parking
    its clients and releasing the lease, and the next call starts a fresh server with a fresh token."""
    import argparse

    from gpu_runtime.model_server.serve import TOKEN_MARGIN_S, main, token_expiring
    from portal.services.model_server_tokens import model_server_token_issue

    client, base = valkey
    clock = Clock()
    token = model_server_token_issue("tiny-qwen2", ttl=7 * 24 * 3600)
    expiry = int(token.rsplit(".", 2)[1])
    expiring = token_expiring(token, clock=clock)
    clock.now = expiry - TOKEN_MARGIN_S - 1
    assert not expiring()
    clock.now += 1
    assert expiring()
    assert not token_expiring("a-token-of-another-form", clock=clock)()

    # The server itself, with a token that expires within the margin: it stops at once (not after 60 s idle).
    monkeypatch.setenv("OPENTINKER_MODEL_SERVER_TOKEN", model_server_token_issue(base, ttl=60))
    args = argparse.Namespace(
        base_model=base,
        queue_url=settings.REDIS_URL,
        ingest_url="http://127.0.0.1:9/never-posted",
        device="cpu",
        dtype="float32",
        seed=0,
        spill_uri="",
        idle_exit_s=60.0,
        lease_ttl_s=30.0,
    )
    monkeypatch.setattr("gpu_runtime.model_server.serve.ModelServer", lambda *a, **k: _NoModel())
    assert main(args) == 0
    assert "its model-server token expires within 3600 s" in capsys.readouterr().out
    assert not client.exists(lease_key(base))  # released for the next server


class _NoModel:
    """What `serve` asks of a model server that never gets a call."""

    def pending(self) -> bool:
        return False

    def park(self) -> list[str]:
        return []
