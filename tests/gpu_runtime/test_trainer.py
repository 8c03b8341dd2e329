"""Trainer-level checklist items on the real tiny-qwen2: temperature, ratio 1, accumulation, masks, LoRA."""

from __future__ import annotations

import math

import pytest
import torch

from gpu_runtime.algorithms import LossNorm
from gpu_runtime.batch import Sample, collate, split_micro
from gpu_runtime.trainer import Trainer, token_logprobs
from tests.gpu_runtime.conftest import small_spec


def _samples(n: int = 5, seed: int = 0) -> list[Sample]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        prompt = torch.randint(0, 256, (4 + i,), generator=g).tolist()
        env = torch.randint(0, 256, (3,), generator=g).tolist()
        gen1 = torch.randint(0, 256, (2 + i % 3,), generator=g).tolist()
        gen2 = torch.randint(0, 256, (2,), generator=g).tolist()
        ids = prompt + gen1 + env + gen2
        mask = [0] * len(prompt) + [1] * len(gen1) + [0] * len(env) + [1] * len(gen2)
        adv = [float(i % 2 * 2 - 1) * m for m in mask]
        out.append(Sample(ids, mask, [0.0] * len(ids), [0.0] * len(ids), 0.0, i // 2, advantages=adv))
    return out


@pytest.fixture(scope="module")
def trainer():
    return Trainer(small_spec(temperature=0.7))


def test_trainer_logprobs_use_the_sampling_temperature(trainer):
    mb = collate(_samples(2))
    lp, _ = token_logprobs(trainer.model, mb, 0.7)
    logits = trainer.model(input_ids=mb.input_ids, attention_mask=mb.attention_mask).logits[:, :-1]
    manual = torch.log_softmax(logits / 0.7, -1).gather(-1, mb.target_ids.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(lp, manual)
    at_one = torch.log_softmax(logits, -1).gather(-1, mb.target_ids.unsqueeze(-1)).squeeze(-1)
    assert not torch.allclose(lp, at_one)


def test_collate_masks_prompt_and_environment_tokens():
    s = _samples(1)[0]
    mb = collate([s])
    # loss_mask[t-1] is the mask of token t: exactly the generated tokens, never prompt/env tokens
    assert mb.loss_mask[0].tolist() == [float(m) for m in s.mask[1:]]
    assert mb.target_ids[0].tolist() == s.token_ids[1:]


def _grads_after(trainer: Trainer, samples, n_micro: int) -> dict[str, torch.Tensor]:
    captured = {}

    def capture(model, opt):
        for n, p in model.named_parameters():
            if p.grad is not None:
                captured[n] = p.grad.clone()
        opt.zero_grad(set_to_none=True)
        return 0.0

    orig = trainer._step
    trainer._step = capture  # inspect gradients without stepping the optimizer
    try:
        norm = LossNorm(sum(s.n_generated for s in samples), len(samples), norm_len=4)
        sums = trainer.train_minibatch(samples, norm, n_micro)
    finally:
        trainer._step = orig
    return captured, sums


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
def test_gradient_accumulation_matches_one_batch_on_the_model(agg):
    t = Trainer(small_spec(loss_agg=agg))
    samples = _samples(5)
    one, sums1 = _grads_after(t, samples, 1)
    three, _ = _grads_after(t, samples, 3)  # micro-batches of 2, 2, 1
    assert sums1["ratio"] == sums1["tokens"]  # ratio exactly 1 on every token (one epoch, one mini-batch)
    assert sums1["clip"] == 0.0
    assert set(one) == set(three)
    for k in one:
        torch.testing.assert_close(three[k], one[k], rtol=1e-4, atol=1e-6)


def test_environment_tokens_do_not_affect_the_gradient(trainer):
    samples = _samples(3)
    base, _ = _grads_after(trainer, samples, 1)
    for s in samples:  # huge advantages on env/prompt tokens must change nothing
        s.advantages = [a if m else 1e6 for a, m in zip(s.advantages, s.mask, strict=True)]
    poisoned, _ = _grads_after(trainer, samples, 1)
    for k in base:
        torch.testing.assert_close(poisoned[k], base[k])


def test_frozen_old_logprobs_give_ratio_one_on_first_minibatch():
    t = Trainer(small_spec(epochs=2))
    samples = _samples(4)
    t.logprobs(samples, 2, old=True, ref=False, values=False)
    norm = LossNorm(sum(s.n_generated for s in samples), 4)
    first = t.train_minibatch(samples, norm, 2)
    assert first["ratio"] / first["tokens"] == pytest.approx(1.0, abs=1e-6)
    second = t.train_minibatch(samples, norm, 2)  # the policy moved: ratios now differ from 1
    assert abs(second["ratio"] / second["tokens"] - 1.0) > 1e-6


def test_kl_in_loss_uses_reference_and_starts_at_zero():
    t = Trainer(small_spec(kl_coef=0.1, kl_estimator="k3"))
    samples = _samples(3)
    t.logprobs(samples, 1, old=False, ref=True, values=False)
    norm = LossNorm(sum(s.n_generated for s in samples), 3)
    first = t.train_minibatch(samples, norm, 1)
    assert first["kl"] == 0.0  # policy == reference before the first update
    t.logprobs(samples, 1, old=False, ref=True, values=False)
    second = t.train_minibatch(samples, norm, 1)
    assert second["kl"] > 0.0 and math.isfinite(second["kl"])


def test_lora_update_reaches_the_rollout_weights():
    spec = small_spec(lora={"rank": 4, "alpha": 8.0})
    t = Trainer(spec)
    before = t.full_state_dict()
    samples = _samples(4)
    for _ in range(2):  # LoRA B starts at zero: the first step moves B only, the merged delta after two
        t.train_minibatch(samples, LossNorm(sum(s.n_generated for s in samples), 4), 1)
    after = t.full_state_dict()
    assert set(after) == set(before)
    assert not any("lora" in k for k in after)
    changed = [k for k in after if not torch.equal(after[k], before[k])]
    assert changed and all("proj" in k for k in changed)
    # the merged weights load strictly into a plain model (what the rollout engine does)
    from gpu_runtime.models import load_model

    plain = load_model("tiny-qwen2", seed=spec.seed).model
    plain.load_state_dict(after, strict=True)


def test_split_micro_pads_with_dummies_so_ranks_agree():
    chunks = split_micro(_samples(3), 4)
    assert len(chunks) == 4
    assert sum(s.group_id == -1 for c in chunks for s in c) == 1


def test_lora_adapter_starts_from_the_job_seed_whatever_the_global_generator_holds():
    def adapter(global_seed: int, job_seed: int) -> dict[str, torch.Tensor]:
        torch.manual_seed(global_seed)  # what earlier work in the process (or on another rank) left behind
        spec = small_spec(lora={"rank": 4, "alpha": 8.0}).model_copy(update={"seed": job_seed})
        t = Trainer(spec)
        return {k: v.detach().clone() for k, v in t.model.named_parameters() if "lora_A" in k}

    first, other_global, other_job = adapter(0, 1), adapter(123, 1), adapter(0, 2)
    assert first and set(first) == set(other_global)
    assert all(torch.equal(first[k], other_global[k]) for k in first)
    assert not any(torch.equal(first[k], other_job[k]) for k in first)
