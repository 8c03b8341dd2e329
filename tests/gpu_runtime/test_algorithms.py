"""Hand-computed numbers for the RL correctness checklist (shared/design/CONVENTIONS.md)."""

from __future__ import annotations

import math

import pytest
import torch

from gpu_runtime.algorithms import (
    LossNorm,
    aggregate,
    gae_advantages,
    grpo_advantages,
    kl_estimate,
    policy_loss,
    reinforce_pp_advantages,
    rloo_advantages,
)
from gpu_runtime.algorithms.advantages import discounted_returns

T = torch.tensor


# ---- item 5: advantages grouped by prompt id; std optional; zero-variance groups, groups of one ---
def test_grpo_groups_by_prompt_id_not_position():
    # group 7 = {1, 0, 0, 1} interleaved with group 3 = {1, 1, 1} (zero variance) and group 9 = {0.5} (alone)
    rewards = T([1.0, 1.0, 0.0, 1.0, 0.0, 1.0, 1.0, 0.5])
    groups = T([7, 3, 7, 3, 7, 3, 7, 9])
    adv = grpo_advantages(rewards, groups, eps=0.0)
    a = 0.5 / math.sqrt(1 / 3)  # group 7: mean 0.5, unbiased std sqrt(1/3) -> +-0.866
    torch.testing.assert_close(adv, T([a, 0.0, -a, 0.0, -a, 0.0, a, 0.0]))


def test_zero_variance_group_is_exactly_zero_even_for_inexact_floats():
    # 0.1 * 3 / 3 != 0.1 in float32 arithmetic; the advantage must still be exactly 0, not 0/eps noise.
    adv = grpo_advantages(T([0.1, 0.1, 0.1]), T([0, 0, 0]))
    assert adv.tolist() == [0.0, 0.0, 0.0]


def test_dr_grpo_drops_std_normalization():
    adv = grpo_advantages(T([1.0, 0.0, 0.0, 1.0]), T([0, 0, 0, 0]), norm_by_std=False)
    assert adv.tolist() == [0.5, -0.5, -0.5, 0.5]


def test_group_of_one_gets_zero_advantage():
    assert grpo_advantages(T([1.0]), T([0])).tolist() == [0.0]
    assert rloo_advantages(T([1.0]), T([0])).tolist() == [0.0]


def test_rloo_leave_one_out_baseline():
    # r_0 = 1, the others' mean = 1/3 -> 2/3; r_1 = 0, the others' mean = 2/3 -> -2/3
    adv = rloo_advantages(T([1.0, 0.0, 0.0, 1.0, 5.0]), T([0, 0, 0, 0, 1]))
    torch.testing.assert_close(adv, T([2 / 3, -2 / 3, -2 / 3, 2 / 3, 0.0]))


# ---- item 2: KL estimators with clamping ---------------------------------------------------------------
def test_kl_estimators_values():
    logp, ref = T([math.log(0.5)]), T([math.log(0.25)])  # log r = log(ref/p) = log 0.5
    lr = math.log(0.5)
    torch.testing.assert_close(kl_estimate(logp, ref, "k1"), T([-lr]))  # 0.6931
    torch.testing.assert_close(kl_estimate(logp, ref, "k2"), T([0.5 * lr * lr]))  # 0.2402
    torch.testing.assert_close(kl_estimate(logp, ref, "k3"), T([0.5 - 1 - lr]))  # 0.1931
    assert kl_estimate(T([0.0]), T([0.0]), "k3").item() == 0.0


def test_kl_log_ratio_is_clamped():
    k3 = kl_estimate(T([0.0]), T([-100.0]), "k3", clamp=20.0)
    assert math.isfinite(k3.item())
    torch.testing.assert_close(k3, T([math.exp(-20.0) - 1 + 20.0]))
    big = kl_estimate(T([-100.0]), T([0.0]), "k3", clamp=20.0)  # exp(+100) would overflow float32
    torch.testing.assert_close(big, T([math.exp(20.0) - 1 - 20.0]))


