"""Tic-tac-toe: multi-agent, two roles ``x`` and ``o`` on a 3x3 board, three in a row wins.

Card: both roles played by LLM policies (self-play or two policies), or one by the rule-based player (win,
block, else best line). Rules, move format and rewards: see `opentinker.env.builtin.board`.
"""

from __future__ import annotations

from opentinker.env.builtin.board import KInARow


class TicTacToeEnv(KInARow):
    name = "tic-tac-toe"
    size = 3
    k = 3
