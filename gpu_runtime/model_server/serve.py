"""The model server as a process: pops the Tinker API's operations from its base model's Valkey queue, runs
them on a `ModelServer`, and writes the outcomes back through the platform's ingest endpoint.

    OPENTINKER_MODEL_SERVER_TOKEN=otm_... python -m gpu_runtime.model_server serve \\
        --base-model tiny-qwen2 --queue-url redis://127.0.0.1:6379/0 \\
        --ingest-url http://127.0.0.1:8000/tinker/ingest/outcomes

It speaks to the platform only through the queue and the ingest (ARCHITECTURE "The second way in"), and
knows no protobuf and no database: the API decodes the SDK's requests into the plain JSON operations below
and encodes the results. One loop: take every operation waiting, run one engine step (which batches the
forward_backward calls of all models at their queue heads), report its outcomes; block on the queue only
when nothing can run.

Operations (JSON): `{"op", "model_id", "future"?, "seq_id"?, ...}` with op one of create_model, load_weights,
create_sampler (no future), forward_backward, optim_step, sample, save_weights, save_weights_for_sampler, and
reject (`error`: a call the API refused, which still takes its seq_id's turn so the later ones run).
Outcomes: `{"future", "result": {...}}` or `{"future", "error", "category": "user" | "server"}`.

Surviving a restart: an operation is never just popped. It moves, atomically, from the queue to the base
model's claimed list, and leaves that list once its outcome is posted (or at once when it has no future). A
server starting up fails every future still in the claimed list (its predecessor died with them in flight:
they may have half-run, so re-running is not safe) and clears the list. One model server per base model
(the claimed list is the base model's), enforced by a lease in Valkey (`Lease`: `tinker:server:<base>`, SET NX
with a TTL, renewed by `LeaseKeeper`) taken before `recover`: a second server started while the first holds
it exits at once with a clear error, touching nothing (a rolling restart stops the old one first: SIGTERM
parks its clients and releases the lease; a killed one's lease lapses after `--lease-ttl-s`). Training clients
live in the process: after a restart their calls fail clearly ("not on this model server"); saved states
(object storage) and futures (PostgreSQL) remain, and a sampler is re-created from what its `sample`
operations carry (`sampler_uri`).

Started by hand (`serve`, above) or by the platform: a Tinker call for a base with no server enqueues a
model-server job (portal/services/model_servers.py), the scheduler admits it, a pool's driver starts
`python -m gpu_runtime run spec.json`, whose spec (`"kind": "tinker"`) lands in `serve_spec`, and the job
ends when the server exits (idle, SIGTERM). The lease is renewed by `LeaseKeeper`, a thread of its own, so
a long engine pass never lets it lapse; once a renewal finds it lost the loop stops taking work.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import signal
import socket
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, cast

import httpx
import redis
import torch

from gpu_runtime.model_server.engine import ModelServer
from gpu_runtime.model_server.types import (
    AdamParams,
    Datum,
    ForwardBackward,
    ForwardBackwardResult,
    LoraConfig,
    ModelServerError,
    Operation,
    OptimStep,
    OptimStepResult,
    Outcome,
    Result,
    Sample,
    SampleResult,
    SamplingParams,
    SaveState,
    SaveStateResult,
)
from gpu_runtime.model_server.valkey import ValkeyTimeouts, valkey_client

log = logging.getLogger(__name__)
DRAIN_BATCH = 256
POST_ATTEMPTS = 5
# One ingest post's JSON at most (the platform's TINKER_MAX_INGEST_BYTES must be larger: 64 MiB by default).
POST_MAX_BYTES = 8 * 1024 * 1024


def ops_key(base_model: str) -> str:
    """The queue's key; the same as api/tinker/queue.py's (the platform side, which this cannot import)."""
    return f"tinker:ops:{base_model}"


def claimed_key(base_model: str) -> str:
    """Operations taken from the queue and not yet reported (api/tinker/queue.py has the same name)."""
    return f"tinker:claimed:{base_model}"


def lease_key(base_model: str) -> str:
    """Which model server serves the base model (its holder id), for `Lease`'s TTL."""
    return f"tinker:server:{base_model}"


