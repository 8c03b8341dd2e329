"""Each built-in runs through the protocol machine with exact rewards for scripted actions."""

from __future__ import annotations

import json

import pytest

from opentinker.env.builtin import BUILTINS, PROTOCOL_KINDS, ArithmeticEnv, CalculatorEnv, MathWordEnv
from opentinker.env.builtin.calculator import calculate
from opentinker.env.builtin.math_word import extract_answer
from opentinker.env.codec import ByteCodec
from opentinker.env.protocol import Budget, SingleTurnProtocol, StopReason, ToolCallingProtocol
from tests.opentinker.env.scripted import Scripted

codec = ByteCodec()


def test_every_builtin_has_a_protocol_kind_and_a_card():
    assert set(BUILTINS) == set(PROTOCOL_KINDS)
    for cls in BUILTINS.values():
        assert "Card:" in (__import__(cls.__module__, fromlist=["_"]).__doc__ or "")


def test_arithmetic_is_deterministic_and_configurable():
    env = ArithmeticEnv(min_operand=2, max_operand=2, operations=["*"])
    assert env.reset(0).text == "What is 2 * 2? Answer with the number only."
    assert env.step("4.").reward == 1.0
    env.reset(0)
    assert env.step("The answer: 5").reward == 0.0
    assert ArithmeticEnv().reset(11).text == ArithmeticEnv().reset(11).text
    with pytest.raises(ValueError, match="operations"):
        ArithmeticEnv(operations=["/"])


def test_arithmetic_compact_prompt_style():
    env = ArithmeticEnv(min_operand=2, max_operand=2, operations=["*"], prompt_style="compact")
    assert env.reset(0).text == "2*2="
    assert env.system_prompt == ""
    assert env.step("4").reward == 1.0
    assert ArithmeticEnv().system_prompt  # the default style keeps its system prompt
    with pytest.raises(ValueError, match="prompt_style"):
        ArithmeticEnv(prompt_style="terse")


def test_arithmetic_parses_first_integer():
    env = ArithmeticEnv(min_operand=3, max_operand=3, operations=["-"])
    env.reset(1)
    assert env.step("0 apples").reward == 1.0
    env.reset(1)
    assert env.step("no number").reward == 0.0


def call(expr: str) -> str:
    return f'<tool_call>{{"name": "calculate", "arguments": {{"expression": "{expr}"}}}}</tool_call>'


def test_calculator_tool_use_episode():
    env = CalculatorEnv(digits=3)
    question = env.reset(5).text
    expr = question.removeprefix("What is ").removesuffix("?")
    answer = env.answer
    policy = Scripted([call(expr), f"The result is {answer}."])
    ep = ToolCallingProtocol(Budget(max_turns=4)).run(env, policy, codec, seed=5)
    assert ep.stop_reason is StopReason.DONE
    assert ep.turn_rewards == [0.0, 1.0]
    assert ep.metrics == {"correct": 1.0, "used_tool": 1.0}
    # The tool schema went into the prompt, and the tool's result came back as a tool message (mask 0).
    assert b'"name": "calculate"' in bytes(t for t in policy.prompts[0] if t < 256)
    result = codec.encode_followup({"role": "tool", "content": str(answer)}, closed=True)
    t0 = ep.turns[0]
    assert ep.token_ids[t0.end : t0.end + len(result)] == result


def test_calculator_without_tool_and_wrong():
    env = CalculatorEnv(digits=3)
    ep = ToolCallingProtocol(Budget(max_turns=4)).run(env, Scripted(["12"]), codec, seed=5)
    assert ep.turn_rewards == [0.0] and ep.metrics == {"correct": 0.0, "used_tool": 0.0}


def test_calculator_tool_errors_are_feedback():
    env = CalculatorEnv()
    env.reset(0)
    assert env.step(call("__import__('os')")).observation.text.startswith("error: ValueError")
    r = env.step('<tool_call>{"name": "calculate", "arguments": {"expr": "1"}}</tool_call>')
    assert r.observation.text == "error: missing argument(s) expression" and not r.done
    assert env.step('<tool_call>{"name": "rm", "arguments": {}}</tool_call>').observation.text == (
        "error: unknown tool 'rm'"
    )
    assert calculate(expression="(2 + 3) * 4 / 2") == "10"


ROWS = [
    {"question": "Tom has 3 apples and buys 4 more. How many?", "answer": "3 + 4 = 7\n#### 7"},
    {"question": "A box holds 1,200 pens; 200 are sold.", "answer": "1,000"},
]


@pytest.mark.parametrize(
    ("seed", "text", "reward", "boxed"),
    [
        (0, "3 + 4 = 7, so \\boxed{7}", 1.0, 1.0),
        (0, "I think 7", 1.0, 0.0),
        (0, "\\boxed{8} or 7", 0.0, 1.0),  # the boxed answer counts, not the last number
        (1, "\\boxed{1,000}", 1.0, 1.0),
        (3, "1000.0", 1.0, 0.0),  # seed 3 -> row 1
    ],
)
def test_math_word_rewards(tmp_path, seed, text, reward, boxed):
    path = tmp_path / "gsm.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    env = MathWordEnv(dataset=f"file://{path}")
    ep = SingleTurnProtocol().run(env, Scripted([text]), codec, seed=seed)
    assert ep.reward == reward and ep.metrics == {"correct": reward, "boxed": boxed}


def test_math_word_rejects_rows_without_a_number():
    with pytest.raises(ValueError, match="has no number"):
        MathWordEnv(rows=[{"question": "q", "answer": "none"}])
    assert extract_answer("nothing") is None
