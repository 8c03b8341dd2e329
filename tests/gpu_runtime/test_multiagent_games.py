"""Games batched across games and routed per policy (`gpu_runtime.rollout.games`), with scripted engines.

Engine "first" plays the first free cell in reading order, engine "last" the last free one, each reading the
board from the end of its own prompt. X = first, O = last: X 1 1, O 3 3, X 1 2, O 3 2, X 1 3 -> X wins row 1.
"""

from __future__ import annotations

import pytest

from gpu_runtime.rollout.base import GenerateResult, RolloutEngine, SamplingParams
from gpu_runtime.rollout.collector import run_episodes
from gpu_runtime.rollout.games import WithStops, run_games
from opentinker.env.base import Observation
from opentinker.env.builtin.tictactoe import TicTacToeEnv
from opentinker.env.codec import ByteCodec
from opentinker.env.multiagent import (
    MultiAgentEnvironment,
    MultiAgentProtocol,
    MultiStepResult,
    RewardMode,
    TurnOrder,
)
from opentinker.env.protocol import Budget, StopReason, TurnProtocol
from tests.gpu_runtime.test_controller import CoinEnv

CODEC = ByteCodec()


class BoardEngine(RolloutEngine):
    def __init__(self, pick: str) -> None:
        self.pick = pick
        self.batches: list[int] = []
        self.stops: list[tuple[int, ...]] = []

    def move(self, prompt: list[int]) -> str:
        lines = CODEC.decode(prompt).split("\n")
        last = max(i for i, line in enumerate(lines) if "Your move:" in line)
        free = [
            (r + 1, c + 1)
            for r, row in enumerate(lines[last - 3 : last])
            for c, cell in enumerate(row.split()[1:])
            if cell == "."
        ]
        r, c = free[0] if self.pick == "first" else free[-1]
        return f"{r} {c}"

    def generate(self, prompts: list[list[int]], sampling: SamplingParams, seeds=None) -> GenerateResult:
        self.batches.append(len(prompts))
        self.stops.append(sampling.stop_ids)
        ids = [CODEC.encode_text(self.move(p)) for p in prompts]
        return GenerateResult(ids, [[0.0] * len(i) for i in ids], [True] * len(ids))

    def load_weights(self, state_dict) -> None:
        pass


def play(n: int, make_env=TicTacToeEnv, role_policy=None):
    engines = {"first": BoardEngine("first"), "last": BoardEngine("last")}
    games = run_games(
        make_env,
        MultiAgentProtocol(Budget(max_turns=20, max_new_tokens=8)),
        {"x": CODEC, "o": CODEC},
        engines,
        role_policy or {"x": "first", "o": "last"},
        SamplingParams(max_new_tokens=8, stop_ids=tuple(CODEC.stop_ids)),
        list(range(n)),
    )
    return games, engines


def test_each_role_is_played_by_its_policys_engine_batched_across_games():
    games, engines = play(3)
    for g in games:
        assert (g.stop_reason, g.rounds, g.info["winner"]) == (StopReason.DONE, 5, "x")
        assert [t.action for t in g.per_role["x"].turns] == ["1 1", "1 2", "1 3"]
        assert [t.action for t in g.per_role["o"].turns] == ["3 3", "3 2"]
        assert g.rewards == {"x": 1.0, "o": -1.0}
    # All three games wait on X together, then on O: one batch of 3 per move, on the right engine only.
    assert engines["first"].batches == [3, 3, 3] and engines["last"].batches == [3, 3]


class Pennies(MultiAgentEnvironment):
    """Matching pennies, both roles at once, two rounds: raw reward 1 to `even` on a match, else to `odd`."""

    name = "pennies"
    roles = ("even", "odd")
    turn_order = TurnOrder.SIMULTANEOUS
    reward_mode = RewardMode.ZERO_SUM

    def reset(self, seed: int) -> dict[str, Observation]:
        self.round = 0
        return {r: Observation("heads or tails?") for r in self.roles}

    def step(self, actions: dict[str, str]) -> MultiStepResult:
        self.round += 1
        match = actions["even"] == actions["odd"]
        obs = {r: Observation(f"round {self.round}: {actions['even']}/{actions['odd']}") for r in self.roles}
        return MultiStepResult(obs, {"even": float(match), "odd": float(not match)}, self.round == 2)


