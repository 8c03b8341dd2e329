"""The model server's Valkey client never hangs (gpu_runtime/model_server/valkey.py): its timeouts fit the
lease TTL (a read gives up within a third of it) and its blocking pop is shorter than its socket timeout, so
an idle queue on the real Valkey the tests start is not an error. Against a Valkey that stops answering (a TCP
listener on loopback that accepts and never replies: a half-open connection), a call fails with a timeout
instead of hanging, the lease keeper declares the lease lost within about a TTL, and the serve loop, instead
of hanging in its blocking pop, stops with "lease lost"."""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import socket
import threading
import uuid
from collections.abc import Iterator

import pytest
import redis
from django.conf import settings

from gpu_runtime.model_server.engine import ModelServer
from gpu_runtime.model_server.serve import Lease, LeaseKeeper, ServeLoop, Transport, lease_key, ops_key, serve
from gpu_runtime.model_server.valkey import READ_MAX_S, ValkeyTimeouts, valkey_client

TTL_S = 1.5  # reads give up after 0.5 s, the blocking pop after 0.25 s
HANG_S = 60  # only against a hang: what the test would otherwise wait on forever


@pytest.fixture
def silent_valkey() -> Iterator[str]:
    """A loopback listener that accepts connections and never answers (nor closes them)."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            held.append(conn)

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield f"redis://127.0.0.1:{listener.getsockname()[1]}/0"
    stop.set()
    listener.close()
    for conn in held:
        conn.close()


def in_thread(fn):
    """fn() on a thread, its outcome or exception back here; a hang fails the test after HANG_S."""
    pool = concurrent.futures.ThreadPoolExecutor(1)
    try:
        return pool.submit(fn).result(timeout=HANG_S)
    finally:
        pool.shutdown(wait=False)  # a hung call's thread is left behind, not waited for


def test_the_timeouts_fit_the_lease_and_the_blocking_pop_is_shorter_than_a_read():
    for ttl in (0.3, TTL_S, 6, 60, 3600):
        t = ValkeyTimeouts.for_lease(ttl)
        assert 0 < t.blocking_s < t.read_s <= ttl / 3 and t.read_s <= READ_MAX_S
        assert 0 < t.connect_s <= t.read_s and t.health_check_s == t.read_s
    assert ValkeyTimeouts.for_lease(60) == ValkeyTimeouts(5.0, 10.0, 10.0, 1.0)  # the default lease
    assert ValkeyTimeouts.for_lease(6) == ValkeyTimeouts(2.0, 2.0, 2.0, 1.0)
    for bad in (0, -1, float("nan")):
        with pytest.raises(ValueError, match="must be positive"):
            ValkeyTimeouts.for_lease(bad)


def test_on_the_real_valkey_an_idle_blocking_pop_is_not_a_timeout():
    # A 6 s lease (pop 1 s, read 2 s), not TTL_S: the pop's margin under the read timeout must absorb a
    # loaded box's scheduling delay, or this races the socket.
    t = ValkeyTimeouts.for_lease(6)
    client = valkey_client(settings.REDIS_URL, t)
    base = f"test-timeouts-{uuid.uuid4().hex[:8]}"
    transport = Transport(client, base, lambda outcomes: None)
    assert transport.wait(t.blocking_s) == []  # Valkey answered nil before the socket gave up
    client.rpush(ops_key(base), '{"op": "optim_step", "model_id": "m"}')
    assert transport.wait(t.blocking_s) == [{"op": "optim_step", "model_id": "m"}]
    # Why the pop must be shorter: one as long as a read is cut off by the socket timeout.
    with pytest.raises(redis.TimeoutError):
        transport.wait(t.read_s * 2)
    client.delete(ops_key(base), transport.claimed)


def test_a_valkey_that_stops_answering_fails_each_call_instead_of_hanging(silent_valkey):
    t = ValkeyTimeouts.for_lease(TTL_S)
    client = valkey_client(silent_valkey, t)
    lease = Lease(client, "tiny-qwen2", "holder", ttl_s=TTL_S)
    transport = Transport(client, "tiny-qwen2", lambda outcomes: None)
    for call in (client.ping, lease.renew, transport.drain, lambda: transport.wait(t.blocking_s)):
        with pytest.raises(redis.TimeoutError):
            in_thread(call)


def test_the_lease_keeper_and_the_serve_loop_stop_on_a_silent_valkey(silent_valkey):
    t = ValkeyTimeouts.for_lease(TTL_S)
    client = valkey_client(silent_valkey, t)
    keeper = LeaseKeeper(Lease(client, "tiny-qwen2", "holder", ttl_s=TTL_S)).start()
    transport = Transport(client, "tiny-qwen2", lambda outcomes: None)
    loop = ServeLoop(ModelServer("tiny-qwen2"))
    try:
        why = in_thread(
            lambda: serve(
                loop,
                transport,
                idle_wait=t.blocking_s,
                should_stop=lambda: False,
                lease_lost=keeper.lost.is_set,
            )
        )
    finally:
        keeper.stop()
    assert why == "lease lost"
    assert keeper.lost.is_set() and keeper.why.startswith("could not renew the lease for 1.5 s"), keeper.why


class ReplyLost(Transport):
    """The claim runs in Valkey, but its reply is lost to a timeout the first `lose` times (a slow Valkey or
    a network blip longer than the socket timeout): what the server sees is a TimeoutError."""

    def __init__(self, *args, lose: int = 1, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.lose = lose

    def drain(self):
        got = super().drain()
        if got and self.lose:
            self.lose -= 1
            self.inflight.clear()  # what _claimed noted from the reply the server never got
            self.loose.clear()
            raise redis.TimeoutError("Timeout reading from socket")
        return got


def test_an_operation_claimed_when_the_reply_was_lost_is_still_run_once():
    client = valkey_client(settings.REDIS_URL, ValkeyTimeouts.for_lease(TTL_S))
    base = f"test-timeouts-{uuid.uuid4().hex[:8]}"
    posted: list[dict] = []
    transport = ReplyLost(client, base, posted.extend)
    create = {"op": "create_model", "future": "f1", "model_id": "m1", "lora_config": {"rank": 4}}
    client.rpush(ops_key(base), json.dumps(create))
    loop = ServeLoop(ModelServer("tiny-qwen2"))
    passes = [0]

    def done() -> bool:
        passes[0] += 1
        return bool(posted) or passes[0] > 20  # a hang guard: without adopting, f1 is never answered

    try:
        serve(loop, transport, idle_wait=0.05, should_stop=done, sleep=lambda s: None)
        assert transport.lose == 0  # the reply was lost once (the precondition)
        assert posted == [{"future": "f1", "result": {}}]  # run, answered once
        assert client.llen(transport.claimed) == 0 and "m1" in loop.server.models
    finally:
        client.delete(ops_key(base), transport.claimed)


def test_answered_operations_whose_release_failed_are_not_taken_again(silent_valkey):
    client = valkey_client(settings.REDIS_URL, ValkeyTimeouts.for_lease(TTL_S))
    base = f"test-timeouts-{uuid.uuid4().hex[:8]}"
    posted: list[dict] = []
    transport = Transport(client, base, posted.extend)
    try:
        client.rpush(ops_key(base), json.dumps({"op": "optim_step", "future": "f1", "model_id": "m"}))
        assert [m["future"] for m in transport.drain()] == ["f1"]
        transport.queue = valkey_client(silent_valkey, ValkeyTimeouts.for_lease(TTL_S))
        with pytest.raises(redis.TimeoutError):  # posted, but its claimed copy could not be released
            in_thread(lambda: transport.post([{"future": "f1", "result": {}}]))
        transport.queue = client
        assert transport.adopt() == []  # answered already: not run a second time
        transport.post([])
        assert client.llen(transport.claimed) == 0  # released at the next post
    finally:
        client.delete(ops_key(base), transport.claimed)


class IdleModel:
    """What `serve` asks of a model server that never gets a call."""

    def pending(self) -> bool:
        return False

    def step(self) -> list:
        return []

    def park(self) -> list[str]:
        return []


@pytest.fixture
def valkey_proxy() -> Iterator[tuple[str, threading.Event]]:
    """A loopback TCP proxy to the real Valkey that goes silent (forwards nothing more, closes nothing) once
    its event is set: Valkey's host lost in the middle of a run."""
    upstream = redis.connection.parse_url(settings.REDIS_URL)
    silent, stop = threading.Event(), threading.Event()
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    listener.settimeout(0.2)
    socks: list[socket.socket] = [listener]

    def pump(src: socket.socket, dst: socket.socket) -> None:
        while not stop.is_set():
            try:
                data = src.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            if not data:
                return
            if not silent.is_set():
                with contextlib.suppress(OSError):
                    dst.sendall(data)

    def accept() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            up = socket.create_connection((upstream.get("host", "127.0.0.1"), upstream.get("port", 6379)))
            for s in (conn, up):
                s.settimeout(0.2)
                socks.append(s)
            for a, b in ((conn, up), (up, conn)):
                threading.Thread(target=pump, args=(a, b), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    yield f"redis://127.0.0.1:{listener.getsockname()[1]}/{upstream.get('db', 0)}", silent
    stop.set()
    for s in socks:
        s.close()


@pytest.mark.timeout(HANG_S)
def test_a_server_whose_valkey_goes_silent_exits_3_saying_why(valkey_proxy, monkeypatch, capsys):
    """The lease lost to a silent Valkey: the server stops with LEASE_LOST_EXIT and the keeper's reason (the
    RUNBOOK's "exit 3"), not with a traceback from releasing a lease it cannot reach."""
    import argparse

    from gpu_runtime.model_server.serve import LEASE_LOST_EXIT, main
    from tests.workers.test_local_driver import wait_for

    url, silent = valkey_proxy
    base = f"test-timeouts-{uuid.uuid4().hex[:8]}"
    monkeypatch.setenv("OPENTINKER_MODEL_SERVER_TOKEN", "otm_test")
    monkeypatch.setattr("gpu_runtime.model_server.serve.ModelServer", lambda *a, **k: IdleModel())
    args = argparse.Namespace(
        base_model=base,
        queue_url=url,
        ingest_url="http://127.0.0.1:9/never-posted",
        device="cpu",
        dtype="float32",
        seed=0,
        spill_uri="",
        idle_exit_s=0.0,
        lease_ttl_s=TTL_S,
    )
    real = redis.Redis.from_url(settings.REDIS_URL)

    def silence_once_serving() -> None:
        wait_for(lambda: real.exists(lease_key(base)), HANG_S, "the server's lease")
        silent.set()

    # main() on this thread (it sets a signal handler); Valkey goes silent once it serves.
    threading.Thread(target=silence_once_serving, daemon=True).start()
    try:
        assert main(args) == LEASE_LOST_EXIT
    finally:
        real.delete(lease_key(base))
    assert f"model server for {base} stopped: could not renew the lease" in capsys.readouterr().err


def test_the_serve_loop_stops_on_a_silent_valkey_with_answered_copies_to_release(silent_valkey):
    t = ValkeyTimeouts.for_lease(TTL_S)
    client = valkey_client(silent_valkey, t)
    transport = Transport(client, "tiny-qwen2", lambda outcomes: None)
    transport.loose = [b'{"op": "create_sampler", "model_id": "s"}']  # answered, not yet released
    lost = iter([False, True])
    why = in_thread(
        lambda: serve(
            ServeLoop(IdleModel()),
            transport,
            idle_wait=t.blocking_s,
            should_stop=lambda: False,
            lease_lost=lambda: next(lost, True),
        )
    )
    assert why == "lease lost"


def test_a_server_taken_over_adopts_nothing_of_the_new_servers_claims():
    client = valkey_client(settings.REDIS_URL, ValkeyTimeouts.for_lease(TTL_S))
    base = f"test-timeouts-{uuid.uuid4().hex[:8]}"
    transport = Transport(client, base, lambda outcomes: None)
    transport.holder = "old"
    op = {"op": "optim_step", "future": "f1", "model_id": "m"}
    try:
        client.rpush(transport.claimed, json.dumps(op))  # claimed, its reply never seen
        client.set(lease_key(base), "new")  # ...or claimed by the server that took the base model over
        assert transport.adopt() == [] and client.llen(transport.claimed) == 1
        client.delete(lease_key(base))  # lapsed: not this server's either
        assert transport.adopt() == []
        client.set(lease_key(base), "old")  # still held: the claim is this server's
        assert transport.adopt() == [op] and list(transport.inflight) == ["f1"]
    finally:
        client.delete(ops_key(base), transport.claimed, lease_key(base))
