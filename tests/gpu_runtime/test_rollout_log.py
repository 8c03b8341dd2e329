"""The rollout log: each RL step records a few episodes as text, best and worst first (spec `rollouts`)."""

from __future__ import annotations

import io
import json
import math

import pytest

from gpu_runtime.batch import Sample
from gpu_runtime.controller import EXIT_OK, Controller, LocalGroup
from gpu_runtime.multiagent import MultiAgentController, MultiAgentGroup
from gpu_runtime.rollout_log import (
    MAX_BYTES,
    MAX_EPISODES,
    EpisodeTrace,
    TurnTrace,
    pick,
    step_records,
    trace_of,
)
from gpu_runtime.sink import HttpSink, JsonlSink
from opentinker.env.protocol import Episode, StopReason, Turn
from opentinker.spec import JobSpec
from tests.gpu_runtime.conftest import small_spec
from tests.gpu_runtime.test_sink import Ingest

EPISODE_KEYS = {
    "index", "group", "game", "role", "reward", "final_reward", "stop_reason", "prompt", "turns", "tokens",
}  # fmt: skip
TURN_KEYS = {"text", "action", "tool_calls", "reward", "truncated", "observation", "info", "tokens"}


def lines_of(out: io.StringIO) -> list[dict]:
    return [json.loads(line) for line in out.getvalue().splitlines()]


def sample(reward: float, *, game: int | None = None, role: str = "agent", text: str = "ab") -> Sample:
    ids = [ord(c) for c in "Q?" + text]
    trace = EpisodeTrace(2, "done", [TurnTrace(2, len(ids), reward, text, False)], 0.0, game)
    zeros = [0.0] * len(ids)
    return Sample(ids, [0, 0] + [1] * len(text), zeros, zeros, reward, 0, role, trace=trace)


def decode(ids: list[int]) -> str:
    return "".join(map(chr, ids))


def test_pick_takes_the_best_and_the_worst_first_then_a_spread():
    samples = [sample(r) for r in (0.5, 0.0, 1.0, 0.25, 0.75, 0.1)]
    assert [s.reward for s in pick(samples, 2)] == [1.0, 0.0]
    assert [s.reward for s in pick(samples, 4)] == [1.0, 0.0, 0.25, 0.5]
    assert len(pick(samples, 20)) == 6 and pick(samples, 0) == []


def test_pick_completes_the_games_of_the_chosen_roles():
    samples = [sample(1.0, game=0, role="x"), sample(-1.0, game=0, role="o"), sample(0.0, game=1, role="x")]
    samples.append(sample(0.0, game=1, role="o"))
    chosen = pick(samples, 1)  # the best (game 0's x) brings its opponent along
    assert [(s.trace.game, s.role) for s in chosen] == [(0, "x"), (0, "o")]


def test_a_step_keeps_at_most_the_ingest_limit_of_whole_games_best_and_worst_first():
    """per_step 64 with 3 trained roles is 192 records: the ingest API would refuse the step (400)."""
    from portal.services.rollouts import MAX_EPISODES as INGEST_MAX

    assert MAX_EPISODES <= INGEST_MAX
    samples = [sample(g + r / 10, game=g, role=role) for g in range(100) for r, role in enumerate("xyz")]
    records = step_records(samples, 64, lambda s: decode, max_chars=100)
    assert 0 < len(records) <= MAX_EPISODES
    assert [(r["game"], r["role"]) for r in records[:2]] == [(99, "z"), (0, "x")]  # the best, the worst
    per_game: dict[int, set[str]] = {}
    for r in records:
        per_game.setdefault(r["game"], set()).add(r["role"])
    assert all(roles == {"x", "y", "z"} for roles in per_game.values())  # each game whole
    assert len(pick([sample(float(r)) for r in range(300)], 200)) == MAX_EPISODES


def test_a_turn_keeps_only_short_json_safe_info():
    ep = Episode(role="x", token_ids=[1, 2], mask=[0, 1], prompt_len=1, stop_reason=StopReason.DONE)
    ep.turns.append(Turn("x", 1, 2, 1.0, info={"winner": "x", "board": [1, 2], "nan": math.nan, "n": 3}))
    assert trace_of(ep, game=2).turns[0].info == {"winner": "x", "n": 3}


def test_records_stay_under_the_byte_limit_keeping_best_and_worst():
    samples = [sample(float(r), text="z" * 50_000) for r in range(8)]
    records = step_records(samples, 8, lambda s: decode, max_chars=20_000)
    assert len(json.dumps(records)) <= MAX_BYTES
    assert [r["reward"] for r in records[:2]] == [7.0, 0.0]
    assert records[0]["turns"][0]["text"].endswith("more characters]")


