"""Board-game options for learning on small models: random openings from the seed, the compact prompt."""

from __future__ import annotations

import pytest

from opentinker.env.builtin import GomokuEnv, TicTacToeEnv
from opentinker.env.codec import ByteCodec
from opentinker.env.multiagent import MultiAgentProtocol, RulePolicy
from opentinker.env.protocol import Budget, StopReason


def stones(env) -> dict[str, int]:
    flat = [c for row in env.board for c in row]
    return {"X": flat.count("X"), "O": flat.count("O")}


def test_an_opening_is_drawn_from_the_seed_and_passes_the_turn():
    env = TicTacToeEnv(opening=2)
    boards = set()
    for seed in range(40):
        first = env.reset(seed)
        assert stones(env) == {"X": 1, "O": 1} and env.moves == 2
        assert env.active_roles() == ["x"]
        assert "Your move:" in first["x"].text and "Your move" not in first["o"].text
        boards.add(str(env.board))
    assert len(boards) > 20  # many positions...
    env2 = TicTacToeEnv(opening=2)
    env.reset(7), env2.reset(7)
    assert env.board == env2.board  # ...each one fixed by its seed
    odd = TicTacToeEnv(opening=3)
    first = odd.reset(1)
    assert stones(odd) == {"X": 2, "O": 1} and odd.active_roles() == ["o"] and "Your move:" in first["o"].text
    assert TicTacToeEnv().reset(5)["x"].text.startswith("You are X and move first.")  # default: no opening


def test_an_opening_never_finishes_a_line():
    for seed in range(200):
        env = GomokuEnv(size=5, opening=20)
        env.reset(seed)
        marks = {(r, c): env.board[r][c] for r in range(5) for c in range(5) if env.board[r][c] != "."}
        assert not any(env.wins(r, c, m) for (r, c), m in marks.items())


def test_bad_options_are_refused():
    with pytest.raises(ValueError, match="opening"):
        TicTacToeEnv(opening=8)
    with pytest.raises(ValueError, match="prompt_style"):
        TicTacToeEnv(prompt_style="tiny")
    with pytest.raises(ValueError, match="size 3"):
        GomokuEnv(prompt_style="compact")


def test_compact_prompt_names_free_cells_by_digit_lists_them_and_reads_a_digit_as_a_move():
    env = TicTacToeEnv(prompt_style="compact")
    assert env.system_prompt == ""
    first = env.reset(0)
    assert first == {"x": first["x"], "o": first["o"]}
    assert first["x"].text == "X\n123\n456\n789\n123456789" and first["o"].text == "O"
    r = env.step({"x": "5"})
    assert r.info["move"] == [2, 2] and r.observations["o"].text == "123\n4X6\n789\n12346789"
    r = env.step({"o": "5"})  # taken
    assert (
        r.info["illegal"] == "2 2 is taken" and r.observations["o"].text == "illegal\n123\n4X6\n789\n12346789"
    )
    assert env.step({"o": "0"}).info["illegal"]  # no cell 0
    assert env.step({"o": "1 3"}).info["move"] == [1, 3]  # `row col` is still read
    assert env.rule_based_action("x") in "12346789" and len(env.rule_based_action("x")) == 1


def test_lines_prompt_adds_the_eight_lines_before_the_free_cells_and_reads_a_digit_as_a_move():
    env = TicTacToeEnv(prompt_style="lines")
    assert env.system_prompt == ""
    assert env.reset(0)["x"].text == "X\n123\n456\n789\n123 456 789 147 258 369 159 357\n123456789"
    env.step({"x": "1"})
    env.step({"o": "5"})
    r = env.step({"x": "2"})  # X threatens 3 along the top row (and O's 5 sits on both diagonals)
    assert r.info["move"] == [1, 2]
    assert r.observations["o"].text == "XX3\n4O6\n789\nXX3 4O6 789 X47 XO8 369 XO9 3O7\n346789"
    assert env.step({"o": "0"}).info["illegal"] and env.rule_based_action("o") == "3"  # the block, one digit
    with pytest.raises(ValueError, match="size 3"):
        GomokuEnv(prompt_style="lines")


