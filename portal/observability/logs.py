"""Log records with the current ids, and a formatter that writes one JSON object per line (LOG_FORMAT=json).

``ContextFilter`` sits on the handler, so every record, whichever logger made it, carries ``request_id``,
``org_id``, ``job_id`` and ``task`` (empty strings when unknown): the text format may use them and the JSON
format always writes those that are set.
"""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime

from portal.observability import context

# What a LogRecord holds by itself; anything else on a record came from ``extra=`` and is written too.
_STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}


class ContextFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        ids = context.current()
        for name in context.FIELDS:
            if not hasattr(record, name):
                setattr(record, name, ids.get(name, ""))
        return True


class JsonFormatter(logging.Formatter):
    """``{"time", "level", "logger", "message", ids..., extra fields..., "exc_info"}`` on one line."""

    def format(self, record: logging.LogRecord) -> str:
        out = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD and value not in ("", None):
                out[key] = value
        if record.exc_info:
            out["exc_info"] = self.formatException(record.exc_info)
        if record.stack_info:
            out["stack_info"] = self.formatStack(record.stack_info)
        return json.dumps(out, default=str, ensure_ascii=False)
