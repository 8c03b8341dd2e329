"""The API's hot path (list and detail of jobs with a token) costs an exact number of SQL queries.

Token authentication is one query for the token (with its user and organization) and one for the owner's
membership; with API_AUTH_CACHE_SECONDS (the production server's 2 s) a process skips both for a token it
authenticated moments ago, and forgets them on any write to tokens, memberships, users or organizations.
"""

from __future__ import annotations

import pytest

from opentinker.spec import example_rl_spec
from portal.models import ApiToken, Membership

pytestmark = pytest.mark.django_db

SPEC = example_rl_spec().model_dump(mode="json")
AUTH_QUERIES = 2  # the token with its user and organization; the owner's membership


@pytest.fixture
def jobs(as_alice):
    for i in range(3):
        assert as_alice.post("/api/v1/jobs", {**SPEC, "name": f"j{i}"}, format="json").status_code == 201
    # The first use of a token records last_used_at (at most once a minute): not part of the steady state.
    assert as_alice.get("/api/v1/jobs?limit=20").status_code == 200


def test_job_list_costs_three_queries(as_alice, jobs, django_assert_num_queries):
    with django_assert_num_queries(AUTH_QUERIES + 1):  # + the page's rows, each with the total count
        r = as_alice.get("/api/v1/jobs?limit=20")
    assert r.status_code == 200
    assert len(r.json()["results"]) == 3
    assert r.json()["count"] == 3


def test_an_empty_job_page_still_counts(as_alice, jobs, django_assert_num_queries):
    with django_assert_num_queries(AUTH_QUERIES + 2):  # no row to carry the count: a count of its own
        r = as_alice.get("/api/v1/jobs?limit=2&offset=5")
    assert r.status_code == 200
    assert r.json()["count"] == 3 and r.json()["results"] == []
    page = as_alice.get("/api/v1/jobs?limit=2&offset=2").json()
    assert page["count"] == 3 and len(page["results"]) == 1 and page["next"] is None
    assert as_alice.get("/api/v1/jobs?limit=2").json()["next"].endswith("limit=2&offset=2")


def test_job_detail_costs_three_queries(as_alice, jobs, django_assert_num_queries):
    job_id = as_alice.get("/api/v1/jobs?limit=1").json()["results"][0]["id"]
    with django_assert_num_queries(AUTH_QUERIES + 1):
        r = as_alice.get(f"/api/v1/jobs/{job_id}")
    assert r.status_code == 200
    assert r.json()["id"] == job_id


def test_revocation_and_removal_are_honoured_on_the_next_request(as_alice, alice, acme, jobs):
    ApiToken.objects.filter(user=alice).update(revoked_at="2020-01-01T00:00:00Z")
    assert as_alice.get("/api/v1/jobs?limit=20").status_code == 401
    ApiToken.objects.filter(user=alice).update(revoked_at=None)
    assert as_alice.get("/api/v1/jobs?limit=20").status_code == 200
    Membership.objects.filter(user=alice, organization=acme).delete()
    assert as_alice.get("/api/v1/jobs?limit=20").status_code == 401


@pytest.fixture
def auth_cache(settings):
    from portal.services import token_cache

    settings.API_AUTH_CACHE_SECONDS = 60
    token_cache.forget_all()
    yield token_cache
    token_cache.forget_all()


def test_with_the_auth_cache_a_list_costs_its_page_alone(
    as_alice, jobs, auth_cache, django_assert_num_queries
):
    assert as_alice.get("/api/v1/jobs?limit=20").status_code == 200  # authenticates, remembers
    with django_assert_num_queries(1):
        assert as_alice.get("/api/v1/jobs?limit=20").status_code == 200


def test_with_the_auth_cache_a_revocation_applies_at_once(as_alice, alice, acme, jobs, auth_cache):
    from portal.services.tokens import token_revoke

    assert as_alice.get("/api/v1/jobs?limit=20").status_code == 200
    membership = Membership.objects.select_related("user").get(user=alice, organization=acme)
    token_revoke(by=membership, token=ApiToken.objects.get(user=alice), manage_all=False)
    assert as_alice.get("/api/v1/jobs?limit=20").status_code == 401


def test_with_the_auth_cache_a_demotion_applies_at_once(as_alice, alice, acme, jobs, auth_cache):
    assert as_alice.post("/api/v1/jobs", {**SPEC, "name": "x"}, format="json").status_code == 201
    membership = Membership.objects.get(user=alice, organization=acme)
    membership.role = "viewer"
    membership.save()
    assert as_alice.post("/api/v1/jobs", {**SPEC, "name": "y"}, format="json").status_code == 403


def test_a_revocation_on_another_thread_during_an_authentication_applies_at_once(
    as_alice, alice, acme, jobs, auth_cache, monkeypatch
):
    """The production server runs a process's requests on several threads: a revocation in this process that
    lands while another request authenticates (its rows already read) must not leave that request's entry."""
    from portal.services.tokens import token_revoke

    authenticate = auth_cache.token_authenticate

    def revoked_meanwhile(raw):
        found = authenticate(raw)  # read before the revocation: the token was live
        membership = Membership.objects.select_related("user").get(user=alice, organization=acme)
        token_revoke(by=membership, token=ApiToken.objects.get(user=alice), manage_all=False)
        return found

    monkeypatch.setattr(auth_cache, "token_authenticate", revoked_meanwhile)
    assert as_alice.get("/api/v1/jobs?limit=20").status_code == 200  # authenticated before the revocation
    monkeypatch.setattr(auth_cache, "token_authenticate", authenticate)
    assert as_alice.get("/api/v1/jobs?limit=20").status_code == 401


