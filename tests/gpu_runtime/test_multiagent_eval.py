"""Multi-agent jobs: seating every policy in every role (`rotate_roles`), per-role game statistics
(illegal-move, win and draw rates) and the in-job evaluation against the rule-based player
(`eval_vs_rule`)."""

from __future__ import annotations

import pytest

from gpu_runtime.multiagent import MultiAgentRolloutWorker, game_stats, policy_game_stats, resolve
from gpu_runtime.rollout.base import GenerateResult, RolloutEngine, SamplingParams
from gpu_runtime.rollout.games import run_games
from opentinker.env.builtin.tictactoe import TicTacToeEnv
from opentinker.env.multiagent import MultiAgentProtocol
from opentinker.env.protocol import Budget
from opentinker.spec import JobSpec
from tests.gpu_runtime.test_multiagent_games import CODEC, BoardEngine


class Stubborn(RolloutEngine):
    """Always answers `1 1`: legal once, illegal ever after."""

    def generate(self, prompts, sampling, seeds=None):
        ids = [CODEC.encode_text("1 1") for _ in prompts]
        return GenerateResult(ids, [[0.0] * len(i) for i in ids], [True] * len(ids))

    def load_weights(self, state_dict) -> None:
        pass


def play(seatings, engines):
    return run_games(
        TicTacToeEnv,
        MultiAgentProtocol(Budget(max_turns=20, max_new_tokens=8)),
        [{"x": CODEC, "o": CODEC}] * len(seatings),
        engines,
        seatings,
        SamplingParams(max_new_tokens=8, stop_ids=tuple(CODEC.stop_ids)),
        list(range(len(seatings))),
    )


def test_games_of_one_batch_may_seat_the_policies_differently():
    engines = {"first": BoardEngine("first"), "last": BoardEngine("last")}
    straight, swapped = {"x": "first", "o": "last"}, {"x": "last", "o": "first"}
    games = play([straight, swapped, straight], engines)
    assert [g.info["winner"] for g in games] == ["x", "x", "x"]  # X (moves first) wins either way...
    assert [t.action for t in games[0].per_role["x"].turns] == ["1 1", "1 2", "1 3"]  # ...as "first"
    assert [t.action for t in games[1].per_role["x"].turns] == ["3 3", "3 2", "3 1"]  # ...as "last"
    # One batch per policy and round, across games: X's moves of games 0 and 2 and O's of game 1, and so on.
    assert engines["first"].batches == [2, 1, 2, 1, 2] and engines["last"].batches == [1, 2, 1, 2, 1]
    stats = policy_game_stats(games, [straight, swapped, straight], ["first", "last"])
    assert stats == {
        "policy/first/win_rate": 2 / 3,
        "policy/first/illegal_rate": 0.0,
        "policy/last/win_rate": 1 / 3,
        "policy/last/illegal_rate": 0.0,
    }
    with pytest.raises(ValueError, match="one entry per seed"):
        play_seeds = [0]  # one seed, two seatings
        run_games(
            TicTacToeEnv,
            MultiAgentProtocol(),
            [{}] * 2,
            engines,
            [straight] * 2,
            SamplingParams(max_new_tokens=8),
            play_seeds,
        )


def test_game_statistics_count_illegal_moves_wins_and_draws():
    # X "first" vs O stubborn: O plays 1 1?  taken -> illegal; the third illegal move forfeits: X wins.
    engines = {"first": BoardEngine("first"), "stubborn": Stubborn()}
    games = play([{"x": "first", "o": "stubborn"}] * 2, engines)
    stats = game_stats(games, ["x", "o"])
    assert (
        stats["game/x/win_rate"] == 1.0 and stats["game/o/win_rate"] == 0.0 and stats["game/draw_rate"] == 0.0
    )
    assert stats["game/x/illegal_rate"] == 0.0 and stats["game/o/illegal_rate"] == 1.0  # 3 of 3 O moves
    assert stats["reward/o/mean"] == -2.0 and stats["episodes/failed"] == 0.0
    # A game the environment ended with `winner: None` is a draw.
    drawn = games[0]
    drawn.info["winner"] = None
    assert game_stats([drawn, games[1]], ["x", "o"])["game/draw_rate"] == 0.5


def spec(**multi_agent) -> JobSpec:
    return JobSpec.model_validate(
        {
            "kind": "rl",
            "model": {"base": "tiny-qwen2"},
            "environment": {"ref": "opentinker/tic-tac-toe@1.0.0", "config": {"prompt_style": "compact"}},
            "algorithm": {"max_new_tokens": 2},
            "multi_agent": {
                "policies": {"alice": {}, "bob": {"model": {"base": "tiny-qwen2", "lora": {"rank": 4}}}},
                "roles": {"x": "alice", "o": "bob"},
                **multi_agent,
            },
        }
    )


