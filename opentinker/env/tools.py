"""Tools as typed Python functions, and an environment base class that lets the agent call them.

A tool's JSON schema (OpenAI / Hugging Face chat-template "function" format) comes from its signature and
docstring, so the function stays the single source of truth. Calls use the Hermes / Qwen format that chat
templates of common open models emit: `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`.
"""

from __future__ import annotations

import inspect
import json
import re
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from opentinker.env.base import Environment, Observation, StepResult

_PRIMITIVES: dict[Any, str] = {str: "string", int: "integer", float: "number", bool: "boolean"}


def _type_schema(tp: Any) -> dict[str, Any]:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp in _PRIMITIVES:
        return {"type": _PRIMITIVES[tp]}
    if origin is Literal:
        return {"enum": list(args)}
    if origin in (list, tuple, set, frozenset):
        return {"type": "array", "items": _type_schema(args[0]) if args else {}}
    if origin is dict or tp is dict:
        return {"type": "object"}
    if origin in (typing.Union, types.UnionType):
        non_none = [a for a in args if a is not type(None)]
        if len(non_none) == 1:
            return _type_schema(non_none[0])
        return {"anyOf": [_type_schema(a) for a in non_none]}
    if tp is list:
        return {"type": "array"}
    raise TypeError(f"tool parameter type {tp!r} has no JSON schema; use str, int, float, bool, list, dict")


def _param_docs(doc: str) -> dict[str, str]:
    # Google-style "Args:" section: `name: description` lines.
    docs: dict[str, str] = {}
    in_args = False
    for line in doc.splitlines():
        stripped = line.strip()
        if stripped.lower() in ("args:", "arguments:", "parameters:"):
            in_args = True
            continue
        if in_args:
            m = re.match(r"^(\w+)(?:\s*\([^)]*\))?:\s*(.+)$", stripped)
            if m:
                docs[m.group(1)] = m.group(2)
            elif not stripped or stripped.endswith(":"):
                in_args = False
    return docs


@dataclass(frozen=True)
class Tool:
    fn: Callable[..., Any]
    name: str
    schema: dict[str, Any]

    def __call__(self, **kwargs: Any) -> Any:
        return self.fn(**kwargs)


def tool(fn: Callable[..., Any]) -> Tool:
    """Declare a typed function as a tool; its schema is derived from type hints and docstring."""
    hints = typing.get_type_hints(fn)
    sig = inspect.signature(fn)
    doc = inspect.getdoc(fn) or ""
    pdocs = _param_docs(doc)
    properties: dict[str, Any] = {}
    required: list[str] = []
    for pname, param in sig.parameters.items():
        if pname not in hints:
            raise TypeError(f"tool {fn.__name__}: parameter {pname!r} needs a type hint")
        prop = _type_schema(hints[pname])
        if pname in pdocs:
            prop["description"] = pdocs[pname]
        properties[pname] = prop
        if param.default is inspect.Parameter.empty:
            required.append(pname)
    schema = {
        "type": "function",
        "function": {
            "name": fn.__name__,
            "description": doc.split("\n\n")[0].strip(),
            "parameters": {"type": "object", "properties": properties, "required": required},
        },
    }
    return Tool(fn=fn, name=fn.__name__, schema=schema)


_CALL_RE = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: dict[str, Any]


def parse_tool_calls(text: str) -> list[ToolCall] | str:
    """The tool calls in `text`; a string explains a malformed call."""
    calls = []
    for raw in _CALL_RE.findall(text):
        try:
            obj = json.loads(raw)
        except json.JSONDecodeError as e:
            return f"tool call is not valid JSON: {e.msg}"
        if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
            return 'tool call must be {"name": ..., "arguments": {...}}'
        args = obj.get("arguments", {})
        if not isinstance(args, dict):
            return "tool call arguments must be an object"
        calls.append(ToolCall(obj["name"], args))
    return calls


def _check_args(t: Tool, args: dict[str, Any]) -> str | None:
    params = t.schema["function"]["parameters"]
    missing = [p for p in params["required"] if p not in args]
    unknown = [a for a in args if a not in params["properties"]]
    if missing:
        return f"missing argument(s) {', '.join(missing)}"
    if unknown:
        return f"unknown argument(s) {', '.join(unknown)}"
    for name, value in args.items():
        want = params["properties"][name].get("type")
        ok = {
            "string": isinstance(value, str),
            "integer": isinstance(value, int) and not isinstance(value, bool),
            "number": isinstance(value, int | float) and not isinstance(value, bool),
            "boolean": isinstance(value, bool),
            "array": isinstance(value, list),
            "object": isinstance(value, dict),
            None: True,
        }[want]
        if not ok:
            return f"argument {name!r} must be of type {want}"
    return None


class ToolEnvironment(Environment):
    """An environment whose agent may call `tools` before giving its final answer.

    A turn with tool calls gets the tool results back (role "tool", reward 0); a turn without any is the final
    answer, scored by `score_answer`. Subclasses set `tools` and implement `reset` and `score_answer`.
    """

    tools: typing.ClassVar[tuple[Tool, ...]] = ()
    max_tool_calls: typing.ClassVar[int] = 8

    def __init__(self, **config: Any) -> None:
        super().__init__(**config)
        self.tool_calls_made = 0

    @property
    def tool_schemas(self) -> list[dict[str, Any]]:
        return [t.schema for t in self.tools]

    def run_tool(self, call: ToolCall) -> str:
        by_name = {t.name: t for t in self.tools}
        if call.name not in by_name:
            return f"error: unknown tool {call.name!r}"
        problem = _check_args(by_name[call.name], call.arguments)
        if problem:
            return f"error: {problem}"
        try:
            return str(by_name[call.name](**call.arguments))
        except Exception as e:  # a tool's failure is feedback for the agent, not an episode failure
            return f"error: {type(e).__name__}: {e}"

    def step(self, action: str) -> StepResult:
        calls = parse_tool_calls(action)
        if isinstance(calls, str):
            return StepResult(Observation(f"error: {calls}", role="tool"), 0.0, False, {"tool_error": calls})
        if not calls:
            reward, info = self.score_answer(action)
            return StepResult(None, reward, True, {**info, "tool_calls": self.tool_calls_made})
        self.tool_calls_made += len(calls)
        if self.tool_calls_made > self.max_tool_calls:
            return StepResult(None, 0.0, True, {"stop": "too many tool calls"})
        results = [self.run_tool(c) for c in calls]
        return StepResult(
            Observation("\n".join(results), role="tool"), 0.0, False, {"tool_calls": len(calls)}
        )

    def score_answer(self, answer: str) -> tuple[float, dict[str, Any]]:
        raise NotImplementedError
