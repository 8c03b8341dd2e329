"""The Valkey side of the Tinker API: one operations list per base model (the model server pops it) and a
pub/sub channel per future (a long-polled `retrieve_future` wakes when the outcome is written).

The PostgreSQL future is the truth; these only carry work and nudges. Key names are shared with
gpu_runtime/model_server/serve.py, which cannot import this module: keep them in step.
"""

from __future__ import annotations

import json
import logging
from functools import cache
from typing import Any

import redis
from django.conf import settings

from portal.services.model_servers import model_server_ensure

log = logging.getLogger(__name__)


def ops_key(base_model: str) -> str:
    return f"tinker:ops:{base_model}"


def claimed_key(base_model: str) -> str:
    """What the base model's server has taken from its queue and not yet reported (it fails these on
    start-up: their server died with them in flight)."""
    return f"tinker:claimed:{base_model}"


def done_channel(future_id: str) -> str:
    return f"tinker:done:{future_id}"


@cache
def _client(url: str) -> redis.Redis:
    return redis.Redis.from_url(url)


def client() -> redis.Redis:
    return _client(settings.REDIS_URL)


def encode(op: dict[str, Any]) -> str:
    """The operation's JSON; ValueError for NaN or Infinity (the API checks this before a future exists)."""
    return json.dumps(op, allow_nan=False)


def lease_key(base_model: str) -> str:
    """Held by the base model's running model server (gpu_runtime/model_server/serve.py `Lease`)."""
    return f"tinker:server:{base_model}"


def enqueue(base_model: str, op: dict[str, Any]) -> None:
    client().rpush(ops_key(base_model), encode(op))
    server_wanted(base_model)


def server_wanted(base_model: str) -> None:
    """An operation waits for the base model: with no model server holding its lease, make sure one is
    queued as a job (portal/services/model_servers.py). One Valkey read while a server runs. Never fails the
    call: the supervisor's pass queues a server for any queue left waiting."""
    if not settings.OPENTINKER_TINKER_AUTOSTART:
        return
    try:
        if client().exists(lease_key(base_model)):
            return
        model_server_ensure(base_model)
    except Exception:
        log.exception("could not ask for a model server for %s (the supervisor will)", base_model)


def announce_done(future_id: str) -> None:
    client().publish(done_channel(future_id), b"1")
