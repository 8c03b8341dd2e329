"""k-in-a-row board games for two roles (tic-tac-toe, gomoku), shared rules and a rule-based player.

Moves are written ``row col`` (1-based; the first two integers of the answer count, so ``(2, 3)`` works).
Raw rewards (reward mode ``custom`` by default, ``reward_mode`` in config may pick ``zero-sum``):
win +1 to the winner and -1 to the loser, draw 0 to both; an illegal move (unreadable, off the board, or an
occupied cell) costs its player ``illegal_penalty`` (default 0.5) and the same player moves again; the
``max_illegal``-th illegal move of one player (default 3) forfeits the game (-1 to it, +1 to the other).
A legal move made when the opponent is one stone from a line and the mover cannot win at once has
``must_block`` and ``blocked`` (did it take a cell the opponent needed) in its info. ``block_reward``
(default 0) is a shaped per-move reward, environment reward design for small learners: a block earns its
player that much at once, so the move that saved the game is credited, not only the game's end.

More config: ``opening`` (default 0) places that many random stones (X, O, X, ...; drawn from the game's seed,
never a finished line) before the first move, so a seed picks one of many positions (diverse training groups,
held-out evaluation positions against the deterministic rule-based player); the role whose turn it is then
moves first. ``threat_openings`` (default 0) is a training curriculum: that share of the games (drawn from the
seed) opens instead on a random position where the mover faces a forced block (the opponent one stone from a
line at exactly one cell, the mover unable to win at once), so the game's first generated move is the decisive
one and a group of samples from that position is ranked by it alone (clean credit for the skill that separates
a random legal player from the rule player); evaluate on the regular openings
(`multi_agent.eval_vs_rule.environment_config: {threat_openings: 0}`). ``move_limit`` (default 0: none) ends
a game as a draw after that many moves past the opening: with ``threat_openings: 1`` and ``move_limit: 2``
every training game is a tactics puzzle, the mover's block (or not) and the opponent's win (or not), both
rewarded at once (-1 / +1 for a missed block that the opponent punished, 0 otherwise).
``prompt_style`` ``"compact"`` (3x3 boards) drops the system prompt and shows only the board, one character
per cell: a stone's mark (``X``, ``O``) or, on a free cell, the digit that names it (``1`` top left to ``9``
bottom right, in reading order), then a line with the free cells' digits, under the player's mark on its first
message and under ``illegal`` after an illegal move. A move is then one digit (``row col`` is still read); the
rule-based player answers with the digit. No digit occurs in the chat template (unlike letters), and the last
line puts a legal move at the same distance from the answer in every position, which is what a tiny model
picks up first. A game is ~150 tokens per role instead of ~650. ``"lines"`` is ``"compact"`` with one more
line before the free cells: the board's 8 lines (rows, columns, diagonals) as 3-character strings
(``XX3 456 789 X47 X58 369 X59 357``), so a threat is three adjacent tokens, not three cells on three rows.
``"mover"`` (3x3) shows the board from the side of the role it is for, as one line of 9 cells in reading
order: ``m`` its own stones, ``t`` the opponent's, ``.`` free (``m.t.m..t.``), no digits and no list of free
cells; a move is still the digit naming the cell. Why: on the tactics puzzles, in the chat, `tiny-qwen2`
learns from this board to block on positions it never saw (0.84 after 48 epochs of SFT on 448), from the
compact one it memorises (~0.3 held out); without digits to copy, legal moves take a longer warm start
(README "Multi-agent jobs"). ``"mover-digits"`` is ``"mover"`` with each free cell shown as its digit
(``m2t4m67t9``): a legal move is a digit copied from the board, and the opponent's threat is still two
``t`` and a digit in a line. On the same puzzles it is legal after 4 epochs (1.00 held out; ``"mover"``
0.84 after 16) and blocks 0.76 held out after 16 (``"mover"`` 0.42).
"""

from __future__ import annotations

import random
import re
from typing import Any, ClassVar

from opentinker.env.base import Observation
from opentinker.env.multiagent import MultiAgentEnvironment, MultiStepResult

