"""The Valkey side of the Tinker API: one operations list per base model (the model server pops it) and a
pub/sub channel per future (a long-polled `retrieve_future` wakes when the outcome is written).

The PostgreSQL future is the truth; these only carry work and nudges. Key names are shared with
gpu_runtime/model_server/serve.py, which cannot import this module: keep them in step.
"""

from __future__ import annotations

import json
from functools import cache
from typing import Any

import redis
from django.conf import settings


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


def enqueue(base_model: str, op: dict[str, Any]) -> None:
    client().rpush(ops_key(base_model), encode(op))


def announce_done(future_id: str) -> None:
    client().publish(done_channel(future_id), b"1")
