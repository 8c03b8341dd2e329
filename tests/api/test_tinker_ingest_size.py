"""Large outcomes reach their futures (the reviewer's C3): the model server's ingest has its own body limit,
larger than the SDK's, and the model server posts outcomes in bounded batches; a batch the ingest refuses is
not retried but failed with a small post. Actor: the model server of tiny-qwen2 (an `otm_` token)."""

from __future__ import annotations

import json

import httpx
import pytest
from django.test import Client

from api.tinker.models import TinkerFuture
from api.tinker.server_tokens import model_server_token_issue
from gpu_runtime.model_server.serve import batches, http_poster
from tests.api.test_tinker_hostile_numbers import api as api  # a fixture

BASE = "tiny-qwen2"


@pytest.mark.django_db
def test_the_ingest_takes_outcomes_over_the_sdk_body_limit(api, settings):
    _, _, model, _ = api
    settings.TINKER_MAX_BODY_BYTES = 4096
    settings.TINKER_MAX_INGEST_BYTES = 1024 * 1024
    future = TinkerFuture.objects.get(model_id=model, operation="create_model")
    outcome = {"future": str(future.pk), "result": {"padding": "x" * 100_000}}
    ingest = Client(headers={"Authorization": f"Bearer {model_server_token_issue(BASE)}"})
    r = ingest.post(
        "/tinker/ingest/outcomes", json.dumps({"outcomes": [outcome]}), content_type="application/json"
    )
    assert r.status_code == 200 and r.json() == {"written": 1, "unknown": 0}
    settings.TINKER_MAX_INGEST_BYTES = 4096
    r = ingest.post(
        "/tinker/ingest/outcomes", json.dumps({"outcomes": [outcome]}), content_type="application/json"
    )
    assert r.status_code == 400


def test_outcomes_are_posted_in_bounded_batches_and_a_refused_one_fails_its_futures():
    posted: list[list[dict]] = []

    def ingest(request: httpx.Request) -> httpx.Response:
        outcomes = json.loads(request.content)["outcomes"]
        posted.append(outcomes)
        if len(request.content) > 3000:
            return httpx.Response(400, json={"error": "request body is over the limit"})
        return httpx.Response(200, json={"written": len(outcomes), "unknown": 0})

    outcomes = [{"future": f"f{i}", "result": {"logprobs": "x" * 900}} for i in range(5)]
    assert [len(b) for b in batches(outcomes, 2000)] == [2, 2, 1]
    huge = {"future": "big", "result": {"logprobs": "x" * 5000}}
    post = http_poster(
        "http://ingest", "t", max_bytes=2000, client=httpx.Client(transport=httpx.MockTransport(ingest))
    )
    post([*outcomes[:2], huge, outcomes[2]])
    futures = [[o["future"] for o in batch] for batch in posted]
    # [f0, f1], then the huge one alone (refused once, not retried), its failure, then f2.
    assert futures == [["f0", "f1"], ["big"], ["big"], ["f2"]]
    assert posted[2] == [
        {
            "future": "big",
            "error": "the model server could not report this outcome: ingest 400",
            "category": "server",
        }
    ]
