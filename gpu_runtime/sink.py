"""Where a job reports: metrics per step, logs, checkpoint records, heartbeats, and cancellation.

`JsonlSink` prints one JSON object per line (standalone runs); `HttpSink` posts to the platform's ingest API
with the job token. The runtime never talks to a database.
"""

from __future__ import annotations

import json
import math
import sys
import time
import urllib.error
import urllib.request
from abc import ABC, abstractmethod
from typing import Any, TextIO


class Sink(ABC):
    @abstractmethod
    def metrics(self, step: int, values: dict[str, float]) -> None: ...

    @abstractmethod
    def log(self, line: str) -> None: ...

    @abstractmethod
    def event(self, kind: str, **data: Any) -> None:
        """Lifecycle records: started, finished, cancelled, failed."""

    @abstractmethod
    def checkpoint(self, step: int, uri: str, files: list[dict[str, Any]]) -> None:
        """`files`: [{name, size, sha256}]."""

    def rollouts(self, step: int, episodes: list[dict[str, Any]]) -> None:  # noqa: B027 (optional)
        """A few of the step's episodes as readable records (gpu_runtime.rollout_log); dropped by default."""

    @abstractmethod
    def heartbeat(self) -> None: ...

    @abstractmethod
    def should_cancel(self) -> bool: ...

    def close(self) -> None:  # noqa: B027 (optional hook)
        pass


def _finite(values: dict[str, float]) -> dict[str, float | None]:
    # JSON has no NaN/Infinity: a non-finite metric is reported as null rather than breaking the line.
    return {k: (float(v) if math.isfinite(float(v)) else None) for k, v in values.items()}


class JsonlSink(Sink):
    """One JSON object per line: `{"type": "metrics", "step": 3, "reward/mean": ...}`, logs, checkpoints,
    events. Cancellation is never requested (Ctrl-C stops a standalone run)."""

    def __init__(self, out: TextIO | None = None) -> None:
        self.out = out or sys.stdout

    def _write(self, obj: dict[str, Any]) -> None:
        self.out.write(json.dumps(obj) + "\n")
        self.out.flush()

    def metrics(self, step: int, values: dict[str, float]) -> None:
        self._write({"type": "metrics", "step": step, **_finite(values)})

    def log(self, line: str) -> None:
        self._write({"type": "log", "time": time.time(), "line": line})

    def event(self, kind: str, **data: Any) -> None:
        self._write({"type": "event", "event": kind, "time": time.time(), **data})

    def checkpoint(self, step: int, uri: str, files: list[dict[str, Any]]) -> None:
        self._write({"type": "checkpoint", "step": step, "uri": uri, "files": files})

    def rollouts(self, step: int, episodes: list[dict[str, Any]]) -> None:
        self._write({"type": "rollouts", "step": step, "episodes": episodes})

    def heartbeat(self) -> None:
        pass

    def should_cancel(self) -> bool:
        return False


class IngestError(RuntimeError):
    pass


class HttpSink(Sink):
    """Posts to `{ingest}/metrics|events|logs|checkpoints|rollouts|heartbeat` with
    `Authorization: Bearer <job token>`.

    Retries connection errors, 429 and 5xx with exponential backoff (the ingest side is idempotent on
    (job, step, metric), so a retried post is harmless); other 4xx are not retried. Heartbeats are
    throttled to one per `heartbeat_every_s`; the cancel flag comes back in the heartbeat's response.
    """

    def __init__(
        self,
        ingest_url: str,
        token: str,
        *,
        retries: int = 5,
        backoff_s: float = 0.5,
        timeout_s: float = 10.0,
        heartbeat_every_s: float = 10.0,
    ) -> None:
        self.base = ingest_url.rstrip("/")
        self.token = token
        self.retries = retries
        self.backoff_s = backoff_s
        self.timeout_s = timeout_s
        self.heartbeat_every_s = heartbeat_every_s
        self._last_heartbeat = -math.inf
        self._cancel = False

    def _post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        data = json.dumps(body).encode()
        delay = self.backoff_s
        for attempt in range(self.retries + 1):
            req = urllib.request.Request(  # noqa: S310 (the ingest URL is ours, http(s) only)
                f"{self.base}/{path}",
                data=data,
                method="POST",
                headers={"Authorization": f"Bearer {self.token}", "Content-Type": "application/json"},
            )
            try:
                with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:  # noqa: S310
                    raw = resp.read()
                    return json.loads(raw) if raw.strip() else {}
            except urllib.error.HTTPError as e:
                if e.code != 429 and e.code < 500:
                    raise IngestError(f"POST {path}: HTTP {e.code}") from e
                err: Exception = e
            except (urllib.error.URLError, TimeoutError, ConnectionError) as e:
                err = e
            if attempt < self.retries:
                time.sleep(delay)
                delay *= 2
        raise IngestError(f"POST {path} failed after {self.retries + 1} attempts: {err}")

    def metrics(self, step: int, values: dict[str, float]) -> None:
        points = [{"step": step, "name": k, "value": v} for k, v in _finite(values).items() if v is not None]
        self._post("metrics", {"points": points})

    def log(self, line: str) -> None:
        self._post("logs", {"lines": [{"line": line, "stream": "stdout"}]})

    def event(self, kind: str, **data: Any) -> None:
        # The platform's event kinds are severities; the runtime's own kind becomes the message.
        severity = "error" if kind == "failed" else "warning" if kind == "time_limit" else "info"
        self._post("events", {"kind": severity, "message": kind, "data": data})

    def checkpoint(self, step: int, uri: str, files: list[dict[str, Any]]) -> None:
        self._post("checkpoints", {"step": step, "uri": uri, "files": files})

    def rollouts(self, step: int, episodes: list[dict[str, Any]]) -> None:
        # Idempotent on (job, step): a retry or a resumed step replaces the step's record.
        try:
            self._post("rollouts", {"step": step, "episodes": episodes})
        except IngestError as e:  # reading material, not training: a refused record never stops the job
            print(f"rollouts of step {step} not recorded: {e}", file=sys.stderr, flush=True)

    def heartbeat(self) -> None:
        now = time.monotonic()
        if now - self._last_heartbeat < self.heartbeat_every_s:
            return
        self._last_heartbeat = now
        resp = self._post("heartbeat", {})
        self._cancel = self._cancel or bool(resp.get("cancel", False))

    def should_cancel(self) -> bool:
        return self._cancel
