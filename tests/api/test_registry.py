"""An organization's model and dataset registries over the API (three actors): resumable uploads, hostile
models refused with nothing stored, registry references in job specs, dataset previews.

alice (owner) and bob (member) of acme push and read; charlie (globex) gets 404 for every acme object and
sees none of them in his lists. Validation in the sandbox is run for real once (test_model_push_validates...);
elsewhere it is left to Celery (which the test transaction never reaches) and the row is marked valid.
"""

from __future__ import annotations

import hashlib
import io
import json
import struct
import uuid
from datetime import timedelta
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from django.utils import timezone

from env_registry import uploads
from env_registry.models import DatasetVersion, ModelVersion, RegisteredDataset, RegisteredModel, Upload
from portal.models import Job
from tests.tiny_model import tiny_model_files

pytestmark = pytest.mark.django_db
V1 = "/api/v1"


# ----------------------------------------------------------------------------------------------------
# a tiny model directory made with transformers, and tiny datasets


@pytest.fixture(scope="module")
def model_files() -> dict[str, bytes]:
    return tiny_model_files()


def prompt_completion_rows(n: int = 12) -> list[dict[str, str]]:
    return [{"question": f"What is {i} + {i}?", "answer": str(2 * i)} for i in range(n)]


def parquet_bytes(rows: list[dict]) -> bytes:
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows), buf)
    return buf.getvalue()


@pytest.fixture
def store(settings, tmp_path) -> Path:
    root = tmp_path / "objects"
    settings.OBJECT_STORE_URL = f"file://{root}"
    return root


@pytest.fixture
def small_chunks(monkeypatch):
    # Several chunks per weights file, so resuming and ordering are exercised with a tiny model.
    monkeypatch.setattr(uploads, "CHUNK_MAX_BYTES", 16 * 1024)
    monkeypatch.setattr(uploads, "CHUNK_MIN_BYTES", 512)


@pytest.fixture
def no_inline_validation(settings):
    settings.ENV_VALIDATION_MODE = "celery"  # enqueued on commit, which a test transaction never reaches


def stored_files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()) if root.exists() else []


def declare(files: dict[str, bytes]) -> list[dict]:
    return [{"path": k, "size": len(v), "sha256": hashlib.sha256(v).hexdigest()} for k, v in files.items()]


def start(client, kind: str, name: str, files: dict[str, bytes], declared: list[dict] | None = None):
    body = {"kind": kind, "name": name, "files": declared if declared is not None else declare(files)}
    return client.post(f"{V1}/org/uploads", body, format="json")


def send_all(client, upload: dict, files: dict[str, bytes]) -> None:
    chunk = upload["chunk_max_bytes"]
    for index, entry in enumerate(upload["files"]):
        data = files[entry["path"]]
        for offset in range(entry["received"], len(data), chunk):
            resp = client.put(
                f"{V1}/org/uploads/{upload['id']}/files/{index}?offset={offset}",
                data[offset : offset + chunk],
                content_type="application/octet-stream",
            )
            assert resp.status_code == 200, resp.content


def push(client, kind: str, name: str, files: dict[str, bytes]):
    resp = start(client, kind, name, files)
    assert resp.status_code == 201, resp.content
    send_all(client, resp.json(), files)
    return client.post(f"{V1}/org/uploads/{resp.json()['id']}/complete")


def error_of(resp) -> str:
    return resp.json()["error"]["message"]


def nothing_stored(store: Path) -> None:
    assert Upload.objects.count() == 0
    assert RegisteredModel.objects.count() == 0 and ModelVersion.objects.count() == 0
    assert RegisteredDataset.objects.count() == 0 and DatasetVersion.objects.count() == 0
    assert stored_files(store) == []


def sft_job(model: str, dataset: str, **dataset_extra) -> dict:
    return {
        "kind": "sft",
        "model": {"base": model},
        "dataset": {"uri": dataset, **dataset_extra},
        "algorithm": {
            "name": "sft",
            "steps": 2,
            "batch_size": 4,
            "micro_batch_size": 2,
            "learning_rate": 1e-3,
        },
        "checkpoint": {"every_steps": 2, "keep_last": 2},
        "seed": 1,
    }


# ----------------------------------------------------------------------------------------------------
# models


