"""The Tinker API's metering: each outcome a model server reports carries its usage (tokens, seconds), which
the ingest adds to the future's organization's month (UsageRecord.tinker_tokens, model_server_seconds) once,
with the outcome the future keeps. Actors: alice (owner of acme) calls; charlie (outsider, globex) is charged
nothing for acme's calls; bob (teammate) shares acme's record."""

from __future__ import annotations

import pytest
from django.test import Client

from api.tinker import services
from api.tinker.server_tokens import model_server_token_issue
from portal.models import Membership, UsageRecord

pytestmark = pytest.mark.django_db
BASE = "tiny-qwen2"


def ingest(outcomes: list[dict]) -> dict:
    token = model_server_token_issue(BASE)
    client = Client(headers={"Authorization": f"Bearer {token}"})
    reply = client.post("/tinker/ingest/outcomes", {"outcomes": outcomes}, content_type="application/json")
    assert reply.status_code == 200, reply.content
    return reply.json()


def calls(org, user, n: int) -> list[str]:
    session = services.session_create(
        Membership.objects.get(user=user, organization=org), tags=[], sdk_version=""
    )
    model = services.model_create(org, str(session.pk), 0, BASE, {"rank": 4}).model
    return [
        str(services.call_submit(org, model.pk, seq, "optim_step", {"adam_params": {}}).pk)
        for seq in range(1, n + 1)
    ]


def test_usage_is_charged_once_to_the_calls_organization(
    alice, bob, charlie, acme, globex, as_bob, as_charlie
):
    first, second, third = calls(acme, alice, 3)
    (theirs,) = calls(globex, charlie, 1)
    assert ingest(
        [
            {"future": first, "result": {"metrics": {}}, "usage": {"tokens": 120, "seconds": 0.5}},
            {"future": second, "error": "bad", "category": "user", "usage": {"tokens": 0, "seconds": 0.25}},
        ]
    ) == {"written": 2, "unknown": 0}
    # A repeated report (a model server that lost the answer) keeps the first outcome, is not charged again.
    ingest([{"future": first, "result": {"metrics": {}}, "usage": {"tokens": 120, "seconds": 0.5}}])
    # Broken numbers are not charged (the outcome is still written).
    ingest([{"future": third, "result": {"metrics": {}}, "usage": {"tokens": -5, "seconds": "x"}}])
    (acme_usage,) = UsageRecord.objects.filter(organization=acme)
    assert (acme_usage.tinker_tokens, acme_usage.model_server_seconds) == (120, 0.75)
    assert not UsageRecord.objects.filter(organization=globex).exists()
    ingest([{"future": theirs, "result": {"metrics": {}}, "usage": {"tokens": 7, "seconds": 1.0}}])
    (globex_usage,) = UsageRecord.objects.filter(organization=globex)
    assert (globex_usage.tinker_tokens, globex_usage.model_server_seconds) == (7, 1.0)
    acme_usage.refresh_from_db()
    assert acme_usage.tinker_tokens == 120
    # The organization's usage API shows it to a teammate; the outsider sees only globex's.
    (month,) = as_bob.get("/api/v1/org/usage").json()
    assert (month["tinker_tokens"], month["model_server_hours"]) == (120, round(0.75 / 3600, 6))
    (theirs,) = as_charlie.get("/api/v1/org/usage").json()
    assert (theirs["tinker_tokens"], theirs["model_server_hours"]) == (7, round(1.0 / 3600, 6))
