"""Environment secrets: stored encrypted, never shown again, resolved at submission, handed to the runtime
only in its process environment.
Actors: alice (owner of acme), bob (member of acme), charlie (owner of globex)."""

from __future__ import annotations

import json

import pytest

from opentinker.spec import EnvironmentSpec, ResourcesSpec, example_rl_spec
from portal.models import Allocation, EnvironmentSecret, Job, JobEvent
from portal.services.env_secrets import environment_secret_reveal
from portal.services.scheduler import schedule_pass
from tests.conftest import client_for
from tests.workers.conftest import make_pool
from workers.drivers import job_env, work_dir, write_spec
from workers.supervisor import launch

pytestmark = pytest.mark.django_db

URL = "/api/v1/org/env-secrets"
VALUE = "sk-live-7Hq2Zx9Pa1-very-secret"
REMOTE = "https://env.example/arithmetic"
NAME = "openenv"


def create(client, name=NAME, value=VALUE):
    return client.post(URL, {"name": name, "value": value}, format="json")


def remote_spec(secret: str | None = NAME, ref: str = REMOTE) -> dict:
    spec = example_rl_spec().model_dump(mode="json")
    spec["environment"] = {"ref": ref, "secret": secret}
    return spec


def test_owner_creates_lists_and_deletes_and_the_value_is_never_shown(as_alice, acme, alice):
    r = create(as_alice)
    assert r.status_code == 201, r.content
    assert r.json() == {"name": "openenv", "created_by": "alice", "created_at": r.json()["created_at"]}
    assert create(as_alice, "other", "v2").status_code == 201
    listed = as_alice.get(URL)
    assert listed.status_code == 200
    assert [s["name"] for s in listed.json()["results"]] == ["openenv", "other"]
    for response in (r, listed):
        assert VALUE not in response.content.decode()
    # At rest: only Fernet ciphertext, which decrypts back to the value.
    row = EnvironmentSecret.objects.get(organization=acme, name="openenv")
    assert VALUE not in json.dumps(list(EnvironmentSecret.objects.values()), default=str)
    assert row.ciphertext.startswith("gAAAAA") and row.created_by == alice
    assert environment_secret_reveal(acme, "openenv") == VALUE
    # Unique per organization.
    dup = create(as_alice, value="another")
    assert dup.status_code == 409 and dup.json()["error"]["code"] == "conflict"
    assert environment_secret_reveal(acme, "openenv") == VALUE  # unchanged
    assert as_alice.delete(f"{URL}/openenv").status_code == 204
    assert as_alice.delete(f"{URL}/openenv").status_code == 404
    assert [s["name"] for s in as_alice.get(URL).json()["results"]] == ["other"]


@pytest.mark.parametrize(
    "body, field",
    [
        ({"name": "Bad-Name", "value": "x"}, "name"),
        ({"name": "-lead", "value": "x"}, "name"),
        ({"name": "a" * 64, "value": "x"}, "name"),
        ({"name": "ok", "value": ""}, "value"),
        ({"name": "ok", "value": "x" * 4097}, "value"),
        ({"name": "ok", "value": "é" * 2049}, "value"),  # 4098 bytes in UTF-8
        ({"name": "ok"}, "value"),
        ({"name": "ok", "value": "x", "extra": 1}, "extra"),
    ],
)
def test_bad_input_is_a_400_naming_the_field_and_nothing_is_stored(as_alice, acme, body, field):
    r = as_alice.post(URL, body, format="json")
    assert r.status_code == 400, r.content
    assert field in r.json()["error"]["fields"]
    assert not EnvironmentSecret.objects.exists()


def test_value_of_exactly_the_limit_is_accepted(as_alice, acme):
    assert create(as_alice, value="x" * 4096).status_code == 201
    assert environment_secret_reveal(acme, "openenv") == "x" * 4096


def test_member_gets_403_everywhere(as_alice, as_bob, acme):
    assert create(as_alice).status_code == 201
    assert as_bob.get(URL).status_code == 403
    assert create(as_bob, "mine").status_code == 403
    assert as_bob.delete(f"{URL}/openenv").status_code == 403
    assert list(EnvironmentSecret.objects.values_list("name", flat=True)) == ["openenv"]


