"""Tenant isolation, walked over EVERY route of the OpenAPI schema.

charlie (owner of globex, every scope he can hold, not staff) calls each route with the real ids of acme's
objects: a job with metrics, events and a checkpoint whose file is on disk, acme's tokens, bob's membership, a
pending invitation, a private environment package, and the slug "acme" for the admin routes. Every route that
names an acme object must answer 404, exactly as it does for an id that never existed; routes without ids must
only ever show globex's data; and no acme identifier may appear in any response body. The same walk runs
unauthenticated (401), with tokens that lack the needed scope (403), and from charlie's browser session
claiming acme through the organization header (403). Afterwards nothing of acme has changed.

The walk is driven by the generated schema: a new route, method or path parameter that this file does not know
about fails `test_every_schema_route_and_parameter_is_covered` (and every walk) until it is added below.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import json
import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pytest
from asgiref.sync import async_to_sync
from django.utils import timezone
from drf_spectacular.generators import SchemaGenerator
from rest_framework.test import APIClient

from api.tinker import services as tinker_services
from api.tinker.models import TinkerWeights
from env_registry import storage as env_storage
from env_registry.models import (
    DatasetVersion,
    EnvironmentPackage,
    EnvironmentVersion,
    ModelVersion,
    RegisteredDataset,
    RegisteredModel,
    Star,
    Upload,
    Visibility,
)
from opentinker.spec import example_rl_spec
from portal import storage
from portal.actors import Actor
from portal.models import (
    ApiToken,
    Checkpoint,
    EnvironmentSecret,
    Invitation,
    Job,
    JobEvent,
    Membership,
    Metric,
    Organization,
    Quota,
    Role,
    RolloutStep,
)
from portal.services.env_secrets import environment_secret_create
from portal.services.jobs import job_submit
from portal.services.orgs import invitation_create
from tests.conftest import client_for

pytestmark = pytest.mark.django_db

V1 = "/api/v1"
FILE_BYTES = b"w8s"
SECRET_ENV = "acme-secret-sauce"
SECRET_ENV_DESCRIPTION = "internal-only-7f3a9c"
INVITEE = "newhire@acme.example"
ACME_IDEMPOTENCY_KEY = "acme-nightly-run-0042"
ACME_ENV_SECRET = "acme-vault-key"
ACME_ENV_SECRET_VALUE = "acme-plaintext-9d2e41"
ACME_MODEL = "acme-secret-llm"
ACME_DATASET = "acme-secret-corpus"


# ----------------------------------------------------------------------------------------------------
# acme's world


@dataclass
class AcmeWorld:
    org: Organization
    alice_token: ApiToken  # alice's everyday token (all her scopes)
    alice_secret: str
    bob_token: ApiToken
    bob_membership: Membership
    job: Job
    checkpoint: Checkpoint
    invitation: Invitation
    invitation_secret: str
    env: EnvironmentPackage
    upload: Upload | None = None
    tinker: dict[str, Any] = field(default_factory=dict)  # a Tinker session, training client, saved weights
    identifiers: list[str] = field(default_factory=list)

    def params(self) -> dict[str, Any]:
        """The real value of each path parameter (see PATH_PARAMS)."""
        return {
            "job_id": str(self.job.id),
            "checkpoint_id": self.checkpoint.pk,
            "file": self.checkpoint.files[0]["name"],
            "member_id": self.bob_membership.pk,
            "invitation_id": self.invitation.pk,
            "token_id": self.alice_token.pk,
            "slug": self.org.slug,
            "owner": self.org.slug,
            "env": self.env.name,
            "env_version": "1.0.0",
            "env_secret": ACME_ENV_SECRET,
            "model": ACME_MODEL,
            "dataset": ACME_DATASET,
            "upload_id": str(self.upload.id) if self.upload else "",
            "index": 0,
            "session_id": self.tinker["session"],
            "model_id": self.tinker["model"],
            "weights_id": self.tinker["weights"],
            "weights_file": "adapter_model.safetensors",
        }


def fake_params() -> dict[str, Any]:
    """Values of the same shape that name nothing at all."""
    return {
        "job_id": str(uuid.uuid4()),
        "checkpoint_id": 2_000_000_001,
        "file": "nothing-here.bin",
        "member_id": 2_000_000_002,
        "invitation_id": 2_000_000_003,
        "token_id": 2_000_000_004,
        "slug": "no-such-org",
        "owner": "no-such-org",
        "env": "no-such-env",
        "env_version": "9.9.9",
        "env_secret": "no-such-secret",
        "model": "no-such-model",
        "dataset": "no-such-dataset",
        "upload_id": str(uuid.uuid4()),
        "index": 0,
        "session_id": str(uuid.uuid4()),
        "model_id": f"{uuid.uuid4()}:train:0",
        "weights_id": 2_000_000_005,
        "weights_file": "adapter_model.safetensors",
    }


# Each path parameter name -> the key in AcmeWorld.params(). `name` means two things, so it is keyed by path.
# An unknown parameter name (or `name` on a new path) fails the coverage test and every walk.
PATH_PARAMS: dict[str, str | dict[str, str]] = {
    "job_id": "job_id",
    "checkpoint_id": "checkpoint_id",
    "member_id": "member_id",
    "invitation_id": "invitation_id",
    "token_id": "token_id",
    "slug": "slug",
    "pool": "slug",  # admin routes only (404 for everyone not staff): any name will do
    "owner": "owner",
    "name": {
        f"{V1}/jobs/{{job_id}}/checkpoints/{{checkpoint_id}}/files/{{name}}": "file",
        f"{V1}/envs/{{owner}}/{{name}}": "env",
        f"{V1}/envs/{{owner}}/{{name}}/star": "env",
        f"{V1}/envs/{{owner}}/{{name}}/fork": "env",
        f"{V1}/envs/{{owner}}/{{name}}/versions/{{version}}/archive": "env",
        f"{V1}/org/env-secrets/{{name}}": "env_secret",
        f"{V1}/org/models/{{name}}": "model",
        f"{V1}/org/datasets/{{name}}": "dataset",
        f"{V1}/tinker/weights/{{weights_id}}/files/{{name}}": "weights_file",
    },
    "version": "env_version",
    "upload_id": "upload_id",
    "index": "index",
    "session_id": "session_id",
    "model_id": "model_id",
    "weights_id": "weights_id",
}


def _token_of(secret: str) -> ApiToken:
    return ApiToken.objects.get(lookup=secret.split("_")[1])


@pytest.fixture
def world(alice, bob, charlie, acme, globex, make_token, settings, tmp_path) -> AcmeWorld:
    store = tmp_path / "objects"
    settings.OBJECT_STORE_URL = f"file://{store}"

    alice_secret = make_token(alice, acme)
    alice_token = _token_of(alice_secret)
    bob_token = _token_of(make_token(bob, acme))
    # Quota values unlike globex's, so a route answering with acme's quota is caught.
    Quota.objects.filter(organization=acme).update(max_gpus=7, gpu_hours_per_month=777, max_queued_jobs=17)

    job, _ = job_submit(
        organization=acme,
        actor=Actor.for_request(alice, alice_token),
        spec=example_rl_spec(),
        idempotency_key=ACME_IDEMPOTENCY_KEY,
    )
    Metric.objects.create(job=job, name="reward", step=1, value=0.25)
    Metric.objects.create(job=job, name="reward", step=2, value=0.5)
    prefix = f"{storage.organization_prefix(acme.slug)}/jobs/{job.id}/step-5"
    folder = Path(urlparse(prefix).path)
    assert folder.is_relative_to(store)
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(FILE_BYTES)
    checkpoint = Checkpoint.objects.create(
        job=job,
        step=5,
        uri=prefix,
        files=[{"name": "model.safetensors", "size": 3, "sha256": hashlib.sha256(FILE_BYTES).hexdigest()}],
        size_bytes=3,
    )
    RolloutStep.objects.create(job=job, step=5, episodes=[{"index": 0, "role": "agent", "reward": 1.0}])

    alice_membership = Membership.objects.get(organization=acme, user=alice)
    invitation, invitation_secret = invitation_create(by=alice_membership, email=INVITEE, role=Role.MEMBER)

    env = EnvironmentPackage.objects.create(
        organization=acme,
        name=SECRET_ENV,
        description=SECRET_ENV_DESCRIPTION,
        visibility=Visibility.PRIVATE,
        tags=["internal"],
    )
    # An uploaded version with its archive in storage (so its download route is real for alice).
    archive = b"acme's private package bytes"
    archive_uri = env_storage.archive_uri(acme.slug, SECRET_ENV, "1.0.0")
    env_storage.archive_put(archive_uri, archive)
    EnvironmentVersion.objects.create(
        package=env,
        version="1.0.0",
        status=EnvironmentVersion.Status.VALID,
        archive_uri=archive_uri,
        sha256=hashlib.sha256(archive).hexdigest(),
    )

    environment_secret_create(by=alice_membership, name=ACME_ENV_SECRET, value=ACME_ENV_SECRET_VALUE)

    # A registry model and dataset with a version each, and an upload in progress.
    model = RegisteredModel.objects.create(organization=acme, name=ACME_MODEL)
    model_prefix = f"{storage.organization_prefix(acme.slug)}/models/{ACME_MODEL}/1"
    ModelVersion.objects.create(model=model, version=1, uri=model_prefix, status="valid")
    dataset = RegisteredDataset.objects.create(organization=acme, name=ACME_DATASET)
    data_prefix = f"{storage.organization_prefix(acme.slug)}/datasets/{ACME_DATASET}/1"
    DatasetVersion.objects.create(dataset=dataset, version=1, format="jsonl", uri=data_prefix, num_rows=1)
    upload = Upload.objects.create(
        id=uuid.uuid4(),
        organization=acme,
        user=alice,
        kind="model",
        name=ACME_MODEL,
        files=[{"path": "config.json", "size": 2, "sha256": "0" * 64, "received": 0}],
        size_bytes=2,
    )

    # A Tinker session with a training client and saved weights whose adapter is on disk.
    session = tinker_services.session_create(alice_membership, tags=["acme-tinker"], sdk_version="0.38.0")
    created = tinker_services.model_create(acme, str(session.pk), 0, "tiny-qwen2", {"rank": 4})
    saved = tinker_services.save_submit(acme, created.model_id, 1, for_sampler=True, name="acme-adapter")
    adapter_dir = Path(urlparse(saved.request["uri"]).path)
    adapter_dir.mkdir(parents=True)
    (adapter_dir / "adapter_model.safetensors").write_bytes(FILE_BYTES)
    tinker_services.future_complete("tiny-qwen2", str(saved.pk), result={"uri": saved.request["uri"]})
    tinker_weights = TinkerWeights.objects.get(model_id=created.model_id)

    w = AcmeWorld(
        org=acme,
        alice_token=alice_token,
        alice_secret=alice_secret,
        bob_token=bob_token,
        bob_membership=Membership.objects.get(organization=acme, user=bob),
        job=job,
        checkpoint=checkpoint,
        invitation=invitation,
        invitation_secret=invitation_secret,
        env=env,
        upload=upload,
        tinker={"session": str(session.pk), "model": created.model_id, "weights": tinker_weights.pk},
    )
    w.identifiers = [
        ACME_MODEL,
        ACME_DATASET,
        str(upload.id),
        str(session.pk),
        "acme-adapter",
        "acme-tinker",
        str(job.id),
        job.id.hex,
        prefix,
        "acme",
        "alice",
        "bob",
        alice.email,
        bob.email,
        INVITEE,
        SECRET_ENV,
        SECRET_ENV_DESCRIPTION,
        ACME_ENV_SECRET,
        ACME_ENV_SECRET_VALUE,
        *ApiToken.objects.filter(organization=acme).values_list("lookup", flat=True),
        *ApiToken.objects.filter(organization=acme).values_list("name", flat=True),
    ]
    return w


def acme_state(w: AcmeWorld) -> dict[str, Any]:
    """Everything of acme an outsider could try to change (token last_used_at is a hint, left out)."""
    org = w.org
    return {
        "org": list(Organization.objects.filter(pk=org.pk).values("slug", "name")),
        "jobs": list(
            Job.objects.filter(organization=org)
            .order_by("id")
            .values("id", "state", "state_reason", "spec", "priority", "attempt", "updated_at", "finished_at")
        ),
        "events": list(JobEvent.objects.filter(job__organization=org).order_by("id").values()),
        "metrics": list(
            Metric.objects.filter(job__organization=org).order_by("id").values("name", "step", "value")
        ),
        "checkpoints": list(Checkpoint.objects.filter(job__organization=org).order_by("id").values()),
        "rollouts": list(RolloutStep.objects.filter(job__organization=org).order_by("id").values()),
        "file": FILE_BYTES,
        "tokens": list(
            ApiToken.objects.filter(organization=org)
            .order_by("id")
            .values("id", "user", "scopes", "revoked_at")
        ),
        "members": list(
            Membership.objects.filter(organization=org).order_by("id").values("id", "user", "role")
        ),
        "invitations": list(
            Invitation.objects.filter(organization=org)
            .order_by("id")
            .values("id", "revoked_at", "accepted_at")
        ),
        "quota": list(Quota.objects.filter(organization=org).values()),
        "envs": list(EnvironmentPackage.objects.filter(organization=org).order_by("id").values()),
        "env_versions": list(
            EnvironmentVersion.objects.filter(package__organization=org).order_by("id").values()
        ),
        "env_stars": list(Star.objects.filter(package__organization=org).order_by("id").values()),
        "env_secrets": list(EnvironmentSecret.objects.filter(organization=org).order_by("id").values()),
        "models": list(ModelVersion.objects.filter(model__organization=org).order_by("id").values()),
        "datasets": list(DatasetVersion.objects.filter(dataset__organization=org).order_by("id").values()),
        "uploads": list(Upload.objects.filter(organization=org).order_by("id").values()),
        "tinker_weights": list(TinkerWeights.objects.filter(organization=org).order_by("id").values()),
    }


def assert_acme_unchanged(w: AcmeWorld, before: dict[str, Any], store_file) -> None:
    after = acme_state(w)
    after["file"] = store_file.read_bytes()
    for key in before:
        assert after[key] == before[key], f"acme's {key} changed"
    # The explicit ones the brief names, spelled out.
    w.job.refresh_from_db()
    assert w.job.state == "queued"
    live = ApiToken.objects.filter(pk__in=[w.alice_token.pk, w.bob_token.pk], revoked_at__isnull=True)
    assert live.count() == 2
    assert dict(Membership.objects.filter(organization=w.org).values_list("user__username", "role")) == {
        "alice": Role.OWNER,
        "bob": Role.MEMBER,
    }
    w.invitation.refresh_from_db()
    assert w.invitation.revoked_at is None and w.invitation.accepted_at is None


@pytest.fixture
def store_file(world) -> Path:
    return Path(urlparse(world.checkpoint.uri).path) / "model.safetensors"


# ----------------------------------------------------------------------------------------------------
# Every route, with what each kind of caller must get.

_org_counter = itertools.count(1)


def _spec(w: AcmeWorld) -> dict:
    return example_rl_spec().model_dump(mode="json")


def _new_org(w: AcmeWorld) -> dict:
    return {"slug": f"neworg-{next(_org_counter)}", "name": "New Org"}


def _new_upload(w: AcmeWorld) -> dict:
    files = [{"path": "data.jsonl", "size": 3, "sha256": "0" * 64}]
    return {"kind": "dataset", "name": f"globex-data-{next(_org_counter)}", "files": files}


def _new_env_secret(w: AcmeWorld) -> dict:
    return {"name": f"globex-key-{next(_org_counter)}", "value": "globex-value"}


@dataclass(frozen=True)
class Route:
    """Expected statuses.

    outsider:       charlie's token, all his scopes, acme's ids
    outsider_envs:  charlie's token holding only envs:read, acme's ids
    owner_envs:     alice's token holding only envs:read, her own org's ids (scope checks, not isolation)
    foreign_session: charlie's browser session claiming acme with the X-OpenTinker-Org header
    Unauthenticated callers get 401 everywhere; charlie's own browser session (no header) gets `outsider`
    except where SESSION_DIFFERS says otherwise.
    """

    outsider: int
    outsider_envs: int
    owner_envs: int
    foreign_session: int
    body: Callable[[AcmeWorld], dict] | None = None


R = Route
ROUTES: dict[tuple[str, str], Route] = {
    # platform admin: not staff -> 404 as for any unknown URL
    (f"{V1}/admin/orgs", "get"): R(404, 404, 404, 404),
    (f"{V1}/admin/orgs/{{slug}}/quota", "get"): R(404, 404, 404, 404),
    (f"{V1}/admin/orgs/{{slug}}/quota", "patch"): R(404, 404, 404, 404, lambda w: {"max_gpus": 64}),
    (f"{V1}/admin/pools", "get"): R(404, 404, 404, 404),
    (f"{V1}/admin/pools", "post"): R(404, 404, 404, 404, lambda w: {"name": "stolen"}),
    (f"{V1}/admin/pools/{{pool}}", "get"): R(404, 404, 404, 404),
    (f"{V1}/admin/pools/{{pool}}", "patch"): R(404, 404, 404, 404, lambda w: {"enabled": False}),
    (f"{V1}/admin/pools/{{pool}}", "delete"): R(404, 404, 404, 404),
    (f"{V1}/admin/queue", "get"): R(404, 404, 404, 404),
    (f"{V1}/admin/jobs/{{job_id}}/preempt", "post"): R(404, 404, 404, 404, lambda w: {}),
    (f"{V1}/admin/usage", "get"): R(404, 404, 404, 404),
    (f"{V1}/admin/audit", "get"): R(404, 404, 404, 404),
    (f"{V1}/admin/audit/export", "get"): R(404, 404, 404, 404),
    # the audit log (org:admin): only ever the caller's own organization's entries
    (f"{V1}/org/audit", "get"): R(200, 403, 403, 403),
    (f"{V1}/org/audit/export", "get"): R(200, 403, 403, 403),
    (f"{V1}/org/usage", "get"): R(200, 200, 200, 403),
    # environments (envs:read)
    (f"{V1}/envs", "get"): R(200, 200, 200, 403),
    (f"{V1}/envs/{{owner}}/{{name}}", "get"): R(404, 404, 200, 403),
    (f"{V1}/envs/{{owner}}/{{name}}/versions/{{version}}/archive", "get"): R(404, 404, 200, 403),
    # environments (envs:write); an upload always lands in the caller's own organization (no body: 400)
    (f"{V1}/envs", "post"): R(400, 403, 403, 403),
    (f"{V1}/envs/{{owner}}/{{name}}", "patch"): R(404, 403, 403, 403, lambda w: {"description": "pwned"}),
    (f"{V1}/envs/{{owner}}/{{name}}/star", "put"): R(404, 403, 403, 403),
    (f"{V1}/envs/{{owner}}/{{name}}/star", "delete"): R(404, 403, 403, 403),
    (f"{V1}/envs/{{owner}}/{{name}}/fork", "post"): R(404, 403, 403, 403, lambda w: {}),
    # browser-session only: a token is refused
    (f"{V1}/invitations/accept", "post"): R(403, 403, 403, 403, lambda w: {"token": w.invitation_secret}),
    (f"{V1}/orgs", "post"): R(403, 403, 403, 201, _new_org),
    # jobs (jobs:read / jobs:write)
    (f"{V1}/jobs", "get"): R(200, 403, 403, 403),
    (f"{V1}/jobs", "post"): R(201, 403, 403, 403, _spec),
    (f"{V1}/jobs/{{job_id}}", "get"): R(404, 403, 403, 403),
    (f"{V1}/jobs/{{job_id}}/cancel", "post"): R(404, 403, 403, 403, lambda w: {"reason": "x"}),
    (f"{V1}/jobs/{{job_id}}/checkpoints", "get"): R(404, 403, 403, 403),
    (f"{V1}/jobs/{{job_id}}/checkpoints/{{checkpoint_id}}/files/{{name}}", "get"): R(404, 403, 403, 403),
    (f"{V1}/jobs/{{job_id}}/events", "get"): R(404, 403, 403, 403),
    (f"{V1}/jobs/{{job_id}}/metrics", "get"): R(404, 403, 403, 403),
    (f"{V1}/jobs/{{job_id}}/rollouts", "get"): R(404, 403, 403, 403),
    (f"{V1}/jobs/{{job_id}}/stream", "get"): R(404, 403, 403, 403),
    # promoting a checkpoint into the caller's registry (envs:write): acme's job is a 404
    (f"{V1}/jobs/{{job_id}}/promote", "post"): R(404, 403, 403, 403, lambda w: {"name": "stolen"}),
    # runtime ingest: job tokens only, so every user credential is a 401 (charlie's own job token on acme's
    # job is a 404: tests/api/test_ingest.py)
    (f"{V1}/ingest/jobs/{{job_id}}/metrics", "post"): R(
        401, 401, 401, 401, lambda w: {"points": [{"step": 9, "name": "reward", "value": 1.0}]}
    ),
    (f"{V1}/ingest/jobs/{{job_id}}/events", "post"): R(
        401, 401, 401, 401, lambda w: {"kind": "info", "message": "x"}
    ),
    (f"{V1}/ingest/jobs/{{job_id}}/logs", "post"): R(
        401, 401, 401, 401, lambda w: {"lines": [{"line": "x"}]}
    ),
    (f"{V1}/ingest/jobs/{{job_id}}/checkpoints", "post"): R(
        401, 401, 401, 401, lambda w: {"step": 9, "uri": w.checkpoint.uri, "files": w.checkpoint.files}
    ),
    (f"{V1}/ingest/jobs/{{job_id}}/rollouts", "post"): R(
        401, 401, 401, 401, lambda w: {"step": 9, "episodes": []}
    ),
    (f"{V1}/ingest/jobs/{{job_id}}/heartbeat", "post"): R(401, 401, 401, 401, lambda w: {}),
    (f"{V1}/ingest/jobs/{{job_id}}/state", "post"): R(401, 401, 401, 401, lambda w: {"state": "failed"}),
    (f"{V1}/ingest/jobs/{{job_id}}/environment", "get"): R(401, 401, 401, 401),
    # a bootstrap token only (otb_, single use: tests/api/test_job_bootstrap.py)
    (f"{V1}/ingest/jobs/{{job_id}}/bootstrap", "post"): R(401, 401, 401, 401, lambda w: {}),
    # the caller and their organization (any scope)
    (f"{V1}/me", "get"): R(200, 200, 200, 403),
    (f"{V1}/models", "get"): R(200, 200, 200, 200),
    (f"{V1}/org", "get"): R(200, 200, 200, 403),
    (f"{V1}/org/quota", "get"): R(200, 200, 200, 403),
    (f"{V1}/org/members", "get"): R(200, 200, 200, 403),
    (f"{V1}/org/members/{{member_id}}", "get"): R(404, 404, 200, 403),
    (f"{V1}/org/members/{{member_id}}", "patch"): R(404, 403, 403, 403, lambda w: {"role": "viewer"}),
    (f"{V1}/org/members/{{member_id}}", "delete"): R(404, 403, 403, 403),
    # invitations (org:admin)
    (f"{V1}/org/invitations", "get"): R(200, 403, 403, 403),
    (f"{V1}/org/invitations", "post"): R(
        201, 403, 403, 403, lambda w: {"email": "newcomer@globex.example", "role": "viewer"}
    ),
    (f"{V1}/org/invitations/{{invitation_id}}", "delete"): R(404, 403, 403, 403),
    # environment secrets (org:admin); a value is never returned
    (f"{V1}/org/env-secrets", "get"): R(200, 403, 403, 403),
    (f"{V1}/org/env-secrets", "post"): R(201, 403, 403, 403, _new_env_secret),
    (f"{V1}/org/env-secrets/{{name}}", "delete"): R(404, 403, 403, 403),
    # the organization's registry models and datasets (envs:read) and uploads into it (envs:write); an upload
    # always lands in the caller's own organization
    (f"{V1}/org/models", "get"): R(200, 200, 200, 403),
    (f"{V1}/org/models/{{name}}", "get"): R(404, 404, 200, 403),
    (f"{V1}/org/datasets", "get"): R(200, 200, 200, 403),
    (f"{V1}/org/datasets/{{name}}", "get"): R(404, 404, 200, 403),
    (f"{V1}/org/uploads", "post"): R(201, 403, 403, 403, _new_upload),
    (f"{V1}/org/uploads/{{upload_id}}", "get"): R(404, 403, 403, 403),
    (f"{V1}/org/uploads/{{upload_id}}", "delete"): R(404, 403, 403, 403),
    (f"{V1}/org/uploads/{{upload_id}}/files/{{index}}", "put"): R(404, 403, 403, 403, lambda w: {}),
    (f"{V1}/org/uploads/{{upload_id}}/complete", "post"): R(404, 403, 403, 403),
    (f"{V1}/org/uploads/{{upload_id}}/files/{{index}}/multipart", "post"): R(404, 403, 403, 403),
    (f"{V1}/org/uploads/{{upload_id}}/files/{{index}}/multipart/complete", "post"): R(
        404, 403, 403, 403, lambda w: {"parts": [{"number": 1, "etag": '"x"'}]}
    ),
    # a Hub import lands in the caller's own organization (org:admin); nothing is allow-listed here: 400
    (f"{V1}/org/model-imports", "post"): R(
        400, 403, 403, 403, lambda w: {"repo": "acme/secret-model", "name": "stolen"}
    ),
    # the organization's Tinker sessions, training clients and saved weights (jobs:read)
    (f"{V1}/tinker/sessions", "get"): R(200, 403, 403, 403),
    (f"{V1}/tinker/sessions/{{session_id}}", "get"): R(404, 403, 403, 403),
    (f"{V1}/tinker/models", "get"): R(200, 403, 403, 403),
    (f"{V1}/tinker/models/{{model_id}}", "get"): R(404, 403, 403, 403),
    (f"{V1}/tinker/weights", "get"): R(200, 403, 403, 403),
    (f"{V1}/tinker/weights/{{weights_id}}", "get"): R(404, 403, 403, 403),
    (f"{V1}/tinker/weights/{{weights_id}}/files/{{name}}", "get"): R(404, 403, 403, 403),
    # tokens: every member manages their own; minting through a token needs org:admin
    (f"{V1}/tokens", "get"): R(200, 200, 200, 403),
    (f"{V1}/tokens", "post"): R(201, 403, 403, 403, lambda w: {"name": "ci", "scopes": ["envs:read"]}),
    (f"{V1}/tokens/{{token_id}}", "get"): R(404, 404, 200, 403),
    # owner_envs revokes alice's own other token: a member manages their own tokens with any token
    (f"{V1}/tokens/{{token_id}}", "delete"): R(404, 404, 204, 403),
}

# charlie's own browser session (his first organization, globex): as his token, except creating organizations.
SESSION_DIFFERS: dict[tuple[str, str], int] = {(f"{V1}/orgs", "post"): 201}


PUBLIC_PROBES = ("/healthz", "/livez", "/readyz")


@functools.cache
def schema_operations() -> tuple[tuple[str, str, tuple[str, ...]], ...]:
    schema = SchemaGenerator().get_schema(request=None, public=True)
    ops = []
    for path, item in schema["paths"].items():
        if path in PUBLIC_PROBES:
            continue  # public by design, no tenant's data: tests/api/test_health.py
        for method, op in item.items():
            if method not in ("get", "post", "put", "patch", "delete", "head", "options", "trace"):
                continue
            declared = sorted(p["name"] for p in op.get("parameters", []) if p.get("in") == "path")
            ops.append((path, method, tuple(declared)))
    return tuple(sorted(ops))


def fill(path: str, values: dict[str, Any]) -> str:
    def one(m: re.Match) -> str:
        name = m.group(1)
        key = PATH_PARAMS.get(name)
        assert key is not None, f"path parameter {{{name}}} of {path} has no value in PATH_PARAMS"
        if isinstance(key, dict):
            assert path in key, f"path parameter {{{name}}} of {path}: add this path to PATH_PARAMS[{name!r}]"
            key = key[path]
        return str(values[key])

    return re.sub(r"\{(\w+)\}", one, path)


def operations() -> list[tuple[str, str, Route]]:
    """The schema's operations with their expectations; fails on any the table does not know."""
    out = []
    for path, method, _ in schema_operations():
        route = ROUTES.get((path, method))
        assert route is not None, f"untested route {method.upper()} {path}: add it to ROUTES in {__file__}"
        out.append((path, method, route))
    return out


