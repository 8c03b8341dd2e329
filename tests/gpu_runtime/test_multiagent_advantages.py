"""Per-role baselines (checklist item 7) in GRPO and RLOO, with hand-computed numbers.

One self-play group of 4 zero-sum games: X's rewards [1, -1, 1, 1], O's [-1, 1, -1, -1] (O won game 2).
Per role: X's mean is 0.5 and O's -0.5; the unbiased std of each is exactly 1 (deviations 0.5, 1.5, 0.5, 0.5:
squares sum to 3, over n - 1 = 3). One shared mean over all 8 samples is 0 with std sqrt(8/7), which would
make X's win in a game X usually wins worth as much as O's rare win: the wrong values checked below.
"""

from __future__ import annotations

import math

import pytest
import torch

from gpu_runtime.algorithms import grpo_advantages, rloo_advantages
from gpu_runtime.algorithms.advantages import baseline_groups

X_REWARDS = [1.0, -1.0, 1.0, 1.0]
O_REWARDS = [-1.0, 1.0, -1.0, -1.0]


def _group(order: str = "blocks"):
    """The 8 samples of one game-seed group, either X's four then O's four, or interleaved by game."""
    if order == "blocks":
        rewards, roles = X_REWARDS + O_REWARDS, ["x"] * 4 + ["o"] * 4
    else:
        rewards = [r for pair in zip(X_REWARDS, O_REWARDS, strict=True) for r in pair]
        roles = ["x", "o"] * 4
    return torch.tensor(rewards, dtype=torch.float64), torch.zeros(8, dtype=torch.long), roles


def _by_role(adv: torch.Tensor, roles: list[str]) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {}
    for a, r in zip(adv.tolist(), roles, strict=True):
        out.setdefault(r, []).append(a)
    return out


@pytest.mark.parametrize("order", ["blocks", "interleaved"])
def test_grpo_per_role_baselines_exact(order):
    rewards, groups, roles = _group(order)
    adv = _by_role(grpo_advantages(rewards, groups, eps=0.0, roles=roles), roles)
    assert adv == {"x": [0.5, -1.5, 0.5, 0.5], "o": [-0.5, 1.5, -0.5, -0.5]}
    # Dr.GRPO (no std): the same numbers here, since each role's std is exactly 1.
    adv = _by_role(grpo_advantages(rewards, groups, norm_by_std=False, roles=roles), roles)
    assert adv == {"x": [0.5, -1.5, 0.5, 0.5], "o": [-0.5, 1.5, -0.5, -0.5]}


def test_one_shared_mean_across_roles_gives_the_wrong_values():
    rewards, groups, roles = _group()
    shared = grpo_advantages(rewards, groups, eps=0.0).tolist()  # no roles: one baseline for all 8
    s = math.sqrt(8 / 7)
    assert shared == pytest.approx([1 / s, -1 / s, 1 / s, 1 / s, -1 / s, 1 / s, -1 / s, -1 / s], abs=1e-12)
    per_role = grpo_advantages(rewards, groups, eps=0.0, roles=roles).tolist()
    assert per_role[1] == -1.5 and shared[1] == pytest.approx(-0.9354143, abs=1e-6)  # X's one loss
    assert all(abs(a - b) > 0.4 for a, b in zip(per_role, shared, strict=True))


def test_rloo_per_role_leave_one_out_exact():
    rewards, groups, roles = _group()
    adv = rloo_advantages(rewards, groups, roles=roles).tolist()
    # k = 4 per role: A_i = r_i - mean(others of the same role) = 4/3 (r_i - mean_role).
    assert adv == pytest.approx([2 / 3, -2, 2 / 3, 2 / 3, -2 / 3, 2, -2 / 3, -2 / 3], abs=1e-12)
    # X's game-2 loss: the other three X samples average 1, so -1 - 1 = -2 (shared: 8/7 * -1).
    shared = rloo_advantages(rewards, groups).tolist()
    assert shared[1] == pytest.approx(-8 / 7, abs=1e-12)


def test_baseline_groups_split_groups_by_role_and_keep_single_role_batches_unchanged():
    groups = torch.tensor([7, 7, 9, 9, 7])
    keys = baseline_groups(groups, ["x", "o", "x", "o", "x"]).tolist()
    assert keys == [0, 1, 2, 3, 0]  # (7, x) (7, o) (9, x) (9, o) (7, x)
    assert baseline_groups(groups, ["agent"] * 5) is groups  # single-agent: exactly the old grouping
    assert baseline_groups(groups, None) is groups
    with pytest.raises(ValueError, match="3 roles for 5 samples"):
        baseline_groups(groups, ["x", "o", "x"])


def test_a_role_with_one_sample_in_its_group_gets_no_baseline():
    # Game seed 0 played twice, but O moved only in the first game: O's single sample has no baseline.
    rewards = torch.tensor([1.0, -1.0, 0.5], dtype=torch.float64)
    adv = grpo_advantages(rewards, torch.tensor([0, 0, 0]), roles=["x", "x", "o"], eps=0.0).tolist()
    assert adv == [pytest.approx(1 / math.sqrt(2)), pytest.approx(-1 / math.sqrt(2)), 0.0]
