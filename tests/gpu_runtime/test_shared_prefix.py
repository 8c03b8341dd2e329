"""Shared-prefix passes compute the same log-probs, gradients and samples as the plain per-sample passes."""

from __future__ import annotations

import pytest
import torch

from gpu_runtime.algorithms import LossNorm
from gpu_runtime.batch import Sample, collate
from gpu_runtime.models import load_model
from gpu_runtime.rollout.base import SamplingParams
from gpu_runtime.rollout.hf import HFEngine
from gpu_runtime.shared_prefix import plan_for_samples, plan_prefixes
from gpu_runtime.trainer import Trainer, token_logprobs
from tests.gpu_runtime.conftest import small_spec


def _group_samples() -> list[Sample]:
    """Two prompts of different lengths x 3 samples each, answers of different lengths, one multi-turn
    sample with environment tokens (mask 0) after its first answer, and one sample with its own prompt."""
    g = torch.Generator().manual_seed(0)
    rnd = lambda n: torch.randint(0, 256, (n,), generator=g).tolist()  # noqa: E731
    prompts = [rnd(9), rnd(6)]
    out = []
    for i in range(7):
        prompt = prompts[i // 3] if i < 6 else rnd(5)
        gen = rnd(2 + i % 3)
        ids, mask = prompt + gen, [0] * len(prompt) + [1] * len(gen)
        if i == 4:
            env, gen2 = rnd(3), rnd(2)
            ids, mask = ids + env + gen2, mask + [0] * 3 + [1] * 2
        adv = [(1.0 if i % 2 else -0.5) * m for m in mask]
        lp = [-0.1 * m for m in mask]
        out.append(Sample(ids, mask, lp, [0.0] * len(ids), 0.0, i // 3, advantages=adv))
    return out


def test_plan_groups_by_prompt_and_keeps_the_last_prompt_token_in_the_suffix():
    plan = plan_prefixes([[5, 6, 7, 1], [5, 6, 7, 2, 3], [9, 9, 1]], [3, 3, 2])
    assert plan.inverse.tolist() == [0, 0, 1]
    assert plan.prefix_ids.tolist() == [[5, 6, 7], [0, 9, 9]]  # left-padded
    assert plan.prefix_attn.tolist() == [[1, 1, 1], [0, 1, 1]]
    assert plan.prefix_pos.tolist() == [[0, 1, 2], [0, 0, 1]]
    assert plan.suffix_ids.tolist() == [[1, 0], [2, 3], [1, 0]]
    assert plan_prefixes([[1, 2, 3], [4, 5, 6]], [2, 2]) is None  # nothing shared: plain path
    # Prefixes are the leading untrained tokens minus one (that token's logits predict the first answer).
    s = Sample([1, 2, 3, 4], [0, 0, 0, 1], [0.0] * 4, [0.0] * 4, 0.0, 0)
    assert plan_for_samples([s, s]).prefix_ids.tolist() == [[1, 2]]


@pytest.fixture(scope="module")
def model():
    return load_model("tiny-qwen2", seed=3).model.train()


def test_logprobs_and_entropies_match_the_plain_forward(model):
    samples = _group_samples()
    mb = collate(samples)
    plan = plan_for_samples(samples)
    assert plan is not None and plan.prefix_ids.shape[0] == 3  # 7 samples, 3 distinct prompts
    with torch.no_grad():
        plain, ent_plain = token_logprobs(model, mb, 0.7, entropy=True)
        shared, ent_shared = token_logprobs(model, mb, 0.7, entropy=True, plan=plan)
    m = mb.loss_mask > 0
    assert m.sum() == sum(s.n_generated for s in samples)
    torch.testing.assert_close(shared[m], plain[m], atol=2e-5, rtol=0)
    torch.testing.assert_close(ent_shared[m], ent_plain[m], atol=2e-5, rtol=0)


@pytest.mark.parametrize("shared", [False, True])
def test_only_the_kept_positions_are_projected_onto_the_vocabulary(model, shared):
    """`keep` (the loss mask): the LM head sees only the columns some row trains on; those log-probs and
    entropies equal the full pass's, every other position reads exactly 0."""
    samples = _group_samples()
    mb = collate(samples)
    plan = plan_for_samples(samples) if shared else None
    rows: list[int] = []
    hook = model.lm_head.register_forward_hook(lambda _m, _i, out: rows.append(out.shape[:-1].numel()))
    try:
        with torch.no_grad():
            full, ent_full = token_logprobs(model, mb, 0.7, entropy=True, plan=plan)
            n_full = rows[-1]
            kept, ent_kept = token_logprobs(model, mb, 0.7, entropy=True, plan=plan, keep=mb.loss_mask)
            n_kept = rows[-1]
    finally:
        hook.remove()
    m = mb.loss_mask > 0
    cols = int(m.any(0).sum()) if plan is None else None
    assert n_kept < n_full
    if cols is not None:
        assert n_kept == len(samples) * cols
    torch.testing.assert_close(kept[m], full[m], atol=1e-6, rtol=0)
    torch.testing.assert_close(ent_kept[m], ent_full[m], atol=1e-6, rtol=0)
    assert kept.shape == full.shape and not kept[~m].any() and not ent_kept[~m].any()


def test_a_training_step_gives_the_same_gradient():
    samples = _group_samples()
    norm = LossNorm(sum(s.n_generated for s in samples), len(samples), norm_len=4, world_size=1)
    results = []
    for share in (False, True):
        t = Trainer(small_spec(learning_rate=1e-3, temperature=0.9))
        t.share_prefix = share
        sums = t.train_minibatch([Sample(**vars(s)) for s in samples], norm, n_micro=2)
        results.append((sums, {n: p.grad.clone() for n, p in t.model.named_parameters()}))
    (plain, g_plain), (shared, g_shared) = results
    assert plain["grad_norm"] > 0
    assert shared["grad_norm"] == pytest.approx(plain["grad_norm"], rel=1e-4)
    assert shared["loss"] == pytest.approx(plain["loss"], rel=1e-4, abs=1e-7)
    assert shared["tokens"] == plain["tokens"] == sum(s.n_generated for s in samples)
    scale = max(g.abs().max().item() for g in g_plain.values())
    worst = max((g_shared[k] - g_plain[k]).abs().max().item() for k in g_plain)
    assert worst < 1e-4 * scale, (worst, scale)


def test_rollout_with_a_shared_prefill_samples_the_same_tokens():
    lm = load_model("tiny-qwen2", seed=1)
    engine = HFEngine(lm.model, pad_id=lm.tokenizer.pad_token_id)
    prompts = [[257, 117, 10, 49, 50, 51]] * 3 + [[257, 10, 51, 52]] * 3 + [[257, 9, 9]]
    sp = SamplingParams(max_new_tokens=6, temperature=1.3, stop_ids=(258,))
    runs = []
    for share in (False, True):
        engine.share_prefix = share
        torch.manual_seed(5)
        runs.append(engine.generate(prompts, sp))
    assert runs[0].token_ids == runs[1].token_ids
    assert len({tuple(t) for t in runs[1].token_ids[:3]}) > 1  # a group's samples differ from each other
    for a, b in zip(runs[0].logprobs, runs[1].logprobs, strict=True):
        assert max(abs(x - y) for x, y in zip(a, b, strict=True)) < 1e-4