LEASE_TTL_S = 60.0  # a killed server's successor waits this long at most; renewed every third of it
# Extend / delete the lease only while this holder has it (one that lapsed may be another server's now).
RENEW_SCRIPT = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
"""
RELEASE_SCRIPT = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class LeaseHeld(Exception):
    """Another model server serves this base model."""


class Lease:
    """One model server per base model: the holder's id under `lease_key`, with a TTL `LeaseKeeper` renews.
    A server stopped cleanly releases it; a killed one's lapses after the TTL."""

    def __init__(self, queue: redis.Redis, base_model: str, holder: str, ttl_s: float = LEASE_TTL_S) -> None:
        if ttl_s <= 0:
            raise ValueError(f"the lease's TTL must be positive, not {ttl_s}")
        self.queue, self.base_model, self.holder = queue, base_model, holder
        self.key, self.ttl_ms = lease_key(base_model), int(ttl_s * 1000)
        self._renew = queue.register_script(RENEW_SCRIPT)
        self._release = queue.register_script(RELEASE_SCRIPT)

    def acquire(
        self,
        wait_s: float = 0.0,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        """Take the lease; with `wait_s`, wait that long for a holder's lease to lapse (a platform-started
        server replacing a killed one: its lease outlives it by up to the TTL)."""
        deadline = clock() + wait_s
        while not self.queue.set(self.key, self.holder, nx=True, px=self.ttl_ms):
            other: Any = self.queue.get(self.key)
            left: Any = self.queue.pttl(self.key)
            if clock() < deadline:
                sleep(min(1.0, max(int(left), 50) / 1000, max(deadline - clock(), 0.0)))
                continue
            raise LeaseHeld(
                f"another model server ({other.decode() if other else 'gone just now'}) serves "
                f"{self.base_model!r}: one per base model. Stop it first (SIGTERM parks its clients and "
                f"releases the lease); a killed one's lease lapses in {max(int(left), 0) / 1000:.0f} s"
            )

    def renew(self) -> bool:
        """Extend the TTL; False when this server no longer holds the lease (it lapsed: taken over)."""
        return bool(self._renew(keys=[self.key], args=[self.holder, self.ttl_ms]))

    def release(self) -> None:
        self._release(keys=[self.key], args=[self.holder])


class LeaseKeeper:
    """Renews the lease on a thread of its own, every third of its TTL, so that an engine pass longer than
    the TTL never lets it lapse. `lost` is set once a renewal finds another holder, or once renewals have
    failed (Valkey unreachable) for a whole TTL, after which the lease has lapsed anyway; the serve loop then
    stops taking work. `stop()` ends the thread and waits for it. `clock` is injectable for tests."""

    def __init__(
        self,
        lease: Lease,
        *,
        every_s: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.lease, self.clock = lease, clock
        self.ttl_s = lease.ttl_ms / 1000
        self.every_s = self.ttl_s / 3 if every_s is None else every_s
        self.lost = threading.Event()
        self.why = ""
        self.renewals = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="lease-keeper", daemon=True)

    def start(self) -> LeaseKeeper:
        self._thread.start()
        return self

    def _run(self) -> None:
        last_ok = self.clock()
        while not self._stop.wait(self.every_s):
            try:
                held = self.lease.renew()
            except redis.RedisError as exc:
                if self.clock() - last_ok < self.ttl_s:
                    log.warning("could not renew the lease (%r); retrying", exc)
                    continue
                self._lose(f"could not renew the lease for {self.ttl_s:g} s (Valkey: {exc!r}): it has lapsed")
                return
            if not held:
                self._lose("the lease was lost: another model server took over the base model")
                return
            self.renewals += 1
            last_ok = self.clock()

    def _lose(self, why: str) -> None:
        self.why = why
        log.error("%s; stopping", why)
        self.lost.set()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join()


def take_base(lease: Lease, transport: Transport, *, wait_s: float = 0.0) -> None:
    """Start-up: the lease first, then `recover` (failing a dead predecessor's claimed calls): a second server
    must not fail the calls the live one is running."""
    lease.acquire(wait_s)
    transport.recover()


# Moves up to ARGV[1] operations from the queue to the claimed list in one atomic step: a server killed at
# any point leaves each operation in exactly one of the two lists.
CLAIM_SCRIPT = """
local items = redis.call('LPOP', KEYS[1], ARGV[1])
if items then redis.call('RPUSH', KEYS[2], unpack(items)) end
return items or {}
"""
# The claimed list, but only while the caller still holds the base model's lease (ARGV[1]; "" for any): once
# taken over, the list holds the new server's claims, which it runs itself.
ADOPT_SCRIPT = """
if ARGV[1] ~= '' and redis.call('GET', KEYS[2]) ~= ARGV[1] then return {} end
return redis.call('LRANGE', KEYS[1], 0, -1)
"""
LOST_IN_FLIGHT = (
    "the model server restarted while this call was in flight (taken from the queue, not finished); it may "
    "have partly run, so it was not re-run. Training state not saved with save_state is lost: resume from "
    "your last saved state"
)


WireOutcome = dict[str, Any]


def _floats(values: Iterable[float]) -> list[float | None]:
    # JSON (and PostgreSQL's jsonb) has no NaN: the first prompt log-prob is NaN by definition.
    return [v if math.isfinite(v) else None for v in (float(x) for x in values)]


def result_to_wire(result: Result) -> dict[str, Any]:
    if isinstance(result, ForwardBackwardResult):
        outputs = [{k: _floats(v.tolist()) for k, v in d.items()} for d in result.loss_fn_outputs]
        return {"loss_fn_outputs": outputs, "metrics": result.metrics}
    if isinstance(result, OptimStepResult):
        return {"metrics": result.metrics}
    if isinstance(result, SampleResult):
        sequences = [
            {"tokens": s.tokens, "logprobs": _floats(s.logprobs), "stop_reason": s.stop_reason}
            for s in result.sequences
        ]
        prompt = None if result.prompt_logprobs is None else _floats(result.prompt_logprobs)
        return {"sequences": sequences, "prompt_logprobs": prompt}
    if isinstance(result, SaveStateResult):
        return {"uri": result.uri}
    raise ModelServerError(f"no wire form for {type(result).__name__}", category="server")


def operation_from_wire(msg: dict[str, Any]) -> Operation:
    op = msg["op"]
    if op == "forward_backward":
        data = [Datum(d["model_input"], d["loss_fn_inputs"]) for d in msg["data"]]
        return ForwardBackward(
            data, msg["loss_fn"], msg.get("loss_fn_config") or {}, bool(msg["forward_only"])
        )
    if op == "optim_step":
        return OptimStep(AdamParams(**msg.get("adam_params", {})))
    if op == "sample":
        params = dict(msg["sampling_params"])
        if params.get("max_tokens") is None:
            raise ModelServerError("sampling_params.max_tokens is required")
        params = {k: v for k, v in params.items() if v is not None or k == "stop"}
        return Sample(
            msg["prompt"], int(msg["num_samples"]), SamplingParams(**params), msg["prompt_logprobs"]
        )
    if op in ("save_weights", "save_weights_for_sampler"):
        return SaveState(msg["uri"], for_sampler=bool(msg["for_sampler"]))
    raise ModelServerError(f"unknown operation {op!r}")


@dataclass(frozen=True)
class Rejected:
    """Holds a refused call's place in its model's seq_id order, so the calls after it still run. The engine
    answers it as an unknown operation; the loop reports `reason` instead."""

    reason: str


class ServeLoop:
    """The transport-free part of the loop: operations in, wire outcomes out (testable without Valkey)."""

    def __init__(self, server: ModelServer) -> None:
        self.server = server
        self.futures: dict[tuple[str, int], str] = {}  # (model_id, engine seq_id) -> future id
        self.sample_seq: dict[str, int] = {}  # per sampler: samples are independent, run in arrival order
        self.rejected: dict[tuple[str, int], str] = {}
        self.broken_samplers: dict[
            str, tuple[str, str]
        ] = {}  # sampler id -> (why, category): its samples fail
        self.created: dict[str, Any] = {}  # model id -> the future that created it
        self.sampling: set[str] = set()  # futures of samples queued or running: a re-sent one is a copy

    def handle(self, msg: dict[str, Any]) -> list[WireOutcome]:
        """Take one operation; returns the outcomes it already has (control calls, retries, bad requests)."""
        future = msg.get("future")
        try:
            model_id, op = str(msg["model_id"]), msg["op"]
            if model_id in self.server.models and (
                op == "create_sampler" or (future is not None and self.created.get(model_id) == future)
            ):
                # A copy the API re-sent (a retry of a pending call): the model is there (the ingest keeps
                # the first outcome it got, this one stands in for a lost one).
                return [] if future is None else [{"future": future, "result": {}}]
            if op == "create_model":
                self.server.create_model(model_id, LoraConfig(**msg["lora_config"]))
                self.created[model_id] = future
                return [{"future": future, "result": {}}]
            if op == "load_weights":
                self.server.create_model_from_state(model_id, msg["uri"], optimizer=bool(msg["optimizer"]))
                self.created[model_id] = future
                return [{"future": future, "result": {}}]
            if op == "create_sampler":
                self._create_sampler(model_id, msg.get("uri"))
                return []
            operation: Operation | Rejected
            if op == "sample" and model_id not in self.server.models and "sampler_uri" in msg:
                # A sampler this process never created (it restarted since): create it as the API did.
                self._create_sampler(model_id, msg["sampler_uri"])
            if op == "sample" and model_id in self.broken_samplers:
                reason, category = self.broken_samplers[model_id]
                error = f"sampler {model_id} could not be created: {reason}"
                return [] if future is None else [{"future": future, "error": error, "category": category}]
            if op == "sample":
                if future in self.sampling:
                    return []  # a copy the API re-sent: this sample is already queued
                self._check_known(model_id)
                operation = operation_from_wire(msg)
                if future is not None:
                    self.sampling.add(str(future))
                # The SDK numbers a sampler's requests from 0 (clones from 1e9 on): the engine gets its own
                # gapless numbering, as samples need no order. The API has already dropped retries.
                seq_id = self.sample_seq.get(model_id, 0) + 1
                self.sample_seq[model_id] = seq_id
            else:
                seq_id = int(msg["seq_id"])
                self._check_known(model_id)
                try:
                    operation = Rejected(msg["error"]) if op == "reject" else operation_from_wire(msg)
                except (ModelServerError, KeyError, TypeError, ValueError) as exc:
                    operation = Rejected(f"bad operation: {exc}")
                if isinstance(operation, Rejected):
                    self.rejected[(model_id, seq_id)] = operation.reason
            if future is not None:
                self.futures[(model_id, seq_id)] = str(future)
            done = self.server.submit(model_id, seq_id, cast(Operation, operation))
            return [] if done is None else [self._wire(done)]
        except ModelServerError as exc:
            return [] if future is None else [{"future": future, "error": str(exc), "category": exc.category}]
        except (KeyError, TypeError, ValueError) as exc:
            log.warning("bad operation %r: %r", msg.get("op"), exc)
            return [] if future is None else [{"future": future, "error": f"bad operation: {exc!r}"}]

    def _check_known(self, model_id: str) -> None:
        # The API only sends calls of models it has: one unknown here was parked by an earlier process (taken
        # back now) or lost with it.
        if model_id not in self.server.models and not self._unpark(model_id):
            raise ModelServerError(
                f"unknown model {model_id!r}: not on this model server (lost if the model server restarted "
                "since it was created; resume from your last save_state)",
                category="server",
            )

    def _unpark(self, model_id: str) -> bool:
        try:
            return self.server.unpark(model_id)
        except ModelServerError as exc:
            raise ModelServerError(f"cannot take back parked {model_id!r}: {exc}", category="server") from exc

    def _create_sampler(self, model_id: str, uri: str | None) -> None:
        """create_sampler has no future to fail: a failure is logged and kept, and fails the sampler's samples
        with its reason (not "unknown model"). Any error (unreadable weights) must not stop the loop."""
        try:
            self.server.create_sampler(model_id, uri)
        except ModelServerError as exc:
            log.error("create_sampler %s (%s) failed: %s", model_id, uri, exc)
            self.broken_samplers[model_id] = (str(exc), exc.category)
        except Exception as exc:
            log.exception("create_sampler %s (%s) failed", model_id, uri)
            self.broken_samplers[model_id] = (repr(exc), "server")

    def step(self) -> list[WireOutcome]:
        return [self._wire(o) for o in self.server.step()]

    def _wire(self, o: Outcome) -> WireOutcome:
        wire = self._wire_outcome(o)
        wire["usage"] = {"tokens": o.tokens, "seconds": o.seconds}
        return wire

    def _wire_outcome(self, o: Outcome) -> WireOutcome:
        future = self.futures.pop((o.model_id, o.seq_id), None)
        self.sampling.discard(str(future))
        reason = self.rejected.pop((o.model_id, o.seq_id), None)
        if reason is not None:
            return {"future": future, "error": reason, "category": "user"}
        if o.error is not None:
            return {"future": future, "error": str(o.error), "category": o.error.category}
        assert o.result is not None
        try:
            return {"future": future, "result": result_to_wire(o.result)}
        except ModelServerError as exc:
            return {"future": future, "error": str(exc), "category": exc.category}


class Transport:
    """The Valkey side: claims operations (queue -> claimed list), posts outcomes, then releases the claimed
    copies whose outcome went out."""

    def __init__(
        self, queue: redis.Redis, base_model: str, post: Callable[[list[WireOutcome]], None]
    ) -> None:
        self.queue, self.poster = queue, post
        self.key, self.claimed = ops_key(base_model), claimed_key(base_model)
        self.lease_key = lease_key(base_model)
        self.holder = ""  # this server's lease holder id, once it has one (main): `adopt` checks it
        self.claim = queue.register_script(CLAIM_SCRIPT)
        self._adopt = queue.register_script(ADOPT_SCRIPT)
        self.inflight: dict[str, list[bytes]] = {}  # future -> its claimed raw messages (a retry adds a copy)
        self.loose: list[bytes] = []  # claimed messages without a future: released at the next post

    def _claimed(self, raw: list[bytes]) -> list[dict[str, Any]]:
        msgs = []
        for r in raw:
            msg = json.loads(r)
            future = msg.get("future") if isinstance(msg, dict) else None
            if future:
                self.inflight.setdefault(str(future), []).append(r)
            else:
                self.loose.append(r)
            msgs.append(msg)
        return msgs

    def drain(self) -> list[dict[str, Any]]:
        raw: Any = self.claim(keys=[self.key, self.claimed], args=[DRAIN_BATCH])
        return self._claimed(list(raw))

    def wait(self, timeout: float) -> list[dict[str, Any]]:
        # redis-py's stub says int; Valkey takes a float timeout
        got: Any = self.queue.blmove(self.key, self.claimed, cast(int, timeout), "LEFT", "RIGHT")
        return [] if got is None else self._claimed([got])

    def post(self, outcomes: list[WireOutcome]) -> None:
        self.poster(outcomes)
        done = self.loose
        self.loose = []
        for o in outcomes:
            done += self.inflight.pop(str(o.get("future")), [])
        if done:
            pipe = self.queue.pipeline(transaction=False)
            for r in done:
                pipe.lrem(self.claimed, 1, cast(str, r))  # the exact bytes claimed
            try:
                pipe.execute()
            except redis.RedisError:
                # Answered but maybe still claimed: released at the next post, never taken as unknown
                # by `adopt` (which would run them again).
                self.loose = done + self.loose
                raise

    def adopt(self) -> list[dict[str, Any]]:
        """After a Valkey error: the operations this server claimed without getting the reply (the claim or
        blocking move ran in Valkey, its answer was lost to a timeout), taken from the claimed list. Without
        this they would sit there, never run, until the next server fails them; and a training client's
        later calls would wait for the lost one's seq_id. The list is this server's alone while it holds the
        lease (`holder`; recover cleared a predecessor's), so what it holds beyond the claims known here (in
        flight, or answered and not yet released) was claimed and never seen. Taken over: nothing."""
        raw: Any = self._adopt(keys=[self.claimed, self.lease_key], args=[self.holder])
        known = Counter(r for copies in self.inflight.values() for r in copies)
        known.update(self.loose)
        unseen = []
        for r in raw:
            if known[r] > 0:
                known[r] -= 1
            else:
                unseen.append(r)
        if unseen:
            log.warning("taking %d operations claimed while Valkey did not answer", len(unseen))
        return self._claimed(unseen)

    def recover(self) -> int:
        """At start-up: fail the futures a dead predecessor had claimed, then clear its claimed list.
        (Failing first: killed in between, the next start fails them again, which the ingest ignores.)"""
        raw: Any = self.queue.lrange(self.claimed, 0, -1)
        futures = {str(m["future"]) for m in map(json.loads, raw) if isinstance(m, dict) and m.get("future")}
        if futures:
            log.warning("failing %d calls a previous model server had in flight", len(futures))
            self.poster(
                [{"future": f, "error": LOST_IN_FLIGHT, "category": "server"} for f in sorted(futures)]
            )
        self.queue.delete(self.claimed)
        return len(futures)


def batches(outcomes: list[WireOutcome], max_bytes: int) -> list[list[WireOutcome]]:
    """The outcomes in posts of at most `max_bytes` of JSON each (one larger outcome goes alone): a
    forward_backward's log-probs are ~40 bytes a token, so a few large calls can exceed one body's limit."""
    out: list[list[WireOutcome]] = []
    size = max_bytes
    for o in outcomes:
        n = len(json.dumps(o)) + 2
        if size + n > max_bytes:
            out.append([])
            size = 0
        out[-1].append(o)
        size += n
    return out


def http_poster(
    ingest_url: str, token: str, *, max_bytes: int = POST_MAX_BYTES, client: httpx.Client | None = None
) -> Callable[[list[WireOutcome]], None]:
    client = client or httpx.Client(headers={"Authorization": f"Bearer {token}"}, timeout=30)

    def send(outcomes: list[WireOutcome]) -> httpx.Response | None:
        """Posts, retrying what may pass later (no answer, a 5xx); None when the ingest never answered."""
        for attempt in range(POST_ATTEMPTS):
            try:
                response = client.post(ingest_url, json={"outcomes": outcomes})
                if response.status_code < 500:
                    return response
                log.warning("ingest answered %d (attempt %d)", response.status_code, attempt + 1)
            except httpx.HTTPError as exc:
                log.warning("ingest failed (attempt %d): %r", attempt + 1, exc)
            if attempt + 1 < POST_ATTEMPTS:
                time.sleep(min(2**attempt, 10))  # back off: the platform may be restarting
        return None

    def post(outcomes: list[WireOutcome]) -> None:
        for batch in batches([o for o in outcomes if o.get("future")], max_bytes):
            response = send(batch)
            if response is None:
                log.error("dropped %d outcomes: the ingest did not answer", len(batch))
            elif response.status_code >= 400:
                # The ingest refused them (too large, malformed): retrying cannot help. Fail their futures
                # with a small post, so their clients are told instead of waiting forever.
                reason = f"the model server could not report this outcome: ingest {response.status_code}"
                log.error(
                    "ingest refused %d outcomes (%d): %s",
                    len(batch),
                    response.status_code,
                    response.text[:500],
                )
                failed = [{"future": o["future"], "error": reason, "category": "server"} for o in batch]
                again = send(failed)
                if again is None or again.status_code >= 400:
                    log.error("dropped %d outcomes: the ingest refused even their failure", len(batch))

    return post


def serve(
    loop: ServeLoop,
    transport: Transport,
    *,
    idle_wait: float = 1.0,
    should_stop: Callable[[], bool],
    idle_exit_s: float = 0.0,
    clock: Callable[[], float] = time.monotonic,
    lease_lost: Callable[[], bool] = lambda: False,
    sleep: Callable[[float], None] = time.sleep,
) -> str:
    """Run until `should_stop()` or, with `idle_exit_s`, until no operation came for that long and nothing
    waits; then park the training clients (ModelServer.park: with a spill_uri, the next server takes them
    back on their next call). `clock` is injectable so the idle rule is testable without waiting. Once
    `lease_lost()` (`LeaseKeeper.lost`) another server has the base model: stop taking work at once.
    Returns why it stopped: "stopped", "idle" or "lease lost"."""
    last_work = clock()
    why = "stopped"
    unsure = False  # a Valkey call failed: a claim may have run without its reply reaching us
    while not should_stop():
        if lease_lost():
            log.error("lost the base model's lease (another model server took over): stopping")
            why = "lease lost"
            break
        try:
            outcomes: list[WireOutcome] = []
            if unsure:
                adopted: list[WireOutcome] = []
                for msg in transport.adopt():
                    adopted += loop.handle(msg)
                unsure = False
                transport.post(adopted)
            for msg in transport.drain():
                outcomes += loop.handle(msg)
            outcomes += loop.step()
            if outcomes:
                transport.post(outcomes)
                last_work = clock()
                continue
            if lease_lost():
                continue  # taken over while it waited: take nothing more
            msgs = transport.wait(idle_wait)  # nothing could run: block until an operation arrives
            for msg in msgs:
                transport.post(loop.handle(msg))
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            # Valkey did not answer within the socket timeout (valkey.py): the connection is dropped and the
            # next command opens a new one. The lease keeper, failing too, stops the server once a whole TTL
            # has passed without a renewal; until then, try again (an idle time does not count meanwhile).
            log.warning("Valkey did not answer (%r): trying again", exc)
            unsure = True
            last_work = clock()
            sleep(min(idle_wait, 1.0))
            continue
        if msgs or loop.server.pending():
            last_work = clock()
        elif idle_exit_s and clock() - last_work >= idle_exit_s:
            log.info("idle for %.0f s: stopping", idle_exit_s)
            why = "idle"
            break
    parked = loop.server.park()
    try:
        transport.post([])  # releases what is claimed and answered
    except redis.RedisError as exc:  # Valkey away (the lease lost to it): the copies hold no future
        log.warning("could not release the answered operations (%r)", exc)
    log.info("stopped (%s); parked %d training clients", why, len(parked))
    return why


LEASE_LOST_EXIT = 3  # the process's exit code when it stopped because another server took its base model
# A server stops taking work this long before its model-server token expires, so that its last outcomes are
# still accepted; the next call (or the supervisor's pass) starts a fresh server with a fresh token.
TOKEN_MARGIN_S = 3600.0


def token_expiring(
    token: str, *, margin_s: float = TOKEN_MARGIN_S, clock: Callable[[], float] = time.time
) -> Callable[[], bool]:
    """A check: true once the model-server token (`otm_<base>.<expiry unix seconds>.<signature>`,
    portal/services/model_server_tokens.py) expires within `margin_s`: past its expiry the ingest refuses
    every outcome, and a busy server, never idle, would keep taking calls whose answers are all dropped.
    A token of another form never expires here."""
    parts = token.rsplit(".", 2)
    expiry = int(parts[1]) if len(parts) == 3 and parts[1].isdigit() else None

    def expiring() -> bool:
        return expiry is not None and clock() >= expiry - margin_s

    return expiring


def main(args: Any) -> int:
    token = os.environ.get("OPENTINKER_MODEL_SERVER_TOKEN", "")
    if not token:
        raise SystemExit("OPENTINKER_MODEL_SERVER_TOKEN is not set (the platform's model-server token)")
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    server = ModelServer(
        args.base_model,
        device=args.device,
        dtype=dtype,
        seed=args.seed,
        spill_uri=args.spill_uri or None,
        sampler=getattr(args, "sampler", "decode"),
    )
    # Timeouts on every socket, fitted to the lease (valkey.py): a silent Valkey never hangs the server.
    timeouts = ValkeyTimeouts.for_lease(args.lease_ttl_s)
    transport = Transport(
        valkey_client(args.queue_url, timeouts), args.base_model, http_poster(args.ingest_url, token)
    )
    lease = Lease(transport.queue, args.base_model, f"{socket.gethostname()}:{os.getpid()}", args.lease_ttl_s)
    transport.holder = lease.holder
    try:
        take_base(lease, transport, wait_s=getattr(args, "lease_wait_s", 0.0))
    except LeaseHeld as exc:
        raise SystemExit(f"model server not started: {exc}") from None
    log.info("model server for %s on %s: serving", args.base_model, args.device)
    print(f"model server for {args.base_model}: serving", flush=True)  # the launcher waits for this line
    stopping: list[int] = []
    signal.signal(signal.SIGTERM, lambda signum, _frame: stopping.append(signum))  # a driver's stop
    expiring = token_expiring(token)
    keeper = LeaseKeeper(lease).start()
    try:
        why = serve(
            ServeLoop(server),
            transport,
            should_stop=lambda: bool(stopping) or expiring(),
            idle_wait=timeouts.blocking_s,
            idle_exit_s=args.idle_exit_s,
            lease_lost=keeper.lost.is_set,
        )
    finally:
        keeper.stop()
        try:
            lease.release()
        except redis.RedisError as exc:  # it lapses after its TTL; a crash here would fail the job
            log.warning("could not release the lease (%r): it lapses in %g s", exc, args.lease_ttl_s)
    if why == "lease lost":
        print(f"model server for {args.base_model} stopped: {keeper.why}", file=sys.stderr, flush=True)
        return LEASE_LOST_EXIT
    if not stopping and expiring():
        print(
            f"model server for {args.base_model} stopped: its model-server token expires within "
            f"{TOKEN_MARGIN_S:.0f} s (a fresh server takes the next call)",
            flush=True,
        )
    return 0


def serve_spec(spec: dict[str, Any]) -> int:
    """A model server the platform started as a job (`python -m gpu_runtime run spec.json` with
    `"kind": "tinker"`): its settings from the spec, where to reach the platform from the environment the
    driver set (OPENTINKER_QUEUE_URL, OPENTINKER_TINKER_INGEST_URL, OPENTINKER_MODEL_SERVER_TOKEN)."""
    conf = spec.get("model_server") or {}
    queue_url = os.environ.get("OPENTINKER_QUEUE_URL", "")
    ingest_url = os.environ.get("OPENTINKER_TINKER_INGEST_URL", "")
    if not queue_url or not ingest_url or not conf.get("base_model"):
        print(
            "opentinker: a model-server job needs model_server.base_model in its spec and "
            "OPENTINKER_QUEUE_URL and OPENTINKER_TINKER_INGEST_URL in its environment",
            file=sys.stderr,
            flush=True,
        )
        return 2
    gpus = os.environ.get("CUDA_VISIBLE_DEVICES", "")
    ttl = float(conf.get("lease_ttl_s") or LEASE_TTL_S)
    args = argparse.Namespace(
        base_model=str(conf["base_model"]),
        queue_url=queue_url,
        ingest_url=ingest_url,
        device="cuda" if gpus and torch.cuda.is_available() else "cpu",
        dtype=str(conf.get("dtype") or "float32"),
        seed=int(conf.get("seed") or 0),
        spill_uri=str(conf.get("spill_uri") or ""),
        sampler=str(conf.get("sampler") or "decode"),
        idle_exit_s=float(conf.get("idle_exit_s") or 0.0),
        lease_ttl_s=ttl,
        # The job was re-queued after its server died: that server's lease outlives it by up to its TTL.
        lease_wait_s=ttl * 1.5,
    )
    return main(args)
