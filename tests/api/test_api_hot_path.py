"""The API's hot path (list and detail of jobs with a token) costs an exact number of SQL queries.

Token authentication is one query for the token (with its user and organization) and one for the owner's
membership; nothing is cached, so a revoked token or a removed member is refused on the very next request.
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


def test_job_list_costs_four_queries(as_alice, jobs, django_assert_num_queries):
    with django_assert_num_queries(AUTH_QUERIES + 2):  # + the page's count and its rows
        r = as_alice.get("/api/v1/jobs?limit=20")
    assert r.status_code == 200
    assert len(r.json()["results"]) == 3


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
