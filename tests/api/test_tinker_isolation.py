"""Tenant isolation over EVERY route of the Tinker-compatible API (`api/tinker/urls.py`).

The Tinker routes are plain Django views outside the OpenAPI schema, so tests/api/test_isolation.py's walk
does not see them; this one does the same for them. charlie (owner of globex, a `tinker` token) calls each
route with the real ids of acme's objects (a session, a training client, a sampler, futures, saved weights):
each answers 404, no acme id appears in any body, and nothing of acme changes. bob (acme's member) reaches
them.
A route added to api/tinker/urls.py that this file does not call fails `test_every_route_is_walked`.
"""

from __future__ import annotations

import json

import pytest
from django.test import Client
from django.urls import URLPattern

from api.tinker import services, urls
from api.tinker.auth import sdk_key
from api.tinker.models import TinkerFuture, TinkerModel, TinkerSession, TinkerWeights
from api.tinker.proto import tinker_public_pb2 as pb
from portal.models import Membership

pytestmark = pytest.mark.django_db
BASE = "tiny-qwen2"
V1 = "/tinker/api/v1"


@pytest.fixture
def world(alice, bob, charlie, acme, globex, make_token):
    owner = Membership.objects.get(user=alice, organization=acme)
    session = services.session_create(owner, tags=[], sdk_version="0.38.0")
    created = services.model_create(acme, str(session.pk), 0, BASE, {"rank": 4})
    model = created.model
    fb = services.call_submit(acme, model.pk, 1, "forward_backward", {"data": []})
    services.future_complete(BASE, str(fb.pk), result={"loss_fn_outputs": [], "metrics": {"loss:sum": 1.0}})
    saved = services.save_submit(acme, model.pk, 2, for_sampler=False, name="ck")
    services.future_complete(BASE, str(saved.pk), result={"uri": "file:///x"})
    sampler = services.sampler_create(acme, str(session.pk), 0, base_model=BASE, model_path=None)
    charlie_key = sdk_key(make_token(charlie, globex, scopes=["tinker"]))
    theirs = Client(headers={"X-API-Key": charlie_key})
    own_session = theirs.post(f"{V1}/create_session", {"tags": []}, content_type="application/json").json()
    return {
        "session": str(session.pk),
        "model": model.pk,
        "sampler": sampler.pk,
        "futures": [str(created.pk), str(fb.pk), str(saved.pk)],
        "path": f"tinker://{model.pk}/weights/ck",
        "charlie": theirs,
        "charlie_session": own_session["session_id"],
        "bob": Client(headers={"X-API-Key": sdk_key(make_token(bob, acme, scopes=["tinker"]))}),
    }


def fb_body(model_id: str) -> bytes:
    msg = pb.ForwardBackwardRequest(model_id=model_id, seq_id=3, loss_fn="cross_entropy")
    msg.data.add().model_input.add().encoded_text.tokens = b"\x05\x00\x00\x00"
    return bytes(msg.SerializeToString())


def calls(w) -> list[tuple[str, str, object]]:
    """(route, url, JSON body or protobuf bytes; None for a GET) naming acme's objects."""
    acme_session, model, sampler, path = w["session"], w["model"], w["sampler"], w["path"]
    mine = w["charlie_session"]
    adam = {"learning_rate": 1e-3}
    out = [
        ("session_heartbeat", "session_heartbeat", {"session_id": acme_session}),
        (
            "sessions/<str:session_id>/finish",
            f"sessions/{acme_session}/finish",
            {"reason": {"type": "success"}},
        ),
        ("create_model", "create_model", {"session_id": acme_session, "model_seq_id": 7, "base_model": BASE}),
        (
            "load_weights",
            "load_weights",
            {"session_id": mine, "model_seq_id": 1, "path": path, "optimizer": True},
        ),
        ("load_weights", "load_weights", {"session_id": acme_session, "model_seq_id": 8, "path": path}),
        ("get_info", "get_info", {"model_id": model}),
        ("forward_backward", "forward_backward", fb_body(model)),
        ("optim_step", "optim_step", {"model_id": model, "seq_id": 3, "adam_params": adam}),
        ("save_weights", "save_weights", {"model_id": model, "seq_id": 3, "path": "mine"}),
        (
            "save_weights_for_sampler",
            "save_weights_for_sampler",
            {"model_id": model, "seq_id": 3, "path": "s"},
        ),
        (
            "create_sampling_session",
            "create_sampling_session",
            {"session_id": acme_session, "sampling_session_seq_id": 4, "base_model": BASE},
        ),
        (
            "create_sampling_session",
            "create_sampling_session",
            {"session_id": mine, "sampling_session_seq_id": 0, "model_path": path},
        ),
        ("samplers/<str:sampler_id>", f"samplers/{sampler}", None),
        ("training_runs/<str:model_id>/checkpoints", f"training_runs/{model}/checkpoints", None),
        (
            "asample",
            "asample",
            {
                "sampling_session_id": sampler,
                "seq_id": 0,
                "num_samples": 1,
                "prompt": {"chunks": [{"type": "encoded_text", "tokens": [5]}]},
                "sampling_params": {"max_tokens": 2},
            },
        ),
    ]
    out += [("retrieve_future", "retrieve_future", {"request_id": f}) for f in w["futures"]]
    return out