def test_model_push_validates_in_the_sandbox_and_a_job_uses_it_as_model_base(
    as_alice, as_bob, as_charlie, store, model_files, small_chunks, settings
):
    resp = push(as_alice, "model", "tiny", model_files)
    assert resp.status_code == 201, resp.content
    body = resp.json()
    assert body["kind"] == "model" and body["ref"] == "acme/tiny@1" and body["dataset"] is None
    version = body["model"]
    assert version["status"] == "valid", version["validation_error"]
    info = version["info"]
    assert (info["model_type"], info["architectures"], info["dtypes"]) == (
        "qwen2",
        ["Qwen2ForCausalLM"],
        ["float32"],
    )
    # embeddings 320x32 (tied) + 2 layers (q 32x32+32, k/v 2x(16x32+16), o 32x32, mlp 3x32x64, 2 norms) + norm
    layer = (32 * 32 + 32) + 2 * (16 * 32 + 16) + 32 * 32 + 3 * 32 * 64 + 2 * 32
    assert info["parameters"] == 320 * 32 + 2 * layer + 32 == 28960
    assert info["vocab_size"] == 320 and info["chat_template"] is True
    assert sorted(f["path"] for f in version["files"]) == sorted(model_files)
    assert stored_files(store) == sorted(f"orgs/acme/models/tiny/1/{name}" for name in model_files)
    for name, data in model_files.items():
        assert (store / "orgs/acme/models/tiny/1" / name).read_bytes() == data
    assert Upload.objects.count() == 0  # chunks and upload row gone

    # bob (member) pushes the next version (validated by the sandbox once is enough here: marked valid)
    settings.ENV_VALIDATION_MODE = "celery"
    resp = push(as_bob, "model", "tiny", model_files)
    ModelVersion.objects.filter(version=2).update(status="valid")
    assert resp.status_code == 201 and resp.json()["ref"] == "acme/tiny@2"
    listed = as_bob.get(f"{V1}/org/models").json()
    assert [(m["owner"], m["name"], [v["version"] for v in m["versions"]]) for m in listed] == [
        ("acme", "tiny", [2, 1])
    ]
    assert as_charlie.get(f"{V1}/org/models").json() == []
    assert as_charlie.get(f"{V1}/org/models/tiny").status_code == 404

    # usable as model.base (exact and latest), pinned to the version's files
    resp = as_alice.post(f"{V1}/jobs", sft_job("acme/tiny@1", "file:///nowhere.jsonl"), format="json")
    assert resp.status_code == 400  # the dataset is outside acme's storage; the model resolved fine
    assert "dataset.uri" in json.dumps(resp.json())
    data_uri = f"file://{store}/orgs/acme/data.jsonl"
    resp = as_alice.post(f"{V1}/jobs", sft_job("acme/tiny@latest", data_uri), format="json")
    assert resp.status_code == 201, resp.content
    spec = Job.objects.get(pk=resp.json()["id"]).spec
    assert spec["model"]["base"] == f"file://{store}/orgs/acme/models/tiny/2"
    assert spec["model"]["registry_ref"] == "acme/tiny@2"
    # charlie cannot name acme's model: as absent as one that never existed
    resp = as_charlie.post(f"{V1}/jobs", sft_job("acme/tiny@1", data_uri), format="json")
    assert resp.status_code == 400 and "no model acme/tiny in your organization" in error_of(resp)


def test_a_pending_or_invalid_version_is_not_usable(as_alice, store, model_files, no_inline_validation):
    assert push(as_alice, "model", "tiny", model_files).json()["model"]["status"] == "pending"
    data_uri = f"file://{store}/orgs/acme/data.jsonl"
    resp = as_alice.post(f"{V1}/jobs", sft_job("acme/tiny@1", data_uri), format="json")
    assert resp.status_code == 400 and error_of(resp) == "acme/tiny@1 is pending, not valid"
    resp = as_alice.post(f"{V1}/jobs", sft_job("acme/tiny@latest", data_uri), format="json")
    assert resp.status_code == 400 and error_of(resp) == "acme/tiny has no valid version yet"
    assert Job.objects.count() == 0


def test_a_raw_uri_into_the_registry_must_be_a_usable_versions_directory(
    as_alice, store, model_files, no_inline_validation
):
    assert push(as_alice, "model", "tiny", model_files).status_code == 201
    arith = {"a.parquet": parquet_bytes(prompt_completion_rows())}
    assert push(as_alice, "dataset", "arith", arith).status_code == 201
    models, data = f"file://{store}/orgs/acme/models", f"file://{store}/orgs/acme/datasets"

    def refusal(model: str, dataset: str) -> str:
        resp = as_alice.post(f"{V1}/jobs", sft_job(model, dataset), format="json")
        assert resp.status_code == 400, resp.content
        return error_of(resp)

    assert refusal(f"{models}/tiny/1", f"{data}/arith/1") == (
        f"'{models}/tiny/1' is acme/tiny@1, which is pending, not valid"
    )
    ModelVersion.objects.update(status="invalid", validation_error="weights do not fit")
    assert refusal(f"{models}/tiny/1/", f"{data}/arith/1") == (
        f"'{models}/tiny/1/' is acme/tiny@1, which is invalid, not valid: weights do not fit"
    )
    ModelVersion.objects.update(status="valid", validation_error="")
    assert refusal(f"{models}/tiny/2", f"{data}/arith/1") == (
        f"'{models}/tiny/2' is not a version of a model in your organization's registry"
    )
    assert refusal(f"{models}/tiny/1/model.safetensors", f"{data}/arith/1").endswith(
        "is inside the models registry's storage but is not one version's directory: "
        "name it as acme/<name>@<version>"
    )
    assert refusal(f"{models}/tiny/1", f"{data}/arith/9") == (
        f"'{data}/arith/9' is not a stored version of a dataset in your organization's registry"
    )
    assert refusal(f"{models}/x/../tiny/1", f"{data}/arith/1/a.parquet").startswith(
        f"'{data}/arith/1/a.parquet'"
    )
    assert Job.objects.count() == 0
    resp = as_alice.post(f"{V1}/jobs", sft_job(f"{models}/tiny/1", f"{data}/arith/1"), format="json")
    assert resp.status_code == 201, resp.content
    # "²" is a digit to str.isdigit, not to int(): outside the layout, not a 500
    resp = as_alice.post(f"{V1}/jobs", sft_job(f"{models}/tiny/²", f"{data}/arith/1"), format="json")
    assert resp.status_code == 201, resp.content
    # Outside the <name>/<version> layout: a file the organization wrote there itself (as make demo does)
    resp = as_alice.post(f"{V1}/jobs", sft_job(f"{models}/tiny/1", f"{data}/arith-sft.jsonl"), format="json")
    assert resp.status_code == 201, resp.content


