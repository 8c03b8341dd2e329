"""A job's registry package: pinned at submission (exact version, sha256), served to the job's runtime by
`GET /api/v1/ingest/jobs/<id>/environment`, and multi-agent role mappings checked at submission.

Actors: alice (owner of acme, publishes acme/echo and submits), bob (member of acme), charlie (outsider, owner
of globex, with a job and job token of his own).
"""

from __future__ import annotations

import hashlib

import pytest

from env_registry.models import EnvironmentVersion
from opentinker.spec import JobState
from portal.actors import Actor
from portal.models import Job
from portal.services.job_tokens import job_token_issue
from portal.services.jobs import job_transition
from tests.api.test_envs import job_with, package, store, upload  # noqa: F401 (store: fixture)
from tests.conftest import client_for

pytestmark = pytest.mark.django_db
V1 = "/api/v1"


@pytest.fixture
def published(as_alice, store):  # noqa: F811 (store: the fixture imported above)
    data = package()
    assert upload(as_alice, data).status_code == 201
    return data


def submit(client, ref: str, **env) -> Job:
    resp = client.post(f"{V1}/jobs", {**job_with(ref), "environment": {"ref": ref, **env}}, format="json")
    assert resp.status_code == 201, resp.content
    job = Job.objects.get(pk=resp.json()["id"])
    return job_transition(job=job, to=JobState.ADMITTED, actor=Actor.system("scheduler"))


def fetch(client, job):
    return client.get(f"{V1}/ingest/jobs/{job.id}/environment")


def test_latest_is_pinned_to_the_exact_version_and_sha256(as_alice, published):
    sha = hashlib.sha256(published).hexdigest()
    job = submit(as_alice, "acme/echo@latest")
    assert job.spec["environment"] == {"ref": "acme/echo@1.2.3", "config": {}, "sha256": sha, "secret": None}
    # A newer release later does not change what this job (or a retry of it) runs.
    assert upload(as_alice, package(version="1.3.0")).status_code == 201
    assert Job.objects.get(pk=job.pk).spec["environment"]["ref"] == "acme/echo@1.2.3"
    body = as_alice.get(f"{V1}/jobs/{job.id}").json()
    assert body["spec"]["environment"]["sha256"] == sha


def test_idempotent_retry_of_a_latest_submission_after_a_new_release_is_the_same_job(as_alice, published):
    headers = {"HTTP_IDEMPOTENCY_KEY": "echo-run"}
    spec = job_with("acme/echo@latest")
    first = as_alice.post(f"{V1}/jobs", spec, format="json", **headers)
    assert upload(as_alice, package(version="1.3.0")).status_code == 201
    again = as_alice.post(f"{V1}/jobs", spec, format="json", **headers)
    assert (first.status_code, again.status_code) == (201, 200)
    assert again.json()["id"] == first.json()["id"]
    changed = as_alice.post(f"{V1}/jobs", {**spec, "seed": 5}, format="json", **headers)
    assert changed.status_code == 409


def test_a_given_sha256_must_match_and_only_valid_versions_are_used(as_alice, published):
    resp = as_alice.post(
        f"{V1}/jobs",
        {**job_with(""), "environment": {"ref": "acme/echo@1.2.3", "sha256": "0" * 64}},
        format="json",
    )
    assert resp.status_code == 400
    [message] = resp.json()["error"]["fields"]["environment.sha256"]
    assert message == f"acme/echo@1.2.3 has sha256 {hashlib.sha256(published).hexdigest()}, not {'0' * 64}"
    EnvironmentVersion.objects.filter(version="1.2.3").update(status="invalid")
    resp = as_alice.post(f"{V1}/jobs", job_with("acme/echo@1.2.3"), format="json")
    assert resp.status_code == 400 and "environment.ref" in resp.json()["error"]["fields"]
    before = Job.objects.count()
    assert as_alice.post(f"{V1}/jobs", job_with("acme/echo@latest"), format="json").status_code == 400
    assert Job.objects.count() == before  # nothing stored


