"""Numbers and shapes the API must refuse up front (the reviewer's C1 and C4): NaN or Infinity in a call
(Python's json reads them, the queue's JSON cannot carry them) and bodies of the wrong shape. The enqueue
runs on commit, so these tests run the on-commit callbacks. Actor: alice (owner of acme), `tinker` key."""

from __future__ import annotations

import json

import pytest
from django.test import Client
from tinker import types
from tinker.proto.request_conv import forward_backward_request_to_proto

from api.tinker import queue, services
from api.tinker.auth import sdk_key
from api.tinker.models import TinkerFuture, TinkerModel
from portal.models import Membership

pytestmark = pytest.mark.django_db
V1 = "/tinker/api/v1"
BASE = "tiny-qwen2"


@pytest.fixture
def api(alice, acme, make_token):
    client = Client(headers={"X-API-Key": sdk_key(make_token(alice, acme, scopes=["tinker"]))})
    session = services.session_create(Membership.objects.get(user=alice), tags=[], sdk_version="0.38.0")
    model = services.model_create(acme, str(session.pk), 0, BASE, {"rank": 4}).model
    sampler = services.sampler_create(acme, str(session.pk), 0, base_model=BASE, model_path=None)
    queue.client().delete(queue.ops_key(BASE))
    yield client, str(session.pk), model.pk, sampler.pk
    queue.client().delete(queue.ops_key(BASE))


def post(client: Client, endpoint: str, body, content_type: str = "application/json"):
    data = body if isinstance(body, bytes | str) else json.dumps(body)
    return client.post(f"{V1}/{endpoint}", data, content_type=content_type)


def literal(body: dict, value: str) -> str:
    """The body as JSON with its "@" string replaced by `value` (NaN, Infinity, 1e400: what json.dumps
    would not write)."""
    return json.dumps(body).replace('"@"', value)


def queued() -> list[dict]:
    return [json.loads(m) for m in queue.client().lrange(queue.ops_key(BASE), 0, -1)]


def fb_body(model_id: str, seq_id: int, advantage: float) -> bytes:
    datum = types.Datum(
        model_input=types.ModelInput(chunks=[types.EncodedTextChunk(tokens=[5, 6])]),
        loss_fn_inputs={
            "target_tokens": [6, 7],
            "logprobs": [-1.0, -1.0],
            "advantages": [advantage, 1.0],
        },
    )
    request = types.ForwardBackwardRequest(
        forward_backward_input=types.ForwardBackwardInput(data=[datum], loss_fn="importance_sampling"),
        model_id=model_id,
        seq_id=seq_id,
    )
    return forward_backward_request_to_proto(request).SerializeToString()


def test_nan_or_infinity_is_refused_and_the_seq_id_still_takes_its_turn(
    api, django_capture_on_commit_callbacks
):
    client, _, model, sampler = api
    with django_capture_on_commit_callbacks(execute=True):
        r1 = post(
            client, "optim_step", {"model_id": model, "seq_id": 1, "adam_params": {"learning_rate": "nan"}}
        )
        r2 = post(client, "forward_backward", fb_body(model, 2, float("nan")), "application/x-protobuf")
        r3 = post(
            client,
            "optim_step",
            literal({"model_id": model, "seq_id": 3, "adam_params": {"eps": "@"}}, "Infinity"),
        )
        prompt = {"chunks": [{"type": "encoded_text", "tokens": [5]}]}
        sample = {"sampling_session_id": sampler, "seq_id": 0, "prompt": prompt}
        r4 = post(client, "asample", {**sample, "sampling_params": {"max_tokens": 4, "temperature": "NaN"}})
        r5 = post(
            client,
            "asample",
            literal({**sample, "sampling_params": {"max_tokens": 4, "temperature": "@"}}, "NaN"),
        )
        # The next call of the training client is queued behind the refusals, which took their turns.
        r6 = post(
            client, "optim_step", {"model_id": model, "seq_id": 4, "adam_params": {"learning_rate": 0.1}}
        )
    for r in (r1, r2, r3, r4, r5):
        assert r.status_code == 400 and r.json()["category"] == "user", r.content
    assert r6.status_code == 200
    assert [(m["op"], m.get("seq_id")) for m in queued()] == [
        ("reject", 1),
        ("reject", 2),
        ("reject", 3),
        ("optim_step", 4),
    ]
    refused = TinkerFuture.objects.filter(model_id=model, seq_id__in=[1, 2, 3])
    assert sorted(refused.values_list("state", flat=True)) == ["failed"] * 3
    assert not TinkerFuture.objects.filter(model_id=sampler).exists()
    # A retry of a refused call gets the failed future, not a pending one that never ends.
    again = post(
        client, "optim_step", {"model_id": model, "seq_id": 1, "adam_params": {"learning_rate": "nan"}}
    )
    assert again.status_code == 200
    assert again.json()["request_id"] == str(refused.get(seq_id=1).pk)


def test_a_nan_lora_seed_is_refused_before_the_model_exists(api, django_capture_on_commit_callbacks):
    client, session, _, _ = api
    body = '{"session_id": "%s", "model_seq_id": 9, "base_model": "%s", "lora_config": {"seed": NaN}}'
    with django_capture_on_commit_callbacks(execute=True):
        r = post(client, "create_model", body % (session, BASE))
    assert r.status_code == 400 and r.json()["category"] == "user"
    assert not TinkerModel.objects.filter(pk=f"{session}:train:9").exists() and queued() == []


def test_bodies_of_the_wrong_shape_are_a_400_never_a_500(api, django_capture_on_commit_callbacks):
    client, session, model, sampler = api
    prompt = {"chunks": [{"type": "encoded_text", "tokens": [5]}]}
    attacks = {
        "a list of adam_params": ("optim_step", {"model_id": model, "seq_id": 1, "adam_params": [1, 2]}),
        "a string chunk": (
            "asample",
            {"sampling_session_id": sampler, "seq_id": 0, "prompt": {"chunks": ["abc"]}},
        ),
        "a list of sampling_params": (
            "asample",
            {"sampling_session_id": sampler, "seq_id": 0, "prompt": prompt, "sampling_params": [1]},
        ),
        "a seq_id of 1e400": (
            "save_weights",
            literal({"model_id": model, "seq_id": "@", "path": "a"}, "1e400"),
        ),
        "a model_seq_id of 40 digits": (
            "create_model",
            {"session_id": session, "model_seq_id": 10**40, "base_model": BASE},
        ),
        "a seq_id past 2**63": ("optim_step", {"model_id": model, "seq_id": 2**63, "adam_params": {}}),
        "a sampling_session_seq_id of 1e400": (
            "create_sampling_session",
            literal({"session_id": session, "sampling_session_seq_id": "@", "base_model": BASE}, "1e400"),
        ),
        "a list of lora_config": (
            "create_model",
            {"session_id": session, "model_seq_id": 3, "base_model": BASE, "lora_config": [4]},
        ),
    }
    with django_capture_on_commit_callbacks(execute=True):
        for name, (endpoint, body) in attacks.items():
            r = post(client, endpoint, body)
            assert r.status_code == 400, (name, r.status_code, r.content[:200])
            assert r.json()["category"] == "user" and r.json()["error"], name
    # Only the list of adam_params had a usable seq_id: its turn is taken by a reject.
    assert [(m["op"], m.get("seq_id")) for m in queued()] == [("reject", 1)]
    assert post(client, f"sessions/{session}/finish", {"reason": "bye"}).status_code == 200  # was a 500