# Routes that name no object: they answer the caller's own things, never acme's.
UNNAMED = [
    ("client/config", "client/config", {"sdk_version": "0.38.0"}),
    ("create_session", "create_session", {"tags": []}),
    ("telemetry", "telemetry", {"events": []}),
    # the lists (GET): the caller's organization's objects only
    ("sessions", "sessions?limit=200", None),
    ("training_runs", "training_runs?limit=200&access_scope=accessible", None),
    ("checkpoints", "checkpoints?limit=200", None),
]


def send(client: Client, url: str, body: object):
    if body is None:
        return client.get(f"{V1}/{url}")
    if isinstance(body, bytes):
        return client.post(f"{V1}/{url}", body, content_type="application/x-protobuf")
    return client.post(f"{V1}/{url}", json.dumps(body), content_type="application/json")


def acme_ids(w) -> list[str]:
    return [w["session"], w["model"], w["sampler"], *w["futures"], "acme"]


def snapshot():
    return (
        sorted(TinkerFuture.objects.values_list("pk", "state", "seq_id")),
        sorted(TinkerModel.objects.values_list("pk", "organization_id")),
        sorted(TinkerSession.objects.values_list("pk", "finished_at", "organization_id")),
        sorted(TinkerWeights.objects.values_list("pk", "name")),
    )


def test_every_route_is_walked(world):
    routes = {str(p.pattern) for p in urls.v1 if isinstance(p, URLPattern)}
    walked = {route for route, _, _ in calls(world) + UNNAMED}
    assert routes - walked == set(), "walk the new Tinker route in this file"


def test_an_outsider_gets_404_for_every_acme_object_and_changes_nothing(world):
    before = snapshot()
    for route, url, body in calls(world):
        r = send(world["charlie"], url, body)
        assert r.status_code == 404, (route, body, r.status_code, r.content[:200])
        assert not any(i in r.content.decode() for i in acme_ids(world)), route
    for route, url, body in UNNAMED:
        r = send(world["charlie"], url, body)
        assert r.status_code == 200, route
        assert not any(i in r.content.decode() for i in acme_ids(world)), route
    futures, models, sessions, weights = snapshot()
    assert (futures, models, weights) == (before[0], before[1], before[3])
    # charlie's own session (the UNNAMED create_session) is the only new row.
    assert len(sessions) == len(before[2]) + 1 and set(before[2]) <= set(sessions)
    assert TinkerSession.objects.filter(pk=world["session"], finished_at=None).exists()


@pytest.mark.parametrize("bad", ["-" * 32, "x", "0" * 40, "../../etc", ""])
def test_malformed_ids_are_404s(world, bad):
    assert send(world["charlie"], "retrieve_future", {"request_id": bad}).status_code == 404
    assert send(world["charlie"], "session_heartbeat", {"session_id": bad}).status_code == 404
    assert send(world["charlie"], "get_info", {"model_id": bad}).status_code == 404


def test_a_teammate_reaches_them(world):
    assert send(world["bob"], "get_info", {"model_id": world["model"]}).json()["model_id"] == world["model"]
    r = send(world["bob"], "retrieve_future", {"request_id": world["futures"][2]})
    assert r.json() == {"type": "save_weights", "path": world["path"]}
    assert send(world["bob"], f"samplers/{world['sampler']}", None).json()["base_model"] == BASE
