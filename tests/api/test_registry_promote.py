"""Promoting a job's checkpoint into the model registry (POST /jobs/{id}/promote), with three actors and a
viewer: alice (owner) and bob (member) of acme promote, dave (viewer of acme) gets 403, charlie (globex) 404.

The checkpoints are written to the store as the runtime lays them out (gpu_runtime/checkpoint.py: the model's
files, trainer_state.pt, meta.json) with the records the ingest API keeps; no training runs here.
"""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

import pytest

from env_registry.models import ModelVersion, RegisteredModel
from opentinker.spec import JobSpec, example_rl_spec
from portal.models import Checkpoint, Job, Membership, Role
from tests.api.test_registry import V1, error_of, sft_job, stored_files
from tests.conftest import client_for
from tests.tiny_model import tiny_model_files

pytestmark = pytest.mark.django_db


@pytest.fixture
def store(settings, tmp_path) -> Path:
    root = tmp_path / "objects"
    settings.OBJECT_STORE_URL = f"file://{root}"
    return root


@pytest.fixture
def as_dave(make_user, acme, make_token):
    dave = make_user("dave")
    Membership.objects.create(organization=acme, user=dave, role=Role.VIEWER)
    return client_for(make_token(dave, acme))


def a_job(client) -> Job:
    resp = client.post(f"{V1}/jobs", example_rl_spec().model_dump(mode="json"), format="json")
    assert resp.status_code == 201, resp.content
    return Job.objects.get(pk=resp.json()["id"])


def write_checkpoint(store: Path, job: Job, step: int, files: dict[str, bytes]) -> Checkpoint:
    rel = f"orgs/{job.organization.slug}/jobs/{job.id}/step_{step:06d}"
    records = []
    for name, data in files.items():
        (store / rel / name).parent.mkdir(parents=True, exist_ok=True)
        (store / rel / name).write_bytes(data)
        records.append({"name": name, "size": len(data), "sha256": hashlib.sha256(data).hexdigest()})
    return Checkpoint.objects.create(
        job=job,
        step=step,
        uri=f"file://{store}/{rel}",
        files=records,
        size_bytes=sum(map(len, files.values())),
    )


RUNTIME_FILES = {"trainer_state.pt": b"optimizer state", "meta.json": b'{"step": 2}'}


def test_members_promote_a_checkpoint_the_viewer_and_an_outsider_cannot(
    as_alice, as_bob, as_charlie, as_dave, store, settings
):
    job = a_job(as_alice)
    model = tiny_model_files(seed=5)
    write_checkpoint(store, job, 1, {**tiny_model_files(seed=6), **RUNTIME_FILES})
    write_checkpoint(store, job, 2, {**model, **RUNTIME_FILES})
    url = f"{V1}/jobs/{job.id}/promote"

    assert as_charlie.post(url, {"name": "trained"}, format="json").status_code == 404
    resp = as_dave.post(url, {"name": "trained"}, format="json")
    assert resp.status_code == 403 and "envs:write" in error_of(resp)
    assert ModelVersion.objects.count() == 0

    resp = as_bob.post(url, {"name": "trained"}, format="json")  # the latest step, validated in the sandbox
    assert resp.status_code == 201, resp.content
    body = resp.json()
    assert body["ref"] == "acme/trained@1" and body["model"]["status"] == "valid", body
    assert body["model"]["info"]["source"] == f"job:{job.id}@2"
    assert body["model"]["info"]["parameters"] == 28960
    assert body["model"]["uploaded_by"] == "bob"
    # byte for byte the checkpoint's model files; trainer state and the checkpoint's meta.json left out
    assert stored_files(store / "orgs/acme/models") == sorted(f"trained/1/{n}" for n in model)
    for name, data in model.items():
        assert (store / "orgs/acme/models/trained/1" / name).read_bytes() == data
    assert {f["path"]: f["sha256"] for f in body["model"]["files"]} == {
        n: hashlib.sha256(d).hexdigest() for n, d in model.items()
    }

    # an explicit step, as the next version (the sandbox's check ran once above: left to Celery here)
    settings.ENV_VALIDATION_MODE = "celery"
    resp = as_alice.post(url, {"name": "trained", "step": 1}, format="json")
    assert resp.status_code == 201 and resp.json()["ref"] == "acme/trained@2", resp.content
    resp = as_alice.post(url, {"name": "trained", "step": 7}, format="json")
    assert resp.status_code == 404 and error_of(resp) == "no checkpoint at step 7 (steps: 1, 2)"
    assert as_charlie.get(f"{V1}/org/models/trained").status_code == 404

    # the promoted version is a model.base: pinned to its files at submission
    resp = as_bob.post(
        f"{V1}/jobs", sft_job("acme/trained@1", f"file://{store}/orgs/acme/data.jsonl"), format="json"
    )
    assert resp.status_code == 201, resp.content
    spec = JobSpec.model_validate(Job.objects.get(pk=resp.json()["id"]).spec)
    assert (spec.model.base, spec.model.registry_ref) == (
        f"file://{store}/orgs/acme/models/trained/1",
        "acme/trained@1",
    )


