"""The multi-agent coordinator and the board games: turn order, barriers, reward modes, win detection."""

from __future__ import annotations

import itertools

import pytest

from opentinker.env.base import Observation
from opentinker.env.builtin import GomokuEnv, TicTacToeEnv, make_builtin
from opentinker.env.codec import ByteCodec
from opentinker.env.multiagent import (
    MultiAgentEnvironment,
    MultiAgentProtocol,
    MultiStepResult,
    RulePolicy,
    TurnOrder,
    VersusRule,
)
from opentinker.env.protocol import Budget, MultiTurnProtocol, State, StopReason
from tests.opentinker.env.scripted import Scripted

codec = ByteCodec()


def play(env, x_moves, o_moves, max_turns=100):
    x, o = Scripted(x_moves), Scripted(o_moves)
    game = MultiAgentProtocol(Budget(max_turns=max_turns)).run(env, {"x": x, "o": o}, codec, seed=0)
    return game, x, o


def test_tictactoe_two_policies_x_wins_with_per_role_token_sequences():
    game, x, o = play(TicTacToeEnv(), ["1 1", "2 2", "3 3"], ["1 2", "1 3"])
    assert game.stop_reason is StopReason.DONE and game.info["winner"] == "x"
    assert game.rewards == {"x": 1.0, "o": -1.0}
    assert game.rounds == 5
    assert game.states == [State.PENDING] + [State.GENERATING, State.INTERACTING] * 5 + [State.TERMINATED]
    ex, eo = game.per_role["x"], game.per_role["o"]
    assert ex.turn_rewards == [0.0, 0.0, 1.0] and eo.turn_rewards == [0.0, -1.0]  # O's loss on its last move
    # Each role's prompts only grow: its own generated ids are carried, never re-encoded.
    for prompts in (x.prompts, o.prompts):
        for prev, nxt in itertools.pairwise(prompts):
            assert nxt[: len(prev)] == prev
    # O saw X's moves as observations (mask 0): its first prompt tells it X played 1 1.
    assert "X played 1 1." in codec.decode(o.prompts[0])
    assert sum(eo.mask) == len(codec.encode_text("1 2")) + len(codec.encode_text("1 3"))


def test_tictactoe_draw():
    game, _, _ = play(TicTacToeEnv(), ["1 1", "1 3", "2 1", "3 2", "2 3"], ["1 2", "2 2", "3 1", "3 3"])
    assert game.info["winner"] is None and game.rewards == {"x": 0.0, "o": 0.0}
    assert game.rounds == 9


def test_illegal_moves_are_penalized_replayed_and_forfeit():
    # X: takes 1 1; O: "1 1" taken (-0.5), "9 9" off board (-0.5), then "hello" = third illegal move: forfeit.
    game, _, o = play(TicTacToeEnv(), ["1 1"], ["1 1", "9 9", "hello"])
    assert game.info["forfeit"] == "o" and game.info["winner"] == "x"
    assert game.per_role["o"].turn_rewards == [-0.5, -0.5, -1.0]
    assert game.rewards == {"x": 1.0, "o": -2.0}
    assert "Illegal move: 1 1 is taken" in codec.decode(o.prompts[1])


def test_zero_sum_reward_mode():
    env = TicTacToeEnv(reward_mode="zero-sum")
    game, _, _ = play(env, ["1 1"], ["1 1", "2 2"], max_turns=3)
    # O's illegal move: raw {o: -0.5} becomes -0.25 for O and +0.25 for X.
    assert game.per_role["o"].turn_rewards[0] == -0.25
    assert game.per_role["x"].turn_rewards[0] == 0.25


@pytest.mark.parametrize(
    ("name", "x_moves", "o_moves"),
    [
        ("horizontal", ["5 1", "5 2", "5 3", "5 4", "5 5"], ["1 1", "1 2", "1 3", "1 4"]),
        ("vertical", ["1 9", "2 9", "3 9", "4 9", "5 9"], ["1 1", "1 2", "1 3", "1 4"]),
        ("diagonal", ["3 3", "4 4", "5 5", "6 6", "7 7"], ["1 1", "1 2", "1 3", "1 4"]),
        ("anti-diagonal", ["1 9", "2 8", "3 7", "4 6", "5 5"], ["9 1", "9 2", "9 3", "9 4"]),
        ("gap filled last", ["5 1", "5 2", "5 4", "5 5", "5 3"], ["1 1", "1 2", "1 3", "1 4"]),
    ],
)
def test_gomoku_detects_wins_in_all_directions(name, x_moves, o_moves):
    game, _, _ = play(GomokuEnv(), x_moves, o_moves)
    assert game.info["winner"] == "x", name
    assert game.rewards == {"x": 1.0, "o": -1.0}
    assert game.rounds == 9


def test_gomoku_four_is_not_a_win_and_o_can_win():
    game, _, _ = play(GomokuEnv(), ["5 1", "5 2", "5 3", "5 4", "9 9"], ["1 1", "2 2", "3 3", "4 4", "5 5"])
    assert game.info["winner"] == "o" and game.rewards == {"x": -1.0, "o": 1.0}
    assert game.rounds == 10