def test_resume_after_a_lost_chunk_and_the_offset_rule(as_alice, store, model_files, small_chunks):
    files = {k: v for k, v in model_files.items()}
    upload = start(as_alice, "model", "tiny", files).json()
    weights = next(i for i, f in enumerate(upload["files"]) if f["path"] == "model.safetensors")
    url = f"{V1}/org/uploads/{upload['id']}/files/{weights}"
    data = files["model.safetensors"]
    assert (
        as_alice.put(f"{url}?offset=0", data[:1000], content_type="application/octet-stream").status_code
        == 200
    )
    # a chunk sent twice (the answer was lost) or out of order: 409 naming where to go on
    resp = as_alice.put(f"{url}?offset=0", data[:1000], content_type="application/octet-stream")
    assert resp.status_code == 409 and "send from offset 1000" in error_of(resp)
    resp = as_alice.put(f"{url}?offset=5000", data[5000:6000], content_type="application/octet-stream")
    assert resp.status_code == 409
    status = as_alice.get(f"{V1}/org/uploads/{upload['id']}").json()
    assert [f["received"] for f in status["files"]][weights] == 1000
    # completing early is refused, and keeps the upload to go on with
    resp = as_alice.post(f"{V1}/org/uploads/{upload['id']}/complete")
    assert resp.status_code == 400 and "not all bytes arrived yet" in error_of(resp)
    send_all(as_alice, status, files)
    resp = as_alice.post(f"{V1}/org/uploads/{upload['id']}/complete")
    assert resp.status_code == 201 and resp.json()["ref"] == "acme/tiny@1"


def test_chunks_below_the_minimum_duplicate_paths_and_too_many_open_uploads_are_refused(
    as_alice, as_bob, store, model_files, small_chunks
):
    upload = start(as_alice, "model", "tiny", model_files).json()
    weights = next(i for i, f in enumerate(upload["files"]) if f["path"] == "model.safetensors")
    url = f"{V1}/org/uploads/{upload['id']}/files/{weights}"
    data = model_files["model.safetensors"]
    resp = as_alice.put(f"{url}?offset=0", data[:511], content_type="application/octet-stream")
    assert resp.status_code == 400 and error_of(resp) == (
        f"model.safetensors: a chunk is at least 512 bytes unless it ends the file ({len(data)} bytes are "
        "left); this one is 511"
    )
    resp = as_alice.put(f"{url}?offset=0", data[:512], content_type="application/octet-stream")
    assert resp.status_code == 200
    # a file's last chunk may be smaller
    config = model_files["config.json"]
    assert 512 < len(config) < 1024
    index = next(i for i, f in enumerate(upload["files"]) if f["path"] == "config.json")
    for offset, part in [(0, config[:512]), (512, config[512:])]:
        resp = as_alice.put(
            f"{V1}/org/uploads/{upload['id']}/files/{index}?offset={offset}",
            part,
            content_type="application/octet-stream",
        )
        assert resp.status_code == 200, resp.content
    send_all(as_alice, as_alice.get(f"{V1}/org/uploads/{upload['id']}").json(), model_files)
    assert as_alice.post(f"{V1}/org/uploads/{upload['id']}/complete").status_code == 201

    rows = {"a.jsonl": b'{"a": 1}\n'}
    twice = declare(rows) * 2
    resp = start(as_alice, "dataset", "d", rows, twice)
    assert resp.status_code == 400 and error_of(resp) == "files[1]: 'a.jsonl' is listed twice"
    arrow = declare({"data-00000-of-00001.arrow": b"x", "state.json": b"{}", "dataset_info.json": b"{}"})
    resp = start(as_alice, "dataset", "d", rows, [*arrow, arrow[0]])
    assert resp.status_code == 400 and error_of(resp) == (
        "files[3]: 'data-00000-of-00001.arrow' is listed twice"
    )

    opened = [start(as_bob if i % 2 else as_alice, "dataset", "d", rows).json()["id"] for i in range(16)]
    assert Upload.objects.count() == 16
    resp = start(as_alice, "dataset", "d", rows)
    assert resp.status_code == 429 and error_of(resp) == (
        "your organization has 16 uploads open (at most 16): complete or abort some first"
    )
    assert as_alice.delete(f"{V1}/org/uploads/{opened[0]}").status_code == 204
    assert start(as_alice, "dataset", "d", rows).status_code == 201


def test_outsider_cannot_touch_an_upload(as_alice, as_charlie, store, model_files):
    upload = start(as_alice, "model", "tiny", model_files).json()
    base = f"{V1}/org/uploads/{upload['id']}"
    assert as_charlie.get(base).status_code == 404
    resp = as_charlie.put(f"{base}/files/0?offset=0", b"x", content_type="application/octet-stream")
    assert resp.status_code == 404
    assert as_charlie.post(f"{base}/complete").status_code == 404
    assert as_charlie.delete(base).status_code == 404
    assert Upload.objects.get().files[0]["received"] == 0
    assert as_alice.delete(base).status_code == 204
    assert Upload.objects.count() == 0 and stored_files(store) == []


# ----------------------------------------------------------------------------------------------------
# hostile model uploads: refused with a clear error, nothing stored


@pytest.mark.parametrize(
    ("extra", "why"),
    [
        ({"pytorch_model.bin": b"\x80\x04pickle"}, "pytorch_model.bin: pickle weights are never loaded"),
        ({"weights.pt": b"\x80\x04pickle"}, "weights.pt: pickle weights are never loaded"),
        ({"modeling_evil.py": b"import os"}, "modeling_evil.py: a model may not carry code"),
        ({"../escape.json": b"{}"}, "'../escape.json': a file path is at most two names"),
    ],
)
def test_files_that_are_code_or_pickles_are_refused_before_any_byte(as_alice, store, model_files, extra, why):
    resp = start(as_alice, "model", "tiny", {**model_files, **extra})
    assert resp.status_code == 400 and error_of(resp).startswith(why), resp.content
    nothing_stored(store)


