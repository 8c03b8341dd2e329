"""Registry uploads straight to an S3 store (moto's server over HTTP on loopback): presigned multipart part
links, completion with the parts' ETags, the size checked there and the sha256 from the stored bytes when the
upload completes, multipart uploads aborted with their upload. Actors: bob (member of acme) uploads, alice
(owner) sees his upload, charlie (globex) gets 404 for it."""

from __future__ import annotations

import hashlib
import json
import os

import httpx
import pytest

from env_registry import uploads
from env_registry.models import DatasetVersion, ModelVersion, Upload
from tests.api.test_registry import V1, declare, error_of, start
from tests.tiny_model import tiny_model_files

pytestmark = pytest.mark.django_db
MiB = 1024 * 1024


@pytest.fixture
def s3(s3_store, settings, monkeypatch):
    settings.ENV_VALIDATION_MODE = "celery"  # the sandbox's check is tests/api/test_registry.py's
    monkeypatch.setattr(uploads, "MULTIPART_PART_BYTES", 5 * MiB)  # S3's (and moto's) smallest part
    return s3_store


def keys(s3) -> list[str]:
    listed = s3.client.list_objects_v2(Bucket=s3.bucket).get("Contents", [])
    return sorted(o["Key"] for o in listed)


def send_parts(links: dict, data: bytes) -> list[dict]:
    step, parts = links["part_bytes"], []
    for part in links["parts"]:
        n = part["number"]
        resp = httpx.put(part["url"], content=data[(n - 1) * step : n * step])  # no credentials: the link's
        assert resp.status_code == 200, resp.text
        parts.append({"number": n, "etag": resp.headers["ETag"]})
    return parts


def test_a_big_file_goes_straight_to_s3_in_parts(as_alice, as_bob, as_charlie, s3):
    rows = [{"prompt": f"{i}: " + "x" * 1000, "completion": str(i)} for i in range(6000)]
    data = "".join(json.dumps(r) + "\n" for r in rows).encode()
    assert 5 * MiB < len(data) < 10 * MiB  # two parts
    resp = start(as_bob, "dataset", "big", {"big.jsonl": data})
    assert resp.status_code == 201 and resp.json()["multipart"] is True, resp.content
    upload = resp.json()
    url = f"{V1}/org/uploads/{upload['id']}/files/0/multipart"
    assert as_charlie.post(url).status_code == 404

    links = as_bob.post(url).json()
    assert links["part_bytes"] == 5 * MiB and [p["number"] for p in links["parts"]] == [1, 2]
    assert links["expires_in"] > 0
    again = as_alice.post(url).json()["parts"][0]["url"]  # asked again: the same multipart upload
    assert again.split("?")[0] == links["parts"][0]["url"].split("?")[0]
    # the file goes in parts now: not through the API
    chunk_url = f"{V1}/org/uploads/{upload['id']}/files/0?offset=0"
    resp = as_bob.put(chunk_url, data[:1024], content_type="application/octet-stream")
    assert resp.status_code == 409 and "sent straight to the store" in error_of(resp)
    parts = send_parts(links, data)
    assert as_charlie.post(f"{url}/complete", {"parts": parts}, format="json").status_code == 404
    resp = as_bob.post(f"{url}/complete", {"parts": parts[:1]}, format="json")
    assert resp.status_code == 400 and "list each part number 1..2 once" in error_of(resp)
    resp = as_bob.post(f"{url}/complete", {"parts": parts}, format="json")
    assert resp.status_code == 200, resp.content
    again = as_bob.post(f"{url}/complete", {"parts": parts}, format="json")  # a retry after a lost answer
    assert again.status_code == 200 and again.json() == resp.json()
    assert resp.json()["files"][0] == {
        "path": "big.jsonl",
        "size": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
        "received": len(data),
        "direct": True,
    }

    resp = as_bob.post(f"{V1}/org/uploads/{upload['id']}/complete")
    assert resp.status_code == 201, resp.content
    assert resp.json()["ref"] == "acme/big@1" and resp.json()["dataset"]["num_rows"] == 6000
    version = DatasetVersion.objects.get()
    assert keys(s3) == ["store/orgs/acme/datasets/big/1/big.jsonl"]  # the parts' object went with the upload
    stored = s3.client.get_object(Bucket=s3.bucket, Key="store/orgs/acme/datasets/big/1/big.jsonl")
    assert stored["Body"].read() == data and version.files[0]["sha256"] == hashlib.sha256(data).hexdigest()


def test_the_server_hashes_what_arrived_and_checks_its_size(as_bob, s3):
    files = tiny_model_files()
    weights = files["model.safetensors"]
    upload = start(as_bob, "model", "tiny", files).json()
    index = [f["path"] for f in upload["files"]].index("model.safetensors")
    url = f"{V1}/org/uploads/{upload['id']}/files/{index}/multipart"

    # fewer bytes than declared: refused at the parts' completion, the object dropped, the file starts over
    links = as_bob.post(url).json()
    assert len(links["parts"]) == 1  # smaller than a part: one (the last part may be small)
    resp = as_bob.post(f"{url}/complete", {"parts": send_parts(links, weights[:-1])}, format="json")
    assert resp.status_code == 400
    assert error_of(resp) == f"model.safetensors was declared as {len(weights)} bytes; the parts hold " + str(
        len(weights) - 1
    )
    assert [k for k in keys(s3) if k.endswith("/direct")] == []

    # the declared size, other bytes: found when the upload completes, from the stored object's sha256
    tampered = bytes([weights[0] ^ 1]) + weights[1:]
    links = as_bob.post(url).json()
    resp = as_bob.post(f"{url}/complete", {"parts": send_parts(links, tampered)}, format="json")
    assert resp.status_code == 200, resp.content
    for i, f in enumerate(upload["files"]):
        if i != index:
            resp = as_bob.put(
                f"{V1}/org/uploads/{upload['id']}/files/{i}?offset=0",
                files[f["path"]],
                content_type="application/octet-stream",
            )
            assert resp.status_code == 200, resp.content
    resp = as_bob.post(f"{V1}/org/uploads/{upload['id']}/complete")
    assert resp.status_code == 400
    assert error_of(resp).startswith("model.safetensors: the bytes received have sha256 ")
    assert hashlib.sha256(weights).hexdigest() in error_of(resp)
    assert Upload.objects.count() == 0 and ModelVersion.objects.count() == 0 and keys(s3) == []