def _adapter_files() -> dict[str, bytes]:
    header = {
        "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": {
            "dtype": "F32",
            "shape": [2, 32],
            "data_offsets": [0, 256],
        },
        "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": {
            "dtype": "F32",
            "shape": [32, 2],
            "data_offsets": [256, 512],
        },
    }
    raw = json.dumps(header).encode()
    config = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj"]}
    tiny = tiny_model_files()
    return {
        "adapter_model.safetensors": struct.pack("<Q", len(raw)) + raw + bytes(512),
        "adapter_config.json": json.dumps({**config, "base_model_name_or_path": None}).encode(),
        "config.json": tiny["config.json"],
        "tokenizer.json": tiny["tokenizer.json"],
        "tokenizer_config.json": tiny["tokenizer_config.json"],
    }


def test_a_lora_checkpoint_becomes_an_adapter_with_the_jobs_base_and_seed_pinned(as_alice, store, settings):
    settings.ENV_VALIDATION_MODE = "celery"  # the checks before storing are what this test is about
    job = a_job(as_alice)
    files = _adapter_files()
    write_checkpoint(store, job, 3, {**files, **RUNTIME_FILES})
    resp = as_alice.post(f"{V1}/jobs/{job.id}/promote", {"name": "lora"}, format="json")
    assert resp.status_code == 201, resp.content
    version = resp.json()["model"]
    assert version["status"] == "pending"
    assert (version["info"]["kind"], version["info"]["base"]) == ("adapter", job.spec["model"]["base"])
    where = store / "orgs/acme/models/lora/1"
    # the base's config.json is not the adapter's: left out, so the version is an adapter
    assert sorted(p.name for p in where.iterdir()) == sorted(
        [*(n for n in files if n != "config.json"), "opentinker_base.json"]
    )
    pin = json.loads((where / "opentinker_base.json").read_text())
    base = job.spec["model"]["base"]
    assert pin == {"base": base, "ref": base, "seed": job.spec["seed"]}


def test_refusals_store_nothing(as_alice, store, settings):
    job = a_job(as_alice)
    url = f"{V1}/jobs/{job.id}/promote"
    resp = as_alice.post(url, {"name": "trained"}, format="json")
    assert resp.status_code == 404 and error_of(resp) == "this job has no checkpoints yet"

    model = tiny_model_files()
    ck = write_checkpoint(store, job, 2, {**model, **RUNTIME_FILES})
    assert as_alice.post(url, {"name": "Bad Name"}, format="json").status_code == 400

    # over the organization's registry limit
    settings.REGISTRY_MAX_BYTES = sum(map(len, model.values())) - 1
    resp = as_alice.post(url, {"name": "trained"}, format="json")
    assert resp.status_code == 400 and "REGISTRY_MAX_BYTES" in error_of(resp)
    settings.REGISTRY_MAX_BYTES = 10**9

    # a file that no longer matches the runtime's record
    (store / ck.uri.removeprefix(f"file://{store}/") / "config.json").write_bytes(b"{}")
    resp = as_alice.post(url, {"name": "trained"}, format="json")
    assert resp.status_code == 400 and "config.json does not match" in error_of(resp), resp.content

    # pickle weights in a checkpoint are refused like an upload's
    write_checkpoint(store, job, 4, {**model, "pytorch_model.bin": b"pickle"})
    resp = as_alice.post(url, {"name": "trained", "step": 4}, format="json")
    assert resp.status_code == 400 and "pickle weights" in error_of(resp)

    assert RegisteredModel.objects.count() == 0 and ModelVersion.objects.count() == 0
    assert stored_files(store / "orgs/acme/models") == []
