"""The two-policy tic-tac-toe recipe, end to end on CPU, shortened to fit CI (issue 11, item 4).

The README's multi-agent example as `make demo DEMO_ARGS=--multi-agent` runs it (every stage a job through the
same controllers as `python -m gpu_runtime run`): the board-game SFT data from the rule-based player
(`gpu_runtime.data.board_sft`), the warm start (`example_multiagent_sft_spec`), then one job
(`example_multiagent_spec`) that co-trains `alice` (full fine-tuning) and `bob` (LoRA) against each other in
both seats, with a share of games against the rule player, and evaluates each against the rule player in
both seats before its first update and at its end.

What this test holds the recipe to is its machinery, not its learning: the warm start (the recipe's own, in
full: ~2 minutes on 2 idle cores) makes games that last (its greedy moves legal), the job reports the
evaluation before and after for every (policy, seat), per-role and per-policy curves every step, and both
parameter sets move. The issue's learning bar (each policy's win-or-draw rate against the rule player up
by >= 0.2) is NOT met by this recipe yet: see `bench/learning_multiagent.py` and the numbers in the README;
a test asserting it would be red.
"""

from __future__ import annotations

import pytest

from bench.learning_multiagent import co_train, parameter_change, summary, warm_start

STEPS = 2


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_the_two_policy_recipe_runs_end_to_end_and_reports_both_policies_in_both_seats(tmp_path):
    base, _ = warm_start(tmp_path, seed=1)
    spec, metrics, _ = co_train(tmp_path, base, seed=1, steps=STEPS)
    assert sorted(metrics) == [0, 1, 2]  # step 0: the evaluation before the first update
    final = f"file://{tmp_path}/rl/step_{STEPS:06d}"
    for step in (1, 2):  # per-role and per-policy curves, every step
        m = metrics[step]
        assert {"reward/x/mean", "reward/o/mean", "game/x/illegal_rate", "game/draw_rate"} <= m.keys()
        for p in ("alice", "bob"):
            assert {
                f"policy/{p}/{k}" for k in ("loss", "reward/mean", "illegal_rate", "win_rate")
            } <= m.keys()
        assert m["episodes/failed"] == 0.0
    # The warm start plays: most of its moves are legal, so games last and both seats get moves to learn from.
    assert metrics[1]["game/x/illegal_rate"] < 0.6 and metrics[1]["game/rounds/mean"] > 3
    assert metrics[0]["eval/vs_rule/alice/illegal_rate"] < 0.1  # greedy: 0.00 here (80 x 32 steps gave 0.10)
    for policy in ("alice", "bob"):
        for when in (0, STEPS):  # each (policy, seat) evaluated against the rule player, before and after
            s = summary(metrics[when], metrics[when], policy)
            assert all(0 <= s[f"{k}_{r}_before"] <= 1 for k in ("wd", "illegal") for r in ("x", "o"))
        assert parameter_change(base, final, policy, spec) > 0  # both parameter sets moved
    # Before the first update both policies are the warm start (bob's LoRA B = 0): the same evaluation.
    assert summary(metrics[0], metrics[0], "alice") == summary(metrics[0], metrics[0], "bob")
