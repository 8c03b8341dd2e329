"""Advantage estimators.

Outcome estimators (GRPO, RLOO) give one scalar per sequence from its group (the samples of one prompt);
token-level ones (REINFORCE++, GAE) read per-token rewards, where the runtime puts each turn's reward on the
turn's last generated token. `mask` marks generated tokens; environment tokens (mask 0) are skipped, so a
multi-turn episode's return flows across them as if they were not there.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def _group_stats(rewards: Tensor, group_ids: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Per-sample group size, group mean and unbiased group std (0 for groups of one)."""
    _, inverse, counts = torch.unique(group_ids, return_inverse=True, return_counts=True)
    n_groups = counts.numel()
    r = rewards.double()  # float64 sums: identical rewards give an exactly zero deviation
    sums = torch.zeros(n_groups, dtype=torch.float64).index_add_(0, inverse, r)
    mean = sums / counts
    dev2 = torch.zeros(n_groups, dtype=torch.float64).index_add_(0, inverse, (r - mean[inverse]) ** 2)
    var = torch.where(counts > 1, dev2 / (counts - 1).clamp(min=1), torch.zeros_like(dev2))
    return counts[inverse], mean[inverse], var.sqrt()[inverse]


def baseline_groups(group_ids: Tensor, roles: Sequence[str] | None = None) -> Tensor:
    """The baseline key of each sample: its prompt's group, split by role when roles are given.

    Multi-agent (checklist item 7): in one game seed's group the roles' rewards are of opposite sign under a
    zero-sum assignment, so one mean across roles would be ~0 and turn every loss of the weaker role into a
    "below average" signal for both roles alike. Each (group, role) pair gets its own baseline instead.
    """
    if roles is None or len(set(roles)) <= 1:
        return group_ids
    if len(roles) != group_ids.numel():
        raise ValueError(f"{len(roles)} roles for {group_ids.numel()} samples")
    keys: dict[tuple[int, str], int] = {}
    ids = [keys.setdefault((int(g), r), len(keys)) for g, r in zip(group_ids.tolist(), roles, strict=True)]
    return torch.tensor(ids, dtype=torch.long)


def grpo_advantages(
    rewards: Tensor,
    group_ids: Tensor,
    *,
    norm_by_std: bool = True,
    eps: float = 1e-6,
    roles: Sequence[str] | None = None,
) -> Tensor:
    """GRPO (Shao et al. 2024, DeepSeekMath, eq. 3 outcome supervision): A_i = (r_i - mean(r_g)) / std(r_g).

    Dr.GRPO (Liu et al. 2025, "Understanding R1-Zero-Like Training") drops the division by std
    (`norm_by_std=False`): it up-weights easy and hard prompts.
    Groups are by prompt id, never across the batch, and by role when `roles` is given (per-role baselines,
    see `baseline_groups`).
    A zero-variance group (all right or all wrong) carries no signal: its advantages are exactly 0, not
    0/eps noise. A group of one has no baseline: advantage 0.
    """
    size, mean, std = _group_stats(rewards, baseline_groups(group_ids, roles))
    adv = rewards.double() - mean
    if norm_by_std:
        adv = adv / (std + eps)
    adv = torch.where((size > 1) & (std > 0), adv, torch.zeros_like(adv))
    return adv.to(rewards.dtype)


def rloo_advantages(rewards: Tensor, group_ids: Tensor, *, roles: Sequence[str] | None = None) -> Tensor:
    """RLOO (Ahmadian et al. 2024, "Back to Basics"): A_i = r_i - 1/(k-1) * sum_{j != i} r_j.

    Equivalently k/(k-1) * (r_i - mean). A group of one has no leave-one-out baseline: advantage 0.
    With `roles`, the other samples j are those of the same group AND role (per-role baselines).
    """
    size, mean, _ = _group_stats(rewards, baseline_groups(group_ids, roles))
    k = size.double()
    adv = k / (k - 1).clamp(min=1) * (rewards.double() - mean)
    return torch.where(size > 1, adv, torch.zeros_like(adv)).to(rewards.dtype)


def discounted_returns(token_rewards: Tensor, mask: Tensor, gamma: float = 1.0) -> Tensor:
    """G_t = sum_{s >= t, mask_s = 1} gamma^(#generated tokens between t and s) r_s, on generated tokens."""
    returns = torch.zeros_like(token_rewards)
    running = torch.zeros(token_rewards.shape[0], dtype=token_rewards.dtype)
    for t in reversed(range(token_rewards.shape[1])):
        m = mask[:, t].to(token_rewards.dtype)
        # Environment tokens (m = 0) neither add reward nor discount: the running return passes through.
        running = torch.where(m > 0, token_rewards[:, t] + gamma * running, running)
        returns[:, t] = running * m
    return returns


def reinforce_pp_advantages(
    token_rewards: Tensor, mask: Tensor, *, gamma: float = 1.0, eps: float = 1e-8
) -> Tensor:
    """REINFORCE++ (Hu 2025, arXiv 2501.03262): token returns (KL penalty already in `token_rewards`),
    whitened over all generated tokens of the global batch: A = (G - mean(G)) / std(G)."""
    returns = discounted_returns(token_rewards, mask, gamma)
    m = mask.bool()
    vals = returns[m]
    if vals.numel() < 2:
        return torch.zeros_like(returns)
    mean, std = vals.mean(), vals.std()
    return torch.where(m, (returns - mean) / (std + eps), torch.zeros_like(returns))


def gae_advantages(
    token_rewards: Tensor, values: Tensor, mask: Tensor, *, gamma: float = 1.0, lam: float = 0.95
) -> tuple[Tensor, Tensor]:
    """GAE (Schulman et al. 2016, eq. 16):

        delta_t = r_t + gamma V(t+1) - V(t),   A_t = sum_l (gamma lam)^l delta_{t+l}.


    Time runs over generated tokens only; after the last one V = 0 (terminal). Returns (advantages, returns),
    returns = A + V being the critic's regression target.
    """
    adv = torch.zeros_like(token_rewards)
    last_gae = torch.zeros(token_rewards.shape[0], dtype=token_rewards.dtype)
    next_value = torch.zeros_like(last_gae)
    for t in reversed(range(token_rewards.shape[1])):
        m = mask[:, t] > 0
        delta = token_rewards[:, t] + gamma * next_value - values[:, t]
        gae = delta + gamma * lam * last_gae
        last_gae = torch.where(m, gae, last_gae)
        next_value = torch.where(m, values[:, t], next_value)
        adv[:, t] = torch.where(m, gae, torch.zeros_like(gae))
    returns = (adv + values) * mask.to(values.dtype)
    return adv, returns
