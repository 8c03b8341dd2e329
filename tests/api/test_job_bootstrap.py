"""Bootstrap tokens: a Ray job's runtime trades one, once, before it expires, for its job token and its
environment secret (POST /api/v1/ingest/jobs/<id>/bootstrap). Actors: alice (acme), charlie (globex)."""

from __future__ import annotations

import json
from datetime import timedelta

import pytest
from django.utils import timezone
from rest_framework.test import APIClient

from gpu_runtime.bootstrap import BootstrapError, redeem
from portal.models import Allocation, EnvironmentSecret
from portal.services.job_bootstrap import bootstrap_issue
from portal.services.job_tokens import job_ingest_url, job_token_verify
from portal.services.supervision import allocation_release
from tests.api.test_env_secrets import NAME, VALUE, _admitted, create
from tests.api.test_stream import uvicorn_url  # noqa: F401 (fixture)

pytestmark = pytest.mark.django_db


def exchange(job, raw: str, job_id=None):
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {raw}")
    return client.post(f"/api/v1/ingest/jobs/{job_id or job.id}/bootstrap", format="json")


@pytest.fixture
def admitted(as_alice, acme, alice):
    assert create(as_alice).status_code == 201
    return _admitted(acme, alice)


def test_a_bootstrap_token_gives_the_job_token_and_the_secret_exactly_once(admitted):
    job, alloc = admitted
    raw = bootstrap_issue(alloc)
    assert raw.startswith("otb_") and len(raw) == 47
    # Only its keyed hash is stored.
    assert raw not in json.dumps(list(Allocation.objects.values()), default=str)
    r = exchange(job, raw)
    assert r.status_code == 200, r.content
    assert r["Cache-Control"] == "no-store"
    body = r.json()
    assert set(body) == {"job_token", "environment_secret"}
    assert body["environment_secret"] == VALUE
    assert job_token_verify(body["job_token"]) == job
    again = exchange(job, raw)
    assert again.status_code == 401
    assert again.json()["error"]["message"] == "invalid, expired or already used bootstrap token"
    assert Allocation.objects.get(pk=alloc.pk).bootstrap_digest == ""


def test_an_expired_token_is_refused_and_spent(admitted):
    job, alloc = admitted
    raw = bootstrap_issue(alloc, ttl_s=60)
    Allocation.objects.filter(pk=alloc.pk).update(bootstrap_expires_at=timezone.now() - timedelta(seconds=1))
    assert exchange(job, raw).status_code == 401
    Allocation.objects.filter(pk=alloc.pk).update(bootstrap_expires_at=timezone.now() + timedelta(seconds=60))
    assert exchange(job, raw).status_code == 401  # the refused try spent it: it never works again


def test_the_ttl_defaults_to_ten_minutes_and_is_configurable(admitted, settings):
    _, alloc = admitted

    def issued_ttl() -> tuple[timedelta, timedelta]:
        """The token's life from before and from after it was issued (exact, however slow the machine)."""
        before = timezone.now()
        bootstrap_issue(alloc)
        after = timezone.now()
        expires = Allocation.objects.get(pk=alloc.pk).bootstrap_expires_at
        return expires - after, expires - before

    shortest, longest = issued_ttl()
    assert shortest <= timedelta(seconds=600) <= longest
    settings.OPENTINKER_BOOTSTRAP_TTL_S = 30
    shortest, longest = issued_ttl()
    assert shortest <= timedelta(seconds=30) <= longest


def test_wrong_job_released_allocation_reissued_and_foreign_credentials_are_refused(
    admitted, acme, alice, globex, charlie, make_token
):
    job, alloc = admitted
    raw = bootstrap_issue(alloc)
    assert exchange(job, raw, job_id="00000000-0000-0000-0000-000000000000").status_code == 401
    assert exchange(job, raw, job_id="not-a-uuid").status_code == 401
    # Those tries named another job: the token is still good for its own (unspent), until it is issued again.
    assert Allocation.objects.get(pk=alloc.pk).bootstrap_digest != ""
    newer = bootstrap_issue(alloc)
    assert exchange(job, raw).status_code == 401
    for bad in (make_token(alice, acme), make_token(charlie, globex), "otb_short", "otb_" + "A" * 200, ""):
        assert exchange(job, bad).status_code == 401
    assert exchange(job, newer).status_code == 200
    fresh = bootstrap_issue(alloc)
    allocation_release(Allocation.objects.get(pk=alloc.pk), reason="test")
    assert exchange(job, fresh).status_code == 401  # its allocation is gone