class Say(RolloutEngine):
    def __init__(self, text: str) -> None:
        self.text, self.batches = text, []

    def generate(self, prompts, sampling, seeds=None):
        self.batches.append(len(prompts))
        ids = [CODEC.encode_text(self.text) for _ in prompts]
        return GenerateResult(ids, [[0.0] * len(i) for i in ids], [True] * len(ids))

    def load_weights(self, state_dict) -> None:
        pass


def test_simultaneous_roles_wait_at_the_barrier_and_get_zero_sum_rewards():
    engines = {"h": Say("heads"), "t": Say("tails")}
    games = run_games(
        Pennies,
        MultiAgentProtocol(Budget(max_turns=5, max_new_tokens=8)),
        {"even": CODEC, "odd": CODEC},
        engines,
        {"even": "h", "odd": "t"},
        SamplingParams(max_new_tokens=8),
        [0, 1, 2, 3],
    )
    for g in games:
        assert (g.stop_reason, g.rounds) == (StopReason.DONE, 2)
        # No match in either round: raw (0, 1) -> zero-sum (-0.5, +0.5) per round.
        assert g.per_role["even"].turn_rewards == [-0.5, -0.5] and g.rewards == {"even": -1.0, "odd": 1.0}
        assert "round 1: heads/tails" in CODEC.decode(g.per_role["odd"].token_ids)
    assert engines["h"].batches == [4, 4] and engines["t"].batches == [4, 4]  # one batch per role per round


def test_swapping_the_mapping_swaps_who_plays_how():
    games, engines = play(1, role_policy={"x": "last", "o": "first"})
    (g,) = games
    assert [t.action for t in g.per_role["x"].turns][:2] == ["3 3", "3 2"]
    assert [t.action for t in g.per_role["o"].turns][:2] == ["1 1", "1 2"]
    assert engines["last"].batches[0] == 1 and engines["first"].batches[0] == 1


def test_a_rule_played_role_uses_no_engine():
    games, engines = play(2, role_policy={"x": "first", "o": None})
    assert all(g.stop_reason is StopReason.DONE and g.per_role["o"].token_ids == [] for g in games)
    assert engines["last"].batches == [] and engines["first"].batches


def test_a_game_whose_environment_cannot_start_fails_alone_and_nothing_hangs():
    built = iter(range(100))

    def flaky():
        if next(built) == 1:
            raise RuntimeError("no board today")
        return TicTacToeEnv()

    games, engines = play(3, make_env=flaky)
    failed = [i for i, g in enumerate(games) if g.failed]
    assert len(failed) == 1 and "no board today" in games[failed[0]].error
    assert all(g.info["winner"] == "x" for g in games if not g.failed)
    assert engines["first"].batches == [2, 2, 2]


@pytest.mark.timeout(30)
def test_the_single_agent_collector_survives_an_environment_that_cannot_start():
    class Echo(RolloutEngine):
        def generate(self, prompts, sampling, seeds=None):
            return GenerateResult(
                [CODEC.encode_text("1") for _ in prompts], [[0.0, 0.0]] * len(prompts), [True] * len(prompts)
            )

        def load_weights(self, state_dict) -> None:
            pass

    calls = iter(range(100))

    def flaky():
        if next(calls) == 0:
            raise OSError("sandbox did not start")
        return CoinEnv()

    eps = run_episodes(
        flaky, TurnProtocol(Budget(max_turns=1)), CODEC, Echo(), SamplingParams(max_new_tokens=4), [5, 6, 7]
    )
    assert sum(e.failed for e in eps) == 1
    assert [e.reward for e in eps if not e.failed] == [1.0, 1.0]  # "1" is byte 49: odd parity
    bad = next(e for e in eps if e.failed)
    assert "sandbox did not start" in bad.error


def test_policies_with_different_tokenizers_stop_on_their_own_end_ids():
    inner = BoardEngine("first")
    prompt = TicTacToeEnv().reset(0)["x"].text
    out = WithStops(inner, frozenset({7, 3})).generate(
        [[*prompt.encode()]], SamplingParams(4, stop_ids=(257,))
    )
    assert inner.stops == [(3, 7)] and CODEC.decode(out.token_ids[0]) == "1 1"
