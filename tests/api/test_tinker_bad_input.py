"""Hostile and malformed input to the Tinker-compatible API: each is a 4xx in the SDK's error shape, never a
500, and nothing is queued for the model server. Actor: alice (owner of acme) with a `tinker` key."""

from __future__ import annotations

import json

import pytest
from django.core.management import CommandError, call_command
from django.test import Client

from api.tinker import queue, services
from api.tinker.auth import sdk_key
from api.tinker.models import TinkerFuture, TinkerWeights
from api.tinker.server_tokens import model_server_token_verify
from portal.models import Membership

pytestmark = pytest.mark.django_db
V1 = "/tinker/api/v1"
BASE = "tiny-qwen2"


@pytest.fixture
def alice_api(alice, acme, make_token):
    client = Client(headers={"X-API-Key": sdk_key(make_token(alice, acme, scopes=["tinker"]))})
    session = services.session_create(Membership.objects.get(user=alice), tags=[], sdk_version="0.38.0")
    model = services.model_create(acme, str(session.pk), 0, BASE, {"rank": 4}).model
    return client, str(session.pk), model.pk


def post(client: Client, endpoint: str, body, content_type: str = "application/json"):
    data = body if isinstance(body, bytes | str) else json.dumps(body)
    return client.post(f"{V1}/{endpoint}", data, content_type=content_type)


def test_each_attack_is_a_4xx_and_queues_nothing_but_order_keeping_rejects(
    alice_api, settings, django_capture_on_commit_callbacks
):
    client, session, model = alice_api
    settings.TINKER_MAX_BODY_BYTES = 4096
    futures = TinkerFuture.objects.count()
    key = queue.ops_key(BASE)
    queue.client().delete(key)
    prompt = {"chunks": [{"type": "encoded_text", "tokens": [5]}]}
    attacks = {
        "path traversal in a name": ("save_weights", {"model_id": model, "seq_id": 1, "path": "../x"}),
        "a weights name with a slash": ("save_weights", {"model_id": model, "seq_id": 1, "path": "a/b"}),
        "a foreign tinker:// path": (
            "create_sampling_session",
            {"session_id": session, "sampling_session_seq_id": 0, "model_path": "s3://bucket/key"},
        ),
        "ten thousand samples": (
            "asample",
            {"sampling_session_id": model, "seq_id": 0, "num_samples": 10_000, "prompt": prompt},
        ),
        "an image prompt": (
            "asample",
            {"sampling_session_id": model, "seq_id": 0, "prompt": {"chunks": [{"type": "image"}]}},
        ),
        "a huge LoRA rank": (
            "create_model",
            {"session_id": session, "model_seq_id": 5, "base_model": BASE, "lora_config": {"rank": 10**6}},
        ),
        "an unknown base": ("create_model", {"session_id": session, "model_seq_id": 6, "base_model": "?"}),
        "a learning rate that is not a number": (
            "optim_step",
            {"model_id": model, "seq_id": 1, "adam_params": {"learning_rate": "fast"}},
        ),
        "a JSON array": ("create_session", "[1, 2]"),
        "not JSON": ("create_session", "{oops"),
        "a body over the limit": ("telemetry", {"events": ["x" * 5000]}),
    }
    with django_capture_on_commit_callbacks(execute=True):
        for name, (endpoint, body) in attacks.items():
            r = post(client, endpoint, body)
            assert 400 <= r.status_code < 500, (name, r.status_code, r.content[:200])
            assert r.json()["category"] == "user" and r.json()["error"], name
        garbage = post(client, "forward_backward", b"\xff\x00garbage", "application/x-protobuf")
        assert garbage.status_code == 400
        assert client.get(f"{V1}/create_session").status_code == 405
    # Nothing reached the model server but the refusal of the training client's seq_id 1 (a bad weights name,
    # then a bad learning rate for the same seq_id), so that its seq_id 2 will not wait for it forever.
    queued = [json.loads(m) for m in queue.client().lrange(key, 0, -1)]
    queue.client().delete(key)
    assert [(m["op"], m["seq_id"]) for m in queued] == [("reject", 1)]
    refused = TinkerFuture.objects.get(model_id=model, seq_id=1)
    assert (refused.state, refused.error_category, refused.operation) == ("failed", "user", "save_weights")
    assert TinkerFuture.objects.count() == futures + 1 and not TinkerWeights.objects.exists()


def test_the_server_token_command_mints_a_token_for_one_base(capsys):
    call_command("tinker_server_token", BASE)
    assert model_server_token_verify(capsys.readouterr().out.strip()) == BASE
    with pytest.raises(CommandError, match="unknown base model"):
        call_command("tinker_server_token", "nope")
    with pytest.raises(CommandError, match="ttl-days"):
        call_command("tinker_server_token", BASE, "--ttl-days", "3650")
