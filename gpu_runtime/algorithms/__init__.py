"""RL and SFT math: advantages, KL estimators, policy/value losses and their aggregation.

Pure tensor functions, no models: each is unit-tested with hand-computed numbers (CONVENTIONS.md checklist).
"""

from gpu_runtime.algorithms.advantages import (
    gae_advantages,
    grpo_advantages,
    reinforce_pp_advantages,
    rloo_advantages,
)
from gpu_runtime.algorithms.losses import (
    LossNorm,
    aggregate,
    kl_estimate,
    policy_loss,
    sft_loss,
    value_loss,
)

__all__ = [
    "LossNorm",
    "aggregate",
    "gae_advantages",
    "grpo_advantages",
    "kl_estimate",
    "policy_loss",
    "reinforce_pp_advantages",
    "rloo_advantages",
    "sft_loss",
    "value_loss",
]
