"""A published multi-agent package, end to end: alice uploads it (the registry's sandboxed smoke test makes it
valid), submits a 2-policy job against it through the API (pinned to its sha256), and the runtime fetches the
pinned archive over the live ingest API with the job's token and trains both policies on the package's game,
played in the sandbox. (A role mapping that does not match the manifest is a 400 at submission:
tests/api/test_ingest_env.py::test_package_roles_come_from_its_manifest.)"""

from __future__ import annotations

import hashlib
import io
import json

import pytest
import torch

from gpu_runtime import env_packages
from gpu_runtime.cli import run_job
from gpu_runtime.sink import JsonlSink
from opentinker.spec import JobSpec, JobState
from portal.actors import Actor
from portal.models import Job
from portal.services.job_tokens import job_token_issue
from portal.services.jobs import job_transition
from tests.api.test_envs import make_tar, upload
from tests.gpu_runtime.test_multiagent_packages import DUEL_SOURCE, MANIFEST, _fresh, duel_job  # noqa: F401

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow]


@pytest.fixture(autouse=True)
def _one_thread():
    prev = torch.get_num_threads()
    torch.set_num_threads(1)  # 2-core CI, as tests/gpu_runtime/conftest.py
    yield
    torch.set_num_threads(prev)


def test_a_published_multi_agent_package_trains_two_policies_through_the_platform(
    live_server, as_alice, settings, tmp_path, monkeypatch
):
    settings.OBJECT_STORE_URL = f"file://{tmp_path / 'objects'}"
    source = DUEL_SOURCE.replace("ROLES", repr(("left", "right"))).encode()
    data = make_tar({"opentinker.json": json.dumps(MANIFEST).encode(), "duel_env.py": source})
    resp = upload(as_alice, data)
    assert resp.status_code == 201, resp.content
    assert resp.json()["versions"][0]["status"] == "valid", resp.json()["versions"][0]

    body = duel_job(steps=2).model_dump(mode="json")
    body["environment"] = {"ref": "acme/duel@latest"}
    resp = as_alice.post("/api/v1/jobs", body, format="json")
    assert resp.status_code == 201, resp.content
    job = Job.objects.get(pk=resp.json()["id"])
    sha = hashlib.sha256(data).hexdigest()
    assert job.spec["environment"]["ref"] == "acme/duel@1.0.0" and job.spec["environment"]["sha256"] == sha
    job = job_transition(job=job, to=JobState.ADMITTED, actor=Actor.system("scheduler"))

    # The launcher's environment: the runtime fetches the archive from the platform, never from disk.
    monkeypatch.setenv("OPENTINKER_INGEST_URL", f"{live_server.url}/api/v1/ingest/jobs/{job.id}")
    monkeypatch.setenv("OPENTINKER_JOB_TOKEN", job_token_issue(job))
    out = io.StringIO()
    code = run_job(JobSpec.model_validate(job.spec), JsonlSink(out), f"file://{tmp_path}/ck")
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    assert code == 0, out.getvalue()[-3000:]

    metrics = {r["step"]: r for r in lines if r["type"] == "metrics"}
    assert sorted(metrics) == [1, 2]
    for m in metrics.values():
        assert m["episodes/failed"] == 0.0 and m["game/rounds/mean"] == 2.0
        for role, policy in (("left", "pl"), ("right", "pr")):
            assert 0.0 <= m[f"reward/{role}/mean"] <= 2.0
            assert m[f"policy/{policy}/reward/mean"] == m[f"reward/{role}/mean"]
            assert f"policy/{policy}/loss" in m
    (package,) = env_packages._unpacked.values()
    assert package.manifest.name == "duel" and (package.directory / "duel_env.py").read_bytes() == source
    ckpts = [r for r in lines if r["type"] == "checkpoint"]
    assert {"pl/model.safetensors", "pr/model.safetensors"} <= {f["name"] for f in ckpts[-1]["files"]}
