"""Rubric: a reward built from weighted reward functions.

Each function scores one aspect of an answer; the reward is the weighted sum. A function with weight 0 is only
logged as a metric, which is how one watches a property (length, format) without training on it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

RewardFn = Callable[..., float]


@dataclass(frozen=True)
class Criterion:
    fn: RewardFn
    weight: float = 1.0
    name: str = ""

    @property
    def label(self) -> str:
        return self.name or getattr(self.fn, "__name__", "criterion")


@dataclass(frozen=True)
class Score:
    reward: float
    metrics: dict[str, float] = field(default_factory=dict)  # every criterion's raw score, weighted or not


class Rubric:
    """`Rubric([(exact_match, 1.0), (brevity, 0.0)])`; functions take keyword arguments and ignore extras.

    Scoring calls every function as `fn(completion=..., **context)`, so a function declares only what it
    needs: `def exact_match(completion: str, answer: str, **_) -> float`.
    """

    def __init__(self, criteria: list[Criterion | tuple[RewardFn, float] | RewardFn]) -> None:
        self.criteria: list[Criterion] = []
        for c in criteria:
            if isinstance(c, Criterion):
                self.criteria.append(c)
            elif isinstance(c, tuple):
                self.criteria.append(Criterion(c[0], float(c[1])))
            else:
                self.criteria.append(Criterion(c))
        labels = [c.label for c in self.criteria]
        if len(set(labels)) != len(labels):
            raise ValueError(f"rubric criteria need distinct names, got {labels}")

    def score(self, completion: str, **context: Any) -> Score:
        metrics: dict[str, float] = {}
        reward = 0.0
        for c in self.criteria:
            value = float(c.fn(completion=completion, **context))
            metrics[c.label] = value
            reward += c.weight * value
        return Score(reward, metrics)
