"""Built-in environments, shipped with the SDK and published as public `opentinker/<name>` packages.

`BUILTINS` maps the package name to its class; the registry's manifest entrypoint names the same class.
Multi-agent games (`MultiAgentEnvironment`) run under `MultiAgentProtocol`; `make_builtin` can also wrap one
as a single-agent environment against the rule-based player (config `opponent: "rule"`, `role`).
"""

from __future__ import annotations

from typing import Any

from opentinker.env.base import Environment
from opentinker.env.builtin.answer_match import AnswerMatchEnv
from opentinker.env.builtin.arithmetic import ArithmeticEnv
from opentinker.env.builtin.calculator import CalculatorEnv
from opentinker.env.builtin.gomoku import GomokuEnv
from opentinker.env.builtin.guess_number import GuessNumberEnv
from opentinker.env.builtin.math_word import MathWordEnv
from opentinker.env.builtin.tictactoe import TicTacToeEnv
from opentinker.env.multiagent import MultiAgentEnvironment, VersusRule

BUILTINS: dict[str, type[Environment] | type[MultiAgentEnvironment]] = {
    "arithmetic": ArithmeticEnv,
    "guess-number": GuessNumberEnv,
    "calculator": CalculatorEnv,
    "math-word": MathWordEnv,
    "tic-tac-toe": TicTacToeEnv,
    "gomoku": GomokuEnv,
    "answer-match": AnswerMatchEnv,
}

# The protocol kind each built-in is published with (its manifest's `protocol`).
PROTOCOL_KINDS: dict[str, str] = {
    "arithmetic": "single-turn",
    "guess-number": "multi-turn",
    "calculator": "tool-calling",
    "math-word": "single-turn",
    "tic-tac-toe": "multi-agent",
    "gomoku": "multi-agent",
    "answer-match": "single-turn",
}


def make_builtin(name: str, **config: Any) -> Environment | MultiAgentEnvironment:
    cls = BUILTINS[name]
    if issubclass(cls, MultiAgentEnvironment):
        opponent = config.pop("opponent", None)
        role = config.pop("role", None)
        game = cls(**config)
        if opponent == "rule":
            return VersusRule(game, role or game.roles[0])
        if opponent not in (None, "policy"):
            raise ValueError("opponent must be 'rule' or 'policy'")
        return game
    return cls(**config)


__all__ = [
    "BUILTINS",
    "PROTOCOL_KINDS",
    "AnswerMatchEnv",
    "ArithmeticEnv",
    "CalculatorEnv",
    "GomokuEnv",
    "GuessNumberEnv",
    "MathWordEnv",
    "TicTacToeEnv",
    "make_builtin",
]
