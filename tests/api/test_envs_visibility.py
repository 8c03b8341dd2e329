"""`private` means its publisher and the organization's admins, not every member (issue 5).

Actors: dave (a plain member of acme) publishes acme/secret privately; alice (owner of acme) and erin (an
admin of acme) see it; bob (another plain member of acme) and charlie (owner of globex, the outsider) get the
same 404 on every endpoint and a 400 on `environment.ref` when a job names it. Switching it to
`organization` shows it to bob.
"""

from __future__ import annotations

import json

import pytest

from env_registry.models import EnvironmentPackage, EnvironmentVersion, Star
from portal.models import Job, Membership, Role
from tests.api.test_envs import V1, job_with, package, store, upload  # noqa: F401 (store: fixture)
from tests.conftest import client_for

pytestmark = pytest.mark.django_db

URLS = [
    ("get", f"{V1}/envs/acme/secret", None),
    ("put", f"{V1}/envs/acme/secret/star", None),
    ("delete", f"{V1}/envs/acme/secret/star", None),
    ("post", f"{V1}/envs/acme/secret/fork", {"name": "mine"}),
    ("get", f"{V1}/envs/acme/secret/versions/1.2.3/archive", None),
]


@pytest.fixture
def dave(make_user, acme):
    user = make_user("dave")
    Membership.objects.create(organization=acme, user=user, role=Role.MEMBER)
    return user


@pytest.fixture
def erin(make_user, acme):
    user = make_user("erin")
    Membership.objects.create(organization=acme, user=user, role=Role.ADMIN)
    return user


@pytest.fixture
def as_dave(dave, acme, make_token):
    return client_for(make_token(dave, acme))


@pytest.fixture
def as_erin(erin, acme, make_token):
    return client_for(make_token(erin, acme))


@pytest.fixture
def secret(as_dave, store):  # noqa: F811
    resp = upload(as_dave, package(name="secret"))
    assert resp.status_code == 201, resp.content
    assert resp.json()["visibility"] == "private"
    return resp.json()


def listed(client) -> list[str]:
    return [f"{e['owner']}/{e['name']}" for e in client.get(f"{V1}/envs?q=acme").json()["results"]]


def test_publisher_and_admins_see_a_private_package(as_dave, as_alice, as_erin, secret):
    for client in (as_dave, as_alice, as_erin):
        assert listed(client) == ["acme/secret"]
        body = client.get(f"{V1}/envs/acme/secret").json()
        assert (body["visibility"], body["versions"][0]["uploaded_by"]) == ("private", "dave")
        archive = client.get(f"{V1}/envs/acme/secret/versions/1.2.3/archive")
        assert archive.status_code == 200
    assert as_erin.put(f"{V1}/envs/acme/secret/star").json() == {"starred": True, "stars": 1}
    # The publisher's and an admin's jobs may use it.
    for client in (as_dave, as_erin):
        resp = client.post(f"{V1}/jobs", job_with("acme/secret@1.2.3"), format="json")
        assert resp.status_code == 201, resp.content


def test_another_member_gets_the_outsiders_404_everywhere(as_bob, as_charlie, secret):
    before = list(EnvironmentPackage.objects.order_by("pk").values())
    for client in (as_bob, as_charlie):
        assert listed(client) == []
        for method, url, body in URLS:
            resp = getattr(client, method)(url, body, format="json")
            assert resp.status_code == 404, (method, url, resp.content)
            # The same answer as for a package that does not exist: nothing confirms it is there.
            missing = getattr(client, method)(url.replace("secret", "nothing"), body, format="json")
            assert resp.json() == json.loads(missing.content.decode().replace("nothing", "secret"))
        resp = client.post(f"{V1}/jobs", job_with("acme/secret@1.2.3"), format="json")
        assert resp.status_code == 400
        error = resp.json()["error"]
        assert error["fields"] == {"environment.ref": ["no environment acme/secret"]}
    assert list(EnvironmentPackage.objects.order_by("pk").values()) == before
    assert Star.objects.count() == 0 and Job.objects.count() == 0


def test_a_member_cannot_publish_into_or_retitle_a_private_package(as_bob, as_dave, secret, store):  # noqa: F811
    # A new version of a package bob cannot see: the same 404, and nothing stored.
    resp = upload(as_bob, package(name="secret", version="2.0.0"))
    assert resp.status_code == 404 and resp.json()["error"]["message"] == (
        "no environment acme/secret you may publish to"
    )
    assert not (store / "orgs/acme/envs/secret/2.0.0.tar.gz").exists()
    # The publisher, a plain member, may add versions but not change the settings (admins do).
    resp = as_dave.patch(f"{V1}/envs/acme/secret", {"visibility": "public"}, format="json")
    assert resp.status_code == 403 and "only an admin or owner of acme" in resp.json()["error"]["message"]
    resp = upload(as_dave, package(name="secret", version="2.0.0"), visibility="public")
    assert resp.status_code == 403
    assert upload(as_dave, package(name="secret", version="2.0.0")).status_code == 201
    assert EnvironmentPackage.objects.get(name="secret").visibility == "private"
    assert sorted(
        EnvironmentVersion.objects.values_list("version", flat=True).filter(package__name="secret")
    ) == ["1.2.3", "2.0.0"]


def test_organization_visibility_shows_it_to_every_member(as_alice, as_bob, as_charlie, secret):
    resp = as_alice.patch(f"{V1}/envs/acme/secret", {"visibility": "organization"}, format="json")
    assert resp.status_code == 200 and resp.json()["visibility"] == "organization"
    assert listed(as_bob) == ["acme/secret"]
    assert as_bob.get(f"{V1}/envs/acme/secret").status_code == 200
    assert as_bob.post(f"{V1}/jobs", job_with("acme/secret@1.2.3"), format="json").status_code == 201
    fork = as_bob.post(f"{V1}/envs/acme/secret/fork", {"name": "bobs"}, format="json").json()
    assert (fork["forked_from"], fork["visibility"]) == ("acme/secret", "private")
    assert listed(as_charlie) == [] and as_charlie.get(f"{V1}/envs/acme/secret").status_code == 404
    # Private again: bob's fork (his, private) no longer names its source he cannot see.
    as_alice.patch(f"{V1}/envs/acme/secret", {"visibility": "private"}, format="json")
    assert as_bob.get(f"{V1}/envs/acme/bobs").json()["forked_from"] is None
    assert as_alice.get(f"{V1}/envs/acme/bobs").json()["forked_from"] == "acme/secret"
    assert as_bob.get(f"{V1}/envs/acme/secret").status_code == 404


def test_a_token_sees_with_its_owners_current_role(as_erin, erin, acme, secret):
    assert as_erin.get(f"{V1}/envs/acme/secret").status_code == 200
    Membership.objects.filter(user=erin, organization=acme).update(role=Role.MEMBER)
    assert as_erin.get(f"{V1}/envs/acme/secret").status_code == 404
    assert listed(as_erin) == []
