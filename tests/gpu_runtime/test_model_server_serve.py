"""The model server's serve loop (gpu_runtime/model_server/serve.py) without Valkey or HTTP: the JSON
operations the Tinker API queues in, the outcomes it posts out. The live path (queue, ingest, the SDK) is
tests/api/test_tinker_sdk.py."""

from __future__ import annotations

import math

import pytest

from gpu_runtime.model_server import ModelServer
from gpu_runtime.model_server.serve import ServeLoop, serve

TOKENS = [5, 6, 7, 8, 9, 10]


@pytest.fixture(scope="module")
def server() -> ModelServer:
    return ModelServer("tiny-qwen2")


def fb(model_id: str, seq_id: int, future: str, **extra) -> dict:
    datum = {
        "model_input": TOKENS[:-1],
        "loss_fn_inputs": {"target_tokens": TOKENS[1:], "weights": [1.0] * 5},
    }
    return {
        "op": "forward_backward",
        "future": future,
        "model_id": model_id,
        "seq_id": seq_id,
        "loss_fn": "cross_entropy",
        "loss_fn_config": {},
        "forward_only": False,
        "data": [datum],
        **extra,
    }


def sample(model_id: str, seq_id: int, future: str) -> dict:
    params = {"max_tokens": 3, "temperature": 1.0, "seed": 3, "stop": [], "top_k": -1, "top_p": 1.0}
    return {
        "op": "sample",
        "future": future,
        "model_id": model_id,
        "seq_id": seq_id,
        "prompt": TOKENS,
        "num_samples": 2,
        "sampling_params": params,
        "prompt_logprobs": True,
    }


def test_training_calls_in_and_outcomes_out(server):
    loop = ServeLoop(server)
    created = loop.handle(
        {"op": "create_model", "future": "f0", "model_id": "t1", "lora_config": {"rank": 4}}
    )
    assert created == [{"future": "f0", "result": {}}]
    again = loop.handle({"op": "create_model", "future": "f1", "model_id": "t1", "lora_config": {"rank": 4}})
    assert again[0]["future"] == "f1" and again[0]["category"] == "user" and "exists" in again[0]["error"]

    # seq_id 2 arrives first: it waits for 1, then both run in order.
    opt = {
        "op": "optim_step",
        "future": "f3",
        "model_id": "t1",
        "seq_id": 2,
        "adam_params": {"learning_rate": 0.01},
    }
    assert loop.handle(opt) == []
    assert loop.step() == []
    assert loop.handle(fb("t1", 1, "f2")) == []
    first = loop.step()
    assert [o["future"] for o in first] == ["f2"]
    (out,) = first[0]["result"]["loss_fn_outputs"]
    assert len(out["logprobs"]) == 5
    assert first[0]["result"]["metrics"]["loss:sum"] == pytest.approx(-sum(out["logprobs"]), rel=1e-5)
    (second,) = loop.step()
    assert second["future"] == "f3" and second["result"]["metrics"]["learning_rate:mean"] == 0.01


def test_samples_need_no_order_and_nan_never_leaves(server):
    loop = ServeLoop(server)
    assert loop.handle({"op": "create_sampler", "model_id": "s1", "uri": None}) == []
    # The SDK numbers a sampler's requests from 0, a clone's from 1e9: neither waits for the other.
    assert loop.handle(sample("s1", 1_000_000_000, "a")) == []
    assert loop.handle(sample("s1", 0, "b")) == []
    done = loop.step() + loop.step()
    assert sorted(o["future"] for o in done) == ["a", "b"]
    for o in done:
        assert o["usage"]["tokens"] == len(TOKENS) + 2 * 3  # the prompt once, and two completions of 3
        seqs = o["result"]["sequences"]
        assert [len(s["tokens"]) for s in seqs] == [3, 3] and all(s["stop_reason"] == "length" for s in seqs)
        first, *rest = o["result"]["prompt_logprobs"]
        assert first is None and all(isinstance(x, float) and math.isfinite(x) for x in rest)


def test_bad_operations_fail_their_future_only(server, caplog):
    loop = ServeLoop(server)
    (unknown,) = loop.handle(fb("nobody", 1, "f1"))
    assert unknown["category"] == "server" and "unknown model" in unknown["error"]
    (broken,) = loop.handle({"op": "optim_step", "future": "f2", "model_id": "x"})  # no seq_id
    assert broken["future"] == "f2" and "bad operation" in broken["error"]
    # A sampler whose weights cannot be loaded: no outcome of its own, but a log line, and its samples fail
    # with the reason.
    assert loop.handle({"op": "create_sampler", "model_id": "s9", "uri": "file:///nonexistent/weights"}) == []
    assert any("create_sampler s9" in r.getMessage() and r.levelname == "ERROR" for r in caplog.records)
    (lost,) = loop.handle(sample("s9", 0, "f3"))
    assert lost["future"] == "f3" and "sampler s9 could not be created" in lost["error"]
    assert "unknown model" not in lost["error"]


def test_a_refused_call_takes_its_turn_and_the_next_ones_run(server):
    loop = ServeLoop(server)
    loop.handle({"op": "create_model", "future": "c", "model_id": "t3", "lora_config": {"rank": 4}})
    broken = fb("t3", 1, "f1")
    del broken["data"]
    assert loop.handle(broken) == []  # no data: refused, in its turn
    reject = {"op": "reject", "model_id": "t3", "seq_id": 2, "error": "image chunks unsupported"}
    assert loop.handle(reject) == []
    assert loop.handle(fb("t3", 3, "f3")) == []
    done: list[dict] = []
    while batch := loop.step():
        done += batch
    assert [(o["future"], o.get("error", "ok")[:14]) for o in done] == [
        ("f1", "bad operation:"),
        (None, "image chunks u"),
        ("f3", "ok"),
    ]


