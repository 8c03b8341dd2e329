"""JSON bodies with a size limit and clear errors."""

from __future__ import annotations

import json

from django.conf import settings
from rest_framework.exceptions import APIException, ParseError
from rest_framework.parsers import JSONParser


class PayloadTooLarge(APIException):
    status_code = 413
    default_code = "payload_too_large"


def read_limited(stream, parser_context, limit: int, *, declared_too_large, too_large: str) -> bytes:
    """A request body of at most `limit` bytes: refused (413) on its declared length before reading, or once
    `limit` + 1 bytes arrived (a body without, or lying about, its length)."""
    request = parser_context["request"] if parser_context else None
    try:
        declared = int(request.META.get("CONTENT_LENGTH") or 0) if request is not None else 0
    except ValueError:
        declared = 0
    if declared > limit:
        raise PayloadTooLarge(declared_too_large(declared))
    raw = stream.read(limit + 1) if stream is not None else b""
    if len(raw) > limit:
        raise PayloadTooLarge(too_large)
    return raw


class LimitedJSONParser(JSONParser):
    def parse(self, stream, media_type=None, parser_context=None):
        limit = settings.API_MAX_BODY_BYTES
        raw = read_limited(
            stream,
            parser_context,
            limit,
            declared_too_large=lambda n: f"request body is {n} bytes; the limit is {limit} bytes",
            too_large=f"request body is over the limit of {limit} bytes",
        )
        if not raw:
            return {}
        try:
            data = json.loads(raw.decode("utf-8"), parse_constant=_refuse_constant)
        except UnicodeDecodeError:
            raise ParseError("request body is not UTF-8") from None
        except json.JSONDecodeError as e:
            raise ParseError(f"malformed JSON: {e.msg} at line {e.lineno} column {e.colno}") from None
        except RecursionError:
            raise ParseError(f"JSON is nested more than {MAX_DEPTH} levels deep") from None
        _check_values(data)
        return data


MAX_DEPTH = 32


def _refuse_constant(name: str):
    # NaN and Infinity are not JSON; Python's json accepts them unless told otherwise.
    raise ParseError(f"{name} is not valid JSON; use a number or null")


def _check_values(value, depth: int = 0) -> None:
    """Refuse what PostgreSQL's jsonb cannot store (NUL characters) and absurd nesting."""
    if depth > MAX_DEPTH:
        raise ParseError(f"JSON is nested more than {MAX_DEPTH} levels deep")
    if isinstance(value, str):
        if "\x00" in value:
            raise ParseError("strings must not contain NUL (\\u0000) characters")
    elif isinstance(value, dict):
        for key, item in value.items():
            _check_values(key, depth + 1)
            _check_values(item, depth + 1)
    elif isinstance(value, list):
        for item in value:
            _check_values(item, depth + 1)
