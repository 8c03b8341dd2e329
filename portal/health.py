"""Liveness and readiness: is this process up, and can the platform do its work right now?

Liveness (``/healthz``, ``/livez``) needs nothing but the process. Readiness (``/readyz``) checks, each with a
short timeout, what a request or a job needs:

    database      PostgreSQL answers ``SELECT 1``
    valkey        Valkey (REDIS_URL: broker, cache, live events) answers PING
    object_store  the configured store is usable: file:// its directory exists (or can be created) and takes
                  a write; s3:// the bucket exists and answers (HeadBucket)
    beat          Celery beat published a periodic task within HEALTH_MAX_SILENCE_S
    worker        a Celery worker finished a task within HEALTH_MAX_SILENCE_S

Beat and the workers leave their heartbeats in Valkey (workers/health.py writes them): beat each time it
publishes (the scheduler pass runs every few seconds), a worker each time it finishes a task (beat's passes
keep every live worker busy every few seconds). A key holds the UNIX time of the last beat.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import redis
from django.conf import settings
from django.db import connection

BEAT_KEY = "health:beat"
WORKER_KEY = "health:worker"
TIMEOUT_S = 2.0
# A key outlives any sensible HEALTH_MAX_SILENCE_S, then goes: a long-gone worker leaves nothing behind.
KEY_TTL_S = 24 * 3600


def max_silence_s() -> float:
    """How long beat or the workers may stay silent before the platform is not ready (default 60 s)."""
    return settings.HEALTH_MAX_SILENCE_S


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str

    def as_dict(self) -> dict:
        return {"ok": self.ok, "detail": self.detail}


def _valkey() -> redis.Redis:
    return redis.Redis.from_url(
        settings.REDIS_URL, socket_timeout=TIMEOUT_S, socket_connect_timeout=TIMEOUT_S
    )


def heartbeat_record(key: str, who: str = "") -> None:
    """Beat's and the workers' "I am alive" (workers/health.py): the time, and who, for KEY_TTL_S."""
    client = _valkey()
    try:
        client.set(key, f"{time.time():.3f} {who}".strip(), ex=KEY_TTL_S)
    finally:
        client.close()


def _error(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text}"[:300] if text else type(exc).__name__


def check_database() -> Check:
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1")
            cursor.fetchone()
    except Exception as exc:
        connection.close_if_unusable_or_obsolete()
        return Check("database", False, f"PostgreSQL unreachable: {_error(exc)}")
    return Check("database", True, "PostgreSQL answers")


def check_valkey_and_heartbeats() -> list[Check]:
    """Valkey, and beat's and the workers' heartbeats that live there (unknown when Valkey is down)."""
    client = _valkey()
    try:
        client.ping()
        beat, worker = client.mget(BEAT_KEY, WORKER_KEY)
    except Exception as exc:
        why = _error(exc)
        return [
            Check("valkey", False, f"Valkey unreachable: {why}"),
            Check("beat", False, "unknown: its heartbeat lives in Valkey, which is unreachable"),
            Check("worker", False, "unknown: its heartbeat lives in Valkey, which is unreachable"),
        ]
    finally:
        client.close()
    limit = max_silence_s()
    return [
        Check("valkey", True, "Valkey answers"),
        _heartbeat("beat", "Celery beat (published no periodic task)", beat, limit),
        _heartbeat("worker", "no Celery worker (finished no task)", worker, limit),
    ]


def _heartbeat(name: str, what: str, raw: bytes | None, limit: float) -> Check:
    if raw is None:
        return Check(name, False, f"{what} never seen, or not for a day")
    at, _, who = raw.decode(errors="replace").partition(" ")
    try:
        age = max(0.0, time.time() - float(at))
    except ValueError:
        return Check(name, False, f"unreadable heartbeat {raw[:60]!r}")
    by = f" ({who})" if who else ""
    if age > limit:
        return Check(name, False, f"{what} in the last {limit:g} s: last seen {age:.0f} s ago{by}")
    return Check(name, True, f"seen {age:.0f} s ago{by}")


def check_object_store() -> Check:
    parsed = urlparse(settings.OBJECT_STORE_URL)
    try:
        if parsed.scheme == "file":
            root = Path(parsed.path)
            # Writes create the directories they need (env_registry/storage.py): so may the check.
            root.mkdir(parents=True, exist_ok=True)
            probe = root / f".readyz-{uuid.uuid4().hex}"
            probe.write_bytes(b"ok")
            probe.unlink()
            return Check("object_store", True, "the file:// store takes writes")
        if parsed.scheme == "s3":
            import boto3
            from botocore.config import Config

            client = boto3.client(
                "s3",
                endpoint_url=settings.S3_ENDPOINT_URL,
                config=Config(connect_timeout=TIMEOUT_S, read_timeout=TIMEOUT_S, retries={"max_attempts": 1}),
            )
            client.head_bucket(Bucket=parsed.netloc)
            return Check("object_store", True, f"the s3:// store's bucket {parsed.netloc} answers")
    except Exception as exc:
        return Check("object_store", False, f"the {parsed.scheme}:// store is not usable: {_error(exc)}")
    return Check("object_store", False, f"unknown store scheme {parsed.scheme!r} (file:// or s3://)")


def readiness() -> tuple[bool, dict[str, Check]]:
    checks = [check_database(), *check_valkey_and_heartbeats(), check_object_store()]
    return all(c.ok for c in checks), {c.name: c for c in checks}
