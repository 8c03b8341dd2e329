"""Stored pages of the unfiltered job list (api/views/jobs.py, `_unfiltered_page`).

A stored page is served for one query (the organization's job count and version, portal.selectors.jobs.
job_list_version); any write to what the page shows changes the version, however it is made, so the next
list shows it. Pages are per organization, and the scope check runs before any page is looked up.
"""

from __future__ import annotations

import pytest
from django.contrib.auth import get_user_model
from django.db import connection

from api.views import jobs as job_views
from opentinker.spec import example_rl_spec
from portal.models import Job
from portal.selectors import jobs as job_selectors
from tests.conftest import client_for

# Committed writes, as in production: inside a test's transaction every write has the same transaction id,
# and pages are not stored inside a transaction at all.
pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.usefixtures("builtin_envs")]

SPEC = example_rl_spec().model_dump(mode="json")
AUTH_QUERIES = 2  # tests/api/test_api_hot_path.py
LIST = "/api/v1/jobs?limit=20"


@pytest.fixture(autouse=True)
def _empty_pages():
    job_views._PAGES.clear()
    yield
    job_views._PAGES.clear()


def _submit(client, name: str) -> str:
    r = client.post("/api/v1/jobs", {**SPEC, "name": name}, format="json")
    assert r.status_code == 201
    return r.json()["id"]


def _page(client) -> dict:
    r = client.get(LIST)
    assert r.status_code == 200
    return r.json()


def test_a_stored_page_costs_one_query_and_every_write_shows_at_once(
    as_alice, as_bob, bob, django_assert_num_queries
):
    first = _submit(as_alice, "a")
    _submit(as_bob, "b")
    assert [j["name"] for j in _page(as_alice)["results"]] == ["b", "a"]  # stored
    with django_assert_num_queries(AUTH_QUERIES + 1):
        assert _page(as_alice)["count"] == 2
    assert len(job_views._PAGES) == 1

    _submit(as_bob, "c")  # through the API
    assert [j["name"] for j in _page(as_alice)["results"]] == ["c", "b", "a"]
    Job.objects.filter(pk=first).update(state_reason="moved")  # no signal
    assert _page(as_alice)["results"][2]["state_reason"] == "moved"
    with connection.cursor() as c:  # behind the ORM's back
        c.execute("UPDATE portal_job SET priority = 7 WHERE id = %s", [first])
    assert _page(as_alice)["results"][2]["priority"] == 7
    assert as_alice.post(f"/api/v1/jobs/{first}/cancel", {}, format="json").status_code == 200
    assert _page(as_alice)["results"][2]["state"] == "cancelled"
    get_user_model().objects.filter(pk=bob.pk).update(username="robert")  # a creator renamed
    assert [j["created_by"] for j in _page(as_alice)["results"]] == ["robert", "robert", "alice"]
    Job.objects.filter(pk=first).delete()
    page = _page(as_alice)
    assert page["count"] == 2 and [j["name"] for j in page["results"]] == ["c", "b"]


def test_pages_are_per_organization_and_the_scope_is_checked_first(
    as_alice, as_bob, as_charlie, alice, acme, bob, make_token
):
    _submit(as_alice, "acme-job")
    _submit(as_charlie, "globex-job")  # the same count, limit and offset as acme's page
    assert [j["name"] for j in _page(as_alice)["results"]] == ["acme-job"]
    assert [j["name"] for j in _page(as_charlie)["results"]] == ["globex-job"]
    assert [j["name"] for j in _page(as_bob)["results"]] == ["acme-job"]  # a teammate: the same page
    assert len(job_views._PAGES) == 2
    no_jobs_scope = client_for(make_token(bob, acme, scopes=["envs:read"]))
    assert no_jobs_scope.get(LIST).status_code == 403
    assert client_for(None).get(LIST).status_code == 401


def test_filtered_lists_and_other_pages_are_not_mixed_up(as_alice):
    for name in ("x", "y", "z"):
        _submit(as_alice, name)
    assert [j["name"] for j in _page(as_alice)["results"]] == ["z", "y", "x"]
    second = as_alice.get("/api/v1/jobs?limit=1&offset=1").json()
    assert second["count"] == 3 and [j["name"] for j in second["results"]] == ["y"]
    filtered = as_alice.get("/api/v1/jobs?limit=20&name=y").json()
    assert filtered["count"] == 1 and [j["name"] for j in filtered["results"]] == ["y"]
    assert len(job_views._PAGES) == 2  # the filtered list is not stored


@pytest.mark.django_db(transaction=False)
def test_inside_a_transaction_nothing_is_stored(as_alice):
    _submit(as_alice, "x")
    assert [j["name"] for j in _page(as_alice)["results"]] == ["x"]
    assert job_views._PAGES == {}


def test_stored_pages_are_bounded_in_bytes_not_only_in_number(as_alice, monkeypatch):
    # A spec's environment config is free-form up to the body limit: 200 such jobs make a ~50 MB page, and
    # 64 stored pages (offsets 0..63) would hold gigabytes in every web process.
    monkeypatch.setattr(job_views, "MAX_PAGE_BYTES", 100_000)
    for name in ("x", "y", "z"):
        spec = {**SPEC, "name": name, "environment": {**SPEC["environment"], "config": {"pad": "p" * 40_000}}}
        assert as_alice.post("/api/v1/jobs", spec, format="json").status_code == 201
    for offset in (0, 1, 2):
        page = as_alice.get(f"/api/v1/jobs?limit=1&offset={offset}").json()
        assert [j["name"] for j in page["results"]] == [["z", "y", "x"][offset]]
    assert len(job_views._PAGES) == 2  # the least recently used one out
    assert [key[2] for key in job_views._PAGES] == [1, 2]
    whole = as_alice.get("/api/v1/jobs?limit=3").json()  # over the bound by itself: served, not stored
    assert [j["name"] for j in whole["results"]] == ["z", "y", "x"]
    assert [key[2] for key in job_views._PAGES] == [1, 2]
    assert len(whole["results"][0]["spec"]["environment"]["config"]["pad"]) == 40_000


def test_many_jobs_get_no_version_scan(as_alice, monkeypatch, django_assert_num_queries):
    # Versioning reads every job row of the organization (~40 ms for 50,000): above VERSIONED_MAX_JOBS only
    # the count (from the index) and the page are read, and nothing is stored.
    monkeypatch.setattr(job_selectors, "VERSIONED_MAX_JOBS", 2)
    ids = [_submit(as_alice, name) for name in ("x", "y", "z")]
    for _ in range(2):
        with django_assert_num_queries(AUTH_QUERIES + 2):
            page = _page(as_alice)
        assert page["count"] == 3 and [j["name"] for j in page["results"]] == ["z", "y", "x"]
    assert job_views._PAGES == {}
    Job.objects.filter(pk=ids[0]).delete()
    assert [j["name"] for j in _page(as_alice)["results"]] == ["z", "y"]
    assert len(job_views._PAGES) == 1  # two jobs: versioned and stored again
