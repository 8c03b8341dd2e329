"""Rollout engines (one interface: `generate` and `load_weights`) and the episode collector."""

from gpu_runtime.rollout.base import GenerateResult, RolloutEngine, SamplingParams

__all__ = ["GenerateResult", "RolloutEngine", "SamplingParams"]