# ---- items 3, 4: the clipped objective, clip-higher, truncated importance sampling ----------------------
def test_policy_loss_clip_higher_branches():
    old = T([0.0, 0.0, 0.0, 0.0])
    logp = T([math.log(1.5), math.log(1.5), math.log(0.5), math.log(0.5)])
    adv = T([1.0, -1.0, 1.0, -1.0])
    out = policy_loss(logp, old, adv, clip_low=0.2, clip_high=0.28)
    # ratio 1.5, A>0: min(1.5, 1.28) -> 1.28 clipped; A<0: min(-1.5, -1.28) = -1.5 unclipped
    # ratio 0.5, A>0: min(0.5, 0.8) = 0.5 unclipped; A<0: min(-0.5, -0.8) = -0.8 clipped
    torch.testing.assert_close(out.loss, T([-1.28, 1.5, -0.5, 0.8]))
    assert out.clipped.tolist() == [1.0, 0.0, 0.0, 1.0]


def test_ratio_is_exactly_one_when_old_is_current():
    logp = torch.randn(5, requires_grad=True)
    out = policy_loss(logp, logp.detach(), torch.ones(5), clip_low=0.2, clip_high=0.2)
    assert out.ratio.tolist() == [1.0] * 5
    out.loss.sum().backward()
    # d/dlogp of -ratio*A at ratio 1 is -A: the REINFORCE gradient
    assert logp.grad.tolist() == [-1.0] * 5


def test_truncated_importance_sampling_weight():
    old = T([math.log(0.6), math.log(0.2)])
    rollout = T([math.log(0.2), math.log(0.4)])  # old/rollout = 3 (capped to 2) and 0.5
    out = policy_loss(
        old.clone(), old, T([1.0, 1.0]), clip_low=0.2, clip_high=0.2, rollout_logp=rollout, tis_cap=2.0
    )
    torch.testing.assert_close(out.is_weight, T([2.0, 0.5]))
    torch.testing.assert_close(out.loss, T([-2.0, -0.5]))


# ---- item 1: aggregation with global denominators ---------------------------------------------------------
LOSS = T([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0], [1.0, 1.0, 0.0]])
MASK = T([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])  # row 2: first token is an env token


@pytest.mark.parametrize(
    ("mode", "expected"),
    [
        ("token-mean", (6 + 4 + 1) / 5),
        ("seq-mean-token-mean", (2 + 4 + 1) / 3),
        ("seq-mean-token-sum-norm", (6 + 4 + 1) / (3 * 4)),
    ],
)
def test_aggregate_modes_and_micro_batches_sum_to_the_global_value(mode, expected):
    norm = LossNorm(tokens=5, seqs=3, norm_len=4)
    full = aggregate(LOSS, MASK, mode, norm)
    assert full.item() == pytest.approx(expected)
    # uneven micro-batches [row 0, row 1] + [row 2], each with the GLOBAL norm: the parts add up exactly
    parts = aggregate(LOSS[:2], MASK[:2], mode, norm) + aggregate(LOSS[2:], MASK[2:], mode, norm)
    assert parts.item() == pytest.approx(expected)