def test_an_rl_job_records_best_and_worst_with_exact_fields():
    spec = small_spec(steps=2, batch_size=2, group_size=3)
    spec = spec.model_copy(update={"rollouts": spec.rollouts.model_copy(update={"per_step": 3})})
    out = io.StringIO()
    result = Controller(spec, JsonlSink(out), LocalGroup(spec), None).run()
    assert result.exit_code == EXIT_OK
    lines = lines_of(out)
    rollouts = {r["step"]: r["episodes"] for r in lines if r["type"] == "rollouts"}
    metrics = {r["step"]: r for r in lines if r["type"] == "metrics"}
    assert sorted(rollouts) == [1, 2]
    for step, episodes in rollouts.items():
        assert len(episodes) == 3
        assert episodes[0]["reward"] == metrics[step]["reward/max"]  # the best first ...
        assert episodes[1]["reward"] == min(e["reward"] for e in episodes)  # ... then the worst
        assert "time/rollout_log" in metrics[step]
        for i, ep in enumerate(episodes):
            assert set(ep) == EPISODE_KEYS and ep["index"] == i
            assert ep["role"] == "agent" and ep["game"] is None
            assert "Answer with the number only.<|im_end|>" in ep["prompt"]  # the question, decoded
            (turn,) = ep["turns"]  # single-turn arithmetic
            assert set(turn) == TURN_KEYS and "answer" in turn["info"]
            assert ep["stop_reason"] == "done" and turn["reward"] + ep["final_reward"] == ep["reward"]
            tok = ep["tokens"]
            assert tok["generated"] == turn["tokens"]["generated"] <= spec.algorithm.max_new_tokens
            assert tok["total"] == tok["generated"] + tok["untrained"] == tok["prompt"] + tok["generated"]


def test_per_step_zero_records_nothing():
    spec = small_spec(steps=1)
    spec = spec.model_copy(update={"rollouts": spec.rollouts.model_copy(update={"per_step": 0})})
    out = io.StringIO()
    assert Controller(spec, JsonlSink(out), LocalGroup(spec), None).run().exit_code == EXIT_OK
    assert not [r for r in lines_of(out) if r["type"] == "rollouts"]


@pytest.mark.slow
def test_a_multi_agent_job_records_whole_games_with_per_role_turns():
    spec = JobSpec.model_validate(
        {
            "kind": "rl",
            "model": {"base": "tiny-qwen2"},
            "environment": {"ref": "opentinker/tic-tac-toe@1.0.0"},
            "algorithm": {"name": "grpo", "steps": 1, "batch_size": 2, "group_size": 2, "max_new_tokens": 6},
            "rollouts": {"per_step": 2},
            "seed": 3,
        }
    )
    out = io.StringIO()
    group = MultiAgentGroup(spec)
    try:
        assert MultiAgentController(spec, JsonlSink(out), group, None).run().exit_code == EXIT_OK
    finally:
        group.shutdown()
    (record,) = [r for r in lines_of(out) if r["type"] == "rollouts"]
    games: dict[int, dict[str, dict]] = {}
    for ep in record["episodes"]:
        games.setdefault(ep["game"], {})[ep["role"]] = ep
    assert 1 <= len(games) <= 2
    for roles in games.values():
        assert set(roles) == {"x", "o"}  # self-play: both roles of each chosen game, each its own transcript
        x = roles["x"]
        assert x["turns"] and all(t["tokens"]["generated"] > 0 for t in x["turns"])


def test_the_http_sink_posts_a_step_and_survives_a_refusal(capfd):
    srv = Ingest()
    try:
        sink = HttpSink(srv.url, "otj_tok", retries=0)
        sink.rollouts(4, [{"index": 0}])
        ((path, body, auth),) = srv.requests
        assert path.endswith("/rollouts") and body == {"step": 4, "episodes": [{"index": 0}]}
        assert auth == "Bearer otj_tok"
        srv.fail["rollouts"] = [413]
        sink.rollouts(5, [{"index": 0}])  # reading material: a refusal is logged, the job goes on
        assert "rollouts of step 5 not recorded: POST rollouts: HTTP 413" in capfd.readouterr().err
    finally:
        srv.server.shutdown()


def test_a_game_bigger_than_the_limit_keeps_its_best_player_first():
    samples = [sample(float(r), game=0, role=f"p{r}") for r in range(5)]
    assert [s.role for s in pick(samples, 2, limit=3)] == ["p4", "p0", "p1"]