def test_a_directory_without_safetensors_or_tokenizer_is_refused(as_alice, store, model_files):
    no_weights = {k: v for k, v in model_files.items() if not k.endswith(".safetensors")}
    resp = start(as_alice, "model", "tiny", no_weights)
    assert resp.status_code == 400 and "safetensors only" in error_of(resp)
    no_tok = {k: v for k, v in model_files.items() if not k.startswith("tokenizer")}
    resp = start(as_alice, "model", "tiny", no_tok)
    assert resp.status_code == 400 and error_of(resp).startswith("no tokenizer")
    nothing_stored(store)


@pytest.mark.parametrize(
    ("config_change", "why"),
    [
        ({"auto_map": {"AutoModelForCausalLM": "modeling_evil.Evil"}}, "config.json has 'auto_map'"),
        ({"trust_remote_code": True}, "config.json has 'trust_remote_code'"),
        ({"text_config": {"auto_map": {"AutoConfig": "x.Y"}}}, "config.json has 'auto_map'"),
    ],
)
def test_a_config_pointing_at_remote_code_is_refused_and_nothing_stays(
    as_alice, store, model_files, small_chunks, config_change, why
):
    config = {**json.loads(model_files["config.json"]), **config_change}
    files = {**model_files, "config.json": json.dumps(config).encode()}
    resp = push(as_alice, "model", "tiny", files)
    assert resp.status_code == 400 and error_of(resp).startswith(why), resp.content
    assert "remote code are refused" in error_of(resp)
    nothing_stored(store)  # the upload's chunks went with it


def test_an_oversized_upload_is_refused_before_any_byte(as_alice, store, model_files, settings):
    total = sum(len(v) for v in model_files.values())
    settings.REGISTRY_MAX_BYTES = total - 1
    resp = start(as_alice, "model", "tiny", model_files)
    assert resp.status_code == 400
    assert error_of(resp) == (
        f"the upload is {total} bytes; your organization's models and datasets may take {total - 1} bytes "
        "and 0 are in use (REGISTRY_MAX_BYTES)"
    )
    nothing_stored(store)


def test_more_bytes_than_declared_and_oversized_chunks_are_refused(as_alice, store, model_files):
    upload = start(as_alice, "model", "tiny", model_files).json()
    index, entry = next((i, f) for i, f in enumerate(upload["files"]) if f["path"] == "config.json")
    url = f"{V1}/org/uploads/{upload['id']}/files/{index}?offset=0"
    resp = as_alice.put(url, b"x" * (entry["size"] + 1), content_type="application/octet-stream")
    assert resp.status_code == 400 and "was declared as" in error_of(resp)
    too_big = b"x" * (uploads.CHUNK_MAX_BYTES + 1)
    assert as_alice.put(url, too_big, content_type="application/octet-stream").status_code == 413
    assert Upload.objects.get().files[index]["received"] == 0
    as_alice.delete(f"{V1}/org/uploads/{upload['id']}")
    nothing_stored(store)


def test_bytes_that_do_not_match_their_sha256_are_refused_and_nothing_stays(as_alice, store, model_files):
    declared = declare(model_files)
    tampered = {**model_files, "config.json": model_files["config.json"].replace(b"qwen2", b"qwen3")}
    resp = start(as_alice, "model", "tiny", model_files, declared=declared)
    send_all(as_alice, resp.json(), tampered)
    resp = as_alice.post(f"{V1}/org/uploads/{resp.json()['id']}/complete")
    assert resp.status_code == 400 and "config.json: the bytes received have sha256" in error_of(resp)
    nothing_stored(store)


def test_safetensors_with_a_lying_header_or_an_odd_dtype_are_refused(as_alice, store, model_files):
    header = json.dumps({"w": {"dtype": "I64", "shape": [2], "data_offsets": [0, 16]}}).encode()
    odd = struct.pack("<Q", len(header)) + header + b"\0" * 16
    resp = push(as_alice, "model", "tiny", {**model_files, "model.safetensors": odd})
    assert resp.status_code == 400 and "tensor 'w' is I64" in error_of(resp)
    header = json.dumps({"w": {"dtype": "F32", "shape": [1000], "data_offsets": [0, 4000]}}).encode()
    short = struct.pack("<Q", len(header)) + header + b"\0" * 16
    resp = push(as_alice, "model", "tiny", {**model_files, "model.safetensors": short})
    assert resp.status_code == 400 and "the tensors take 4000 bytes but the file holds 16" in error_of(resp)
    nothing_stored(store)


def test_weights_that_do_not_fit_the_architecture_are_invalid_after_the_sandbox(as_alice, store, model_files):
    config = {**json.loads(model_files["config.json"]), "intermediate_size": 128}
    resp = push(as_alice, "model", "tiny", {**model_files, "config.json": json.dumps(config).encode()})
    assert resp.status_code == 201
    version = resp.json()["model"]
    assert version["status"] == "invalid"
    assert version["validation_error"] == (
        "tensor model.layers.0.mlp.gate_proj.weight has shape [64, 32], the model needs [128, 32]"
    )
    data_uri = f"file://{store}/orgs/acme/data.jsonl"
    resp = as_alice.post(f"{V1}/jobs", sft_job("acme/tiny@1", data_uri), format="json")
    assert resp.status_code == 400 and error_of(resp) == (
        "acme/tiny@1 is invalid, not valid: tensor model.layers.0.mlp.gate_proj.weight has shape [64, 32], "
        "the model needs [128, 32]"
    )