def call(client: APIClient, method: str, url: str, body: dict | None):
    if body is None:
        response = client.generic(method.upper(), url)
    else:
        response = client.generic(method.upper(), url, json.dumps(body), content_type="application/json")
    # Consuming a stream closes the response (the test client's wrapper); closing it again here would fire
    # request_finished and drop the test's database connection.
    if response.streaming and response.is_async:
        # A live stream (SSE) never ends while the job runs: read its opening, then hang up.
        raw = async_to_sync(_first_chunk)(response.streaming_content)
    else:
        raw = b"".join(response.streaming_content) if response.streaming else response.content
    return response, raw.decode("utf-8", errors="replace")


async def _first_chunk(stream) -> bytes:
    try:
        async for chunk in stream:
            return chunk
        return b""
    finally:
        await stream.aclose()


def assert_no_acme_identifier(w: AcmeWorld, text: str, request_text: str, what: str) -> None:
    for ident in w.identifiers:
        if ident.lower() in request_text.lower():
            continue  # an echo of what the caller sent is no leak (the 404 comparison covers those routes)
        pattern = rf"(?<![A-Za-z0-9]){re.escape(ident)}(?![A-Za-z0-9])"
        found = re.search(pattern, text, flags=re.IGNORECASE)
        assert not found, f"{what} leaks acme's {ident!r}: {text[:500]}"


