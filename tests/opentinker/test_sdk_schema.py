"""The SDK's response types (opentinker/types.py) against the server's OpenAPI schema: a drift fails here.

For each call the client makes, the operation must exist in the schema with that method, and the model the
SDK parses its answer with must (1) name only fields the schema documents (nested models too) and (2) accept
every shape the schema allows: documents built from the schema with every property set, with every nullable
property null, and with only the required properties. Routes the client calls are read from its source, so a
new call without a schema operation fails too.
"""

from __future__ import annotations

import re
import types
import typing
import uuid
from pathlib import Path
from typing import Any

import pytest
from drf_spectacular.generators import SchemaGenerator
from pydantic import BaseModel

from opentinker import client as client_module
from opentinker.types import (
    Checkpoint,
    CreatedToken,
    EnvironmentPackage,
    EventPage,
    Job,
    Me,
    Member,
    MetricSeries,
    ModelPreset,
    Organization,
    Page,
    Quota,
    Rollouts,
    Token,
)

PREFIX = "/api/v1"

# (method, schema path, success status, SDK model, where the model sits in the body, SDK fields the operation
# does not send: a package's list entry lacks what only its detail has)
CALLS: list[tuple[str, str, str, type[BaseModel], str, set[str]]] = [
    ("GET", "/me", "200", Me, "body", set()),
    ("GET", "/org", "200", Organization, "body", set()),
    ("GET", "/org/quota", "200", Quota, "body", set()),
    ("GET", "/org/members", "200", Member, "page", set()),
    ("GET", "/models", "200", ModelPreset, "results", set()),
    ("POST", "/jobs", "201", Job, "body", set()),
    ("POST", "/jobs", "200", Job, "body", set()),
    ("GET", "/jobs", "200", Job, "page", set()),
    ("GET", "/jobs/{job_id}", "200", Job, "body", set()),
    ("POST", "/jobs/{job_id}/cancel", "200", Job, "body", set()),
    ("GET", "/jobs/{job_id}/metrics", "200", MetricSeries, "series", set()),
    ("GET", "/jobs/{job_id}/events", "200", EventPage, "body", set()),
    ("GET", "/jobs/{job_id}/checkpoints", "200", Checkpoint, "results", set()),
    ("GET", "/jobs/{job_id}/rollouts", "200", Rollouts, "body", set()),
    ("POST", "/tokens", "201", CreatedToken, "body", set()),
    ("GET", "/tokens", "200", Token, "page", set()),
    ("GET", "/tokens/{token_id}", "200", Token, "body", set()),
    ("GET", "/envs", "200", EnvironmentPackage, "page", {"readme", "starred", "forked_from"}),
    ("GET", "/envs/{owner}/{name}", "200", EnvironmentPackage, "body", set()),
    ("PATCH", "/envs/{owner}/{name}", "200", EnvironmentPackage, "body", set()),
    ("POST", "/envs", "201", EnvironmentPackage, "body", set()),
    ("POST", "/envs/{owner}/{name}/fork", "201", EnvironmentPackage, "body", set()),
]
# Calls that read no model: (method, path) -> the fields the SDK reads from the body (None: not JSON).
RAW_CALLS: dict[tuple[str, str], set[str] | None] = {
    ("PUT", "/envs/{owner}/{name}/star"): {"stars"},
    ("DELETE", "/envs/{owner}/{name}/star"): {"stars"},
    ("DELETE", "/tokens/{token_id}"): None,
    ("GET", "/jobs/{job_id}/stream"): None,
    ("GET", "/jobs/{job_id}/checkpoints/{checkpoint_id}/files/{name}"): None,
}


@pytest.fixture(scope="module")
def schema() -> dict:
    return SchemaGenerator().get_schema(request=None, public=True)


def resolve(node: dict, schema: dict) -> dict:
    while "$ref" in node:
        node = schema["components"]["schemas"][node["$ref"].rsplit("/", 1)[1]]
    return node


def sample(node: dict, schema: dict, variant: str) -> Any:
    """A document `node` allows. variant: full (every property, no nulls), nulls (every nullable one
    null), minimal (required properties only)."""
    node = resolve(node, schema)
    for key in ("oneOf", "anyOf"):
        if key in node:
            branches = [resolve(b, schema) for b in node[key]]
            nulls = [b for b in branches if b.get("type") == "null"]
            if variant == "nulls" and nulls:
                return None
            return sample(next(b for b in branches if b.get("type") != "null"), schema, variant)
    if "allOf" in node:
        return sample(node["allOf"][0], schema, variant)
    if "enum" in node:
        values = node["enum"]
        if variant == "nulls" and None in values:
            return None
        return next(v for v in values if v is not None)
    kinds = node.get("type")
    if kinds is None:
        return {"any": ["json"]}  # free-form (a JobSpec, a manifest)
    kinds = [kinds] if isinstance(kinds, str) else list(kinds)
    if variant == "nulls" and "null" in kinds:
        return None
    kind = next(k for k in kinds if k != "null")
    if kind == "object":
        props = node.get("properties", {})
        names = node.get("required", []) if variant == "minimal" else list(props)
        if not props and "additionalProperties" in node:
            extra = node["additionalProperties"]
            return {"key": sample(extra, schema, variant) if isinstance(extra, dict) else "value"}
        return {name: sample(props[name], schema, variant) for name in names}
    if kind == "array":
        return [sample(node.get("items", {}), schema, variant)]
    if kind == "string":
        return {
            "date-time": "2026-01-02T03:04:05.123456Z",
            "date": "2026-01-01",
            "uri": "https://opentinker.example/api/v1/x",
            "uuid": str(uuid.UUID(int=7)),
            "email": "alice@example.com",
        }.get(node.get("format"), "text")
    return {"integer": 7, "number": 1.5, "boolean": True}[kind]