def test_outsider_sees_only_his_own_and_gets_404_for_acme_secret(as_alice, as_charlie, acme, globex):
    assert create(as_alice).status_code == 201
    assert as_charlie.get(URL).json()["results"] == []
    assert as_charlie.delete(f"{URL}/openenv").status_code == 404
    # The same name in globex is globex's own, separate secret.
    assert create(as_charlie, value="globex-value").status_code == 201
    assert environment_secret_reveal(acme, "openenv") == VALUE
    assert environment_secret_reveal(globex, "openenv") == "globex-value"
    # And acme's secret cannot be named by a globex job.
    assert as_charlie.delete(f"{URL}/openenv").status_code == 204
    r = as_charlie.post("/api/v1/jobs", remote_spec(), format="json")
    assert r.status_code == 400 and "environment.secret" in r.json()["error"]["fields"]


def test_submission_resolves_the_secret_in_the_job_organization(as_alice, acme):
    jobs = Job.objects.count()
    r = as_alice.post("/api/v1/jobs", remote_spec(), format="json")
    assert r.status_code == 400, r.content
    assert "environment.secret" in r.json()["error"]["fields"]
    for bad in (
        remote_spec(ref="http://env.example/arithmetic"),
        remote_spec(ref="opentinker/arithmetic@1.0.0"),
    ):
        r = as_alice.post("/api/v1/jobs", bad, format="json")
        assert r.status_code == 400 and "environment.secret" in r.json()["error"]["fields"], r.content
        assert "https://" in r.json()["error"]["fields"]["environment.secret"][0]
    assert Job.objects.count() == jobs
    assert create(as_alice).status_code == 201
    r = as_alice.post("/api/v1/jobs", remote_spec(), format="json")
    assert r.status_code == 201, r.content
    assert r.json()["spec"]["environment"]["secret"] == "openenv"
    assert VALUE not in r.content.decode()
    assert VALUE not in json.dumps(list(Job.objects.values("spec", "state_reason")))


def _admitted(acme, alice, secret=NAME):
    """A job naming the secret, admitted on a local CPU pool (not launched)."""
    from portal.actors import Actor
    from portal.services.jobs import job_submit

    make_pool("local", 2, cpu_slots=True, cpus=2)
    spec = example_rl_spec().model_copy(
        update={
            "environment": EnvironmentSpec(ref=REMOTE, secret=secret),
            "resources": ResourcesSpec(gpus=0, cpus=1, memory_gb=1, max_hours=1.0),
        }
    )
    job, _ = job_submit(organization=acme, actor=Actor.for_request(alice, None), spec=spec)
    assert job.pk in schedule_pass().admitted
    return job, Allocation.objects.get(job=job, released_at__isnull=True)


def test_launcher_puts_the_value_in_the_runtime_env_and_never_in_the_spec_file(
    as_alice, acme, alice, settings, tmp_path
):
    settings.OPENTINKER_JOBS_DIR = str(tmp_path / "jobs")
    assert create(as_alice).status_code == 201
    job, alloc = _admitted(acme, alice)
    env = job_env(job, alloc)
    assert env["OPENTINKER_ENV_SECRET"] == VALUE
    spec_path = write_spec(job, work_dir(job, alloc.attempt))
    on_disk = spec_path.read_text()
    assert VALUE not in on_disk and json.loads(on_disk)["environment"]["secret"] == "openenv"
    # A job without a secret gets no such variable.
    job.spec["environment"].pop("secret")
    assert "OPENTINKER_ENV_SECRET" not in job_env(job, alloc)


def test_secret_deleted_before_launch_fails_the_job_with_a_clear_reason(
    as_alice, acme, alice, settings, tmp_path
):
    settings.OPENTINKER_JOBS_DIR = str(tmp_path / "jobs")
    assert create(as_alice).status_code == 201
    job, alloc = _admitted(acme, alice)
    assert as_alice.delete(f"{URL}/openenv").status_code == 204
    assert launch(alloc.pk) == "failed"
    job.refresh_from_db()
    alloc.refresh_from_db()
    assert job.state == "failed"
    assert job.state_reason == "the environment secret 'openenv' was deleted after this job was submitted"
    assert alloc.released_at is not None and not alloc.launched_at
    events = json.dumps(list(JobEvent.objects.filter(job=job).values("message", "data")))
    assert "deleted after this job was submitted" in events and VALUE not in events


def test_token_without_org_admin_scope_gets_403(alice, acme, make_token):
    client = client_for(make_token(alice, acme, scopes=["jobs:read", "jobs:write"]))
    assert client.get(URL).status_code == 403
    assert create(client).status_code == 403
