"""Exceptions raised by the SDK, one class per kind of failure a caller may want to handle differently.

Every API error response has the shape ``{"error": {"code", "message", "fields"}}``;
:func:`error_from_response` turns one into the matching exception so callers never parse bodies themselves.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


class OpenTinkerError(Exception):
    """Base class: ``status`` is the HTTP status (None when no response came), ``code`` the server's error
    code, ``fields`` maps a dotted field path to its messages."""

    def __init__(
        self,
        message: str,
        status: int | None = None,
        code: str | None = None,
        fields: Mapping[str, Any] | None = None,
    ) -> None:
        self.message = message
        self.status = status
        self.code = code
        self.fields: dict[str, list[str]] = _normalize_fields(fields)
        super().__init__(message)

    def __str__(self) -> str:
        text = self.message.rstrip(". ") or "request failed"
        if self.fields:
            text += ": " + "; ".join(_format_field(path, msgs) for path, msgs in self.fields.items())
        if self.status is not None:
            text += f" (HTTP {self.status})"
        # One line, always: this is what the CLI prints after "error: ".
        return " ".join(text.split())

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.message!r}, status={self.status!r}, code={self.code!r})"


class ApiConnectionError(OpenTinkerError):
    """No response: DNS, refused connection, TLS failure or timeout."""


class AuthenticationError(OpenTinkerError):
    """401: the token is missing, malformed, expired or revoked."""


class PermissionDenied(OpenTinkerError):
    """403: the token lacks a scope or the user's role does not allow the action."""


class NotFound(OpenTinkerError):
    """404 (also returned for objects of other organizations)."""


class ValidationError(OpenTinkerError):
    """400 from the server, or input (a job spec, a URL) rejected locally (then ``status`` is None)."""


class Conflict(OpenTinkerError):
    """409: e.g. cancelling a job that already finished."""


class PayloadTooLarge(OpenTinkerError):
    """413: the request body is over the server's limit (256 KiB)."""


class QuotaExceeded(OpenTinkerError):
    """429: the organization is over a quota (queued jobs, GPU hours, ...)."""


class ServerError(OpenTinkerError):
    """5xx: a problem on the server's side; GETs were already retried."""


_BY_STATUS: dict[int, type[OpenTinkerError]] = {
    400: ValidationError,
    401: AuthenticationError,
    403: PermissionDenied,
    404: NotFound,
    409: Conflict,
    413: PayloadTooLarge,
    422: ValidationError,
    429: QuotaExceeded,
}


def error_class_for_status(status: int) -> type[OpenTinkerError]:
    if status >= 500:
        return ServerError
    return _BY_STATUS.get(status, OpenTinkerError)


def error_from_response(status: int, body: Any, reason: str = "") -> OpenTinkerError:
    """Build the exception for an error response; ``body`` is the decoded JSON (or anything else when the
    response was not the API's JSON, e.g. a proxy's HTML 502 page)."""
    err = body.get("error") if isinstance(body, dict) else None
    if not isinstance(err, dict):
        err = {}
    message = err.get("message")
    if not isinstance(message, str) or not message.strip():
        message = reason or "request failed"
    code = err.get("code") if isinstance(err.get("code"), str) else None
    fields = err.get("fields") if isinstance(err.get("fields"), dict) else None
    return error_class_for_status(status)(message, status=status, code=code, fields=fields)


def _normalize_fields(fields: Mapping[str, Any] | None) -> dict[str, list[str]]:
    # Servers send lists of strings; be lenient with a bare string so a message is never lost.
    out: dict[str, list[str]] = {}
    for path, msgs in (fields or {}).items():
        if isinstance(msgs, str):
            out[str(path)] = [msgs]
        elif isinstance(msgs, list | tuple):
            out[str(path)] = [str(m) for m in msgs]
        else:
            out[str(path)] = [str(msgs)]
    return out


def _format_field(path: str, msgs: list[str]) -> str:
    joined = ", ".join(m.rstrip(".") for m in msgs)
    # DRF-style keys for whole-object errors carry no useful path.
    return joined if path in ("", "__all__", "non_field_errors") else f"{path}: {joined}"
