"""The serve loop's Valkey transport (gpu_runtime/model_server/serve.py `Transport`) on the real Valkey the
tests start: operations are claimed (moved, not popped), released once reported, and a new server fails
what a dead one had claimed. The live restart with the SDK is tests/api/test_tinker_restart.py."""

from __future__ import annotations

import json
import uuid

import pytest
import redis
from django.conf import settings

from gpu_runtime.model_server.serve import LOST_IN_FLIGHT, Transport, claimed_key, ops_key


@pytest.fixture
def valkey():
    client = redis.Redis.from_url(settings.REDIS_URL)
    base = f"test-claims-{uuid.uuid4().hex[:8]}"
    yield client, base
    client.delete(ops_key(base), claimed_key(base))


def test_claimed_until_reported_then_a_new_server_fails_the_rest(valkey):
    client, base = valkey
    ops = [
        {"op": "optim_step", "future": "f1", "model_id": "m", "seq_id": 1},
        {"op": "create_sampler", "model_id": "s", "uri": None},
        {"op": "optim_step", "future": "f2", "model_id": "m", "seq_id": 2},
    ]
    client.rpush(ops_key(base), *(json.dumps(o) for o in ops))
    posted: list[list[dict]] = []
    transport = Transport(client, base, posted.append)

    assert transport.drain() == ops
    assert client.llen(ops_key(base)) == 0 and client.llen(claimed_key(base)) == 3
    transport.post([{"future": "f1", "result": {}}])  # f1 reported; create_sampler (no future) released
    assert [json.loads(r) for r in client.lrange(claimed_key(base), 0, -1)] == [ops[2]]
    client.rpush(ops_key(base), json.dumps(ops[2]))  # the API re-sent f2 (a retry while pending)
    assert transport.wait(1) == [ops[2]]
    assert client.llen(claimed_key(base)) == 2

    # This server dies; the next one fails f2 once (both copies), clearly, and clears the list.
    posted.clear()
    successor = Transport(client, base, posted.append)
    assert successor.recover() == 1
    assert posted == [[{"future": "f2", "error": LOST_IN_FLIGHT, "category": "server"}]]
    assert client.llen(claimed_key(base)) == 0
    assert successor.drain() == [] and successor.wait(0.01) == []