def test_a_change_made_elsewhere_applies_when_the_entry_ends(as_alice, alice, jobs, auth_cache, monkeypatch):
    assert as_alice.get("/api/v1/jobs?limit=20").status_code == 200
    # Another process revokes (here: an update() that sends no signal): this process trusts its entry...
    ApiToken.objects.filter(user=alice).update(revoked_at="2020-01-01T00:00:00Z")
    assert as_alice.get("/api/v1/jobs?limit=20").status_code == 200
    # ...until it ends.
    later = auth_cache.time.monotonic() + 61
    monkeypatch.setattr(auth_cache.time, "monotonic", lambda: later)
    assert as_alice.get("/api/v1/jobs?limit=20").status_code == 401


def test_the_auth_cache_needs_the_exact_secret_and_checks_expiry(as_alice, alice, jobs, auth_cache):
    from tests.conftest import client_for

    secret = as_alice._credentials["HTTP_AUTHORIZATION"].removeprefix("Bearer ")
    assert as_alice.get("/api/v1/jobs?limit=20").status_code == 200
    wrong = secret[:-1] + ("A" if secret[-1] != "A" else "B")
    assert client_for(wrong).get("/api/v1/jobs?limit=20").status_code == 401
    ApiToken.objects.filter(user=alice).update(expires_at="2020-01-01T00:00:00Z")
    for entry in auth_cache._entries.values():  # as another process would have seen it
        token = entry[2]
        token.expires_at = ApiToken.objects.get(pk=token.pk).expires_at
    assert as_alice.get("/api/v1/jobs?limit=20").status_code == 401


def _later(auth_cache, monkeypatch, seconds: float) -> None:
    later = auth_cache.time.monotonic() + seconds
    monkeypatch.setattr(auth_cache.time, "monotonic", lambda: later)


@pytest.fixture
def short_auth_cache(auth_cache, settings):
    settings.API_AUTH_CACHE_SECONDS = 2  # the production server's
    return auth_cache


def test_an_unchanged_token_is_trusted_again_for_one_query(
    as_alice, jobs, short_auth_cache, monkeypatch, django_assert_num_queries
):
    assert as_alice.get("/api/v1/jobs?limit=20").status_code == 200  # authenticates, remembers
    _later(short_auth_cache, monkeypatch, 3)  # the entry has ended
    with django_assert_num_queries(1 + 1):  # the row versions, then the page; no authentication
        assert as_alice.get("/api/v1/jobs?limit=20").status_code == 200
    with django_assert_num_queries(1):  # trusted again for another 2 s
        assert as_alice.get("/api/v1/jobs?limit=20").status_code == 200
    _later(short_auth_cache, monkeypatch, 61)  # a full authentication at least once a minute (last_used_at)
    with django_assert_num_queries(1 + AUTH_QUERIES + 1):
        assert as_alice.get("/api/v1/jobs?limit=20").status_code == 200


@pytest.mark.parametrize("change", ["revoke", "deactivate", "remove", "demote", "rename org"])
def test_any_change_made_elsewhere_applies_when_the_entry_ends(
    as_alice, alice, acme, jobs, short_auth_cache, monkeypatch, django_assert_num_queries, change
):
    assert as_alice.get("/api/v1/jobs?limit=20").status_code == 200
    # Another process writes (update() and delete() of querysets send no signal to this process's cache).
    mine = Membership.objects.filter(user=alice, organization=acme)
    if change == "revoke":
        ApiToken.objects.filter(user=alice).update(revoked_at="2020-01-01T00:00:00Z")
    elif change == "deactivate":
        type(alice).objects.filter(pk=alice.pk).update(is_active=False)
    elif change == "remove":
        mine._raw_delete(mine.db)  # delete() would signal this process's cache
    elif change == "demote":
        mine.update(role="viewer")
    else:
        type(acme).objects.filter(pk=acme.pk).update(name="Acme Renamed")
    assert as_alice.get("/api/v1/jobs?limit=20").status_code == 200  # its entry still holds...
    _later(short_auth_cache, monkeypatch, 3)  # ...until it ends: the versions differ, a full authentication
    if change == "demote":
        assert as_alice.post("/api/v1/jobs", {**SPEC, "name": "y"}, format="json").status_code == 403
    elif change == "rename org":
        with django_assert_num_queries(1 + AUTH_QUERIES + 1):
            assert as_alice.get("/api/v1/jobs?limit=20").status_code == 200
        entry = next(iter(short_auth_cache._entries.values()))
        assert entry[2].organization.name == "Acme Renamed"
    else:
        assert as_alice.get("/api/v1/jobs?limit=20").status_code == 401
