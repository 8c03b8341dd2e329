"""Work limits of the shared model servers on the Tinker API (the reviewer's S2): tokens per sequence and per
call, seq_ids far ahead of a training client's next call, and the calls an organization has in flight.
Actor: alice (owner of acme) with a `tinker` key; the enqueue on commit runs."""

from __future__ import annotations

import json
import re

import pytest

from api.tinker import queue, services
from api.tinker.models import TinkerFuture
from tests.api.test_tinker_hostile_numbers import BASE, fb_body, post, queued
from tests.api.test_tinker_hostile_numbers import api as api

pytestmark = pytest.mark.django_db


def sample(sampler: str, tokens: int, max_tokens: int) -> dict:
    prompt = {"chunks": [{"type": "encoded_text", "tokens": [5] * tokens}]}
    return {
        "sampling_session_id": sampler,
        "seq_id": 0,
        "prompt": prompt,
        "sampling_params": {"max_tokens": max_tokens},
    }


def test_tokens_are_capped_by_the_context_limit(api, settings, django_capture_on_commit_callbacks):
    client, _, model, sampler = api
    settings.TINKER_MAX_CONTEXT_TOKENS = 32
    with django_capture_on_commit_callbacks(execute=True):
        assert post(client, "asample", sample(sampler, 1, 10**9)).status_code == 400
        assert post(client, "asample", sample(sampler, 30, 3)).status_code == 400
        assert post(client, "asample", sample(sampler, 1, 0)).status_code == 400
        assert post(client, "asample", sample(sampler, 30, 2)).status_code == 200
        settings.TINKER_MAX_CONTEXT_TOKENS = 1  # fb_body's datum has 2 tokens
        r = post(client, "forward_backward", fb_body(model, 1, 1.0), "application/x-protobuf")
    assert r.status_code == 400 and "TINKER_MAX_CONTEXT_TOKENS" in r.json()["error"]
    assert [(m["op"], m.get("seq_id")) for m in queued()] == [("sample", 0), ("reject", 1)]


def test_a_seq_id_far_ahead_is_refused(api, django_capture_on_commit_callbacks):
    client, _, model, _ = api
    ahead = services.MAX_SEQ_AHEAD
    with django_capture_on_commit_callbacks(execute=True):
        far = post(client, "optim_step", {"model_id": model, "seq_id": 2 + ahead, "adam_params": {}})
        edge = post(client, "optim_step", {"model_id": model, "seq_id": 1 + ahead, "adam_params": {}})
    assert far.status_code == 400 and "past the next call" in far.json()["error"]
    assert edge.status_code == 200
    assert [m.get("seq_id") for m in queued()] == [1 + ahead]


def test_an_organization_with_too_many_calls_in_flight_gets_a_429(
    api,
    settings,
    django_capture_on_commit_callbacks,
):
    client, _, model, _ = api
    pending = TinkerFuture.objects.filter(state="pending").count()  # the training client's create_model
    settings.TINKER_MAX_PENDING_FUTURES = pending + 1
    with django_capture_on_commit_callbacks(execute=True):
        first = post(client, "optim_step", {"model_id": model, "seq_id": 1, "adam_params": {}})
        busy = post(client, "optim_step", {"model_id": model, "seq_id": 2, "adam_params": {}})
        retry = post(client, "optim_step", {"model_id": model, "seq_id": 1, "adam_params": {}})
    assert first.status_code == 200 and retry.json()["request_id"] == first.json()["request_id"]
    assert busy.status_code == 429 and "in flight" in busy.json()["error"]
    assert [m.get("seq_id") for m in queued()] == [1, 1]  # the retry of the pending call is queued again
    queue.client().delete(queue.ops_key(BASE))
    assert json.loads(first.content)["model_id"] == model


def test_bad_sampling_params_are_refused_in_the_sdks_error_shape(api, django_capture_on_commit_callbacks):
    client, _, _, sampler = api
    bad = {
        "top_k": (-2, r"top_k must be in \[-1, 2147483647\]"),
        "top_p": (0, r"top_p must be in \(0, 1\]"),
        "temperature": (-0.5, "temperature must be >= 0"),
    }
    with django_capture_on_commit_callbacks(execute=True):
        for field, (value, message) in bad.items():
            body = sample(sampler, 2, 3)
            body["sampling_params"][field] = value
            r = post(client, "asample", body)
            assert r.status_code == 400 and r.json()["category"] == "user", r.content
            assert re.search(message, r.json()["error"]), r.json()
        ok = sample(sampler, 2, 3)
        ok["sampling_params"].update(top_k=5, top_p=0.5, temperature=0)
        assert post(client, "asample", ok).status_code == 200
    assert [m["sampling_params"] for m in queued() if m["op"] == "sample"] == [
        {"max_tokens": 3, "top_k": 5, "top_p": 0.5, "temperature": 0}
    ]