DIRECTIONS = ((0, 1), (1, 0), (1, 1), (1, -1))  # horizontal, vertical, diagonal, anti-diagonal
_MOVE_RE = re.compile(r"\d+")
_PROMPT_STYLES = ("default", "compact", "lines", "mover", "mover-digits")
DIGIT_STYLES = ("compact", "lines", "mover", "mover-digits")  # a move: one digit naming its cell (3x3)
_MOVER_STYLES = ("mover", "mover-digits")  # the board from the observing role's side
_CELLS = "123456789"  # the digit styles: cell names in reading order (3x3 boards)


class KInARow(MultiAgentEnvironment):
    roles = ("x", "o")
    size: ClassVar[int] = 3
    k: ClassVar[int] = 3

    def __init__(self, **config: Any) -> None:
        super().__init__(**config)
        self.n = int(config.get("size", self.size))
        if not self.k <= self.n <= 19:
            raise ValueError(f"size must be {self.k}-19")
        self.illegal_penalty = float(config.get("illegal_penalty", 0.5))
        self.max_illegal = int(config.get("max_illegal", 3))
        self.block_reward = float(config.get("block_reward", 0.0))
        if not 0 <= self.block_reward <= 1:
            raise ValueError("block_reward must be 0-1 (a win is worth 1)")
        self.opening = int(config.get("opening", 0))
        if not 0 <= self.opening <= self.n * self.n - 2:
            raise ValueError(f"opening must be 0-{self.n * self.n - 2} stones")
        self.threat_openings = float(config.get("threat_openings", 0.0))
        if not 0 <= self.threat_openings <= 1:
            raise ValueError("threat_openings must be 0-1 (a share of the games)")
        self.move_limit = int(config.get("move_limit", 0))
        if not 0 <= self.move_limit <= self.n * self.n:
            raise ValueError(f"move_limit must be 0-{self.n * self.n} (0: none)")
        self.prompt_style = str(config.get("prompt_style", "default"))
        if self.prompt_style not in _PROMPT_STYLES:
            raise ValueError(f"prompt_style must be one of {list(_PROMPT_STYLES)}")
        if self.prompt_style in DIGIT_STYLES and self.n != 3:
            raise ValueError("the compact prompt style names cells with one digit each: size 3 only")
        self.board: list[list[str]] = []
        self.illegal: dict[str, int] = {}
        self.moves = 0
        self.opened = 0  # stones the opening placed

    @property
    def system_prompt(self) -> str:  # type: ignore[override]
        if self.prompt_style in DIGIT_STYLES:
            return ""
        return (
            f"You play {self.name} on a {self.n}x{self.n} board: get {self.k} in a row (across, down or "
            "diagonally). Answer with your move as `row col` (1-based), nothing else."
        )

    def render(self, viewer: str | None = None) -> str:
        """The board as `viewer` (the role the observation is for) is shown it."""
        if self.prompt_style in _MOVER_STYLES:
            assert viewer is not None, "the mover style shows the board from one role's side"
            me = self.mark(viewer)
            free = "." * len(_CELLS) if self.prompt_style == "mover" else _CELLS  # a free cell's face
            cells = [cell for row in self.board for cell in row]
            return "".join(free[i] if c == "." else "m" if c == me else "t" for i, c in enumerate(cells))
        if self.prompt_style in DIGIT_STYLES:
            rows = [
                "".join(_CELLS[r * self.n + c] if cell == "." else cell for c, cell in enumerate(row))
                for r, row in enumerate(self.board)
            ]
            free = "".join(ch for row in rows for ch in row if ch in _CELLS)
            if self.prompt_style == "lines":
                return "\n".join([*rows, self._lines(rows), free])
            return "\n".join([*rows, free])
        head = "   " + " ".join(f"{c + 1:>2}" for c in range(self.n))
        rows = [f"{r + 1:>2} " + " ".join(f"{cell:>2}" for cell in row) for r, row in enumerate(self.board)]
        return "\n".join([head, *rows])

    @staticmethod
    def _lines(rows: list[str]) -> str:
        """The 8 lines of a 3x3 board as 3-character strings (rows, columns, diagonals): a threat is a string
        with two of one mark and a digit, the cell to take, within 3 adjacent tokens."""
        cols = ["".join(row[c] for row in rows) for c in range(3)]
        diags = ["".join(rows[i][i] for i in range(3)), "".join(rows[i][2 - i] for i in range(3))]
        return " ".join([*rows, *cols, *diags])

    def mark(self, role: str) -> str:
        return role.upper()

    def other(self, role: str) -> str:
        return self.roles[1 - self.roles.index(role)]

    def reset(self, seed: int) -> dict[str, Observation]:
        self.board = [["." for _ in range(self.n)] for _ in range(self.n)]
        self.illegal = dict.fromkeys(self.roles, 0)
        self.moves = 0
        self._next = 0
        self._play_opening(seed)
        self.opened = self.moves
        mover = self.active_roles()[0]
        other = self.other(mover)
        if self.prompt_style in _MOVER_STYLES:
            return {mover: Observation(self.render(mover)), other: Observation(self.mark(other))}
        if self.prompt_style in DIGIT_STYLES:
            return {
                mover: Observation(f"{self.mark(mover)}\n{self.render()}"),
                other: Observation(self.mark(other)),
            }
        if self.opening:
            return {
                mover: Observation(
                    f"You are {self.mark(mover)}; the game opened with {self.moves} random moves and it is "
                    f"your turn.\n{self.render()}\nYour move:"
                ),
                other: Observation(f"You are {self.mark(other)}; {self.mark(mover)} moves next."),
            }
        return {
            "x": Observation(f"You are X and move first.\n{self.render()}\nYour move:"),
            "o": Observation("You are O; X moves first."),
        }

    def _play_opening(self, seed: int) -> None:
        """`opening` random stones, alternating from X, none completing a line; the turn passes on each. With
        `threat_openings`, that share of the seeds opens on a forced block instead (`_play_threat`)."""
        rng = random.Random(seed)  # noqa: S311 (reproducible positions, not secrets)
        if self.threat_openings and rng.random() < self.threat_openings and self._play_threat(rng):
            return
        self._random_stones(rng, self.opening)

    def _play_threat(self, rng: random.Random) -> bool:
        """Random stones (3 or more, none completing a line) until the mover must block at exactly one cell;
        False (an empty board again) if no such position turned up in a bounded number of tries."""
        for _ in range(200):
            self.board = [["." for _ in range(self.n)] for _ in range(self.n)]
            self.moves, self._next = 0, 0
            self._random_stones(rng, rng.randint(3, min(2 * self.k, self.n * self.n - 3)))
            mover = self.active_roles()[0]
            free = [(r, c) for r in range(self.n) for c in range(self.n) if self.board[r][c] == "."]
            them = self.mark(self.other(mover))
            if any(self.wins(r, c, self.mark(mover)) for r, c in free):
                continue
            if sum(self.wins(r, c, them) for r, c in free) == 1:
                return True
        self.board = [["." for _ in range(self.n)] for _ in range(self.n)]
        self.moves, self._next = 0, 0
        return False

    def _random_stones(self, rng: random.Random, count: int) -> None:
        for _ in range(count):
            mark = self.mark(self.active_roles()[0])
            free = [(r, c) for r in range(self.n) for c in range(self.n) if self.board[r][c] == "."]
            cells = [(r, c) for r, c in free if not self.wins(r, c, mark)]
            r, c = rng.choice(cells or free)
            self.board[r][c] = mark
            self.moves += 1
            self.advance()

    def parse_move(self, action: str) -> tuple[int, int] | str:
        nums = _MOVE_RE.findall(action)
        if self.prompt_style in DIGIT_STYLES and len(nums) == 1 and len(nums[0]) == 1 and nums[0] != "0":
            r, c = divmod(int(nums[0]) - 1, self.n)  # a cell's digit
            nums = [str(r + 1), str(c + 1)]
        if len(nums) < 2:
            return "write your move as `row col`"
        r, c = int(nums[0]) - 1, int(nums[1]) - 1
        if not (0 <= r < self.n and 0 <= c < self.n):
            return f"{r + 1} {c + 1} is off the board"
        if self.board[r][c] != ".":
            return f"{r + 1} {c + 1} is taken"
        return r, c

    def line_length(self, r: int, c: int, mark: str, dr: int, dc: int) -> int:
        """Stones of `mark` in a line through (r, c) along (dr, dc), counting (r, c) itself."""
        count = 1
        for sign in (1, -1):
            rr, cc = r + sign * dr, c + sign * dc
            while 0 <= rr < self.n and 0 <= cc < self.n and self.board[rr][cc] == mark:
                count += 1
                rr, cc = rr + sign * dr, cc + sign * dc
        return count

    def wins(self, r: int, c: int, mark: str) -> bool:
        return any(self.line_length(r, c, mark, dr, dc) >= self.k for dr, dc in DIRECTIONS)

    def step(self, actions: dict[str, str]) -> MultiStepResult:
        (role,) = actions  # round-robin: exactly one mover
        if role not in self.active_roles():
            raise ValueError(f"it is not {role}'s turn")
        opp = self.other(role)
        move = self.parse_move(actions[role])
        if isinstance(move, str):
            self.illegal[role] += 1
            info: dict[str, Any] = {"illegal": move, "player": role}
            if self.illegal[role] >= self.max_illegal:
                return MultiStepResult(
                    {}, {role: -1.0, opp: 1.0}, True, {**info, "winner": opp, "forfeit": role}
                )
            if self.prompt_style in DIGIT_STYLES:
                obs = Observation(f"illegal\n{self.render(role)}")
            else:
                obs = Observation(f"Illegal move: {move}. Try again.\n{self.render()}\nYour move:")
            return MultiStepResult({role: obs}, {role: -self.illegal_penalty}, False, info)
        r, c = move
        tactics = self._tactics(role, r, c)  # read before the stone lands
        bonus = self.block_reward if tactics.get("blocked") else 0.0
        self.board[r][c] = self.mark(role)
        self.moves += 1
        info = {"move": [r + 1, c + 1], "player": role, **tactics}
        if self.wins(r, c, self.mark(role)):
            return MultiStepResult({}, {role: 1.0, opp: -1.0}, True, {**info, "winner": role})
        if self.moves == self.n * self.n:
            return MultiStepResult({}, {role: bonus, opp: 0.0}, True, {**info, "winner": None})
        if self.move_limit and self.moves - self.opened >= self.move_limit:  # a puzzle's end: no result
            return MultiStepResult({}, {role: bonus, opp: 0.0}, True, {**info, "winner": None, "limit": True})
        self.advance()
        if self.prompt_style in DIGIT_STYLES:
            text = self.render(opp)
        else:
            text = f"{self.mark(role)} played {r + 1} {c + 1}.\n{self.render()}\nYour move:"
        return MultiStepResult({opp: Observation(text)}, {role: bonus} if bonus else {}, False, info)

    def _tactics(self, role: str, r: int, c: int) -> dict[str, bool]:
        """Whether `role` had to block (no win of its own, the opponent one move from a line) and, if so,
        whether a move to (r, c) blocks: `{"must_block": True, "blocked": ...}`, else {}. Per-move
        diagnostics (`game/<role>/block_rate`) and the `block_reward`'s trigger. The last move a `move_limit`
        allows is never one: the game ends on it as a draw, so no missed block can be punished (in a tactics
        puzzle, the non-mover's answer would otherwise count as half the puzzles' blocks, none decisive)."""
        if self.move_limit and self.moves + 1 - self.opened >= self.move_limit:
            return {}
        free = [(rr, cc) for rr in range(self.n) for cc in range(self.n) if self.board[rr][cc] == "."]
        them = self.mark(self.other(role))
        if any(self.wins(rr, cc, self.mark(role)) for rr, cc in free):
            return {}
        if not any(self.wins(rr, cc, them) for rr, cc in free):
            return {}
        return {"must_block": True, "blocked": self.wins(r, c, them)}

    def rule_based_action(self, role: str) -> str:
        """Win if possible, else block the opponent's win, else the cell making the longest lines (own lines
        weighted over the opponent's), ties to the cell nearest the center, then reading order."""
        me, them = self.mark(role), self.mark(self.other(role))
        center = (self.n - 1) / 2
        best: tuple[float, ...] | None = None
        best_cell = (0, 0)
        for r in range(self.n):
            for c in range(self.n):
                if self.board[r][c] != ".":
                    continue
                mine = max(self.line_length(r, c, me, dr, dc) for dr, dc in DIRECTIONS)
                theirs = max(self.line_length(r, c, them, dr, dc) for dr, dc in DIRECTIONS)
                key = (
                    mine >= self.k,
                    theirs >= self.k,
                    2 * mine + theirs,
                    -abs(r - center) - abs(c - center),
                    -r,
                    -c,
                )
                if best is None or key > best:
                    best, best_cell = key, (r, c)
        if self.prompt_style in DIGIT_STYLES:
            return _CELLS[best_cell[0] * self.n + best_cell[1]]
        return f"{best_cell[0] + 1} {best_cell[1] + 1}"
