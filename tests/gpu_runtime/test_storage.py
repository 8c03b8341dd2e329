"""Checkpoints through the runtime's storage on S3 (moto's server), found by the endpoint a job is given.

The runtime reaches S3 at ``AWS_ENDPOINT_URL`` from its environment; checkpoints are published whole, the
oldest pruned past ``keep_last``, the latest found under the job's prefix and downloaded to resume.
"""

from __future__ import annotations

import json

import pytest

from gpu_runtime import checkpoint, storage


@pytest.fixture
def s3_job_env(s3_store, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_store.endpoint)
    return s3_store


def test_checkpoints_on_s3_are_pruned_resolved_and_downloaded(s3_job_env, tmp_path):
    prefix = "s3://otk-store/store/orgs/acme/jobs/3"
    for step in (1, 2, 3):
        staging = tmp_path / f"staging-{step}"
        staging.mkdir()
        (staging / "model.safetensors").write_bytes(b"weights-%d" % step)
        uri, files = checkpoint.publish(staging, prefix, step, {"loss": 0.5}, keep_last=2)
        assert uri == f"{prefix}/step_{step:06d}"
        assert [f["name"] for f in files] == ["meta.json", "model.safetensors"]
    assert storage.list_dirs(prefix) == ["step_000002", "step_000003"]
    keys = [o["Key"] for o in s3_job_env.client.list_objects_v2(Bucket="otk-store")["Contents"]]
    assert not [k for k in keys if "step_000001" in k]  # pruned, every file of it

    latest = checkpoint.resolve(prefix)
    assert latest == f"{prefix}/step_000003"
    local = storage.download_prefix(latest)
    assert json.loads((local / "meta.json").read_text()) == {"step": 3, "loss": 0.5}
    assert (local / "model.safetensors").read_bytes() == b"weights-3"


def test_a_dataset_file_round_trips_through_s3(s3_job_env):
    uri = "s3://otk-store/store/orgs/acme/data/train.jsonl"
    storage.write_bytes(uri, b'{"prompt": "1+1"}\n')
    assert storage.read_bytes(uri) == b'{"prompt": "1+1"}\n'