def test_a_compact_game_against_the_rule_player_is_short():
    codec = ByteCodec()
    env = TicTacToeEnv(prompt_style="compact", opening=2)

    def first_free(ids, max_new):  # the first digit of the last board shown
        board = env.render()
        assert codec.decode(ids).endswith(board)
        return codec.encode_text(next(ch for ch in board if ch.isdigit()))

    game = MultiAgentProtocol(Budget(max_turns=16)).run(env, {"x": first_free, "o": RulePolicy()}, codec, 4)
    assert game.stop_reason is StopReason.DONE
    ep = game.per_role["x"]
    assert not any(t.info.get("illegal") for t in ep.turns)
    assert len(ep.token_ids) < 100  # bytes: the board and its free cells, one digit per move


def test_a_block_earns_the_block_reward_at_once_and_nothing_else_does():
    env = TicTacToeEnv(prompt_style="compact", block_reward=0.25)
    env.reset(0)
    for move in ("1", "5", "2"):  # X threatens 1-2-3
        assert env.step({env.active_roles()[0]: move}).rewards == {}
    r = env.step({"o": "3"})  # O blocks it
    assert r.rewards == {"o": 0.25} and r.info["must_block"] and r.info["blocked"] and not r.done
    r = env.step({"x": "9"})  # X had to block O's 3-5 at 7 and did not: no shaped reward
    assert r.rewards == {} and r.info["must_block"] and not r.info["blocked"]
    r = env.step({"o": "7"})  # a win is the win, not a block (O could win: nothing to block)
    assert r.rewards == {"o": 1.0, "x": -1.0} and "must_block" not in r.info
    plain = TicTacToeEnv(prompt_style="compact")  # default 0: the game's rewards only
    plain.reset(0)
    for move in ("1", "5"):
        assert "must_block" not in plain.step({plain.active_roles()[0]: move}).info  # no threat yet
    plain.step({"x": "2"})
    assert plain.step({"o": "3"}).rewards == {}
    for bad in (-0.1, 1.5):
        with pytest.raises(ValueError, match="block_reward"):
            TicTacToeEnv(block_reward=bad)


def test_threat_openings_put_the_mover_at_one_forced_block_for_that_share_of_the_seeds():
    env = TicTacToeEnv(prompt_style="compact", opening=2, threat_openings=0.5)
    threats = 0
    for seed in range(200):
        first = env.reset(seed)
        mover = env.active_roles()[0]
        free = [(r, c) for r in range(3) for c in range(3) if env.board[r][c] == "."]
        them = env.mark(env.other(mover))
        if env.moves == 2 and not any(env.wins(r, c, them) for r, c in free):
            continue  # a regular opening: two stones, nothing to block yet
        threats += 1
        assert env.moves >= 3 and not any(env.wins(r, c, env.mark(mover)) for r, c in free)
        (cell,) = [(r, c) for r, c in free if env.wins(r, c, them)]  # exactly one cell to block
        assert first[mover].text == f"{env.mark(mover)}\n{env.render()}"
        digit = str(cell[0] * 3 + cell[1] + 1)
        assert env.rule_based_action(mover) == digit  # the rule player blocks it
        r = env.step({mover: digit})
        assert r.info["must_block"] and r.info["blocked"]
    assert 70 < threats < 130  # about half
    env.reset(3)
    board = [row[:] for row in env.board]
    env.reset(3)
    assert env.board == board  # a seed fixes its position
    regular, default = TicTacToeEnv(opening=2), TicTacToeEnv(opening=2, threat_openings=0)
    for seed in range(20):  # the default draws the same openings as before the option existed
        regular.reset(seed), default.reset(seed)
        assert regular.board == default.board
    all_threats = TicTacToeEnv(opening=2, threat_openings=1)
    for seed in range(20):
        all_threats.reset(seed)
        assert all_threats.moves >= 3
    for bad in (-0.1, 1.5):
        with pytest.raises(ValueError, match="threat_openings"):
            TicTacToeEnv(threat_openings=bad)