ERROR_CODES = {
    401: {"not_authenticated", "authentication_failed"},
    403: {"permission_denied"},
    404: {"not_found"},
}


def assert_error_shape(resp, text: str, status: int, what: str) -> None:
    codes = ERROR_CODES.get(status)
    if codes is None:
        return
    body = json.loads(text)
    assert body["error"]["code"] in codes, f"{what}: {text}"
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]


def _normalized(text: str, values: dict[str, Any]) -> str:
    for key, value in sorted(values.items(), key=lambda kv: -len(str(kv[1]))):
        text = text.replace(str(value), f"<{key}>")
    return text


# ----------------------------------------------------------------------------------------------------
# Coverage


def test_every_schema_route_and_parameter_is_covered():
    ops = schema_operations()
    assert ops, "the schema lists no routes"
    in_schema = {(path, method) for path, method, _ in ops}
    assert not in_schema - set(ROUTES), f"untested routes: {sorted(in_schema - set(ROUTES))}"
    assert not set(ROUTES) - in_schema, f"routes no longer in the schema: {sorted(set(ROUTES) - in_schema)}"
    for path, _method, declared in ops:
        in_template = sorted(re.findall(r"\{(\w+)\}", path))
        assert in_template == list(declared), f"{path}: template {in_template} vs declared {declared}"
        for name in in_template:
            key = PATH_PARAMS.get(name)
            assert key is not None, f"unknown path parameter {{{name}}} in {path}: add it to PATH_PARAMS"
            if isinstance(key, dict):
                assert path in key, f"path parameter {{{name}}} of {path} is not mapped in PATH_PARAMS"
    # The docs routes are not part of the schema (they are public by design).
    assert not any(p.startswith(("/api/schema", "/api/docs", "/api/redoc")) for p, _ in in_schema)
    # Outside the API only the liveness and readiness probes (public by design) are in the schema.
    paths = SchemaGenerator().get_schema(request=None, public=True)["paths"]
    assert sorted(p for p in paths if not p.startswith(f"{V1}/")) == sorted(PUBLIC_PROBES)


