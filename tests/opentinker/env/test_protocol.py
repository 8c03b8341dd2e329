"""The protocol state machine: states, masks, token carry-over, budgets and stop reasons."""

from __future__ import annotations

import pytest

from opentinker.env import Environment, Observation, StepResult
from opentinker.env.builtin import ArithmeticEnv, GuessNumberEnv
from opentinker.env.codec import ByteCodec
from opentinker.env.protocol import (
    Budget,
    MultiTurnProtocol,
    SingleTurnProtocol,
    State,
    StopReason,
    protocol_for,
)
from tests.opentinker.env.scripted import Scripted

codec = ByteCodec()


class Echo(Environment):
    """Multi-turn: never done; rewards 0.25 per turn; observation repeats the action."""

    name = "echo"

    def reset(self, seed: int) -> Observation:
        return Observation(f"start {seed}")

    def step(self, action: str) -> StepResult:
        return StepResult(Observation(f"you said {action}"), 0.25, False)


class Broken(Environment):
    def __init__(self, fail_in: str, **config):
        super().__init__(**config)
        self.fail_in = fail_in

    def reset(self, seed: int) -> Observation:
        if self.fail_in == "reset":
            raise KeyError("boom")
        return Observation("hi")

    def step(self, action: str) -> StepResult:
        raise ZeroDivisionError("division by zero")


def test_single_turn_arithmetic_masks_and_states():
    env = ArithmeticEnv()
    env.reset(7)
    answer = env.answer
    policy = Scripted([f"{answer}"], logprob=-0.5)
    ep = SingleTurnProtocol().run(env, policy, codec, seed=7)
    assert ep.stop_reason is StopReason.DONE
    assert ep.states == [State.PENDING, State.GENERATING, State.INTERACTING, State.TERMINATED]
    assert ep.reward == 1.0 and ep.turn_rewards == [1.0]
    gen = codec.encode_text(str(answer))
    assert ep.token_ids == policy.prompts[0] + gen
    assert ep.prompt_len == len(policy.prompts[0])
    assert ep.mask == [0] * ep.prompt_len + [1] * len(gen)
    assert ep.logprobs == [0.0] * ep.prompt_len + [-0.5] * len(gen)
    assert (ep.turns[0].start, ep.turns[0].end) == (ep.prompt_len, len(ep.token_ids))
    # The prompt is the system prompt and the question, as the codec renders them.
    assert codec.decode(policy.prompts[0]) == env.system_prompt + env.reset(7).text


def test_wrong_answer_scores_zero():
    ep = SingleTurnProtocol().run(ArithmeticEnv(), Scripted(["-1"]), codec, seed=7)
    assert ep.reward == 0.0 and ep.stop_reason is StopReason.DONE


def test_multi_turn_carries_generated_ids_unchanged():
    policy = Scripted(["a", "bb", "ccc"])
    ep = MultiTurnProtocol(Budget(max_turns=3)).run(Echo(), policy, codec, seed=1)
    assert ep.stop_reason is StopReason.MAX_TURNS
    assert ep.turn_rewards == [0.25, 0.25, 0.25] and ep.reward == 0.75
    # Each prompt extends the previous prompt plus what was generated: nothing is re-encoded.
    for prev, nxt, turn in zip(policy.prompts, policy.prompts[1:], ep.turns, strict=False):
        assert nxt[: len(prev)] == prev
        assert nxt[turn.start : turn.end] == ep.token_ids[turn.start : turn.end]
    follow = codec.encode_followup({"role": "user", "content": "you said a"}, closed=True)
    t0 = ep.turns[0]
    assert ep.token_ids[t0.end : t0.end + len(follow)] == follow
    assert ep.mask[t0.end : t0.end + len(follow)] == [0] * len(follow)
    assert sum(ep.mask) == sum(len(codec.encode_text(t)) for t in ["a", "bb", "ccc"])
    assert ep.states == [State.PENDING] + [State.GENERATING, State.INTERACTING] * 3 + [State.TERMINATED]