def test_a_move_limit_ends_the_game_as_a_draw_that_many_moves_past_the_opening():
    # A tactics puzzle: a forced block, then the opponent's answer; a missed block punished is -1 / +1.
    env = TicTacToeEnv(prompt_style="compact", threat_openings=1.0, move_limit=2)
    env.reset(4)
    mover = env.active_roles()[0]
    block = env.rule_based_action(mover)
    miss = next(
        d for d in "123456789" if d != block and env.board[(int(d) - 1) // 3][(int(d) - 1) % 3] == "."
    )
    first = env.step({mover: miss})
    assert not first.done and first.info["must_block"] and not first.info["blocked"]
    win = env.step({env.other(mover): block})  # the opponent takes the cell the block needed
    assert win.done and win.rewards == {env.other(mover): 1.0, mover: -1.0}
    env.reset(4)
    assert not env.step({mover: block}).done
    r = env.step({env.other(mover): env.rule_based_action(env.other(mover))})
    assert (
        r.done
        and r.info["winner"] is None
        and r.info["limit"]
        and r.rewards == {env.other(mover): 0.0, mover: 0.0}
    )
    assert env.moves == env.opened + 2
    long = TicTacToeEnv(prompt_style="compact", opening=2)  # default: no limit
    long.reset(4)
    for _ in range(3):
        assert not long.step({long.active_roles()[0]: long.rule_based_action(long.active_roles()[0])}).done
    with pytest.raises(ValueError, match="move_limit"):
        TicTacToeEnv(move_limit=10)


def test_the_last_move_a_move_limit_allows_is_no_forced_block():
    # In a tactics puzzle the opponent's answer ends the game as a draw: a threat it faces can never be
    # punished, so it must not count as a forced block (block_rate) nor earn block_reward.
    found = 0
    for seed in range(200):
        env = TicTacToeEnv(prompt_style="compact", threat_openings=1.0, move_limit=2, block_reward=0.5)
        env.reset(seed)
        mover = env.active_roles()[0]
        assert env.step({mover: env.rule_based_action(mover)}).info["must_block"]  # the decisive move
        other = env.other(mover)
        free = [(r, c) for r in range(3) for c in range(3) if env.board[r][c] == "."]
        if not any(env.wins(r, c, env.mark(mover)) for r, c in free):
            continue  # the answer faces no threat
        found += 1
        last = env.step({other: env.rule_based_action(other)})
        assert last.done and "must_block" not in last.info and last.rewards.get(other, 0.0) in (0.0, 1.0)
    assert found >= 10  # the precondition: answers facing a threat are common


@pytest.mark.parametrize(
    ("style", "boards"),
    [
        ("mover", [".........", "t........", "m...t....", "tt..m...."]),
        # Each free cell shows the digit that names it: a legal move can be copied off the board.
        ("mover-digits", ["123456789", "t23456789", "m234t6789", "tt34m6789"]),
    ],
)
def test_mover_prompts_show_the_board_from_its_roles_side_and_read_a_digit_as_a_move(style, boards):
    env = TicTacToeEnv(prompt_style=style)
    assert env.system_prompt == ""
    first = env.reset(0)
    assert first["x"].text == boards[0] and first["o"].text == "O"
    r = env.step({"x": "1"})
    assert r.observations["o"].text == boards[1]  # X's stone is the opponent's, seen by O
    r = env.step({"o": "5"})
    assert r.observations["x"].text == boards[2]  # and its own, seen by X
    r = env.step({"x": "2"})  # X threatens 3 along the top row
    assert r.observations["o"].text == boards[3]
    r = env.step({"o": "1"})  # taken
    assert r.info["illegal"] == "1 1 is taken" and r.observations["o"].text == f"illegal\n{boards[3]}"
    assert env.rule_based_action("o") == "3"  # the block, one digit
    assert env.step({"o": "3"}).info == {"move": [1, 3], "player": "o", "must_block": True, "blocked": True}
    with pytest.raises(ValueError, match="size 3"):
        GomokuEnv(prompt_style=style)