def test_acme_ids_are_real(world, store_file):
    """Positive control: acme's owner reaches every GET route with these ids (so a 404 means isolation)."""
    client = client_for(world.alice_secret)
    values = world.params()
    for path, method, _route in operations():
        if method != "get":
            continue
        resp, text = call(client, "get", fill(path, values), None)
        if path.startswith(f"{V1}/ingest/"):  # job tokens only: its control is tests/api/test_ingest_env.py
            assert resp.status_code == 401, f"alice GET {path}: {resp.status_code}"
            continue
        expected = 404 if path.startswith(f"{V1}/admin/") else 200
        assert resp.status_code == expected, f"alice GET {path}: {resp.status_code} {text[:300]}"
        if "{job_id}" in path:
            if path.endswith("{name}"):
                assert text.encode() == FILE_BYTES
            else:
                assert resp.status_code == 200 and text.strip() not in ("", "{}", '{"results":[]}'), path
    assert str(world.job.id) in client.get(f"{V1}/jobs").content.decode()
    assert SECRET_ENV in client.get(f"{V1}/envs").content.decode()


# ----------------------------------------------------------------------------------------------------
# The outsider walk


def _own_data_checks(w: AcmeWorld, charlie, globex) -> dict[tuple[str, str], Callable[[Any], None]]:
    acme_token_ids = set(ApiToken.objects.filter(organization=w.org).values_list("id", flat=True))
    globex_quota = Quota.objects.get(organization=globex)

    def jobs_list(body):
        assert all(j["organization"] == "globex" for j in body["results"])
        assert str(w.job.id) not in {j["id"] for j in body["results"]}

    def job_created(body):
        assert body["organization"] == "globex"
        assert Job.objects.get(pk=body["id"]).organization_id == globex.pk

    def envs(body):
        names = {(e["owner"], e["name"]) for e in body["results"]}
        assert ("acme", SECRET_ENV) not in names
        assert all(e["owner"] == "globex" or e["visibility"] == "public" for e in body["results"])

    def me(body):
        assert body["username"] == "charlie" and body["organization"]["slug"] == "globex"
        assert {o["slug"] for o in body["organizations"]} == {"globex"}

    def org(body):
        assert body["slug"] == "globex"

    def quota(body):
        assert (body["max_gpus"], body["gpu_hours_per_month"], body["max_queued_jobs"]) == (
            globex_quota.max_gpus,
            globex_quota.gpu_hours_per_month,
            globex_quota.max_queued_jobs,
        )

    def members(body):
        assert [m["username"] for m in body["results"]] == ["charlie"]

    def invitations(body):
        assert w.invitation.pk not in {i["id"] for i in body["results"]}
        assert all(Invitation.objects.get(pk=i["id"]).organization_id == globex.pk for i in body["results"])

    def invitation_created(body):
        assert Invitation.objects.get(pk=body["id"]).organization_id == globex.pk

    def env_secrets(body):
        names = {s["name"] for s in body["results"]}
        assert ACME_ENV_SECRET not in names
        assert names == set(
            EnvironmentSecret.objects.filter(organization=globex).values_list("name", flat=True)
        )

    def env_secret_created(body):
        assert EnvironmentSecret.objects.get(organization=globex, name=body["name"]).created_by == charlie

    def tokens(body):
        assert {t["user"] for t in body["results"]} <= {"charlie"}
        assert not acme_token_ids & {t["id"] for t in body["results"]}

    def token_created(body):
        assert body["user"] == "charlie"
        assert ApiToken.objects.get(pk=body["id"]).organization_id == globex.pk

    return {
        (f"{V1}/jobs", "get"): jobs_list,
        (f"{V1}/jobs", "post"): job_created,
        (f"{V1}/envs", "get"): envs,
        (f"{V1}/me", "get"): me,
        (f"{V1}/org", "get"): org,
        (f"{V1}/org/quota", "get"): quota,
        (f"{V1}/org/members", "get"): members,
        (f"{V1}/org/invitations", "get"): invitations,
        (f"{V1}/org/invitations", "post"): invitation_created,
        (f"{V1}/org/env-secrets", "get"): env_secrets,
        (f"{V1}/org/env-secrets", "post"): env_secret_created,
        (f"{V1}/tokens", "get"): tokens,
        (f"{V1}/tokens", "post"): token_created,
    }