def test_the_runtime_gets_its_pinned_archive(as_alice, as_bob, as_charlie, published):
    job = submit(as_alice, "acme/echo@1.2.3")
    resp = fetch(client_for(job_token_issue(job)), job)
    assert resp.status_code == 200 and resp["Content-Type"] == "application/gzip"
    assert b"".join(resp.streaming_content) == published
    assert resp["X-Checksum-Sha256"] == hashlib.sha256(published).hexdigest()

    # Another job's token: 404 (charlie's own job in globex, a built-in job in acme); user credentials: 401.
    charlie_job = submit(as_charlie, "opentinker/arithmetic@1.0.0")
    assert fetch(client_for(job_token_issue(charlie_job)), job).status_code == 404
    builtin_job = submit(as_alice, "opentinker/arithmetic@1.0.0")
    assert fetch(client_for(job_token_issue(builtin_job)), job).status_code == 404
    for user_client in (as_alice, as_bob, as_charlie):
        assert fetch(user_client, job).status_code == 401
    assert fetch(client_for(None), job).status_code == 401


def test_a_job_without_a_package_archive_gets_404(as_alice, published):
    builtin_job = submit(as_alice, "opentinker/arithmetic@latest")
    resp = fetch(client_for(job_token_issue(builtin_job)), builtin_job)
    assert resp.status_code == 404
    assert "no package archive" in resp.json()["error"]["message"]


def test_a_stale_token_of_an_earlier_attempt_is_refused(as_alice, published):
    job = submit(as_alice, "acme/echo@1.2.3")
    token = job_token_issue(job)
    job = job_transition(job=job, to=JobState.QUEUED, actor=Actor.system("reaper"), reason="lost")
    assert fetch(client_for(token), job).status_code == 401


# --- multi-agent role mappings are checked at submission ---

GAME = {"ref": "opentinker/tic-tac-toe@latest"}


def multi_agent_job(roles: dict, policies: dict | None = None) -> dict:
    policies = policies or {"main": {}}
    return {**job_with(""), "environment": GAME, "multi_agent": {"policies": policies, "roles": roles}}


@pytest.mark.parametrize(
    ("roles", "policies", "message"),
    [
        ({"x": "main", "z": "main"}, None, "opentinker/tic-tac-toe has no role 'z' (its roles: x, o)"),
        ({"x": "main"}, None, "role 'o' of opentinker/tic-tac-toe has no policy"),
    ],
)
def test_bad_role_mapping_is_a_400_naming_multi_agent_roles(as_alice, roles, policies, message):
    before = Job.objects.count()
    resp = as_alice.post(f"{V1}/jobs", multi_agent_job(roles, policies), format="json")
    assert resp.status_code == 400, resp.content
    assert message in resp.json()["error"]["fields"]["multi_agent.roles"][0]
    assert Job.objects.count() == before


def test_good_role_mappings_are_accepted(as_alice):
    both = as_alice.post(f"{V1}/jobs", multi_agent_job({"x": "main", "o": "main"}), format="json")
    assert both.status_code == 201, both.content
    rule = multi_agent_job({"x": "main", "o": "bot"}, {"main": {}, "bot": {"kind": "rule"}})
    assert as_alice.post(f"{V1}/jobs", rule, format="json").status_code == 201


def test_package_roles_come_from_its_manifest(as_alice, store):  # noqa: F811
    game = package(name="duel", protocol="multi-agent", roles=["left", "right"])
    resp = upload(as_alice, game)
    assert resp.status_code == 201
    EnvironmentVersion.objects.filter(package__name="duel").update(status="valid")
    resp = as_alice.post(
        f"{V1}/jobs",
        {**job_with(""), "environment": {"ref": "acme/duel@1.2.3"},
         "multi_agent": {"policies": {"main": {}}, "roles": {"left": "main", "up": "main"}}},
        format="json",
    )  # fmt: skip
    assert resp.status_code == 400
    assert resp.json()["error"]["fields"]["multi_agent.roles"] == [
        "acme/duel has no role 'up' (its roles: left, right); role 'right' of acme/duel has no policy"
    ]
    # A mapping that matches the manifest is accepted: the runtime plays the package's game sandboxed.
    good = {"policies": {"main": {}}, "roles": {"left": "main", "right": "main"}}
    resp = as_alice.post(
        f"{V1}/jobs",
        {**job_with(""), "environment": {"ref": "acme/duel@1.2.3"}, "multi_agent": good},
        format="json",
    )
    assert resp.status_code == 201, resp.content
    assert resp.json()["spec"]["multi_agent"]["roles"] == {"left": "main", "right": "main"}
