"""The job spec's dataset for rl and eval jobs: a column mapping for prompts and reference answers, played by
opentinker/answer-match; clear errors for a mapping or environment that cannot work."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from opentinker.spec import JobSpec

ENV = {"ref": "opentinker/answer-match@1.0.0"}


def rl(**over):
    spec = {
        "kind": "rl",
        "model": {"base": "tiny-qwen2"},
        "environment": ENV,
        "dataset": {"uri": "acme/prompts@latest", "columns": {"prompt": "question", "answer": "solution"}},
    }
    return JobSpec.model_validate(spec | over)


def error(**over) -> str:
    with pytest.raises(ValidationError) as e:
        rl(**over)
    return str(e.value)


def test_an_rl_job_takes_a_prompt_dataset_with_a_column_mapping():
    spec = rl()
    assert spec.dataset.columns == {"prompt": "question", "answer": "solution"}
    assert str(spec.dataset.registry) == "acme/prompts@latest"
    chat = rl(dataset={"uri": "file:///d/p.parquet", "columns": {"messages": "chat", "answer": "a"}})
    assert chat.dataset.columns == {"messages": "chat", "answer": "a"}
    held = rl(dataset={"uri": "acme/prompts@2", "eval_rows": 16, "eval_every": 5})
    assert (held.dataset.eval_rows, held.dataset.eval_every, held.dataset.columns) == (16, 5, None)
    ev = rl(kind="eval", dataset={"uri": "acme/prompts@2"})
    assert ev.kind.value == "eval" and ev.algorithm.name == "eval"


@pytest.mark.parametrize(
    ("columns", "message"),
    [
        ({"prompt": "q"}, "needs `prompt` (or `messages`) and `answer`"),
        ({"answer": "a"}, "needs `prompt` (or `messages`) and `answer`"),
        ({"prompt": "q", "completion": "c"}, "`completion` is for sft datasets"),
        ({"prompt": "q", "messages": "m", "answer": "a"}, "either `prompt` (text) or `messages`"),
        ({"messages": "m", "system": "s", "answer": "a"}, "`system` goes with `prompt`"),
        ({"prompt": "q", "reference": "a"}, "unknown role 'reference'"),
        ({"prompt": "q", "answer": ""}, "a column name is 1-128 characters"),
    ],
)
def test_a_column_mapping_that_cannot_work_is_refused_naming_the_problem(columns, message):
    msg = error(dataset={"uri": "acme/prompts@1", "columns": columns})
    assert "dataset" in msg and message in msg


def test_an_environment_that_does_not_take_a_dataset_is_refused():
    msg = error(environment={"ref": "opentinker/arithmetic@1.0.0"})
    assert "opentinker/arithmetic@1.0.0 does not take a dataset" in msg
    assert "opentinker/answer-match" in msg
    assert "does not take a dataset" in error(environment={"ref": "https://envs.example.com/x"})
    assert "does not take a dataset" in error(environment={"ref": "acme/answer-match@1.0.0"})


def test_answer_match_without_a_dataset_is_refused_unless_rows_are_inline():
    msg = error(dataset=None)
    assert "opentinker/answer-match@1.0.0 plays the rows of a dataset: give the job a dataset" in msg
    inline = rl(dataset=None, environment=ENV | {"config": {"rows": [{"prompt": "1+1=", "answer": "2"}]}})
    assert inline.dataset is None


def test_the_eval_split_is_for_rl_and_eval_and_eval_every_needs_it():
    assert "eval_every needs eval_rows" in error(dataset={"uri": "acme/p@1", "eval_every": 2})
    assert "less than or equal to 100000" in error(dataset={"uri": "acme/p@1", "eval_rows": 100_001})
    with pytest.raises(ValidationError, match="eval_rows and eval_every are for rl and eval jobs, not sft"):
        JobSpec.model_validate(
            {"kind": "sft", "model": {"base": "tiny-qwen2"}, "dataset": {"uri": "acme/p@1", "eval_rows": 4}}
        )
    with pytest.raises(ValidationError, match="`answer` is for rl and eval datasets"):
        JobSpec.model_validate(
            {
                "kind": "sft",
                "model": {"base": "tiny-qwen2"},
                "dataset": {"uri": "acme/p@1", "columns": {"prompt": "q", "answer": "a"}},
            }
        )


def test_a_prompt_dataset_is_for_single_agent_jobs():
    msg = error(
        multi_agent={"policies": {"p": {"kind": "trained"}}, "roles": {"agent": "p"}},
    )
    assert "a dataset of prompts is for single-agent jobs" in msg