def _outsider_client(kind: str, charlie, globex, make_token) -> APIClient:
    if kind == "session":
        client = APIClient()
        client.force_login(charlie)
        return client
    secret = make_token(charlie, globex)
    if kind == "token+acme-header":
        # A token is bound to its organization: the browser's organization header must change nothing.
        client = APIClient()
        client.credentials(HTTP_AUTHORIZATION=f"Bearer {secret}", HTTP_X_OPENTINKER_ORG="acme")
        return client
    return client_for(secret)


@pytest.mark.parametrize("kind", ["token", "token+acme-header", "session"])
def test_outsider_gets_404_for_every_acme_object_and_only_his_own_data(
    world, store_file, charlie, globex, make_token, kind
):
    client = _outsider_client(kind, charlie, globex, make_token)
    checks = _own_data_checks(world, charlie, globex)
    before = acme_state(world)
    real, fake = world.params(), fake_params()
    walked = 0
    for path, method, route in operations():
        expected = route.outsider
        if kind == "session":
            expected = SESSION_DIFFERS.get((path, method), expected)
        names_acme = "{" in path
        if names_acme:
            # (ingest routes refuse every user credential outright: 401 whatever the id)
            assert expected == 404 or (expected == 401 and path.startswith(f"{V1}/ingest/")), (
                f"{path}: a route naming an acme object must answer 404 to an outsider"
            )
        body = route.body(world) if route.body else None
        url = fill(path, real)
        what = f"charlie ({kind}) {method.upper()} {url}"
        methods = [method, "head"] if method == "get" else [method]
        for m in methods:
            resp, text = call(client, m, url, body)
            walked += 1
            assert resp.status_code == expected, f"{what} [{m}]: {resp.status_code} {text[:300]}"
            request_text = url + (json.dumps(body) if body else "")
            assert_no_acme_identifier(world, text, request_text, f"{what} [{m}]")
            if m == "head":
                continue
            assert_error_shape(resp, text, expected, what)
            if expected in (200, 201) and (path, method) in checks:
                checks[(path, method)](json.loads(text))
            if names_acme:
                # Indistinguishable from an id that never existed: a 404 confirms nothing.
                fake_resp, fake_text = call(client, m, fill(path, fake), body)
                assert fake_resp.status_code == expected
                assert _normalized(text, real) == _normalized(fake_text, fake), (
                    f"{what}: the answer differs from that for a non-existent id: {text} vs {fake_text}"
                )
    assert walked >= len(ROUTES)
    assert_acme_unchanged(world, before, store_file)