def test_rotated_roles_seat_every_policy_in_every_role_group_by_group():
    worker = MultiAgentRolloutWorker(spec(rotate_roles=True).model_dump_json())
    straight, swapped = {"x": "alice", "o": "bob"}, {"x": "bob", "o": "alice"}
    # Groups in order of first appearance: 7 -> straight, 3 -> swapped, 9 -> straight.
    assert worker.seatings([7, 7, 3, 3, 9]) == [straight, straight, swapped, swapped, straight]
    per_policy, stats = worker.collect([1, 1, 2, 2], [7, 7, 3, 3], torch_seed=0)
    assert [s.role for s in per_policy["alice"]] == ["x", "x", "o", "o"]
    assert [s.role for s in per_policy["bob"]] == ["o", "o", "x", "x"]
    assert {"policy/alice/win_rate", "policy/bob/illegal_rate", "game/x/illegal_rate"} <= stats.keys()
    plain = MultiAgentRolloutWorker(spec().model_dump_json())
    assert plain.seatings([7, 3]) == [straight, straight]


def test_each_policy_is_evaluated_against_the_rule_player_in_each_seat():
    worker = MultiAgentRolloutWorker(spec(eval_vs_rule={"games": 3}).model_dump_json())
    out = worker.versus_rule([1, 2, 3])
    for p in ("alice", "bob"):
        for role in ("x", "o"):
            for k in ("win_rate", "win_or_draw", "illegal_rate", "reward", "failed"):
                assert 0 <= out[f"vs_rule/{p}/{role}/{k}"] <= 1 or k == "reward"
        # A random-init model writes no legal move: every move illegal, every game forfeited.
        assert out[f"vs_rule/{p}/illegal_rate"] == 1.0 and out[f"vs_rule/{p}/win_or_draw"] == 0.0
        assert (
            out[f"vs_rule/{p}/win_or_draw"]
            == (out[f"vs_rule/{p}/x/win_or_draw"] + out[f"vs_rule/{p}/o/win_or_draw"]) / 2
        )
    assert resolve(spec(eval_vs_rule={"games": 3, "every_steps": 2})).mapping.eval_vs_rule.every_steps == 2


def test_a_rule_mix_seats_each_policy_against_the_rule_player_in_each_role():
    worker = MultiAgentRolloutWorker(spec(rotate_roles=True, rule_mix=0.5).model_dump_json())
    groups = [10, 11, 12, 13, 14, 15, 16, 17]
    straight, swapped = {"x": "alice", "o": "bob"}, {"x": "bob", "o": "alice"}
    # Every other group is against the rule player, cycling (alice x), (bob x), (alice o), (bob o); the
    # others rotate the two policies' seats as before.
    assert worker.seatings(groups) == [
        straight,
        {"x": "alice", "o": None},
        swapped,
        {"x": "bob", "o": None},
        straight,
        {"x": None, "o": "alice"},
        swapped,
        {"x": None, "o": "bob"},
    ]
    per_policy, stats = worker.collect([1, 2, 3, 4], [10, 11, 12, 13], torch_seed=0)
    assert [s.role for s in per_policy["alice"]] == ["x", "x", "o"]  # no sample for a rule-played seat
    assert [s.role for s in per_policy["bob"]] == ["o", "x", "x"]
    assert {"policy/alice/win_rate", "policy/bob/win_rate"} <= stats.keys()
    none = MultiAgentRolloutWorker(spec(rule_mix=1.0).model_dump_json())
    assert none.seatings([1, 2]) == [{"x": "alice", "o": None}, {"x": "bob", "o": None}]


def test_game_statistics_give_the_share_of_forced_blocks_made():
    # Both play the first free cell: X 11, O 12, X 13, O 21, X 22 (two open lines through 22), O must block
    # 33 or 31 but plays 23, X wins at 31. O faced one forced block and missed it; X never had to block.
    engine = BoardEngine("first")
    (game,) = play([{"x": "first", "o": "first"}], {"first": engine})
    assert [t.info.get("must_block", False) for t in game.per_role["o"].turns] == [False, False, True]
    stats = game_stats([game], ["x", "o"])
    assert stats["game/o/block_rate"] == 0.0 and "game/x/block_rate" not in stats
    assert game.info["winner"] == "x"


def test_the_evaluation_against_the_rule_player_may_override_the_training_environment():
    # Training on a curriculum (every game opens on a forced block), evaluating on the regular openings.
    train = {"prompt_style": "compact", "opening": 2, "threat_openings": 1.0}
    js = spec(eval_vs_rule={"games": 2, "environment_config": {"threat_openings": 0}}).model_dump(mode="json")
    js["environment"]["config"] = train
    worker = MultiAgentRolloutWorker(JobSpec.model_validate(js).model_dump_json())
    trained, evaluated = worker.make_env(), worker.make_eval_env()
    assert trained.threat_openings == 1.0 and evaluated.threat_openings == 0.0
    assert evaluated.opening == 2 and evaluated.prompt_style == "compact"  # the rest as in training
    trained.reset(5), evaluated.reset(5)
    assert trained.moves >= 3 and evaluated.moves == 2
    plain = MultiAgentRolloutWorker(spec(eval_vs_rule={"games": 2}).model_dump_json())
    assert plain.make_eval_env is plain.make_env  # no overrides: the training environment
