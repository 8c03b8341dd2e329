"""The SDK and the CLI against the real API server (pytest-django's live server, real PostgreSQL).
Actors: alice (owner of acme), bob (member of acme), charlie (outsider, owner of globex)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from opentinker import errors
from opentinker.client import Client
from opentinker.spec import JobState, example_rl_spec
from portal.models import Checkpoint, Job, Metric, Quota

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.usefixtures("builtin_envs")]
BASE = Path(__file__).resolve().parents[2]


@pytest.fixture
def sdk(live_server, alice, bob, charlie, acme, globex, make_token):
    clients = {
        "alice": Client(live_server.url, make_token(alice, acme)),
        "bob": Client(live_server.url, make_token(bob, acme)),
        "charlie": Client(live_server.url, make_token(charlie, globex)),
    }
    yield clients
    for c in clients.values():
        c.close()


def test_sdk_job_lifecycle(sdk, settings, tmp_path):
    alice, bob, charlie = sdk["alice"], sdk["bob"], sdk["charlie"]
    job = alice.jobs.submit(example_rl_spec())
    assert job.state is JobState.QUEUED and job.organization == "acme" and job.created_by == "alice"
    assert bob.jobs.get(job.id).id == job.id
    with pytest.raises(errors.NotFound):
        charlie.jobs.get(job.id)
    assert [j.id for j in alice.jobs.list(state="queued").results] == [job.id]
    assert charlie.jobs.list().count == 0

    row = Job.objects.get(pk=job.id)
    Metric.objects.bulk_create([Metric(job=row, name="reward/mean", step=s, value=s / 10) for s in range(20)])
    (series,) = alice.jobs.metrics(job.id, names=["reward/mean"], step_min=5, step_max=7)
    assert (series.steps, series.values) == ([5, 6, 7], [0.5, 0.6, 0.7])

    settings.OBJECT_STORE_URL = f"file://{tmp_path}"
    (tmp_path / "ck").mkdir()
    (tmp_path / "ck" / "model.safetensors").write_bytes(b"weights")
    digest = hashlib.sha256(b"weights").hexdigest()
    ck = Checkpoint.objects.create(
        job=row,
        step=5,
        uri=f"file://{tmp_path}/ck",
        size_bytes=7,
        files=[{"name": "model.safetensors", "size": 7, "sha256": digest}],
    )
    (listed,) = bob.jobs.checkpoints(job.id)
    assert listed.step == 5 and listed.file("model.safetensors").sha256 == digest
    dest = bob.jobs.download(job.id, str(ck.pk), "model.safetensors", tmp_path / "out.bin", sha256=digest)
    assert Path(dest).read_bytes() == b"weights"

    cancelled = bob.jobs.cancel(job.id, reason="enough")
    assert cancelled.state is JobState.CANCELLED and cancelled.state_reason == "enough"
    events = alice.jobs.events(job.id).results
    assert [(e.from_state, e.to_state) for e in events] == [("", "queued"), ("queued", "cancelled")]
    with pytest.raises(errors.Conflict):
        alice.jobs.cancel(job.id)


def test_sdk_errors_are_typed(sdk, acme, live_server):
    alice = sdk["alice"]
    spec = example_rl_spec().model_dump(mode="json")
    with pytest.raises(errors.ValidationError) as bad:
        alice.jobs.submit({**spec, "environment": {"ref": "nobody/nothing@1.0.0"}})
    assert "environment.ref" in bad.value.fields
    Quota.objects.filter(organization=acme).update(max_queued_jobs=1)
    alice.jobs.submit(spec)
    with pytest.raises(errors.QuotaExceeded):
        alice.jobs.submit(spec)
    with pytest.raises(errors.AuthenticationError):
        Client(live_server.url, "otk_000000000000_" + "x" * 43).me()
    with pytest.raises(errors.PermissionDenied):
        sdk["bob"].tokens.create("admin", ["org:admin"])


def test_sdk_tokens(sdk):
    alice = sdk["alice"]
    created = alice.tokens.create("nightly", ["jobs:read"], expires_in_days=7)
    assert created.token.startswith("otk_")
    assert "nightly" in [t.name for t in alice.tokens.list().results]
    with Client(alice.base_url, created.token) as nightly:
        assert nightly.me().scopes == ["jobs:read"]
        alice.tokens.revoke(created.id)
        with pytest.raises(errors.AuthenticationError):
            nightly.me()


def _cli(*args: str, config: Path, stdin: str | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPENTINKER_")}
    env["OPENTINKER_CONFIG"] = str(config)
    return subprocess.run(
        [sys.executable, "-m", "opentinker", *args],
        cwd=BASE,
        env=env,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_cli_end_to_end(live_server, alice, acme, charlie, globex, make_token, tmp_path):
    config = tmp_path / "config.json"
    token = make_token(alice, acme)
    login = _cli("login", "--url", live_server.url, "--token", token, config=config)
    assert login.returncode == 0, login.stderr
    assert oct(config.stat().st_mode & 0o777) == "0o600"

    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(yaml.safe_dump(example_rl_spec().model_dump(mode="json")))
    submitted = _cli("--json", "jobs", "submit", str(spec_file), config=config)
    assert submitted.returncode == 0, submitted.stderr
    job_id = json.loads(submitted.stdout)["id"]

    listed = _cli("jobs", "list", config=config)
    assert listed.returncode == 0 and job_id[:8] in listed.stdout and "queued" in listed.stdout
    shown = _cli("jobs", "show", job_id, config=config)
    assert shown.returncode == 0 and "arithmetic-grpo" in shown.stdout

    bad_spec = tmp_path / "bad.yaml"
    bad_spec.write_text("kind: rl\nmodel: {base: tiny-qwen2}\nresources: {gpus: -3}\n")
    refused = _cli("jobs", "submit", str(bad_spec), config=config)
    assert (
        refused.returncode == 2 and "resources.gpus" in refused.stderr and "Traceback" not in refused.stderr
    )

    cancelled = _cli("jobs", "cancel", job_id, "--reason", "cli test", config=config)
    assert cancelled.returncode == 0 and Job.objects.get(pk=job_id).state == "cancelled"

    created = _cli("tokens", "create", "ci", "--scope", "jobs:read", config=config)
    assert created.returncode == 0 and created.stdout.strip().startswith("otk_")
    assert "only time the token is shown" in created.stderr
    tokens = _cli("--json", "tokens", "list", config=config)
    ci = next(t for t in json.loads(tokens.stdout)["results"] if t["name"] == "ci")
    assert _cli("tokens", "revoke", str(ci["id"]), config=config).returncode == 0

    # The outsider's CLI cannot see or cancel alice's job.
    other = tmp_path / "charlie.json"
    assert (
        _cli(
            "login", "--url", live_server.url, "--token", make_token(charlie, globex), config=other
        ).returncode
        == 0
    )
    hidden = _cli("jobs", "show", job_id, config=other)
    assert hidden.returncode == 1 and hidden.stderr == "error: no such job (HTTP 404)\n"
