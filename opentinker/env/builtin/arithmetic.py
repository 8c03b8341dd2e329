"""Arithmetic: single-turn, data-free.

Card: the prompt asks for ``a <op> b`` with both operands drawn from the seed; the reward is 1.0 when the
first integer in the answer equals the result, else 0.0. Config: ``min_operand`` (default 0), ``max_operand``
(default 50), ``operations`` (any of ``+ - *``, default ``["+"]``), ``prompt_style`` (``"default"``: a
system prompt and "What is 3 + 4? Answer with the number only."; ``"compact"``: no system prompt and "3+4=",
a few tokens that a tiny model learns from quickly). The same seed gives the same problem.
"""

from __future__ import annotations

import random
import re
from typing import Any

from opentinker.env.base import Environment, Observation, StepResult

_OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}
_PROMPT_STYLES = ("default", "compact")
_INT_RE = re.compile(r"-?\d+")


def first_integer(text: str) -> int | None:
    """The first (optionally negative) integer in `text`, or None."""
    m = _INT_RE.search(text)
    return int(m.group()) if m else None


class ArithmeticEnv(Environment):
    name = "arithmetic"
    system_prompt = "Answer arithmetic questions with the number only."

    def __init__(self, **config: Any) -> None:
        super().__init__(**config)
        self.min_operand = int(config.get("min_operand", 0))
        self.max_operand = int(config.get("max_operand", 50))
        self.operations = list(config.get("operations", ["+"]))
        if self.min_operand > self.max_operand:
            raise ValueError("min_operand must not exceed max_operand")
        if not self.operations or any(op not in _OPS for op in self.operations):
            raise ValueError(f"operations must be a non-empty subset of {sorted(_OPS)}")
        self.prompt_style = str(config.get("prompt_style", "default"))
        if self.prompt_style not in _PROMPT_STYLES:
            raise ValueError(f"prompt_style must be one of {list(_PROMPT_STYLES)}")
        if self.prompt_style == "compact":
            self.system_prompt = ""  # type: ignore[misc]  # instance override of the class default
        self.answer: int | None = None

    def problem(self, seed: int) -> tuple[int, str, int]:
        rng = random.Random(seed)  # noqa: S311 (reproducible problems, not secrets)
        a = rng.randint(self.min_operand, self.max_operand)
        b = rng.randint(self.min_operand, self.max_operand)
        op = rng.choice(self.operations)
        return a, op, b

    def reset(self, seed: int) -> Observation:
        a, op, b = self.problem(seed)
        self.answer = _OPS[op](a, b)
        if self.prompt_style == "compact":
            return Observation(f"{a}{op}{b}=")
        return Observation(f"What is {a} {op} {b}? Answer with the number only.")

    def step(self, action: str) -> StepResult:
        if self.answer is None:
            raise RuntimeError("step() before reset()")
        got = first_integer(action)
        correct = got is not None and got == self.answer
        return StepResult(None, 1.0 if correct else 0.0, True, {"answer": self.answer, "parsed": got})