def test_outsider_cannot_reach_acme_checkpoint_through_his_own_job(world, charlie, globex, make_token):
    """Nested ids are checked against their parent: charlie's job + acme's checkpoint id is still 404."""
    secret = make_token(charlie, globex)
    client = client_for(secret)
    own, _ = job_submit(
        organization=globex, actor=Actor.for_request(charlie, _token_of(secret)), spec=example_rl_spec()
    )
    url = f"{V1}/jobs/{own.id}/checkpoints/{world.checkpoint.pk}/files/model.safetensors"
    resp, text = call(client, "get", url, None)
    assert resp.status_code == 404, text
    resp, text = call(client, "get", f"{V1}/jobs/{own.id}/checkpoints", None)
    assert resp.status_code == 200 and json.loads(text) == {"results": []}
    assert_no_acme_identifier(world, text, url, "checkpoints of charlie's job")


def test_outsider_cannot_tell_acme_private_env_from_a_missing_one(world, charlie, globex, make_token):
    """Submitting a job against acme's private environment fails exactly like a non-existent one."""
    client = client_for(make_token(charlie, globex))
    jobs = Job.objects.count()
    answers = []
    for name in (SECRET_ENV, "no-such-env"):
        spec = {**example_rl_spec().model_dump(mode="json"), "environment": {"ref": f"acme/{name}@1.0.0"}}
        resp = client.post(f"{V1}/jobs", spec, format="json")
        assert resp.status_code == 400, resp.content
        assert "environment.ref" in resp.json()["error"]["fields"]
        answers.append(resp.content.decode().replace(name, "<name>"))
    assert answers[0] == answers[1]
    assert Job.objects.count() == jobs


