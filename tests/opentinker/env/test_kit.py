"""Authoring kit: Rubric, typed tools with JSON schemas, dataset-backed environments."""

from __future__ import annotations

import json
from typing import Literal

import pytest

from opentinker.env.dataset import DatasetEnvironment, load_jsonl
from opentinker.env.rubric import Criterion, Rubric
from opentinker.env.tools import parse_tool_calls, tool


def exact(completion: str, answer: str, **_) -> float:
    return 1.0 if completion == answer else 0.0


def short(completion: str, **_) -> float:
    return 1.0 if len(completion) <= 3 else 0.0


def test_rubric_weights_and_logged_only_metrics():
    rubric = Rubric([(exact, 2.0), Criterion(short, 0.0, name="brevity")])
    s = rubric.score("42", answer="42")
    assert s.reward == 2.0 and s.metrics == {"exact": 1.0, "brevity": 1.0}
    s = rubric.score("forty-two", answer="42")
    assert s.reward == 0.0 and s.metrics == {"exact": 0.0, "brevity": 0.0}
    with pytest.raises(ValueError, match="distinct names"):
        Rubric([exact, exact])


def test_tool_schema_from_type_hints_and_docstring():
    @tool
    def search(
        query: str, limit: int = 5, mode: Literal["fast", "exact"] = "fast", tags: list[str] | None = None
    ):
        """Search the catalog.

        Args:
            query: what to look for
            limit: at most this many results
        """
        return query

    assert search.schema == {
        "type": "function",
        "function": {
            "name": "search",
            "description": "Search the catalog.",
            "parameters": {
                "type": "object",
                "properties": {
                    "query": {"type": "string", "description": "what to look for"},
                    "limit": {"type": "integer", "description": "at most this many results"},
                    "mode": {"enum": ["fast", "exact"]},
                    "tags": {"type": "array", "items": {"type": "string"}},
                },
                "required": ["query"],
            },
        },
    }


def test_tool_without_type_hint_is_rejected():
    def bad(x):
        return x

    with pytest.raises(TypeError, match="needs a type hint"):
        tool(bad)


def test_parse_tool_calls():
    text = 'ok <tool_call>{"name": "f", "arguments": {"a": 1}}</tool_call>'
    (call,) = parse_tool_calls(text)
    assert (call.name, call.arguments) == ("f", {"a": 1})
    assert parse_tool_calls("no calls") == []
    assert "not valid JSON" in parse_tool_calls("<tool_call>{oops</tool_call>")


class QA(DatasetEnvironment):
    required_fields = ("q",)

    def reset(self, seed):
        from opentinker.env import Observation

        return Observation(self.select_row(seed)["q"])

    def step(self, action):
        raise NotImplementedError


def test_dataset_environment_from_jsonl(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps({"q": f"question {i}"}) for i in range(3)) + "\n\n")
    env = QA(dataset=f"file://{path}")
    assert [env.reset(s).text for s in (0, 1, 2, 3)] == [
        "question 0",
        "question 1",
        "question 2",
        "question 0",
    ]
    assert len(load_jsonl(str(path))) == 3


def test_dataset_errors_name_the_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"q": 1}\nnot json\n')
    with pytest.raises(ValueError, match=r"d.jsonl:2: not JSON"):
        QA(dataset=str(path))
    with pytest.raises(ValueError, match="row 0 lacks field"):
        QA(rows=[{"x": 1}])
    with pytest.raises(ValueError, match="needs config 'dataset'"):
        QA()