def test_gomoku_illegal_moves():
    env = GomokuEnv(size=9)
    env.reset(0)
    assert env.step({"x": "10 1"}).info["illegal"] == "10 1 is off the board"
    assert env.step({"x": "0 3"}).info["illegal"] == "0 3 is off the board"
    assert env.step({"x": "5 5"}).info["move"] == [5, 5]
    r = env.step({"o": "5 5"})
    assert r.info["illegal"] == "5 5 is taken" and r.rewards == {"o": -0.5} and "o" in r.observations
    with pytest.raises(ValueError, match="not x's turn"):
        env.step({"x": "1 1"})


def test_rule_based_player_wins_and_blocks():
    env = TicTacToeEnv()
    env.reset(0)
    env.board = [list("XX."), list("OO."), list("...")]
    assert env.rule_based_action("x") == "1 3"  # win beats block
    assert env.rule_based_action("o") == "2 3"  # o wins too
    env.board = [list("XX."), list("O.."), list("...")]
    assert env.rule_based_action("o") == "1 3"  # block


def test_llm_vs_rule_based_opponent_in_the_coordinator():
    env = TicTacToeEnv()
    x = Scripted(["1 1", "1 2", "3 1", "2 3", "3 3"])
    game = MultiAgentProtocol(Budget(max_turns=20)).run(env, {"x": x, "o": RulePolicy()}, codec, seed=0)
    # The rule player takes the center, then blocks 1 3, 2 1 and finally fills 3 2: a draw.
    assert game.stop_reason is StopReason.DONE and game.info["winner"] is None and game.rounds == 9
    assert env.board == [list("XXO"), list("OOX"), list("XOX")]
    assert game.rewards == {"x": 0.0, "o": 0.0}
    eo = game.per_role["o"]
    assert eo.token_ids == [] and eo.turns == []  # a rule player has rewards but no tokens


def test_versus_rule_is_a_single_agent_environment():
    env = make_builtin("tic-tac-toe", opponent="rule", role="x")
    assert isinstance(env, VersusRule)
    ep = MultiTurnProtocol(Budget(max_turns=9)).run(env, Scripted(["1 1", "3 3", "1 3"]), codec, 0)
    # X: 1 1, O: 2 2; X: 3 3, O: 1 2; X: 1 3 misses the block, O wins down column 2 on its reply.
    assert ep.stop_reason is StopReason.DONE
    assert ep.turn_rewards == [0.0, 0.0, -1.0]
    assert env.game.board == [list("XOX"), list(".O."), list(".OX")]
    assert "O played 1 2." in codec.decode(ep.token_ids)


class Handshake(MultiAgentEnvironment):
    """Simultaneous: both say a number each round; +1 each when they match, else 0; two rounds."""

    name = "handshake"
    roles = ("a", "b")
    turn_order = TurnOrder.SIMULTANEOUS

    def reset(self, seed):
        self.round = 0
        self.seen = []
        return {r: Observation(f"you are {r}") for r in self.roles}

    def step(self, actions):
        self.seen.append(dict(actions))
        self.round += 1
        match = actions["a"] == actions["b"]
        obs = {r: Observation(f"other said {actions['b' if r == 'a' else 'a']}") for r in self.roles}
        return MultiStepResult(obs, {"a": 1.0 if match else 0.0, "b": 1.0 if match else 0.0}, self.round == 2)


@pytest.mark.parametrize(
    ("mode", "expected"),
    [
        ("custom", {"a": 1.0, "b": 1.0}),
        ("cooperative", {"a": 2.0, "b": 2.0}),
        ("zero-sum", {"a": 0.0, "b": 0.0}),
    ],
)
def test_simultaneous_barrier_and_reward_modes(mode, expected):
    env = Handshake(reward_mode=mode)
    a, b = Scripted(["1", "2"]), Scripted(["1", "3"])
    game = MultiAgentProtocol(Budget(max_turns=5)).run(env, {"a": a, "b": b}, codec, seed=0)
    assert env.seen == [{"a": "1", "b": "1"}, {"a": "2", "b": "3"}]  # both acted before each step
    assert game.rewards == expected and game.rounds == 2
    assert "other said 1" in codec.decode(a.prompts[1])


def test_self_play_same_policy_and_missing_role():
    shared = Scripted(["1 1", "2 1", "1 2", "2 2", "1 3"])
    game = MultiAgentProtocol().run(TicTacToeEnv(), {"x": shared, "o": shared}, codec, seed=0)
    assert game.rewards == {"x": 1.0, "o": -1.0}
    with pytest.raises(ValueError, match="no policy for role"):
        MultiAgentProtocol().run(TicTacToeEnv(), {"x": shared}, codec, seed=0)


def test_round_budget_and_env_error():
    g2 = MultiAgentProtocol(Budget(max_turns=3)).run(
        TicTacToeEnv(), {"x": Scripted(["1 1", "1 2"]), "o": Scripted(["2 2"])}, codec, seed=0
    )
    assert g2.stop_reason is StopReason.MAX_TURNS and g2.rounds == 3

    class Crashy(Handshake):
        def step(self, actions):
            raise RuntimeError("nope")

    g3 = MultiAgentProtocol().run(Crashy(), {"a": Scripted(["1"]), "b": Scripted(["1"])}, codec, seed=0)
    assert g3.failed and g3.error == "step failed: RuntimeError: nope"
    assert g3.per_role["a"].stop_reason is StopReason.ENV_ERROR