def test_outsider_reusing_acme_idempotency_key_gets_his_own_new_job(world, charlie, globex, make_token):
    """Idempotency keys are per organization: acme's key never hands charlie acme's job."""
    client = client_for(make_token(charlie, globex))
    spec = example_rl_spec().model_dump(mode="json")
    for expected in (201, 200):  # the second time, charlie's own first job comes back
        resp = client.post(f"{V1}/jobs", spec, format="json", HTTP_IDEMPOTENCY_KEY=ACME_IDEMPOTENCY_KEY)
        assert resp.status_code == expected, resp.content
        body = resp.json()
        assert body["organization"] == "globex" and body["id"] != str(world.job.id)
        assert_no_acme_identifier(world, resp.content.decode(), "", "idempotent submit")
    assert Job.objects.filter(organization=globex).count() == 1
    assert Job.objects.filter(organization=world.org).count() == 1


@pytest.mark.parametrize("field", ["model.base", "resume_from"])
def test_outsider_cannot_point_a_job_at_acme_checkpoint(world, charlie, globex, make_token, field):
    """A job reads only its own organization's objects: acme's checkpoint URI is refused for globex."""
    client = client_for(make_token(charlie, globex))
    spec = example_rl_spec().model_dump(mode="json")
    if field == "model.base":
        spec["model"] = {**spec["model"], "base": world.checkpoint.uri}
    else:
        spec["resume_from"] = world.checkpoint.uri
    jobs = Job.objects.count()
    resp = client.post(f"{V1}/jobs", spec, format="json")
    assert resp.status_code in (400, 404), resp.content
    assert field in resp.json()["error"]["fields"]
    assert Job.objects.count() == jobs
    # Only the URI charlie sent is echoed; nothing else of acme.
    assert_no_acme_identifier(world, resp.content.decode(), world.checkpoint.uri, "spec pointing at acme")


