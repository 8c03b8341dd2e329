"""The rollout engine interface."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    stop_ids: tuple[int, ...] = ()
    greedy: bool = False  # eval: argmax decoding (log-probs are still reported at `temperature`)


@dataclass
class GenerateResult:
    """Per prompt: the sampled ids (through the first stop id, inclusive), their log-probs under the sampling
    distribution softmax(logits / temperature), and whether generation ended on a stop id."""

    token_ids: list[list[int]]
    logprobs: list[list[float]]
    finished: list[bool]


class RolloutEngine(ABC):
    @abstractmethod
    def generate(
        self, prompts: list[list[int]], sampling: SamplingParams, seeds: Sequence[int] | None = None
    ) -> GenerateResult:
        """`seeds`: one sampling seed per prompt (non-negative, < 2**63). An engine that seeds per request
        (our decode loop, vLLM) draws a prompt's tokens from its seed alone, whatever else is in the batch;
        None: the engine draws the seeds from torch's global RNG. HFEngine samples batch-wise, from a seed
        hashed from the whole batch's seeds."""

    @abstractmethod
    def load_weights(self, state_dict: dict[str, torch.Tensor]) -> None:
        """Replace the policy weights (full, Hugging Face names, LoRA already merged)."""