def test_a_failure_that_is_not_the_models_leaves_it_pending_and_retried(
    as_alice, store, model_files, no_inline_validation, monkeypatch, settings
):
    from celery.exceptions import SoftTimeLimitExceeded
    from django.core.management import CommandError, call_command

    from env_registry import model_registry
    from opentinker.env.sandbox import SandboxError
    from workers.env_tasks import validate_model_version_task

    assert push(as_alice, "model", "tiny", model_files).status_code == 201
    version = ModelVersion.objects.get()
    # The sandbox's report stands in for the checker: what matters is how each outcome is judged.
    outcomes: list[BaseException] = [
        SoftTimeLimitExceeded(),  # its str() is "SoftTimeLimitExceeded()"
        SandboxError("reset timed out after 60s"),
        SandboxError("reset: the environment process died (killed by signal 9)"),
        MemoryError("out of memory"),
        SandboxError("reset raised ValueError: config.json needs remote code (auto_map)"),
    ]

    def check(model_dir: Path) -> dict:
        raise outcomes.pop(0)

    monkeypatch.setattr(model_registry, "model_check_in_sandbox", check)
    for why in [
        "SoftTimeLimitExceeded: SoftTimeLimitExceeded()",
        "SandboxError: reset timed out after 60s",
        "SandboxError: reset: the environment process died (killed by signal 9)",
        "MemoryError: out of memory",
    ]:
        with pytest.raises(model_registry.ValidationDeferred):
            model_registry.model_validate(version.pk)
        version.refresh_from_db()
        assert (version.status, version.validation_error) == ("pending", f"not validated yet: {why}")
    assert model_registry.ValidationDeferred in validate_model_version_task.autoretry_for
    # Retries spent, an admin validates the pending versions again (inline here).
    settings.ENV_VALIDATION_MODE = "inline"
    out = io.StringIO()
    call_command("registry_revalidate", "--org", "acme", stdout=out)
    assert out.getvalue() == "acme/tiny@1: invalid (config.json needs remote code (auto_map))\n"
    version.refresh_from_db()
    assert (version.status, version.validation_error) == (
        "invalid",
        "config.json needs remote code (auto_map)",
    )
    assert outcomes == []
    with pytest.raises(CommandError, match="no organization 'nope'"):
        call_command("registry_revalidate", "--org", "nope")


# ----------------------------------------------------------------------------------------------------
# datasets


def test_parquet_dataset_is_previewed_and_usable_in_a_job_spec(
    as_alice, as_charlie, store, model_files, settings
):
    rows = prompt_completion_rows()
    resp = push(as_alice, "dataset", "arith", {"train.parquet": parquet_bytes(rows)})
    assert resp.status_code == 201, resp.content
    body = resp.json()
    assert body["ref"] == "acme/arith@1" and body["model"] is None
    version = body["dataset"]
    assert version["format"] == "parquet" and version["num_rows"] == 12
    assert version["columns"] == [
        {"name": "question", "type": "string"},
        {"name": "answer", "type": "string"},
    ]
    assert version["preview"] == rows[:5]
    assert stored_files(store) == ["orgs/acme/datasets/arith/1/train.parquet"]
    assert as_charlie.get(f"{V1}/org/datasets").json() == []
    assert as_charlie.get(f"{V1}/org/datasets/arith").status_code == 404

    settings.ENV_VALIDATION_MODE = "celery"
    assert push(as_alice, "model", "tiny", model_files).status_code == 201
    ModelVersion.objects.update(status="valid")
    columns = {"prompt": "question", "completion": "answer"}
    resp = as_alice.post(
        f"{V1}/jobs", sft_job("acme/tiny@1", "acme/arith@latest", columns=columns), format="json"
    )
    assert resp.status_code == 201, resp.content
    spec = Job.objects.get(pk=resp.json()["id"]).spec
    assert spec["dataset"] == {
        "uri": f"file://{store}/orgs/acme/datasets/arith/1",
        "registry_ref": "acme/arith@1",
        "columns": columns,
        "eval_rows": 0,
        "eval_every": None,
    }
    resp = as_charlie.post(f"{V1}/jobs", sft_job("tiny-qwen2", "acme/arith@1"), format="json")
    assert resp.status_code == 400 and "no dataset acme/arith in your organization" in error_of(resp)


def test_jsonl_and_saved_hf_datasets(as_alice, store, tmp_path):
    import datasets

    chats = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}] * 3
    jsonl = "".join(json.dumps(c) + "\n" for c in chats).encode()
    version = push(as_alice, "dataset", "chats", {"chats.jsonl": jsonl}).json()["dataset"]
    assert (version["format"], version["num_rows"], [c["name"] for c in version["columns"]]) == (
        "jsonl",
        3,
        ["messages"],
    )
    saved = tmp_path / "saved"
    datasets.Dataset.from_list(prompt_completion_rows(7)).save_to_disk(str(saved))
    files = {p.name: p.read_bytes() for p in saved.iterdir()}
    version = push(as_alice, "dataset", "saved", files).json()["dataset"]
    assert (version["format"], version["num_rows"]) == ("hf", 7)
    assert version["preview"][0] == {"question": "What is 0 + 0?", "answer": "0"}


def saved_dataset_files(tmp_path: Path, name: str, rows: list[dict], state_files: list | None = None):
    import datasets

    saved = tmp_path / name
    datasets.Dataset.from_list(rows).save_to_disk(str(saved))
    if state_files is not None:
        state = json.loads((saved / "state.json").read_text())
        state["_data_files"] = [{"filename": f} for f in state_files]
        (saved / "state.json").write_text(json.dumps(state))
    return saved, {p.name: p.read_bytes() for p in saved.iterdir()}