def test_a_job_without_a_secret_gets_null_and_a_deleted_secret_is_a_409(admitted, acme, alice):
    job, alloc = admitted
    raw = bootstrap_issue(alloc)
    EnvironmentSecret.objects.filter(organization=acme, name=NAME).delete()
    r = exchange(job, raw)
    assert r.status_code == 409 and NAME in r.json()["error"]["message"]
    job.spec["environment"].pop("secret")
    job.save(update_fields=["spec"])
    r = exchange(job, bootstrap_issue(alloc))
    assert r.status_code == 200 and r.json()["environment_secret"] is None


@pytest.mark.django_db(transaction=True)
def test_the_runtime_redeems_it_over_http_into_its_environment(
    uvicorn_url,  # noqa: F811
    as_alice,
    acme,
    alice,
):
    assert create(as_alice).status_code == 201
    job, alloc = _admitted(acme, alice)
    raw = bootstrap_issue(alloc)
    environ = {"OPENTINKER_BOOTSTRAP_TOKEN": raw, "OPENTINKER_INGEST_URL": job_ingest_url(job, uvicorn_url)}
    assert redeem(environ) is True
    assert environ["OPENTINKER_ENV_SECRET"] == VALUE
    assert job_token_verify(environ["OPENTINKER_JOB_TOKEN"]) == job
    assert "OPENTINKER_BOOTSTRAP_TOKEN" not in environ  # children never inherit it
    # A copy of the token read from the cluster's job API is worth nothing now.
    environ = {"OPENTINKER_BOOTSTRAP_TOKEN": raw, "OPENTINKER_INGEST_URL": job_ingest_url(job, uvicorn_url)}
    with pytest.raises(BootstrapError, match=r"refused the bootstrap token \(401\)"):
        redeem(environ, attempts=1)
    assert "OPENTINKER_JOB_TOKEN" not in environ and "OPENTINKER_ENV_SECRET" not in environ
    assert redeem({}) is False  # not bootstrapped (the local driver): nothing to do


def test_a_model_server_job_gets_its_token_and_queue_url_not_in_the_ray_env(settings):
    """A Tinker model server's job (portal/services/model_servers.py): the driver gives it its base model's
    token and the queue's URL; on Ray they come through the bootstrap token, never in the runtime_env."""
    from portal.models import ComputePool
    from portal.services.model_server_tokens import model_server_token_verify
    from portal.services.model_servers import model_server_ensure
    from workers.drivers import job_env
    from workers.drivers.ray import SECRET_VARS

    job, _ = model_server_ensure("tiny-qwen2")
    pool = ComputePool.objects.create(name="ray-a", driver="ray", health=ComputePool.Health.HEALTHY)
    alloc = Allocation.objects.create(job=job, pool=pool, slots=1)
    env = job_env(job, alloc)
    assert env["OPENTINKER_QUEUE_URL"] == settings.REDIS_URL
    assert env["OPENTINKER_TINKER_INGEST_URL"] == f"{settings.INGEST_BASE_URL}/tinker/ingest/outcomes"
    assert model_server_token_verify(env["OPENTINKER_MODEL_SERVER_TOKEN"]) == "tiny-qwen2"
    assert {"OPENTINKER_MODEL_SERVER_TOKEN", "OPENTINKER_QUEUE_URL"} <= SECRET_VARS  # never in runtime_env
    body = exchange(job, bootstrap_issue(alloc)).json()
    assert set(body) == {"job_token", "environment_secret", "model_server_token", "queue_url"}
    assert model_server_token_verify(body["model_server_token"]) == "tiny-qwen2"
    assert body["queue_url"] == settings.REDIS_URL
    assert body["environment_secret"] is None
