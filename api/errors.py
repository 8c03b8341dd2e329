"""One error shape for every failure: {"error": {"code", "message", "fields": {"dotted.path": [msgs]}}}."""

from __future__ import annotations

from typing import Any

import pydantic
from django.core.exceptions import PermissionDenied as DjangoPermissionDenied
from django.http import Http404
from rest_framework import exceptions, status
from rest_framework.response import Response
from rest_framework.views import exception_handler as drf_exception_handler

from portal.errors import DomainError


class SpecInvalid(exceptions.ValidationError):
    """A JobSpec failed pydantic validation; carries field paths like `resources.gpus`."""

    def __init__(self, error: pydantic.ValidationError) -> None:
        self.fields = pydantic_fields(error)
        super().__init__(self.fields)


def pydantic_fields(error: pydantic.ValidationError) -> dict[str, list[str]]:
    fields: dict[str, list[str]] = {}
    for err in error.errors(include_url=False):
        path = ".".join(str(p) for p in err["loc"]) or "spec"
        msg = err["msg"].removeprefix("Value error, ")
        fields.setdefault(path, []).append(msg)
    return fields


def _flatten(detail: Any, prefix: str = "") -> dict[str, list[str]]:
    """DRF's nested {"field": ["msg"]} into {"dotted.path": ["msg"]}."""
    out: dict[str, list[str]] = {}
    if isinstance(detail, dict):
        for key, value in detail.items():
            path = f"{prefix}.{key}" if prefix else str(key)
            if key == "non_field_errors":
                path = prefix or "body"
            for k, v in _flatten(value, path).items():
                out.setdefault(k, []).extend(v)
    elif isinstance(detail, list):
        if all(not isinstance(d, dict | list) for d in detail):
            out[prefix or "body"] = [str(d) for d in detail]
        else:
            for i, item in enumerate(detail):
                for k, v in _flatten(item, f"{prefix}.{i}" if prefix else str(i)).items():
                    out.setdefault(k, []).extend(v)
    else:
        out[prefix or "body"] = [str(detail)]
    return out


def error_body(code: str, message: str, fields: dict[str, list[str]] | None = None) -> dict[str, Any]:
    return {"error": {"code": code, "message": message, "fields": fields or {}}}


def exception_handler(exc, context):
    if isinstance(exc, DomainError):
        fields = {exc.field: [exc.message]} if exc.field else {}
        return Response(error_body(exc.code, exc.message, fields), status=exc.status)
    if isinstance(exc, pydantic.ValidationError):
        exc = SpecInvalid(exc)
    if isinstance(exc, Http404):
        return Response(error_body("not_found", "not found"), status=status.HTTP_404_NOT_FOUND)
    if isinstance(exc, DjangoPermissionDenied):
        exc = exceptions.PermissionDenied()

    response = drf_exception_handler(exc, context)
    if response is None:
        return None  # a real server error: Django logs it and answers 500
    if isinstance(exc, exceptions.ValidationError):
        fields = exc.fields if isinstance(exc, SpecInvalid) else _flatten(exc.detail)
        first = next(iter(fields.items()), None)
        message = f"{first[0]}: {first[1][0]}" if first else "invalid input"
        if len(fields) > 1:
            message += f" (and {len(fields) - 1} more)"
        response.data = error_body("invalid", message, fields)
    else:
        detail = exc.detail if isinstance(exc, exceptions.APIException) else str(exc)
        code = exc.get_codes() if isinstance(exc, exceptions.APIException) else "error"
        response.data = error_body(code if isinstance(code, str) else "error", str(detail))
    return response
