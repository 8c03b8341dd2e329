"""HF rollout engine and the protocol-driven collector."""

from __future__ import annotations

import pytest
import torch

from gpu_runtime.batch import collate
from gpu_runtime.models import build_byte_tokenizer, load_model
from gpu_runtime.rollout.base import SamplingParams
from gpu_runtime.rollout.collector import episode_to_sample, run_episodes
from gpu_runtime.rollout.hf import HFEngine
from gpu_runtime.trainer import token_logprobs
from opentinker.env.base import Environment, Observation, StepResult
from opentinker.env.builtin.arithmetic import ArithmeticEnv
from opentinker.env.codec import HFChatCodec
from opentinker.env.protocol import Budget, protocol_for


@pytest.fixture(scope="module")
def engine():
    lm = load_model("tiny-qwen2", seed=1)
    return HFEngine(lm.model, pad_id=lm.tokenizer.pad_token_id)


def test_tokenizer_is_byte_level_with_chatml():
    tok = build_byte_tokenizer()
    assert len(tok) == 259
    assert tok.encode("12 + é") == [49, 50, 32, 43, 32, 0xC3, 0xA9]
    assert tok.decode(tok.encode("any text ✓")) == "any text ✓"
    ids = tok.apply_chat_template(
        [{"role": "user", "content": "hi"}], add_generation_prompt=True, return_dict=False
    )
    assert tok.decode(ids) == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_preset_sizes():
    tiny = load_model("tiny-qwen2").model
    assert 2e6 < sum(p.numel() for p in tiny.parameters()) < 5e6


def test_generate_returns_logprobs_matching_the_trainer(engine):
    torch.manual_seed(0)
    prompts = [[257, 117, 10, 49, 50], [257, 10, 51]]  # different lengths: left padding
    sp = SamplingParams(max_new_tokens=6, temperature=0.8, stop_ids=(258,))
    res = engine.generate(prompts, sp)
    assert [len(t) for t in res.token_ids] == [len(lp) for lp in res.logprobs]
    from gpu_runtime.batch import Sample

    samples = [
        Sample(p + g, [0] * len(p) + [1] * len(g), [0.0] * len(p) + lp, [], 0.0, 0)
        for p, g, lp in zip(prompts, res.token_ids, res.logprobs, strict=True)
    ]
    mb = collate(samples)
    with torch.no_grad():
        lp, _ = token_logprobs(engine.model, mb, 0.8)
    gap = ((lp - mb.rollout_logprobs).abs() * mb.loss_mask).max().item()
    assert gap < 1e-4  # same weights, same temperature: rollout and trainer agree


def test_generation_stops_at_the_stop_id_and_is_seeded(engine):
    sp = SamplingParams(max_new_tokens=40, temperature=5.0, stop_ids=tuple(range(0, 259, 2)))
    torch.manual_seed(3)
    a = engine.generate([[1, 2, 3]] * 4, sp)
    torch.manual_seed(3)
    b = engine.generate([[1, 2, 3]] * 4, sp)
    assert a.token_ids == b.token_ids
    for ids, fin in zip(a.token_ids, a.finished, strict=True):
        assert fin == (ids[-1] % 2 == 0)
        assert all(t % 2 == 1 for t in ids[:-1])


def test_hf_engine_samples_a_batch_from_its_requests_seeds(engine):
    # HFEngine samples batch-wise: its noise comes from the batch's seeds (the collector's per-request ones),
    # not from torch's global RNG, which every rollout worker of a step seeds alike (same step seed): two
    # workers' parts would otherwise draw the very same noise row for row.
    sp = SamplingParams(max_new_tokens=12, temperature=5.0)
    prompts = [[1, 2, 3]] * 4
    torch.manual_seed(3)
    a = engine.generate(prompts, sp, [11, 12, 13, 14])
    torch.manual_seed(3)
    b = engine.generate(prompts, sp, [21, 22, 23, 24])  # another part of the step, same global state
    c = engine.generate(prompts, sp, [11, 12, 13, 14])  # other global state, same requests
    assert a.token_ids != b.token_ids
    assert c.token_ids == a.token_ids


