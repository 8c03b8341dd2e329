"""Schemathesis against a live server: every operation of the OpenAPI schema answers what the schema says.

The real uvicorn server (tests/api/test_stream.py's fixture) on the test database serves its own schema
(/api/schema/); schemathesis' CLI (the run issue 13 reported) generates valid and invalid requests for ALL
operations and checks each answer: no server error, a documented status, a body that matches the documented
schema and content type. Path parameters name real objects made here (a job, a checkpoint and its file, an
environment package and version, a token, a member, an invitation, an environment secret, a pool), so the
operations reach their real code, not only their 404. The run is deterministic (fixed seed, derandomized) and
small (a few examples per operation).

Actor: "root", platform staff and owner of acme, with a token holding every scope (admin operations
included); the ingest operations use a job token of acme's running job. Other tests cover tenancy.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import redis
from django.conf import settings

from env_registry import storage as env_storage
from env_registry.models import EnvironmentPackage, EnvironmentVersion, Visibility
from opentinker.spec import EnvironmentSpec, JobState, example_rl_spec
from portal import storage
from portal.actors import Actor
from portal.models import Checkpoint, ComputePool, Membership, Role
from portal.services import live
from portal.services.env_secrets import environment_secret_create
from portal.services.job_tokens import job_token_issue
from portal.services.jobs import job_cancel, job_submit, job_transition
from portal.services.orgs import invitation_create, organization_create
from portal.services.tokens import token_create
from tests.api.test_envs import package
from tests.api.test_stream import running_uvicorn

pytestmark = [
    pytest.mark.django_db(transaction=True),
    pytest.mark.usefixtures("builtin_envs"),
    pytest.mark.timeout(300),
]
SEED = 13
MAX_EXAMPLES = 5
CHECKS = (
    "not_a_server_error",
    "status_code_conformance",
    "response_schema_conformance",
    "content_type_conformance",
)


@pytest.fixture
def world(make_user):
    """acme's objects, each named in some operation's path."""
    root = make_user("root", staff=True)
    bob = make_user("bob")
    acme = organization_create(slug="acme", name="Acme", owner=root)
    member = Membership.objects.create(organization=acme, user=bob, role=Role.MEMBER)
    owner = Membership.objects.select_related("user", "organization").get(user=root, organization=acme)
    _, secret = token_create(
        membership=owner,
        name="schemathesis",
        scopes=["jobs:read", "jobs:write", "envs:read", "envs:write", "org:admin", "platform:admin"],
    )
    other_token, _ = token_create(membership=owner, name="to-revoke", scopes=["jobs:read"])
    invitation, _ = invitation_create(by=owner, email="dora@example.com", role=Role.MEMBER)
    environment_secret_create(by=owner, name="api-key", value="s3cret")
    ComputePool.objects.create(name="gpu-a", driver="local")

    # A valid public environment package with its archive in the store (validation is tested elsewhere).
    archive = package()
    uri = env_storage.archive_uri("acme", "echo", "1.2.3")
    env_storage.archive_put(uri, archive)
    pkg = EnvironmentPackage.objects.create(
        organization=acme, name="echo", description="Echoes", visibility=Visibility.PUBLIC, tags=["demo"]
    )
    EnvironmentVersion.objects.create(
        package=pkg,
        version="1.2.3",
        manifest={"name": "echo", "version": "1.2.3", "entrypoint": "echo_env:Echo"},
        archive_uri=uri,
        sha256=hashlib.sha256(archive).hexdigest(),
        size_bytes=len(archive),
        status=EnvironmentVersion.Status.VALID,
        uploaded_by=root,
    )
    actor = Actor.for_request(root)
    # The running job uses the package: its runtime downloads the archive (ingest/.../environment).
    spec = example_rl_spec().model_copy(update={"environment": EnvironmentSpec(ref="acme/echo@1.2.3")})
    running, _ = job_submit(organization=acme, actor=actor, spec=spec, idempotency_key="running")
    running = job_transition(job=running, to=JobState.ADMITTED, actor=Actor.system("scheduler"))
    done, _ = job_submit(organization=acme, actor=actor, spec=example_rl_spec(), idempotency_key="done")
    done = job_cancel(job=done, actor=actor, reason="a finished job: its stream ends")

    # A checkpoint of the finished job whose file lies in the object store, as the runtime writes it.
    ckpt_uri = f"{storage.organization_prefix('acme')}/jobs/{done.id}/step-1"
    data = b"weights"
    target = Path(storage.normalize(ckpt_uri).removeprefix("file://")) / "model.safetensors"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(data)
    checkpoint = Checkpoint.objects.create(
        job=done,
        step=1,
        uri=ckpt_uri,
        files=[{"name": "model.safetensors", "size": len(data), "sha256": hashlib.sha256(data).hexdigest()}],
        size_bytes=len(data),
    )

    yield {
        "token": secret,
        "job_token": job_token_issue(running),
        "running": str(running.id),
        "done": str(done.id),
        "checkpoint": checkpoint.pk,
        "member": member.pk,
        "other_token": other_token.pk,
        "invitation": invitation.pk,
    }
    client = redis.Redis.from_url(settings.REDIS_URL)
    client.delete(live.stream_key(running.id), live.stream_key(done.id))
    client.close()


def _toml(value) -> str:
    return json.dumps(value)  # a JSON string or number is a TOML one


def config(world: dict) -> str:
    path_parameters = {
        "path.job_id": world["done"],
        "path.checkpoint_id": world["checkpoint"],
        "path.name": "model.safetensors",
        "path.owner": "acme",
        "path.version": "1.2.3",
        "path.token_id": world["other_token"],
        "path.member_id": world["member"],
        "path.invitation_id": world["invitation"],
        "path.slug": "acme",
        "path.pool": "gpu-a",
    }
    lines = [
        f"seed = {SEED}",
        "[generation]",
        f"max-examples = {MAX_EXAMPLES}",
        "deterministic = true",
        'database = "none"',
        "[cache]",
        "enabled = false",
        # Within the CI budget: the coverage phase's valid boundary cases (its invalid ones, about 2,100 more,
        # take a minute and a half here: run them with mode = "all" when changing the API), then 5
        # generated valid and invalid cases per operation.
        "[phases.coverage.generation]",
        'mode = "positive"',
        "[phases.stateful]",
        "enabled = false",
        "[checks]",
        "enabled = false",
        *(f"[checks.{check}]\nenabled = true" for check in CHECKS),
        "[auth.openapi.ApiToken]",
        f"bearer = {_toml(world['token'])}",
        "[auth.openapi.JobToken]",
        f"bearer = {_toml(world['job_token'])}",
        "[parameters]",
        *(f"{_toml(k)} = {_toml(v)}" for k, v in path_parameters.items()),
        # env secrets and packages are both named by `name`: one operation block each
        "[[operations]]",
        'include-path-regex = "^/api/v1/org/env-secrets/"',
        "[operations.parameters]",
        f'"path.name" = {_toml("api-key")}',
        "[[operations]]",
        'include-path-regex = "^/api/v1/envs/"',
        "[operations.parameters]",
        f'"path.name" = {_toml("echo")}',
        "[[operations]]",
        'include-path-regex = "^/api/v1/ingest/"',
        "[operations.parameters]",
        f'"path.job_id" = {_toml(world["running"])}',
        # Not ready (no beat, no worker here) is /readyz's documented 503, not a server fault.
        "[[operations]]",
        'include-path = "/readyz"',
        "[operations.checks.not_a_server_error]",
        'expected-statuses = ["2XX", "3XX", "4XX", "503"]',
    ]
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def server(django_db_setup):
    # Its own server: the per-user API rate limit (API_RATE_LIMIT) would answer 429 to most of the run.
    with running_uvicorn(API_RATE_LIMIT="1000000/min") as url:
        yield url


def test_every_operation_answers_as_the_schema_says(world, server, tmp_path):
    config_file = tmp_path / "schemathesis.toml"
    config_file.write_text(config(world))
    report = tmp_path / "report.json"
    proc = subprocess.run(
        [
            *(sys.executable, "-m", "schemathesis.cli", "--config-file", str(config_file), "--no-color"),
            *("run", f"{server}/api/schema/?format=json", "--request-timeout", "60"),
            *("--report", "json", "--report-json-path", str(report)),
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=280,
    )
    out = proc.stdout + proc.stderr
    failures = out[out.find("=== FAILURES ===") :] if "=== FAILURES ===" in out else out[-6000:]
    assert proc.returncode == 0, failures[:20000]
    summary = json.loads(report.read_text())
    operations = summary["operations"]
    # Every operation of the schema ran (the audit log's, the probes' and whatever comes next included).
    assert operations["tested"] == operations["total"] == operations["selected"] >= 64, operations
    assert summary["test_cases"]["with_failures"] == 0 and summary["test_cases"]["generated"] > 500
    assert summary["phases"]["coverage"]["status"] == summary["phases"]["fuzzing"]["status"] == "success"
