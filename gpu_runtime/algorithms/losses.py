"""Losses and their aggregation.

Every loss is computed per token and then aggregated with `aggregate`, whose denominators (`LossNorm`) are
counted over the GLOBAL mini-batch (all micro-batches on all ranks) before the first micro-batch runs. Each
micro-batch's loss is then a partial sum of the one global loss, so gradient accumulation adds up to exactly
the single-batch gradient; nothing is divided again by the number of micro-batches (checklist item 1).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

LossAgg = Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"]
KLEstimator = Literal["k1", "k2", "k3"]


@dataclass(frozen=True)
class LossNorm:
    """Denominators of one optimizer step, counted over the whole mini-batch on every rank."""

    tokens: int  # generated (mask 1) tokens
    seqs: int  # sequences with at least one generated token
    norm_len: int = 1  # Dr.GRPO's constant length for seq-mean-token-sum-norm (max_new_tokens)
    # FSDP/DDP average gradients over ranks; a loss that is already a global sum is multiplied back by it.
    world_size: int = 1


def aggregate(loss: Tensor, mask: Tensor, mode: LossAgg, norm: LossNorm) -> Tensor:
    """This micro-batch's share of the global aggregated loss.

    - token-mean: sum over all tokens / global token count (DAPO, Yu et al. 2025, eq. 8).
    - seq-mean-token-mean: mean over sequences of each sequence's token mean (original GRPO).
    - seq-mean-token-sum-norm: token sums / (global sequences * norm_len) (Dr.GRPO: no length bias).
    """
    m = mask.to(loss.dtype)
    if mode == "token-mean":
        total = (loss * m).sum() / max(norm.tokens, 1)
    elif mode == "seq-mean-token-mean":
        per_seq = (loss * m).sum(-1) / m.sum(-1).clamp(min=1)
        total = per_seq.sum() / max(norm.seqs, 1)
    elif mode == "seq-mean-token-sum-norm":
        total = (loss * m).sum() / (max(norm.seqs, 1) * norm.norm_len)
    else:
        raise ValueError(f"unknown loss aggregation {mode!r}")
    return total * norm.world_size


def kl_estimate(logp: Tensor, ref_logp: Tensor, estimator: KLEstimator, clamp: float = 20.0) -> Tensor:
    """Per-token estimate of KL(pi || pi_ref) from samples of pi.

    Schulman 2020, "Approximating KL Divergence".

    With log r = log pi_ref - log pi (clamped to +-`clamp` so one outlier token cannot overflow exp):
    k1 = -log r (unbiased, high variance), k2 = (log r)^2 / 2 (biased, low variance), k3 = r - 1 - log r
    (unbiased, always >= 0). As a loss, k3's gradient is a biased estimate of the KL gradient; k1 in the
    reward is the textbook choice. Callers put KL in the reward or in the loss, never both.
    """
    log_r = (ref_logp - logp).clamp(-clamp, clamp)
    if estimator == "k1":
        return -log_r
    if estimator == "k2":
        return 0.5 * log_r**2
    if estimator == "k3":
        return torch.exp(log_r) - 1 - log_r
    raise ValueError(f"unknown KL estimator {estimator!r}")


@dataclass
class PolicyLossOut:
    loss: Tensor  # per token, before aggregation
    ratio: Tensor
    clipped: Tensor  # 1.0 where the clipped branch was taken (the gradient is zero there)
    is_weight: Tensor  # truncated importance weight (1 without TIS)


def policy_loss(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    *,
    clip_low: float,
    clip_high: float,
    rollout_logp: Tensor | None = None,
    tis_cap: float | None = None,
) -> PolicyLossOut:
    """PPO clipped surrogate (Schulman et al. 2017, eq. 7), per token, as a loss to minimize:

        L_t = -min(rho_t A_t, clip(rho_t, 1 - eps_low, 1 + eps_high) A_t),   rho_t = pi(a_t) / pi_old(a_t)

    with DAPO's decoupled clip-higher (eps_high > eps_low, Yu et al. 2025). `old_logp` are the trainer's
    log-probs frozen before the first update, so rho = 1 exactly on the first mini-batch of an on-policy step.

    Truncated importance sampling (Yao et al. 2025, "Your Efficient RL Framework Secretly Brings You
    Off-Policy RL Training"): the sampler (rollout engine) and the trainer disagree slightly on log-probs, so
    the loss is re-weighted by w_t = min(pi_old(a_t) / pi_rollout(a_t), C), detached.
    """
    ratio = torch.exp(logp - old_logp)
    surr = ratio * advantages
    surr_clipped = ratio.clamp(1 - clip_low, 1 + clip_high) * advantages
    loss = -torch.minimum(surr, surr_clipped)
    clipped = (surr_clipped < surr).to(logp.dtype)
    weight = torch.ones_like(logp)
    if tis_cap is not None:
        if rollout_logp is None:
            raise ValueError("tis_cap needs the rollout log-probs")
        weight = torch.exp(old_logp - rollout_logp).clamp(max=tis_cap).detach()
        loss = loss * weight
    return PolicyLossOut(loss=loss, ratio=ratio.detach(), clipped=clipped, is_weight=weight)


def value_loss(values: Tensor, old_values: Tensor, returns: Tensor, clip: float) -> Tensor:
    """PPO clipped value loss (as in OpenAI baselines' ppo2), per token: 0.5 max((V-R)^2, (clip(V)-R)^2)."""
    v_clipped = old_values + (values - old_values).clamp(-clip, clip)
    return 0.5 * torch.maximum((values - returns) ** 2, (v_clipped - returns) ** 2)


def sft_loss(logp: Tensor) -> Tensor:
    """Negative log-likelihood per token; masks (prompt, other roles) are applied by `aggregate`."""
    return -logp