class ListTransport:
    """The queue as a list; stops the loop once it is empty and nothing runs."""

    def __init__(self, ops: list[dict]) -> None:
        self.ops, self.posted, self.idle = list(ops), [], False

    def drain(self) -> list[dict]:
        ops, self.ops = self.ops, []
        return ops

    def wait(self, timeout: float) -> list[dict]:
        self.idle = True
        return []

    def post(self, outcomes: list[dict]) -> None:
        self.posted += outcomes


def test_serve_runs_what_is_queued_and_reports_each_outcome_once(server):
    ops = [
        {"op": "create_model", "future": "c", "model_id": "t2", "lora_config": {"rank": 4}},
        fb("t2", 1, "f1"),
        fb("t2", 2, "f2", forward_only=True),
    ]
    transport = ListTransport(ops)
    serve(ServeLoop(server), transport, should_stop=lambda: transport.idle)  # type: ignore[arg-type]
    assert [o["future"] for o in transport.posted] == ["c", "f1", "f2"]
    assert all("result" in o for o in transport.posted)
    # Metering: a forward_backward's tokens are its rows' (5 each); a pass's time is split among its calls.
    assert [o["usage"]["tokens"] for o in transport.posted[1:]] == [5, 5]
    assert all(o["usage"]["seconds"] > 0 for o in transport.posted[1:])


def test_a_copy_the_api_re_sent_is_not_run_twice(server):
    # A retry of a pending call makes the API queue it again (its first enqueue may have been lost).
    loop = ServeLoop(server)
    create = {"op": "create_model", "future": "c0", "model_id": "dup", "lora_config": {"rank": 4}}
    assert loop.handle(create) == [{"future": "c0", "result": {}}]
    assert loop.handle(create) == [{"future": "c0", "result": {}}]  # answered again, not "already exists"
    assert loop.handle({"op": "create_sampler", "model_id": "dup-s", "uri": None}) == []
    assert loop.handle({"op": "create_sampler", "model_id": "dup-s", "uri": None}) == []
    assert loop.handle(sample("dup-s", 0, "s0")) == []
    assert loop.handle(sample("dup-s", 0, "s0")) == []
    assert loop.handle(fb("dup", 1, "f1")) == [] and loop.handle(fb("dup", 1, "f1")) == []
    done = loop.step() + loop.step() + loop.step()
    assert sorted(o["future"] for o in done) == ["f1", "s0"]


class ClockTransport(ListTransport):
    """The queue on a fake clock: `arrivals` come at their (fake) times; a wait with nothing arriving moves
    the clock on by its whole timeout. The idle rule is tested in clock time, not by waiting."""

    def __init__(self, ops: list[dict], arrivals: list[tuple[float, dict]]) -> None:
        super().__init__(ops)
        self.now, self.arrivals = 0.0, list(arrivals)

    def wait(self, timeout: float) -> list[dict]:
        assert self.now < 100, "serve() never went idle"  # a hang guard in fake time
        if self.arrivals and self.arrivals[0][0] <= self.now + timeout:
            self.now, op = self.arrivals.pop(0)
            return [op]
        self.now += timeout
        return []


def test_serve_stops_after_idle_exit_s_without_work_and_parks_its_clients(tmp_path):
    spill = f"file://{tmp_path}/spill"
    server = ModelServer("tiny-qwen2", spill_uri=spill)
    ops = [
        {"op": "create_model", "future": "c", "model_id": "idle", "lora_config": {"rank": 4}},
        fb("idle", 1, "f1"),
    ]
    transport = ClockTransport(ops, arrivals=[(4.0, fb("idle", 2, "f2", forward_only=True))])
    serve(
        ServeLoop(server),
        transport,  # type: ignore[arg-type]
        idle_wait=1.0,
        should_stop=lambda: False,
        idle_exit_s=5,
        clock=lambda: transport.now,
    )
    # The call at t=4 restarted the idle count: it stopped at 4 + 5, not at 5.
    assert transport.now == 9.0
    assert [o["future"] for o in transport.posted] == ["c", "f1", "f2"]
    assert (tmp_path / "spill" / "next-seq" / "idle").read_text() == "3"  # parked: runs seq_id 3 next
    assert server.models == {}


def test_taking_back_a_parked_client_deletes_its_marker_before_its_state(tmp_path, monkeypatch):
    from gpu_runtime.model_server import engine

    spill = f"file://{tmp_path}/spill"
    server = ModelServer("tiny-qwen2", spill_uri=spill)
    loop = ServeLoop(server)
    loop.handle({"op": "create_model", "future": "c", "model_id": "p1", "lora_config": {"rank": 4}})
    assert server.park() == ["p1"]
    marker = tmp_path / "spill" / "next-seq" / "p1"
    assert marker.read_text() == "1" and (tmp_path / "spill" / "p1").is_dir()

    def crash(uri: str) -> None:
        raise RuntimeError("killed while removing the parked state")

    monkeypatch.setattr(engine.storage, "remove_dir", crash)
    with pytest.raises(RuntimeError, match="killed"):
        ModelServer("tiny-qwen2", spill_uri=spill).unpark("p1")
    # A crash in between leaves orphaned bytes, never a marker naming a half-removed state.
    assert not marker.exists() and (tmp_path / "spill" / "p1").is_dir()
    assert ModelServer("tiny-qwen2", spill_uri=spill).unpark("p1") is False
