"""The Environment contract: `reset(seed) -> Observation`, `step(action) -> StepResult`.

Environments speak text. The runtime renders observations with the model's chat template and keeps token ids
itself across turns, so an environment never sees (or has to reproduce) tokenization.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar


@dataclass(frozen=True)
class Observation:
    """What the agent is shown next, rendered as one chat message."""

    text: str
    role: str = "user"  # chat role of the message: "user" for prompts and feedback, "tool" for tool results
    info: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class StepResult:
    observation: Observation | None  # None when the episode is over and there is nothing more to show
    reward: float
    done: bool
    info: dict[str, Any] = field(default_factory=dict)


class Environment(ABC):
    """Subclass, set `name` (and `system_prompt`, `roles` where needed), implement `reset` and `step`.

    `config` holds the JobSpec's `environment.config`; an environment validates what it needs from it.
    """

    name: ClassVar[str] = ""
    system_prompt: ClassVar[str] = ""
    roles: ClassVar[tuple[str, ...]] = ("agent",)

    def __init__(self, **config: Any) -> None:
        self.config = config

    @abstractmethod
    def reset(self, seed: int) -> Observation:
        """Start an episode; the same seed must give the same episode."""

    @abstractmethod
    def step(self, action: str) -> StepResult:
        """Apply the agent's action (its generated text, after `parse_action`)."""

    def parse_action(self, text: str) -> str:
        """Turn generated text into the action `step` receives; the default strips whitespace."""
        return text.strip()

    def close(self) -> None:  # noqa: B027 (optional hook)
        """Release resources (subprocesses, connections)."""