def test_a_state_json_pointing_into_another_organizations_dataset_is_refused_and_never_followed(
    as_alice, as_charlie, store, tmp_path
):
    from gpu_runtime.data.sft import load_rows

    theirs = [{"question": "globex secret", "answer": "42"}]
    _, files = saved_dataset_files(tmp_path, "theirs", theirs)
    assert push(as_charlie, "dataset", "secret", files).status_code == 201
    stolen = "../../../../globex/datasets/secret/1/data-00000-of-00001.arrow"
    hostiles = [[stolen], ["data-00000-of-00001.arrow", stolen], [f"{store}/orgs/globex/x.arrow"], []]
    for i, hostile in enumerate(hostiles):
        _, files = saved_dataset_files(tmp_path, f"mine{i}", prompt_completion_rows(3), hostile)
        resp = push(as_alice, "dataset", "mine", files)
        assert resp.status_code == 400, resp.content
        assert "state.json's _data_files must name exactly the uploaded arrow files" in error_of(resp)
    assert not RegisteredDataset.objects.filter(organization__slug="acme").exists()
    assert stored_files(store / "orgs" / "acme") == [] and Upload.objects.count() == 0

    # The runtime never reads state.json: a hostile one (written straight into storage) reads only its own
    # folder's arrow files. Through datasets.load_from_disk this returned globex's row.
    mine, _ = saved_dataset_files(tmp_path, "placed", prompt_completion_rows(3), [stolen])
    placed = store / "orgs/acme/datasets/mine/1"
    placed.parent.mkdir(parents=True, exist_ok=True)
    mine.rename(placed)
    assert load_rows(f"file://{placed}") == prompt_completion_rows(3)


def test_a_saved_dataset_in_several_shards_loads_in_order(tmp_path):
    import datasets

    from gpu_runtime.data.sft import load_rows

    rows = prompt_completion_rows(11)
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "d"), num_shards=3)
    assert sorted(p.name for p in (tmp_path / "d").glob("*.arrow")) == [
        f"data-0000{i}-of-00003.arrow" for i in range(3)
    ]
    assert load_rows(f"file://{tmp_path / 'd'}") == rows
    (tmp_path / "d/data-00001-of-00003.arrow").unlink()
    with pytest.raises(ValueError, match="not one complete set"):
        load_rows(f"file://{tmp_path / 'd'}")


def test_the_preview_reads_only_the_first_rows_and_counts_the_rest(as_alice, store, tmp_path, monkeypatch):
    import datasets

    from env_registry import dataset_registry

    rows = prompt_completion_rows(1000)
    lines = [json.dumps(r) for r in rows]
    # Blank lines are not rows; past the preview, lines are counted, not parsed (the runtime's loader reports
    # a bad one with its line number), and no trailing newline still ends a row.
    lines[700] = "{not json"
    jsonl = "\n".join([*lines[:10], "", "  ", *lines[10:]]).encode()
    version = push(as_alice, "dataset", "lines", {"d.jsonl": jsonl}).json()["dataset"]
    assert (version["num_rows"], version["preview"]) == (1000, rows[:5])

    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows), buf, row_group_size=300)
    version = push(as_alice, "dataset", "groups", {"d.parquet": buf.getvalue()}).json()["dataset"]
    assert (version["num_rows"], version["preview"]) == (1000, rows[:5])

    datasets.Dataset.from_list(rows[:11]).save_to_disk(str(tmp_path / "s"), num_shards=3)
    files = {p.name: p.read_bytes() for p in (tmp_path / "s").iterdir()}
    version = push(as_alice, "dataset", "shards", files).json()["dataset"]
    assert (version["format"], version["num_rows"], version["preview"]) == ("hf", 11, rows[:5])

    monkeypatch.setattr(dataset_registry, "PREVIEW_MAX_BYTES", 100)
    big = json.dumps({"text": "x" * 200}).encode() + b"\n"
    resp = push(as_alice, "dataset", "big", {"d.jsonl": big})
    assert resp.status_code == 400 and error_of(resp) == "the first row is over 100 bytes"
    # The preview stops at the byte cap with the rows that fit in it (three of 30 bytes).
    small = b"".join(json.dumps({"n": f"{i:020d}"}).encode() + b"\n" for i in range(10))
    version = push(as_alice, "dataset", "small", {"d.jsonl": small}).json()["dataset"]
    assert (version["num_rows"], len(version["preview"])) == (10, 3)


def test_json_files_over_their_cap_are_refused_before_any_byte(as_alice, store, model_files):
    from env_registry.model_files import CONFIG_JSON_MAX_BYTES, JSON_MAX_BYTES

    assert (CONFIG_JSON_MAX_BYTES, JSON_MAX_BYTES) == (1024 * 1024, 50 * 1024 * 1024)
    for name, size in [("config.json", CONFIG_JSON_MAX_BYTES + 1), ("tokenizer.json", JSON_MAX_BYTES + 1)]:
        declared = [f for f in declare(model_files) if f["path"] != name]
        declared.append({"path": name, "size": size, "sha256": "0" * 64})
        resp = start(as_alice, "model", "tiny", model_files, declared)
        assert resp.status_code == 400, resp.content
        assert error_of(resp) == f"{name} is {size} bytes; at most {size - 1} bytes for this JSON file"
    nothing_stored(store)


