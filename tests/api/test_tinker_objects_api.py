"""/api/v1/tinker/...: an organization's Tinker sessions, training clients and saved weights, for people and
the CLI. Three actors: alice (acme's owner) and bob (acme's member) see acme's objects with exact counts;
charlie (globex) gets 404 for each of them and sees only his own. A weights file comes down byte for byte
(file:// and S3); a name outside the adapter's files is a 404.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from urllib.parse import quote, urlparse

import httpx
import pytest
from django.test import Client

from api.tinker import services
from api.tinker.models import TinkerWeights
from portal.models import Membership
from tests.conftest import client_for

pytestmark = pytest.mark.django_db
BASE = "tiny-qwen2"
V1 = "/api/v1/tinker"
ADAPTER = b"\x08\x00\x00\x00\x00\x00\x00\x00{}"  # any bytes: served as stored
CONFIG = b'{"r": 4, "peft_type": "LORA"}'


def _done(future, result=None) -> None:
    services.future_complete(BASE, str(future.pk), result=result or {"metrics": {}})


def tinker_world(org, user, *, steps: int, publish=None) -> dict:
    """A session with one training client: `steps` forward_backward + optim_step pairs, then a saved state
    "ck" and a sampler adapter "sw" whose files are written where the model server would publish them."""
    membership = Membership.objects.get(user=user, organization=org)
    session = services.session_create(membership, tags=["demo"], sdk_version="0.38.0")
    created = services.model_create(org, str(session.pk), 0, BASE, {"rank": 4})
    _done(created)
    model = created.model
    seq = 1
    for _ in range(steps):
        _done(services.call_submit(org, model.pk, seq, "forward_backward", {"data": []}))
        _done(services.call_submit(org, model.pk, seq + 1, "optim_step", {"adam_params": {}}))
        seq += 2
    services.call_submit(org, model.pk, seq, "forward_backward", {"data": []})  # still pending
    saved = []
    for for_sampler, name in ((False, "ck"), (True, "sw")):
        seq += 1
        future = services.save_submit(org, model.pk, seq, for_sampler=for_sampler, name=name)
        files = {"adapter_config.json": CONFIG, "adapter_model.safetensors": ADAPTER, "meta.json": b"{}"}
        if not for_sampler:
            files["optimizer.safetensors"] = b"adam"
        (publish or _publish_local)(future.request["uri"], files)
        _done(future, {"uri": future.request["uri"]})
        saved.append(future.request["uri"])
    services.sampler_create(org, str(session.pk), 0, base_model=BASE, model_path=None)
    return {"session": str(session.pk), "model": model.pk, "uris": saved}


def _publish_local(uri: str, files: dict[str, bytes]) -> None:
    folder = Path(urlparse(uri).path)
    folder.mkdir(parents=True)
    for name, data in files.items():
        (folder / name).write_bytes(data)


@pytest.fixture
def store(settings, tmp_path):
    settings.OBJECT_STORE_URL = f"file://{tmp_path / 'objects'}"
    return tmp_path / "objects"


@pytest.fixture
def world(store, alice, acme, charlie, globex):
    return {"acme": tinker_world(acme, alice, steps=3), "globex": tinker_world(globex, charlie, steps=1)}


def test_owner_and_teammate_see_sessions_models_weights(world, as_alice, as_bob):
    acme = world["acme"]
    for client in (as_alice, as_bob):
        sessions = client.get(f"{V1}/sessions").json()["results"]
        assert [(s["id"], s["training_clients"], s["samplers"]) for s in sessions] == [
            (acme["session"], 1, 1)
        ]
        assert sessions[0]["created_by"] == "alice" and sessions[0]["tags"] == ["demo"]

        models = client.get(f"{V1}/models").json()["results"]
        assert len(models) == 1
        m = models[0]
        assert (m["id"], m["base_model"], m["lora_rank"], m["session"]) == (
            acme["model"],
            BASE,
            4,
            acme["session"],
        )
        assert (m["steps"], m["forward_backward_calls"], m["pending_calls"], m["saved_weights"]) == (
            3,
            3,
            1,
            2,
        )

        detail = client.get(f"{V1}/models/{quote(acme['model'])}").json()
        paths = sorted(w["path"] for w in detail["weights"])
        assert paths == [
            f"tinker://{acme['model']}/sampler_weights/sw",
            f"tinker://{acme['model']}/weights/ck",
        ]

        session = client.get(f"{V1}/sessions/{acme['session']}").json()
        assert [m["id"] for m in session["models"]] == [acme["model"]]

        weights = client.get(f"{V1}/weights").json()["results"]
        assert [(w["kind"], w["name"], w["base_model"], w["lora_rank"]) for w in weights] == [
            ("sampler_weights", "sw", BASE, 4),
            ("weights", "ck", BASE, 4),
        ]
        by_name = {w["name"]: w for w in weights}
        ck = client.get(f"{V1}/weights/{by_name['ck']['id']}").json()
        assert ck["files"] == [
            {"name": "adapter_config.json", "size": len(CONFIG)},
            {"name": "adapter_model.safetensors", "size": len(ADAPTER)},
            {"name": "meta.json", "size": 2},
            {"name": "optimizer.safetensors", "size": 4},
        ]
        sw = client.get(f"{V1}/weights/{by_name['sw']['id']}").json()
        assert [f["name"] for f in sw["files"]] == [
            "adapter_config.json",
            "adapter_model.safetensors",
            "meta.json",
        ]
        got = client.get(f"{V1}/weights/{by_name['sw']['id']}/files/adapter_model.safetensors")
        assert got.status_code == 200 and b"".join(got.streaming_content) == ADAPTER

        filtered = client.get(f"{V1}/weights", {"model": acme["model"]}).json()["results"]
        assert len(filtered) == 2
        assert client.get(f"{V1}/models", {"session": acme["session"]}).json()["results"][0]["steps"] == 3


def test_outsider_gets_404_for_each_object_and_sees_only_his_own(world, as_charlie):
    acme, globex = world["acme"], world["globex"]
    ids = [w["id"] for w in as_charlie.get(f"{V1}/weights").json()["results"]]
    acme_weights = TinkerWeights.objects.filter(model_id=acme["model"]).values_list("pk", flat=True)
    assert not set(ids) & set(acme_weights)
    for url in (
        f"{V1}/sessions/{acme['session']}",
        f"{V1}/models/{quote(acme['model'])}",
        *(f"{V1}/weights/{pk}" for pk in acme_weights),
        *(f"{V1}/weights/{pk}/files/adapter_model.safetensors" for pk in acme_weights),
    ):
        resp = as_charlie.get(url)
        assert resp.status_code == 404, url
        assert resp.json()["error"]["code"] == "not_found"
    # A filter naming acme's objects is a 404 too, not an empty list that confirms nothing.
    assert as_charlie.get(f"{V1}/models", {"session": acme["session"]}).status_code == 404
    assert as_charlie.get(f"{V1}/weights", {"model": acme["model"]}).status_code == 404
    sessions = as_charlie.get(f"{V1}/sessions").json()["results"]
    assert [s["id"] for s in sessions] == [globex["session"]]
    models = as_charlie.get(f"{V1}/models").json()["results"]
    assert [(m["id"], m["steps"]) for m in models] == [(globex["model"], 1)]
    for text in (
        as_charlie.get(f"{V1}/{what}").content.decode() for what in ("sessions", "models", "weights")
    ):
        assert acme["session"] not in text and "alice" not in text


def test_bad_ids_and_file_names_are_404(world, as_alice):
    ck = TinkerWeights.objects.get(model_id=world["acme"]["model"], name="ck")
    for url in (
        f"{V1}/sessions/not-a-uuid",
        f"{V1}/models/nothing",
        f"{V1}/weights/999999999",
        f"{V1}/weights/{ck.pk}/files/secrets.txt",
        f"{V1}/weights/{ck.pk}/files/..",
        f"{V1}/weights/{ck.pk}/files/grads.safetensors",
    ):
        assert as_alice.get(url).status_code == 404, url


def test_needs_jobs_read_scope_and_a_login(world, alice, acme, make_token):
    only_envs = client_for(make_token(alice, acme, scopes=["envs:read"]))
    assert only_envs.get(f"{V1}/sessions").status_code == 403
    assert Client().get(f"{V1}/sessions").status_code == 401


def test_weights_file_from_s3_is_a_signed_redirect(s3_store, alice, acme, as_alice):
    def publish(uri: str, files: dict[str, bytes]) -> None:
        bucket, _, key = uri.removeprefix("s3://").partition("/")
        for name, data in files.items():
            s3_store.client.put_object(Bucket=bucket, Key=f"{key}/{name}", Body=data)

    acme_world = tinker_world(acme, alice, steps=1, publish=publish)
    ck = TinkerWeights.objects.get(model_id=acme_world["model"], name="ck")
    detail = as_alice.get(f"{V1}/weights/{ck.pk}").json()
    assert {f["name"]: f["size"] for f in detail["files"]}["adapter_model.safetensors"] == len(ADAPTER)
    resp = as_alice.get(f"{V1}/weights/{ck.pk}/files/adapter_model.safetensors")
    assert resp.status_code == 302
    fetched = httpx.get(resp["Location"])
    assert hashlib.sha256(fetched.content).hexdigest() == hashlib.sha256(ADAPTER).hexdigest()


def test_lists_are_pages_for_owner_and_teammate_and_the_outsider_sees_only_his(
    world, alice, acme, as_alice, as_bob, as_charlie
):
    """acme: 3 sessions, 3 training clients, 6 saved weights; pages of 2 (sessions, models) and 4 (weights)
    cover each list once, newest first; limit over 200, 0, a negative offset or an unknown parameter: 400."""
    more = [tinker_world(acme, alice, steps=0) for _ in range(2)]
    sessions = [m["session"] for m in reversed(more)] + [world["acme"]["session"]]
    models = [m["model"] for m in reversed(more)] + [world["acme"]["model"]]
    for client in (as_alice, as_bob):
        for what, limit, expected in (("sessions", 2, sessions), ("models", 2, models), ("weights", 4, None)):
            first = client.get(f"{V1}/{what}", {"limit": limit}).json()
            assert first["count"] == (6 if what == "weights" else 3) and first["previous"] is None
            assert len(first["results"]) == limit and "offset=" + str(limit) in first["next"]
            rest = client.get(first["next"]).json()
            assert rest["next"] is None and len(rest["results"]) == first["count"] - limit
            got = [r["id"] for r in first["results"] + rest["results"]]
            if expected is not None:
                assert got == expected
            else:
                assert len(set(got)) == 6 and {r["model"] for r in first["results"] + rest["results"]} == set(
                    models
                )
    one = as_alice.get(f"{V1}/weights", {"session": more[0]["session"], "limit": 1, "offset": 1}).json()
    assert one["count"] == 2 and [w["name"] for w in one["results"]] == ["ck"]
    mine = as_charlie.get(f"{V1}/sessions", {"limit": 1}).json()
    assert mine["count"] == 1 and [s["id"] for s in mine["results"]] == [world["globex"]["session"]]
    assert as_charlie.get(f"{V1}/weights", {"limit": 200}).json()["count"] == 2
    for params in ({"limit": 201}, {"limit": 0}, {"offset": -1}, {"limit": "x"}, {"page": 2}):
        for what in ("sessions", "models", "weights"):
            resp = as_alice.get(f"{V1}/{what}", params)
            assert resp.status_code == 400, (what, params)
            assert list(resp.json()["error"]["fields"]) == list(params), resp.json()