def test_load_weights_is_strict(engine):
    with pytest.raises(RuntimeError):
        engine.load_weights({"nope": torch.zeros(1)})


class TwoTurnEnv(Environment):
    """Turn 1 earns 0.25, turn 2 earns 1.0; then done."""

    name = "two-turn"

    def reset(self, seed: int) -> Observation:
        self.turn = 0
        return Observation(f"start {seed}")

    def step(self, action: str) -> StepResult:
        self.turn += 1
        if self.turn == 1:
            return StepResult(Observation("again"), 0.25, False)
        return StepResult(None, 1.0, True)


def test_collector_multi_turn_masks_env_tokens_and_places_turn_rewards(engine):
    tok = build_byte_tokenizer()
    codec = HFChatCodec(tok)
    proto = protocol_for("multi-turn", Budget(max_turns=4, max_new_tokens=3))
    sp = SamplingParams(max_new_tokens=3, stop_ids=(tok.eos_token_id,))
    torch.manual_seed(0)
    eps = run_episodes(TwoTurnEnv, proto, codec, engine, sp, [5, 5, 6])
    assert len(eps) == 3
    for ep in eps:
        s = episode_to_sample(ep, 0)
        assert len(ep.turns) == 2 and s.reward == 1.25
        t1, t2 = ep.turns
        # generated spans are mask 1; the env's "again" message between them is mask 0
        assert all(s.mask[i] == 1 for i in range(t1.start, t1.end))
        assert all(s.mask[i] == 0 for i in range(t1.end, t2.start))
        assert sum(s.mask) == (t1.end - t1.start) + (t2.end - t2.start)
        assert "again" in tok.decode(s.token_ids[t1.end : t2.start])
        assert s.token_rewards[t1.end - 1] == 0.25 and s.token_rewards[t2.end - 1] == 1.0
        assert sum(s.token_rewards) == 1.25
        assert s.rollout_logprobs[t2.start] != 0.0 and s.rollout_logprobs[t2.start - 1] == 0.0


def test_collector_multi_turn_tokens_do_not_depend_on_the_split():
    """Per-request seeds (base from the global RNG, step-wide episode index, turn): two multi-turn episodes
    collected as a part starting at index 2 get the tokens they get in the whole call."""
    from gpu_runtime.rollout.decode import StaticDecodeEngine
    from tests.gpu_runtime.test_decode import _model

    tok = build_byte_tokenizer()
    ours = StaticDecodeEngine(_model(), pad_id=tok.pad_token_id)
    proto = protocol_for("multi-turn", Budget(max_turns=4, max_new_tokens=6))
    sp = SamplingParams(max_new_tokens=6, stop_ids=(tok.eos_token_id,))

    def run(seeds: list[int], first: int, torch_seed: int = 3) -> list[list[int]]:
        torch.manual_seed(torch_seed)
        eps = run_episodes(TwoTurnEnv, proto, HFChatCodec(tok), ours, sp, seeds, first)
        return [list(ep.token_ids) for ep in eps]

    whole = run([5, 5, 6, 7], 0)
    assert run([6, 7], 2) == whole[2:] and run([5, 5], 0) == whole[:2]
    assert run([6, 7], 0) != whole[2:]  # other indices, other noise
    assert whole[0] != whole[1]  # one prompt, two episodes: two samples
    assert run([5, 5, 6, 7], 0, torch_seed=4) != whole


def test_collector_on_arithmetic_groups_share_the_problem(engine):
    tok = build_byte_tokenizer()
    proto = protocol_for("single-turn", Budget(max_turns=1, max_new_tokens=4))
    sp = SamplingParams(max_new_tokens=4, stop_ids=(tok.eos_token_id,))
    eps = run_episodes(ArithmeticEnv, proto, HFChatCodec(tok), engine, sp, [11, 11, 12])
    prompts = [tok.decode(ep.token_ids[: ep.prompt_len]) for ep in eps]
    assert prompts[0] == prompts[1] != prompts[2]
    assert "What is" in prompts[0] and prompts[0].endswith("<|im_start|>assistant\n")
