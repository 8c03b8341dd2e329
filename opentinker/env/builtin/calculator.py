"""Calculator tool use: tool-calling, data-free.

Card: the agent is asked a product or sum of large numbers (drawn from the seed) and may call the
``calculate(expression)`` tool, written ``<tool_call>{"name": "calculate", "arguments": {"expression":
"4821 * 3907"}}</tool_call>``; the tool result comes back as a "tool" message. The first turn without a tool
call is the final answer. Reward (a Rubric): 1.0 for the exact result (first integer in the answer); the
metric ``used_tool`` (weight 0) logs whether the calculator was called. Config: ``digits`` (default 4).
"""

from __future__ import annotations

import ast
import operator
import random
from typing import Any

from opentinker.env.base import Observation
from opentinker.env.builtin.arithmetic import first_integer
from opentinker.env.rubric import Criterion, Rubric
from opentinker.env.tools import ToolEnvironment, tool

_BINOPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}
_MAX_ABS = 10**30


def _eval(node: ast.AST) -> float | int:
    # Only numbers and + - * / and unary minus: the model's expression is data, never code.
    if (
        isinstance(node, ast.Constant)
        and isinstance(node.value, int | float)
        and not isinstance(node.value, bool)
    ):
        return node.value
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
        return -_eval(node.operand)
    if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
        value = _BINOPS[type(node.op)](_eval(node.left), _eval(node.right))
        if abs(value) > _MAX_ABS:
            raise ValueError("result too large")
        return value
    raise ValueError("only numbers and + - * / are allowed")


@tool
def calculate(expression: str) -> str:
    """Evaluate an arithmetic expression with + - * / and parentheses.

    Args:
        expression: the expression, e.g. "12 * (3 + 4)"
    """
    if len(expression) > 200:
        raise ValueError("expression too long")
    value = _eval(ast.parse(expression, mode="eval").body)
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return str(value)


def correct(completion: str, answer: int, **_: Any) -> float:
    return 1.0 if first_integer(completion.replace(",", "")) == answer else 0.0


def used_tool(completion: str, tool_calls: int, **_: Any) -> float:
    return 1.0 if tool_calls > 0 else 0.0


class CalculatorEnv(ToolEnvironment):
    name = "calculator"
    system_prompt = "Solve the problem. You may call the calculate tool. Give the final answer as a number."
    tools = (calculate,)
    rubric = Rubric([Criterion(correct, 1.0), Criterion(used_tool, 0.0)])

    def __init__(self, **config: Any) -> None:
        super().__init__(**config)
        self.digits = int(config.get("digits", 4))
        if not 1 <= self.digits <= 12:
            raise ValueError("digits must be 1-12")
        self.answer = 0

    def reset(self, seed: int) -> Observation:
        rng = random.Random(seed)  # noqa: S311 (reproducible problems)
        lo, hi = 10 ** (self.digits - 1), 10**self.digits - 1
        a, b = rng.randint(lo, hi), rng.randint(lo, hi)
        op = rng.choice("+*")
        self.answer = a + b if op == "+" else a * b
        self.tool_calls_made = 0
        return Observation(f"What is {a} {op} {b}?")

    def score_answer(self, answer: str) -> tuple[float, dict[str, Any]]:
        score = self.rubric.score(answer, answer=self.answer, tool_calls=self.tool_calls_made)
        return score.reward, {"metrics": score.metrics, "answer": self.answer}
