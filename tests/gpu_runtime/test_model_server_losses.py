"""Tinker's four losses (gpu_runtime/model_server/losses.py) against numbers worked out by hand.

Two tokens: lp = log-probs under the current weights [-1, -2], sampler log-probs [-1, -1.5], advantages
[2, -1], so the ratio r = exp(lp - logprobs) = [1, e^-0.5 = 0.60653066]. Every loss is a SUM over tokens."""

from __future__ import annotations

import math

import pytest
import torch

from gpu_runtime.model_server.losses import elementwise_loss, resolve_config
from gpu_runtime.model_server.types import ModelServerError

R2 = math.exp(-0.5)
RL_INPUTS = {"logprobs": torch.tensor([-1.0, -1.5]), "advantages": torch.tensor([2.0, -1.0])}


def _loss_and_grad(name: str, inputs: dict[str, torch.Tensor], config: dict[str, float] | None = None):
    lp = torch.tensor([-1.0, -2.0], requires_grad=True)
    loss = elementwise_loss(name, lp, inputs, resolve_config(name, config or {})).sum()
    loss.backward()
    return loss.item(), lp.grad.tolist()


def test_cross_entropy_is_minus_the_weighted_sum_with_any_real_weights():
    # -(2 * -1 + 0.5 * -2) = 3
    loss, grad = _loss_and_grad("cross_entropy", {"weights": torch.tensor([2.0, 0.5])})
    assert loss == pytest.approx(3.0)
    assert grad == pytest.approx([-2.0, -0.5])
    # negative weights (forward_backward_custom sends -grad): -(-1 * -1 + 3 * -2) = 5
    loss, grad = _loss_and_grad("cross_entropy", {"weights": torch.tensor([-1.0, 3.0])})
    assert loss == pytest.approx(5.0)
    assert grad == pytest.approx([1.0, -3.0])


def test_importance_sampling():
    # -(1 * 2 + e^-0.5 * -1) ; d/dlp = -r A
    loss, grad = _loss_and_grad("importance_sampling", RL_INPUTS)
    assert loss == pytest.approx(-(2.0 - R2))
    assert grad == pytest.approx([-2.0, R2])


def test_ppo_clips_at_0_8_and_1_2_by_default():
    # token 2: r = 0.607 < 0.8, A < 0: min(r A, clip(r) A) = min(-0.607, -0.8) = -0.8, clipped: no gradient
    loss, grad = _loss_and_grad("ppo", RL_INPUTS)
    assert loss == pytest.approx(-(2.0 - 0.8))
    assert grad == pytest.approx([-2.0, 0.0])
    # wider thresholds leave token 2 unclipped: the importance-sampling numbers
    loss, grad = _loss_and_grad("ppo", RL_INPUTS, {"clip_low_threshold": 0.5, "clip_high_threshold": 1.5})
    assert loss == pytest.approx(-(2.0 - R2))
    assert grad == pytest.approx([-2.0, R2])


def test_ppo_clips_the_high_side_for_positive_advantages():
    inputs = {"logprobs": torch.tensor([-2.0, -1.5]), "advantages": torch.tensor([1.0, 1.0])}
    # r = [e^1, e^-0.5]: token 1 clipped to 1.2 (no gradient), token 2 inside
    loss, grad = _loss_and_grad("ppo", inputs)
    assert loss == pytest.approx(-(1.2 + R2))
    assert grad == pytest.approx([0.0, -R2])


def test_cispo_weights_the_log_prob_by_the_stopped_clipped_ratio():
    # -(clip(r) * lp * A) summed: -(1 * -1 * 2 + 0.607 * -2 * -1); d/dlp = -clip(r) A, the ratio is a constant
    loss, grad = _loss_and_grad("cispo", RL_INPUTS)
    assert loss == pytest.approx(-(-2.0 + 2 * R2))
    assert grad == pytest.approx([-2.0, R2])
    # clip_high 0.5 caps token 1's ratio 1 -> 0.5
    loss, grad = _loss_and_grad("cispo", RL_INPUTS, {"clip_high_threshold": 0.5})
    assert loss == pytest.approx(-(-1.0 + 2 * 0.5))
    assert grad == pytest.approx([-1.0, 0.5])


def test_bad_loss_names_and_configs_are_refused_clearly():
    with pytest.raises(ModelServerError, match=r"unknown loss_fn 'dpo'.*cispo, cross_entropy"):
        resolve_config("dpo", {})
    with pytest.raises(ModelServerError, match="takes no config"):
        resolve_config("cross_entropy", {"clip_low_threshold": 0.5})
    with pytest.raises(ModelServerError, match="clip_low_threshold must be <="):
        resolve_config("ppo", {"clip_low_threshold": 2.0})