def test_aborting_an_upload_aborts_its_multipart_uploads(as_bob, s3):
    files = tiny_model_files()
    upload = start(as_bob, "model", "tiny", files).json()
    index = [f["path"] for f in upload["files"]].index("model.safetensors")
    links = as_bob.post(f"{V1}/org/uploads/{upload['id']}/files/{index}/multipart").json()
    send_parts(links, files["model.safetensors"])  # the parts arrived; never completed
    assert len(s3.client.list_multipart_uploads(Bucket=s3.bucket).get("Uploads", [])) == 1
    assert as_bob.delete(f"{V1}/org/uploads/{upload['id']}").status_code == 204
    assert s3.client.list_multipart_uploads(Bucket=s3.bucket).get("Uploads", []) == []
    assert keys(s3) == [] and Upload.objects.count() == 0


def test_a_file_store_offers_no_multipart_and_takes_full_size_chunks(as_bob, settings, tmp_path):
    settings.OBJECT_STORE_URL = f"file://{tmp_path / 'objects'}"
    rows = [{"prompt": f"{i}: " + "y" * 1000, "completion": str(i)} for i in range(1500)]
    files = {"a.jsonl": "".join(json.dumps(r) + "\n" for r in rows).encode()}
    upload = as_bob.post(
        f"{V1}/org/uploads", {"kind": "dataset", "name": "a", "files": declare(files)}, format="json"
    ).json()
    assert upload["multipart"] is False
    resp = as_bob.post(f"{V1}/org/uploads/{upload['id']}/files/0/multipart")
    assert resp.status_code == 400 and "send the file in chunks" in error_of(resp)
    # chunks of the sizes the server asks for (1 MiB at least, chunk_max_bytes at most) pass the body limit
    data, step = files["a.jsonl"], upload["chunk_max_bytes"]
    assert 8 * MiB == step and MiB < len(data) < step
    for offset in (0, MiB):
        resp = as_bob.put(
            f"{V1}/org/uploads/{upload['id']}/files/0?offset={offset}",
            data[offset : (offset + MiB if offset == 0 else None)],
            content_type="application/octet-stream",
        )
        assert resp.status_code == 200, resp.content
    resp = as_bob.post(f"{V1}/org/uploads/{upload['id']}/complete")
    assert resp.status_code == 201 and resp.json()["dataset"]["num_rows"] == 1500, resp.content


def signed_for(url: str, length: int) -> bool:
    """Whether a SigV4 presigned PUT link is good for a body of `length` bytes: its signature recomputed as
    S3 checks it, with that Content-Length (False when the link signs no length)."""
    import hmac
    from urllib.parse import parse_qsl, quote, urlsplit

    parts = urlsplit(url)
    query = dict(parse_qsl(parts.query, keep_blank_values=True))
    if "content-length" not in query.get("X-Amz-SignedHeaders", "").split(";"):
        return False
    signature = query.pop("X-Amz-Signature")
    canonical_query = "&".join(
        f"{quote(k, safe='-_.~')}={quote(v, safe='-_.~')}" for k, v in sorted(query.items())
    )
    canonical = (
        f"PUT\n{parts.path}\n{canonical_query}\ncontent-length:{length}\nhost:{parts.netloc}\n\n"
        f"{query['X-Amz-SignedHeaders']}\nUNSIGNED-PAYLOAD"
    )
    scope = query["X-Amz-Credential"].split("/", 1)[1]
    digest = hashlib.sha256(canonical.encode()).hexdigest()
    to_sign = f"AWS4-HMAC-SHA256\n{query['X-Amz-Date']}\n{scope}\n{digest}"
    key = ("AWS4" + os.environ["AWS_SECRET_ACCESS_KEY"]).encode()  # the s3_store fixture's
    for piece in scope.split("/"):
        key = hmac.new(key, piece.encode(), hashlib.sha256).digest()
    return hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest() == signature


def test_each_part_link_takes_exactly_its_parts_bytes(as_bob, s3, settings):
    # an unbounded link let a client park up to 5 GiB per part in the store, far past the declared size
    # that REGISTRY_MAX_BYTES counted, until the upload was aborted or abandoned
    data = b"x" * (11 * MiB + 3)
    upload = start(as_bob, "dataset", "big", {"big.jsonl": data}).json()
    links = as_bob.post(f"{V1}/org/uploads/{upload['id']}/files/0/multipart").json()
    assert [p["number"] for p in links["parts"]] == [1, 2, 3]
    for part, size in zip(links["parts"], [5 * MiB, 5 * MiB, MiB + 3], strict=True):
        assert signed_for(part["url"], size) and not signed_for(part["url"], size + 1)
    settings.OBJECT_STORE_LINK_SECONDS = 30 * 24 * 3600  # longer than S3 takes for a SigV4 link: a week
    links = as_bob.post(f"{V1}/org/uploads/{upload['id']}/files/0/multipart").json()
    assert links["expires_in"] == 7 * 24 * 3600 and "X-Amz-Expires=604800&" in links["parts"][0]["url"]