def _grads(mode: str, chunks: list[slice], world_size: int = 1) -> torch.Tensor:
    torch.manual_seed(0)
    w = torch.randn(3, requires_grad=True)
    x = torch.randn(4, 5, 3)
    mask = T([[1, 1, 1, 0, 0], [1, 0, 0, 0, 0], [0, 1, 1, 1, 1], [1, 1, 0, 1, 0]]).float()
    norm = LossNorm(tokens=int(mask.sum()), seqs=4, norm_len=5, world_size=world_size)
    for sl in chunks:
        tok = (x[sl] @ w) ** 2
        aggregate(tok, mask[sl], mode, norm).backward()
    return w.grad.clone()


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
def test_gradient_accumulation_equals_single_batch(mode):
    single = _grads(mode, [slice(0, 4)])
    accumulated = _grads(mode, [slice(0, 1), slice(1, 4)])  # uneven micro-batches
    torch.testing.assert_close(accumulated, single, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
def test_two_ranks_averaged_equal_single_rank(mode):
    # Rank 0 gets rows 0-2 (two uneven micro-batches), rank 1 row 3; FSDP/DDP then average the two.
    single = _grads(mode, [slice(0, 4)])
    r0 = _grads(mode, [slice(0, 2), slice(2, 3)], world_size=2)
    r1 = _grads(mode, [slice(3, 4)], world_size=2)
    torch.testing.assert_close((r0 + r1) / 2, single, rtol=1e-6, atol=1e-7)


def test_naive_per_micro_batch_mean_would_differ():
    # The bug the global denominator prevents: averaging per-micro-batch token means.
    torch.manual_seed(0)
    a = (LOSS[:1] * MASK[:1]).sum() / MASK[:1].sum()
    b = (LOSS[1:] * MASK[1:]).sum() / MASK[1:].sum()
    assert ((a + b) / 2).item() != pytest.approx(aggregate(LOSS, MASK, "token-mean", LossNorm(5, 3)).item())


# ---- token-level estimators: env tokens skipped ----------------------------------------------------------
def test_gae_hand_computed():
    r, v, m = T([[0.0, 0.0, 1.0]]), T([[0.5, 0.5, 0.5]]), T([[1.0, 1.0, 1.0]])
    adv, ret = gae_advantages(r, v, m, gamma=1.0, lam=1.0)
    torch.testing.assert_close(adv, T([[0.5, 0.5, 0.5]]))
    torch.testing.assert_close(ret, T([[1.0, 1.0, 1.0]]))
    adv, _ = gae_advantages(r, v, m, gamma=1.0, lam=0.5)
    torch.testing.assert_close(adv, T([[0.125, 0.25, 0.5]]))


def test_gae_skips_environment_tokens():
    # token 1 is an environment token (mask 0) with a garbage value: it must not enter any delta
    r, v, m = T([[0.0, 0.0, 0.0, 1.0]]), T([[0.5, 9.0, 0.5, 0.5]]), T([[1.0, 0.0, 1.0, 1.0]])
    adv, _ = gae_advantages(r, v, m, gamma=1.0, lam=0.5)
    torch.testing.assert_close(adv, T([[0.125, 0.0, 0.25, 0.5]]))


def test_discounted_returns_pass_through_env_tokens():
    ret = discounted_returns(T([[0.0, 5.0, 0.0, 1.0]]), T([[1.0, 0.0, 1.0, 1.0]]), gamma=0.5)
    # the 5.0 sits on an env token (masked): ignored. G_3 = 1, G_2 = 0.5, G_0 = 0.25
    torch.testing.assert_close(ret, T([[0.25, 0.0, 0.5, 1.0]]))


def test_reinforce_pp_whitens_over_generated_tokens():
    adv = reinforce_pp_advantages(T([[0.0, 0.0, 1.0], [0.0, 0.0, 0.0]]), torch.ones(2, 3))
    std = math.sqrt(6 * 0.25 / 5)
    torch.testing.assert_close(adv, T([[0.5 / std] * 3, [-0.5 / std] * 3]))


def test_minibatches_hold_whole_groups_in_a_seeded_order():
    import random

    from gpu_runtime.batch import Sample
    from gpu_runtime.controller import minibatch_parts

    samples = [Sample([1, 2], [0, 1], [0.0, 0.0], [0.0, 0.0], 0.0, g) for g in (7, 7, 3, 3, 5, 5, 9, 9, 1, 1)]
    parts = minibatch_parts(samples, 2, random.Random(0))
    assert sorted(len(p) for p in parts) == [4, 6]  # 5 groups of 2 dealt to 2 parts
    groups = [{s.group_id for s in p} for p in parts]
    assert groups[0].isdisjoint(groups[1]) and groups[0] | groups[1] == {1, 3, 5, 7, 9}
    again = minibatch_parts(samples, 2, random.Random(0))
    assert [[id(s) for s in p] for p in again] == [[id(s) for s in p] for p in parts]
    assert minibatch_parts(samples, 1, random.Random(0))[0] != []
