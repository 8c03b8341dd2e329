"""opentinker/answer-match: a dataset row's prompt, and its reference answer matched the way GSM8K-style RL
scores (numeric with `#### N` and `\\boxed{}`, exact after normalisation, or a regex)."""

from __future__ import annotations

import pytest

from opentinker.env.builtin import BUILTINS, AnswerMatchEnv
from opentinker.env.protocol import _messages

GSM = {"prompt": "Tom has 3 boxes of 412 pens. How many pens?", "answer": "3 * 412 = 1236\n#### 1,236"}


def score(completion: str, answer: str, **config) -> float:
    env = AnswerMatchEnv(rows=[{"prompt": "q", "answer": answer}], **config)
    env.reset(0)
    return env.step(completion).reward


@pytest.mark.parametrize(
    ("completion", "reward"),
    [
        ("So the answer is \\boxed{1236}.", 1.0),
        ("3 boxes x 412 = 1236 pens\n#### 1236", 1.0),
        ("It is 1,236", 1.0),
        ("It is $1236.00", 1.0),
        ("\\boxed{1236} ... wait, 1235", 1.0),  # a boxed answer wins over a later number
        ("412 * 3 = 1235", 0.0),
        ("I do not know", 0.0),
    ],
)
def test_numeric_match_reads_the_final_answer_like_gsm8k_scorers(completion, reward):
    env = AnswerMatchEnv(rows=[GSM])
    assert env.reset(0).text == GSM["prompt"]
    result = env.step(completion)
    assert (result.reward, result.done) == (reward, True)
    assert result.info["reference"] == GSM["answer"]


def test_exact_and_regex_matches_and_a_custom_extractor():
    assert score("  The PARIS. ", "the paris", match="exact") == 1.0
    assert score("Paris, France", "Paris", match="exact") == 0.0
    assert score("<answer> B </answer>", "b", match="exact", extract=r"<answer>(.*?)</answer>") == 1.0
    assert score("no tags: b", "b", match="exact", extract=r"<answer>(.*?)</answer>") == 0.0
    assert score("x = 0.50", r"0?\.50*", match="regex", extract=r"x = (\S+)") == 1.0
    assert score("x = 1.50", r"0?\.50*", match="regex", extract=r"x = (\S+)") == 0.0
    env = AnswerMatchEnv(rows=[{"prompt": "q", "answer": "7"}], extract=r"answer: (\d+)")
    env.reset(0)
    assert env.step("7? answer: 8").info["metrics"] == {"answer_found": 1.0}
    env.reset(0)
    assert env.step("seven").info["metrics"] == {"answer_found": 0.0}


def test_a_prompt_chat_or_a_system_column_is_rendered_as_given():
    chat = [
        {"role": "system", "content": "Be terse."},
        {"role": "user", "content": "1+1?"},
        {"role": "assistant", "content": "2"},
        {"role": "user", "content": "2+2?"},
    ]
    env = AnswerMatchEnv(
        rows=[{"messages": chat, "answer": "4"}, {"prompt": "3+3?", "system": "S", "answer": "6"}]
    )
    assert _messages(env, env.reset(0)) == chat
    assert _messages(env, env.reset(1)) == [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "3+3?"},
    ]
    plain = AnswerMatchEnv(rows=[{"prompt": "3+3?", "answer": "6"}], system_prompt="Answer with a number.")
    assert _messages(plain, plain.reset(5))[0] == {"role": "system", "content": "Answer with a number."}


@pytest.mark.parametrize(
    ("rows", "config", "message"),
    [
        ([{"prompt": "q"}], {}, "row 0: `answer` must be text"),
        ([{"answer": "1"}], {}, "row 0: needs a `prompt` (text) or `messages`"),
        (
            [
                {
                    "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
                    "answer": "1",
                }
            ],
            {},
            "the prompt's last turn must be the user's, not assistant",
        ),
        ([{"messages": [{"role": "wizard", "content": "q"}], "answer": "1"}], {}, "list of {role, content}"),
        ([{"prompt": "q", "answer": "1"}], {"match": "fuzzy"}, "match must be one of numeric, exact, regex"),
        ([{"prompt": "q", "answer": "1"}], {"extract": "(unclosed"}, "is not a regular expression"),
        ([{"prompt": "q", "answer": "1"}], {"extract": "a" * 257}, "1-256 characters"),
        ([{"prompt": "q", "answer": "[z-a]"}], {"match": "regex"}, "row 0: the regex reference"),
    ],
)
def test_rows_and_config_that_cannot_be_played_are_refused_at_load(rows, config, message):
    with pytest.raises(ValueError) as e:
        AnswerMatchEnv(rows=rows, **config)
    assert message in str(e.value)


def test_it_is_a_builtin():
    assert BUILTINS["answer-match"] is AnswerMatchEnv
