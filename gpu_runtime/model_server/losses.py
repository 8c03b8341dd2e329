"""Tinker's loss functions, per datum, as the SDK documents them: SUMS over tokens, never means.

`lp` is the log-probability of `target_tokens` under the current weights, one per input token; r = exp(lp -
logprobs) is the ratio to the sampler's log-probs. Each function returns the per-token losses (their sum is
the datum's loss).

- cross_entropy:        -w * lp                                  (weights any real: `forward_backward_custom`)
- importance_sampling:  -r * A
- ppo (Schulman et al. 2017, eq. 7):  -min(r A, clip(r, low, high) A)        defaults 0.8 / 1.2
- cispo (MiniMax-M1, 2025):           -stopgrad(clip(r, low, high)) * lp * A   defaults 0 / 4
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from gpu_runtime.model_server.types import ModelServerError


@dataclass(frozen=True)
class LossSpec:
    inputs: tuple[str, ...]  # loss_fn_inputs it needs besides the model input
    config_defaults: dict[str, float]
    elementwise: Callable[[Tensor, dict[str, Tensor], dict[str, float]], Tensor]


def _cross_entropy(lp: Tensor, x: dict[str, Tensor], cfg: dict[str, float]) -> Tensor:
    return -x["weights"] * lp


def _ratio(lp: Tensor, x: dict[str, Tensor]) -> Tensor:
    return torch.exp(lp - x["logprobs"])


def _importance_sampling(lp: Tensor, x: dict[str, Tensor], cfg: dict[str, float]) -> Tensor:
    return -_ratio(lp, x) * x["advantages"]


def _clipped(r: Tensor, cfg: dict[str, float]) -> Tensor:
    return r.clamp(cfg["clip_low_threshold"], cfg["clip_high_threshold"])


def _ppo(lp: Tensor, x: dict[str, Tensor], cfg: dict[str, float]) -> Tensor:
    r, a = _ratio(lp, x), x["advantages"]
    return -torch.minimum(r * a, _clipped(r, cfg) * a)


def _cispo(lp: Tensor, x: dict[str, Tensor], cfg: dict[str, float]) -> Tensor:
    return -_clipped(_ratio(lp, x), cfg).detach() * lp * x["advantages"]


_RL_INPUTS = ("target_tokens", "logprobs", "advantages")
LOSSES: dict[str, LossSpec] = {
    "cross_entropy": LossSpec(("target_tokens", "weights"), {}, _cross_entropy),
    "importance_sampling": LossSpec(_RL_INPUTS, {}, _importance_sampling),
    "ppo": LossSpec(_RL_INPUTS, {"clip_low_threshold": 0.8, "clip_high_threshold": 1.2}, _ppo),
    "cispo": LossSpec(_RL_INPUTS, {"clip_low_threshold": 0.0, "clip_high_threshold": 4.0}, _cispo),
}


def loss_spec(name: str) -> LossSpec:
    spec = LOSSES.get(name)
    if spec is None:
        raise ModelServerError(f"unknown loss_fn {name!r}; supported: {', '.join(sorted(LOSSES))}")
    return spec


def resolve_config(name: str, config: dict[str, float]) -> dict[str, float]:
    """The loss's config with defaults filled in; a key the loss does not take is an error, not ignored."""
    spec = loss_spec(name)
    unknown = sorted(set(config) - set(spec.config_defaults))
    if unknown:
        raise ModelServerError(f"loss_fn {name!r} takes no config {unknown}")
    cfg = {**spec.config_defaults, **{k: float(v) for k, v in config.items()}}
    if "clip_low_threshold" in cfg and not cfg["clip_low_threshold"] <= cfg["clip_high_threshold"]:
        raise ModelServerError("clip_low_threshold must be <= clip_high_threshold")
    return cfg


def elementwise_loss(name: str, lp: Tensor, inputs: dict[str, Tensor], config: dict[str, float]) -> Tensor:
    """Per-token losses of one datum (`config` already resolved); sum them for the datum's loss."""
    return loss_spec(name).elementwise(lp, inputs, config)