def test_bad_datasets_are_refused_and_nothing_stays(as_alice, store):
    resp = start(as_alice, "dataset", "d", {"data.csv": b"a,b\n1,2\n"})
    assert resp.status_code == 400 and error_of(resp).startswith("a dataset is one .jsonl or .parquet file")
    resp = push(as_alice, "dataset", "d", {"data.parquet": b"PAR1 not really"})
    assert resp.status_code == 400 and error_of(resp).startswith("the parquet data cannot be read")
    nothing_stored(store)


# ----------------------------------------------------------------------------------------------------
# S3 (moto's server): the same protocol, chunks and versions as objects


def s3_keys(s3_store) -> list[str]:
    found = s3_store.client.list_objects_v2(Bucket=s3_store.bucket).get("Contents", [])
    return sorted(o["Key"] for o in found)


def test_uploads_into_an_s3_store(as_alice, s3_store, model_files, small_chunks, no_inline_validation):
    resp = push(as_alice, "model", "tiny", model_files)
    assert resp.status_code == 201 and resp.json()["ref"] == "acme/tiny@1", resp.content
    assert s3_keys(s3_store) == sorted(f"store/orgs/acme/models/tiny/1/{name}" for name in model_files)
    obj = s3_store.client.get_object(
        Bucket=s3_store.bucket, Key="store/orgs/acme/models/tiny/1/model.safetensors"
    )
    assert obj["Body"].read() == model_files["model.safetensors"]
    assert ModelVersion.objects.get().uri == "s3://otk-store/store/orgs/acme/models/tiny/1"

    # a refused upload leaves no chunk behind in the bucket either
    config = {**json.loads(model_files["config.json"]), "auto_map": {"AutoConfig": "x.Y"}}
    resp = push(as_alice, "model", "tiny", {**model_files, "config.json": json.dumps(config).encode()})
    assert resp.status_code == 400
    assert s3_keys(s3_store) == sorted(f"store/orgs/acme/models/tiny/1/{name}" for name in model_files)
    assert Upload.objects.count() == 0 and ModelVersion.objects.count() == 1


def test_an_abandoned_upload_stops_counting_and_is_dropped(as_alice, store, model_files, settings):
    total = sum(len(v) for v in model_files.values())
    settings.REGISTRY_MAX_BYTES = total + 10
    first = start(as_alice, "model", "tiny", model_files).json()
    as_alice.put(
        f"{V1}/org/uploads/{first['id']}/files/0?offset=0", b"{", content_type="application/octet-stream"
    )
    resp = start(as_alice, "model", "tiny", model_files)
    assert resp.status_code == 400 and f"and {total} are in use" in error_of(resp)
    # a day without a chunk: abandoned, dropped with its chunks when the next upload starts
    Upload.objects.filter(pk=first["id"]).update(updated_at=timezone.now() - timedelta(hours=25))
    resp = start(as_alice, "model", "tiny", model_files)
    assert resp.status_code == 201
    assert list(Upload.objects.values_list("id", flat=True)) == [uuid.UUID(resp.json()["id"])]
    assert stored_files(store) == []


def test_one_completion_at_a_time_and_none_after_it(as_alice, store, model_files, no_inline_validation):
    """A completion already running (its advisory lock held by another connection) makes a second one a 409;
    after it, the upload is gone (404), so a retried request never stores a second version."""
    import threading

    from django.db import connections

    upload = start(as_alice, "model", "tiny", model_files).json()
    send_all(as_alice, upload, model_files)
    key = int.from_bytes(uuid.UUID(upload["id"]).bytes[:8], "big", signed=True)
    held, release = threading.Event(), threading.Event()

    def other_request():
        with connections["default"].cursor() as cursor:  # this thread's own connection
            cursor.execute("SELECT pg_advisory_lock(%s)", [key])
            held.set()
            release.wait(timeout=60)
            cursor.execute("SELECT pg_advisory_unlock(%s)", [key])
        connections["default"].close()

    t = threading.Thread(target=other_request)
    t.start()
    try:
        assert held.wait(timeout=60)
        resp = as_alice.post(f"{V1}/org/uploads/{upload['id']}/complete")
        assert (
            resp.status_code == 409 and error_of(resp) == "this upload is being completed by another request"
        )
    finally:
        release.set()
        t.join(timeout=60)
    resp = as_alice.post(f"{V1}/org/uploads/{upload['id']}/complete")
    assert resp.status_code == 201 and resp.json()["ref"] == "acme/tiny@1"
    resp = as_alice.post(f"{V1}/org/uploads/{upload['id']}/complete")
    assert resp.status_code == 404
    assert ModelVersion.objects.count() == 1


# ----------------------------------------------------------------------------------------------------
# PEFT (LoRA) adapters with their base