def test_truncated_generation_is_closed_by_environment_tokens():
    policy = Scripted(["abcdef", "x"])
    ep = MultiTurnProtocol(Budget(max_turns=2, max_new_tokens=3)).run(Echo(), policy, codec, seed=0)
    t0 = ep.turns[0]
    assert t0.truncated and t0.action == "abc"
    assert ep.token_ids[t0.start : t0.end] == list(b"abc")
    # The END token the model never produced is environment-side (mask 0).
    assert ep.token_ids[t0.end] == ByteCodec.END and ep.mask[t0.end] == 0


def test_token_budget_stops_with_reason():
    policy = Scripted(["aaaa", "bbbb", "cccc"])
    ep = MultiTurnProtocol(Budget(max_turns=10, max_tokens=7)).run(Echo(), policy, codec, seed=0)
    assert ep.stop_reason is StopReason.MAX_TOKENS
    assert sum(ep.mask) == 7  # 5 + 2: the second generation was capped at what was left
    assert len(ep.turns) == 2 and ep.turns[1].truncated


def test_context_budget_stops_with_reason():
    env = Echo()
    prompt_len = len(codec.encode_prompt([{"role": "user", "content": "start 0"}]))
    budget = Budget(max_turns=10, max_context=prompt_len + 20)
    ep = MultiTurnProtocol(budget).run(env, Scripted(["hello"] * 10), codec, seed=0)
    assert ep.stop_reason is StopReason.CONTEXT
    assert len(ep.token_ids) < prompt_len + 20


def test_wall_time_budget_uses_the_clock():
    ticks = iter(range(100))
    proto = MultiTurnProtocol(Budget(max_turns=10, max_wall_s=2.5), now=lambda: float(next(ticks)))
    ep = proto.run(Echo(), Scripted(["a"] * 10), codec, seed=0)
    assert ep.stop_reason is StopReason.WALL_TIME
    assert len(ep.turns) == 2  # the clock read 1 and 2 before the first two turns, 3 >= 0 + 2.5 after


@pytest.mark.parametrize(
    ("fail_in", "message"), [("reset", "reset failed: KeyError"), ("step", "step failed")]
)
def test_environment_exception_fails_the_episode_not_the_caller(fail_in, message):
    ep = MultiTurnProtocol().run(Broken(fail_in), Scripted(["x"]), codec, seed=0)
    assert ep.failed and ep.stop_reason is StopReason.ENV_ERROR
    assert ep.error.startswith(message)
    assert ep.states[-1] is State.TERMINATED


def test_guess_number_binary_search_exact_rewards():
    env = GuessNumberEnv(low=1, high=100, max_guesses=7)
    env.reset(3)
    secret = env.secret
    lo, hi, guesses = 1, 100, []
    while True:  # a bisecting script, precomputed against the known secret
        g = (lo + hi) // 2
        guesses.append(str(g))
        if g == secret:
            break
        lo, hi = (g + 1, hi) if g < secret else (lo, g - 1)
    ep = MultiTurnProtocol(Budget(max_turns=7)).run(env, Scripted(guesses), codec, seed=3)
    assert ep.stop_reason is StopReason.DONE
    assert ep.turn_rewards == [0.0] * (len(guesses) - 1) + [1.0]


def test_guess_number_out_of_guesses_and_hints():
    env = GuessNumberEnv(low=1, high=10, max_guesses=3)
    env.reset(0)
    wrong = [str(v) for v in range(1, 11) if v != env.secret][:3]
    ep = MultiTurnProtocol(Budget(max_turns=5)).run(env, Scripted(["no idea", *wrong[:2]]), codec, seed=0)
    assert ep.turn_rewards == [0.0, 0.0, 0.0] and ep.stop_reason is StopReason.DONE
    assert ep.turns[-1].info["solved"] is False
    assert "Please answer with a single integer" in codec.decode(ep.token_ids[ep.turns[0].end :])


def test_protocol_for_kinds():
    assert protocol_for("single-turn").budget.max_turns == 1
    assert protocol_for("tool-calling").kind == "tool-calling"
    with pytest.raises(ValueError, match="unknown protocol"):
        protocol_for("telepathy")
    with pytest.raises(ValueError, match="exactly one turn"):
        SingleTurnProtocol(Budget(max_turns=2))
