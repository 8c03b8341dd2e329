"""Shared fixtures: the three actors of every API test module.

- alice: owner of org "acme"
- bob: a teammate in "acme" with a lesser role (member; some tests make him a viewer)
- charlie: outsider, owner of org "globex", who must get 404 for every object of acme
"""

from __future__ import annotations

from dataclasses import dataclass

import httpx
import pytest
from rest_framework.test import APIClient

from portal.models import Membership, Role
from portal.services.orgs import organization_create
from portal.services.tokens import token_create
from tests.ray_session import ray_job_api, ray_session  # noqa: F401 (the session's one Ray cluster)

ALL_SCOPES = ["jobs:read", "jobs:write", "envs:read", "envs:write", "org:admin"]


@pytest.fixture(autouse=True)
def _fast_password_hashing(settings):
    # PBKDF2's deliberate slowness costs ~0.3 s per user; tests create many.
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]


@pytest.fixture
def make_user(django_user_model):
    def make(username: str, *, staff: bool = False, password: str = "correct-horse-battery"):  # noqa: S107
        return django_user_model.objects.create_user(
            username=username, email=f"{username}@example.com", password=password, is_staff=staff
        )

    return make


@pytest.fixture
def alice(make_user):
    return make_user("alice")


@pytest.fixture
def bob(make_user):
    return make_user("bob")


@pytest.fixture
def charlie(make_user):
    return make_user("charlie")


@pytest.fixture
def acme(alice, bob):
    org = organization_create(slug="acme", name="Acme", owner=alice)
    Membership.objects.create(organization=org, user=bob, role=Role.MEMBER)
    return org


@pytest.fixture
def globex(charlie):
    return organization_create(slug="globex", name="Globex", owner=charlie)


def _membership(user, org):
    return Membership.objects.select_related("user", "organization").get(user=user, organization=org)


@pytest.fixture
def make_token():
    def make(user, org, scopes=None, **kwargs) -> str:
        membership = _membership(user, org)
        if scopes is None:
            from portal.roles import scopes_for

            scopes = sorted(set(ALL_SCOPES) & scopes_for(membership.role, is_staff=False))
        _, secret = token_create(membership=membership, name=f"{user.username}-test", scopes=scopes, **kwargs)
        return secret

    return make


def client_for(secret: str | None) -> APIClient:
    client = APIClient()
    if secret:
        client.credentials(HTTP_AUTHORIZATION=f"Bearer {secret}")
    return client


@pytest.fixture
def as_alice(alice, acme, make_token):
    return client_for(make_token(alice, acme))


@pytest.fixture
def as_bob(bob, acme, make_token):
    return client_for(make_token(bob, acme))


@pytest.fixture
def as_charlie(charlie, globex, make_token):
    return client_for(make_token(charlie, globex))


@dataclass
class S3Store:
    endpoint: str
    bucket: str
    client: object  # boto3 S3 client


@pytest.fixture
def s3_store(settings, monkeypatch):
    """A real S3 API (moto's server over HTTP) as the platform's object store: `s3://otk-store/store`."""
    import boto3
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    try:
        host, port = server.get_host_and_port()
        endpoint = f"http://{host}:{port}"
        # moto keeps its buckets in process-wide state: start each test from an empty store.
        httpx.post(f"{endpoint}/moto-api/reset").raise_for_status()
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
        monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
        settings.S3_ENDPOINT_URL = endpoint
        settings.OBJECT_STORE_URL = "s3://otk-store/store"
        client = boto3.client("s3", endpoint_url=endpoint)
        client.create_bucket(Bucket="otk-store")
        yield S3Store(endpoint=endpoint, bucket="otk-store", client=client)
    finally:
        server.stop()


@pytest.fixture
def builtin_envs(db):
    """The built-in environments, as the data migrations publish them.

    A transactional test's flush removes migration data; serialized_rollback cannot restore it reliably once
    an earlier flush re-created content types, so transactional tests that need the built-ins ask for this.
    """
    import importlib

    from django.apps import apps

    for name in (
        "0002_fill_builtin_environments",
        "0003_fill_more_builtin_environments",
        "0008_fill_answer_match_environment",
    ):
        importlib.import_module(f"env_registry.migrations.{name}").fill(apps, None)


@pytest.fixture(autouse=True)
def _no_signin_throttle_counts(request):
    # Sign-in failures and sign-ups are counted in Valkey (portal/services/throttle.py), which outlives a
    # test's database transaction: each database test starts with none, whatever ran before it.
    if request.node.get_closest_marker("django_db") is not None:
        from portal.services.throttle import throttle_reset

        throttle_reset()


@pytest.fixture(autouse=True)
def _builtins_for_every_database_test(request):
    # Tests run after a transactional test's flush still see the built-ins, as a fresh database would.
    if request.node.get_closest_marker("django_db") is not None:
        request.getfixturevalue("builtin_envs")
