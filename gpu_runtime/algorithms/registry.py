"""The algorithms a job can name, each as what sets it apart in the RL step: its advantage estimator, its
loss, and what its step needs besides the rollout (a critic, the reference model, frozen old log-probs).

One entry per name the spec accepts (`opentinker.spec.KIND_ALGORITHMS`); the spec refuses any other name when
it is validated, and `algorithm()` refuses one that reaches the runtime anyway. The estimators here read and
fill `Sample`s; the tensor math they call is in `advantages.py`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from gpu_runtime.algorithms.advantages import (
    gae_advantages,
    grpo_advantages,
    reinforce_pp_advantages,
    rloo_advantages,
)
from gpu_runtime.batch import Sample
from opentinker.spec import AlgorithmSpec

# Fills each sample's `advantages` (token-level estimators: `returns` too) from its (KL-shaped) token rewards.
Estimator = Callable[[list[Sample], AlgorithmSpec], None]
Loss = Literal["policy", "sft"]  # PPO's clipped surrogate (+ KL when placed in the loss); negative log-lik.


@dataclass(frozen=True)
class Algorithm:
    name: str
    loss: Loss | None  # None: the job trains nothing (eval)
    advantages: Estimator | None = None  # None: no advantages (SFT, eval)
    # A value model: values in the frozen pass (GAE reads them) and a critic update after each policy update.
    critic: bool = False
    # Always on (DAPO); for the others the spec's `dynamic_sampling` decides.
    dynamic_sampling: bool = False

    @property
    def old_logprobs(self) -> bool:
        """Whether an update reads the policy's log-probs frozen before the step's first update (the clipped
        ratio's denominator)."""
        return self.loss == "policy"

    def reference(self, a: AlgorithmSpec) -> bool:
        """Whether the step needs the reference model's log-probs (a KL term, in the reward or the loss)."""
        return self.loss == "policy" and a.kl_coef > 0


def _outcome(samples: list[Sample]) -> tuple[Tensor, Tensor, list[str]]:
    rewards = torch.tensor([sum(s.token_rewards) for s in samples], dtype=torch.float64)
    groups = torch.tensor([s.group_id for s in samples])
    roles = [s.role for s in samples]  # per-role baselines in self-play (checklist item 7)
    return rewards, groups, roles


def _per_sequence(samples: list[Sample], adv: Tensor) -> None:
    for s, v in zip(samples, adv.tolist(), strict=True):
        s.advantages = [v * m for m in s.mask]


def _grpo(samples: list[Sample], a: AlgorithmSpec) -> None:
    rewards, groups, roles = _outcome(samples)
    _per_sequence(samples, grpo_advantages(rewards, groups, norm_by_std=a.norm_adv_by_std, roles=roles))


def _dr_grpo(samples: list[Sample], a: AlgorithmSpec) -> None:
    # Dr.GRPO: no std normalization, whatever the spec says. Its constant-length token sum is the spec's
    # `loss_agg`, which defaults to seq-mean-token-sum-norm for dr_grpo (opentinker.spec.AlgorithmSpec).
    rewards, groups, roles = _outcome(samples)
    _per_sequence(samples, grpo_advantages(rewards, groups, norm_by_std=False, roles=roles))


def _rloo(samples: list[Sample], a: AlgorithmSpec) -> None:
    rewards, groups, roles = _outcome(samples)
    _per_sequence(samples, rloo_advantages(rewards, groups, roles=roles))


def _token_rows(samples: list[Sample]) -> tuple[Callable[[list[list[float]]], Tensor], Tensor, Tensor]:
    """A padder to [B, T] float64 rows, and the padded token rewards and generated-token mask."""
    width = max(len(s.token_ids) for s in samples)

    def pad(rows: list[list[float]]) -> Tensor:
        return torch.tensor([r + [0.0] * (width - len(r)) for r in rows], dtype=torch.float64)

    rewards = pad([s.token_rewards for s in samples])
    mask = pad([[float(m) for m in s.mask] for s in samples])
    return pad, rewards, mask


def _per_token(samples: list[Sample], adv: Tensor, returns: Tensor) -> None:
    for i, s in enumerate(samples):
        n = len(s.token_ids)
        s.advantages = adv[i, :n].tolist()
        s.returns = returns[i, :n].tolist()


def _reinforce_pp(samples: list[Sample], a: AlgorithmSpec) -> None:
    _, rewards, mask = _token_rows(samples)
    adv = reinforce_pp_advantages(rewards, mask, gamma=a.gae_gamma)
    _per_token(samples, adv, adv)


def _frozen_values(s: Sample) -> list[float]:
    assert s.values is not None, "the critic's values come from the frozen pass"
    return s.values


def _gae(samples: list[Sample], a: AlgorithmSpec) -> None:
    pad, rewards, mask = _token_rows(samples)
    values = pad([_frozen_values(s) for s in samples])
    adv, returns = gae_advantages(rewards, values, mask, gamma=a.gae_gamma, lam=a.gae_lambda)
    # PPO whitens advantages over the batch's generated tokens.
    sel = adv[mask > 0]
    if sel.numel() > 1:
        adv = torch.where(mask > 0, (adv - sel.mean()) / (sel.std() + 1e-8), adv)
    _per_token(samples, adv, returns)


ALGORITHMS: dict[str, Algorithm] = {
    a.name: a
    for a in (
        Algorithm("grpo", "policy", _grpo),
        Algorithm("dr_grpo", "policy", _dr_grpo),
        Algorithm("dapo", "policy", _grpo, dynamic_sampling=True),
        Algorithm("rloo", "policy", _rloo),
        Algorithm("reinforce_pp", "policy", _reinforce_pp),
        Algorithm("ppo", "policy", _gae, critic=True),
        Algorithm("sft", "sft"),
        Algorithm("eval", None),
    )
}


def algorithm(name: str) -> Algorithm:
    try:
        return ALGORITHMS[name]
    except KeyError:
        raise ValueError(f"unknown algorithm {name!r}; one of {', '.join(ALGORITHMS)}") from None