def lora_adapter_files(model_files: dict[str, bytes], base: str, tmp: Path) -> dict[str, bytes]:
    """A LoRA adapter (random, non-zero B: it changes the model) for the tiny model, naming `base`."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    src = tmp / "base"
    src.mkdir()
    for name, data in model_files.items():
        (src / name).write_bytes(data)
    model = AutoModelForCausalLM.from_pretrained(src)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    peft_model = get_peft_model(model, config)
    out = tmp / "adapter"
    peft_model.save_pretrained(out)
    adapter_config = {
        **json.loads((out / "adapter_config.json").read_text()),
        "base_model_name_or_path": base,
    }
    (out / "adapter_config.json").write_text(json.dumps(adapter_config))
    return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.is_file()}


def test_a_lora_adapter_with_its_registry_base_is_validated_pinned_and_loads_merged(
    as_alice, as_charlie, store, model_files, settings, tmp_path
):
    import torch
    from peft import PeftModel

    from gpu_runtime.models import load_model

    settings.ENV_VALIDATION_MODE = "celery"
    assert push(as_alice, "model", "tiny", model_files).status_code == 201
    ModelVersion.objects.update(status="valid")
    settings.ENV_VALIDATION_MODE = "inline"
    adapter = lora_adapter_files(model_files, "acme/tiny@1", tmp_path)
    assert sorted(adapter) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    resp = push(as_alice, "model", "tiny-lora", adapter)
    assert resp.status_code == 201, resp.content
    version = resp.json()["model"]
    assert version["status"] == "valid", version["validation_error"]
    info = version["info"]
    assert (info["kind"], info["base"], info["r"], info["target_modules"]) == (
        "adapter",
        "acme/tiny@1",
        4,
        ["q_proj", "v_proj"],
    )
    # 2 layers x (q: 4x32 + 32x4, v: 4x32 + 16x4)
    assert info["parameters"] == 2 * (4 * 32 + 32 * 4 + 4 * 32 + 16 * 4) == 896
    pinned = json.loads((store / "orgs/acme/models/tiny-lora/1/opentinker_base.json").read_text())
    assert pinned == {"base": f"file://{store}/orgs/acme/models/tiny/1", "ref": "acme/tiny@1"}

    # The runtime loads it as its base with the adapter merged in.
    loaded = load_model(f"file://{store}/orgs/acme/models/tiny-lora/1")
    base = load_model(f"file://{store}/orgs/acme/models/tiny/1")
    expected = PeftModel.from_pretrained(
        base.model, str(store / "orgs/acme/models/tiny-lora/1")
    ).merge_and_unload()
    got, want = loaded.model.state_dict(), expected.state_dict()
    assert sorted(got) == sorted(want)
    assert all(torch.equal(got[k], want[k]) for k in want)
    q = "model.layers.0.self_attn.q_proj.weight"
    original = load_model(f"file://{store}/orgs/acme/models/tiny/1").model.state_dict()[q]
    assert not torch.equal(got[q], original)  # the adapter did change the model

    data_uri = f"file://{store}/orgs/acme/data.jsonl"
    resp = as_alice.post(f"{V1}/jobs", sft_job("acme/tiny-lora@1", data_uri), format="json")
    assert resp.status_code == 201, resp.content
    # Another organization's model is no base for charlie's adapter; nothing of it stays.
    resp = push(as_charlie, "model", "stolen", adapter)
    assert resp.status_code == 400
    assert error_of(resp) == (
        "adapter_config.json: base_model_name_or_path 'acme/tiny@1': no model acme/tiny in your organization"
    )
    assert Upload.objects.count() == 0 and not RegisteredModel.objects.filter(name="stolen").exists()


def test_the_platforms_own_base_file_cannot_be_uploaded(as_alice, store, model_files):
    files = {**model_files, "opentinker_base.json": b'{"base": "s3://other-org/model"}'}
    resp = start(as_alice, "model", "tiny", files)
    assert resp.status_code == 400 and error_of(resp).startswith("opentinker_base.json: a name the platform")
    nothing_stored(store)


def test_an_adapter_pointing_at_code_outside_transformers_is_refused(as_alice, store, model_files, tmp_path):
    adapter = lora_adapter_files(model_files, "tiny-qwen2", tmp_path)
    config = json.loads(adapter["adapter_config.json"])
    config["auto_mapping"] = {"base_model_class": "Evil", "parent_library": "evil_module"}
    resp = push(as_alice, "model", "lora", {**adapter, "adapter_config.json": json.dumps(config).encode()})
    assert resp.status_code == 400
    assert error_of(resp) == "adapter_config.json: auto_mapping names 'evil_module', not a transformers class"
    nothing_stored(store)


def test_a_policy_model_outside_the_organizations_storage_is_refused(as_alice, store):
    # Each policy's runtime loads its own model.base: checked like the job's (another organization's
    # checkpoint, or a raw URI into a registry version that is not valid).
    from opentinker.spec import example_multiagent_spec

    spec = example_multiagent_spec("tiny-qwen2").model_dump(mode="json")
    name = next(iter(spec["multi_agent"]["policies"]))
    theirs = f"file://{store}/orgs/globex/jobs/x/checkpoints/step-5"
    spec["multi_agent"]["policies"][name]["model"] = {"base": theirs}
    resp = as_alice.post(f"{V1}/jobs", spec, format="json")
    assert resp.status_code == 400
    assert error_of(resp).startswith(f"{theirs!r} is not in your organization's storage")
    assert list(resp.json()["error"]["fields"]) == [f"multi_agent.policies.{name}.model.base"]
    ours = f"file://{store}/orgs/acme/models/tiny/3"
    spec["multi_agent"]["policies"][name]["model"] = {"base": ours}
    resp = as_alice.post(f"{V1}/jobs", spec, format="json")
    assert resp.status_code == 400
    assert error_of(resp) == f"{ours!r} is not a version of a model in your organization's registry"
    assert Job.objects.count() == 0


def test_a_registry_model_per_multi_agent_policy_is_refused_clearly(as_alice, store):
    from opentinker.spec import example_multiagent_spec

    spec = example_multiagent_spec("tiny-qwen2").model_dump(mode="json")
    name = next(iter(spec["multi_agent"]["policies"]))
    spec["multi_agent"]["policies"][name]["model"] = {"base": "acme/tiny@1"}
    resp = as_alice.post(f"{V1}/jobs", spec, format="json")
    assert resp.status_code == 400
    assert error_of(resp) == (
        f"policy {name!r}: registry models are not supported per policy yet; use the job's model.base"
    )
    assert Job.objects.count() == 0
