"""Gomoku: multi-agent, two roles ``x`` and ``o``, five in a row on a 9x9 board (config ``size`` 5-19).

Card: wins are detected across, down and along both diagonals; illegal moves (unreadable, off the board, on
a taken cell) are penalized and replayed, and the third forfeits. Both roles played by LLM policies or one by
the rule-based player. Rules, move format and rewards: see `opentinker.env.builtin.board`.
"""

from __future__ import annotations

from opentinker.env.builtin.board import KInARow


class GomokuEnv(KInARow):
    name = "gomoku"
    size = 9
    k = 5