def success_body(schema: dict, method: str, path: str, status: str) -> dict:
    operation = schema["paths"][PREFIX + path][method.lower()]
    assert status in operation["responses"], f"{method} {path}: the schema has no {status}"
    return operation["responses"][status]["content"]["application/json"]["schema"]


def item_schema(body: dict, where: str, schema: dict) -> dict:
    body = resolve(body, schema)
    if where == "body":
        return body
    if where == "page":
        assert set(body["properties"]) == {"count", "next", "previous", "results"}
        assert set(body["required"]) == {"count", "next", "previous", "results"}
        where = "results"
    field = resolve(body["properties"][where], schema)
    assert field["type"] == "array", field
    assert where in body["required"]
    return field["items"]


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        return _models_in(typing.get_args(annotation)[0])
    if origin in (list, typing.Union, types.UnionType):
        return [m for arg in typing.get_args(annotation) for m in _models_in(arg)]
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return []


def unknown_fields(model: type[BaseModel], node: dict, schema: dict, where: str) -> list[str]:
    """SDK fields (nested models included) that the schema does not document."""
    node = resolve(node, schema)
    props = node.get("properties", {})
    missing = []
    for name, field in model.model_fields.items():
        if name not in props:
            missing.append(f"{where}.{name}")
            continue
        for nested in _models_in(field.annotation):
            prop = resolve(props[name], schema)
            for key in ("oneOf", "anyOf"):
                prop = next((resolve(b, schema) for b in prop.get(key, []) if b.get("type") != "null"), prop)
            if prop.get("type") == "array" or "array" in prop.get("type", []):
                prop = resolve(prop["items"], schema)
            missing += unknown_fields(nested, prop, schema, f"{where}.{name}")
    return missing


@pytest.mark.parametrize(
    ("method", "path", "status", "model", "where", "not_sent"),
    CALLS,
    ids=[f"{c[0]} {c[1]} {c[2]}" for c in CALLS],
)
def test_sdk_model_accepts_what_the_schema_documents(schema, method, path, status, model, where, not_sent):
    node = item_schema(success_body(schema, method, path, status), where, schema)
    unknown = unknown_fields(model, node, schema, model.__name__)
    assert sorted(unknown) == sorted(f"{model.__name__}.{f}" for f in not_sent), (
        f"{method} {path}: the SDK's {model.__name__} has fields the schema does not document: {unknown}"
    )
    for variant in ("full", "nulls", "minimal"):
        doc = sample(node, schema, variant)
        model.model_validate(doc)  # raises on a shape the SDK cannot read
        if where == "page":
            Page[model].model_validate(
                sample(success_body(schema, method, path, status), schema, variant) | {"results": [doc]}
            )


def test_sample_documents_exercise_nulls_and_required(schema):
    # The three variants differ where the schema says they may (a check that the checks above can fail).
    node = item_schema(success_body(schema, "GET", "/jobs/{job_id}", "200"), "body", schema)
    assert sample(node, schema, "nulls")["finished_at"] is None
    assert sample(node, schema, "full")["finished_at"] == "2026-01-02T03:04:05.123456Z"
    with pytest.raises(ValueError, match="state"):
        Job.model_validate({k: v for k, v in sample(node, schema, "full").items() if k != "state"})


def _client_calls() -> set[tuple[str, str]]:
    """(method, path template) of every request in the SDK's client module."""
    source = Path(client_module.__file__).read_text()
    calls = set()
    helpers = r"(?:_get_model|_get_results|_stream|_call|build_request)"
    pattern = helpers + r'\(\s*(?:"([A-Z]+)",\s*)?(f?"/[^"]*"|path)'
    for verb, raw in re.findall(pattern, source):
        if raw == "path":
            continue  # the helpers themselves and the paths built just above (listed below)
        template = re.sub(r"\{_seg\((\w+)\)\}", r"{\1}", raw.lstrip("f").strip('"'))
        calls.add((verb or "GET", template))
    # Paths the client builds in a variable first (watch, download):
    calls |= {
        ("GET", "/jobs/{job_id}/stream"),
        ("GET", "/jobs/{job_id}/checkpoints/{checkpoint_id}/files/{name}"),
    }
    return calls


def test_every_call_of_the_sdk_is_a_documented_operation(schema):
    calls = _client_calls()
    known = {(m, p) for m, p, *_ in CALLS} | set(RAW_CALLS)
    assert calls - known == set(), "SDK calls that this test does not check yet"
    for method, template in sorted(calls):
        # Path parameter names may differ between the client and the schema; their places must not.
        pattern = re.sub(r"\\\{\w+\\\}", r"\\{\\w+\\}", re.escape(PREFIX + template))
        paths = [p for p in schema["paths"] if re.fullmatch(pattern, p)]
        assert paths, f"{method} {template}: no such path in the schema"
        assert method.lower() in schema["paths"][paths[0]], f"{method} {template}: not documented"
    for (method, path), fields in RAW_CALLS.items():
        if fields:
            operation = schema["paths"][PREFIX + path][method.lower()]
            body = resolve(operation["responses"]["200"]["content"]["application/json"]["schema"], schema)
            assert fields <= set(body["required"]), (method, path)