# ----------------------------------------------------------------------------------------------------
# Missing authentication, missing scope, foreign organization header


@pytest.mark.parametrize("credentials", ["none", "garbage", "revoked"])
def test_every_route_needs_authentication(world, store_file, alice, acme, make_token, credentials):
    client = APIClient()
    if credentials == "garbage":
        client.credentials(HTTP_AUTHORIZATION="Bearer otk_000000000000_" + "A" * 43)
    elif credentials == "revoked":
        secret = make_token(alice, acme)
        ApiToken.objects.filter(pk=_token_of(secret).pk).update(revoked_at=timezone.now())
        client.credentials(HTTP_AUTHORIZATION=f"Bearer {secret}")
    before = acme_state(world)
    real = world.params()
    for path, method, route in operations():
        body = route.body(world) if route.body else None
        url = fill(path, real)
        resp, text = call(client, method, url, body)
        what = f"{credentials}: {method.upper()} {url}"
        assert resp.status_code == 401, f"{what}: {resp.status_code} {text[:300]}"
        assert_error_shape(resp, text, 401, f"{method.upper()} {url}")
        assert_no_acme_identifier(world, text, url + json.dumps(body), f"anonymous {method.upper()} {url}")
    assert_acme_unchanged(world, before, store_file)
    # The schema and the docs are public (and not in the schema they describe).
    for url in ("/api/schema/", "/api/docs/", "/api/redoc/"):
        assert APIClient().get(url).status_code == 200, url


@pytest.mark.parametrize("who", ["outsider", "owner"])
def test_every_route_with_a_token_lacking_the_scope(
    world, store_file, alice, charlie, globex, make_token, who
):
    """Tokens holding only envs:read: jobs and admin routes give 403, whoever's ids are used."""
    if who == "outsider":
        client = client_for(make_token(charlie, globex, scopes=["envs:read"]))
    else:
        client = client_for(make_token(alice, world.org, scopes=["envs:read"]))
    before = acme_state(world)
    real = world.params()
    for path, method, route in operations():
        expected = route.outsider_envs if who == "outsider" else route.owner_envs
        body = route.body(world) if route.body else None
        url = fill(path, real)
        resp, text = call(client, method, url, body)
        what = f"{who} with envs:read {method.upper()} {url}"
        assert resp.status_code == expected, f"{what}: {resp.status_code} {text[:300]}"
        assert_error_shape(resp, text, expected, what)
        if who == "outsider":
            assert_no_acme_identifier(world, text, url + json.dumps(body), what)
    if who == "outsider":
        assert_acme_unchanged(world, before, store_file)
    else:
        # Only the owner's own token revocation went through (DELETE /tokens/{id} on her own token).
        world.alice_token.refresh_from_db()
        assert world.alice_token.revoked_at is not None
        world.job.refresh_from_db()
        assert world.job.state == "queued"
        assert Job.objects.filter(organization=world.org).count() == 1


def test_foreign_organization_header_on_a_browser_session(world, store_file, charlie):
    """charlie's session naming acme in X-OpenTinker-Org is refused (403), never served acme's data."""
    client = APIClient()
    client.force_login(charlie)
    client.defaults["HTTP_X_OPENTINKER_ORG"] = "acme"
    before = acme_state(world)
    real = world.params()
    for path, method, route in operations():
        body = route.body(world) if route.body else None
        url = fill(path, real)
        resp, text = call(client, method, url, body)
        what = f"charlie's session as acme {method.upper()} {url}"
        assert resp.status_code == route.foreign_session, f"{what}: {resp.status_code} {text[:300]}"
        assert_error_shape(resp, text, route.foreign_session, what)
        assert_no_acme_identifier(world, text, url + json.dumps(body), what)
    assert_acme_unchanged(world, before, store_file)


def test_a_token_without_org_admin_cannot_see_or_revoke_teammates_tokens(world, alice, make_token):
    """The owner's role is not enough through a token: managing teammates' tokens needs org:admin."""
    client = client_for(make_token(alice, world.org, scopes=["envs:read"]))
    listed = {t["id"] for t in client.get(f"{V1}/tokens").json()["results"]}
    assert world.bob_token.pk not in listed and world.alice_token.pk in listed
    assert client.get(f"{V1}/tokens/{world.bob_token.pk}").status_code in (403, 404)
    resp = client.delete(f"{V1}/tokens/{world.bob_token.pk}")
    assert resp.status_code in (403, 404), resp.content
    world.bob_token.refresh_from_db()
    assert world.bob_token.revoked_at is None
    # With org:admin the owner does manage them.
    admin = client_for(make_token(alice, world.org, scopes=["org:admin"]))
    assert admin.get(f"{V1}/tokens/{world.bob_token.pk}").status_code == 200
