"""What the current request or task is about (request id, organization id, job id), for the log lines.

One mutable dict per request or task, held in a context variable: the request-id middleware and the Celery
task signals open it, and whoever learns an id later (tenant resolution, job-token authentication, a task that
loads a job) adds it with ``bind``. Mutating the dict rather than setting the variable again keeps the ids
visible to the middleware's own closing log line, even where Django or asgiref run the view in a copied
context.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator
from typing import Any

FIELDS = ("request_id", "org_id", "job_id", "task", "task_id")

_current: contextvars.ContextVar[dict[str, Any] | None] = contextvars.ContextVar(
    "opentinker_log_context", default=None
)


@contextlib.contextmanager
def scope(**ids: Any) -> Iterator[dict[str, Any]]:
    """A fresh set of ids for one request or task, dropped at the end."""
    values = {k: str(v) for k, v in ids.items() if v is not None}
    token = _current.set(values)
    try:
        yield values
    finally:
        _current.reset(token)


def open_scope(**ids: Any) -> contextvars.Token:
    """``scope`` for callers that open and close in two places (Celery's prerun and postrun signals)."""
    return _current.set({k: str(v) for k, v in ids.items() if v is not None})


def close_scope(token: contextvars.Token) -> None:
    _current.reset(token)


def bind(**ids: Any) -> None:
    """Add ids to the current request's or task's scope (nothing outside one: there is no one to tell)."""
    values = _current.get()
    if values is not None:
        values.update({k: str(v) for k, v in ids.items() if v is not None})


def current() -> dict[str, Any]:
    return _current.get() or {}
