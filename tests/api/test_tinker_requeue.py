"""A call whose enqueue failed after its future committed (Valkey down at commit: the client got a 500) is
queued again when the client retries it, instead of waiting forever (the reviewer's C2). Real Valkey: the
first enqueue goes to a port where nothing listens. Actor: alice (owner of acme) with a `tinker` key."""

from __future__ import annotations

import pytest
import redis

from api.tinker.models import TinkerFuture
from tests.api.test_tinker_hostile_numbers import BASE, post, queued
from tests.api.test_tinker_hostile_numbers import api as api  # a fixture

pytestmark = pytest.mark.django_db
NOWHERE = "redis://127.0.0.1:9/0"  # the discard port: nothing listens


def test_a_retry_of_a_call_whose_enqueue_was_lost_queues_it_again(
    api,
    settings,
    django_capture_on_commit_callbacks,
):
    client, session, model, _ = api
    working = settings.REDIS_URL
    step = {"model_id": model, "seq_id": 1, "adam_params": {"learning_rate": 0.1}}
    create = {"session_id": session, "model_seq_id": 7, "base_model": BASE, "lora_config": {"rank": 4}}
    with pytest.raises(redis.ConnectionError), django_capture_on_commit_callbacks(execute=True):
        first = post(client, "optim_step", step)
        settings.REDIS_URL = NOWHERE
    settings.REDIS_URL = working
    with pytest.raises(redis.ConnectionError), django_capture_on_commit_callbacks(execute=True):
        made = post(client, "create_model", create)
        settings.REDIS_URL = NOWHERE
    settings.REDIS_URL = working
    assert queued() == []
    with django_capture_on_commit_callbacks(execute=True):
        retry = post(client, "optim_step", step)
        remade = post(client, "create_model", create)
    assert retry.json()["request_id"] == first.json()["request_id"]
    assert remade.json()["request_id"] == made.json()["request_id"]
    ops = queued()
    assert [(m["op"], m.get("seq_id"), m["future"]) for m in ops] == [
        ("optim_step", 1, first.json()["request_id"]),
        ("create_model", None, made.json()["request_id"]),
    ]
    assert ops[0]["adam_params"] == {"learning_rate": 0.1} and ops[1]["lora_config"]["rank"] == 4
    # A retry of a call that is done queues nothing.
    TinkerFuture.objects.filter(pk=first.json()["request_id"]).update(state="done", result={})
    with django_capture_on_commit_callbacks(execute=True):
        post(client, "optim_step", step)
    assert len(queued()) == 2
