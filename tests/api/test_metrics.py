"""``GET /metrics``: who may scrape it, and what a scrape shows after real requests, jobs, passes and ingest.

Actors: alice (owner of acme) makes API requests and submits jobs; charlie (outsider, globex) has a job of
his own; the scraper is nobody's user. Counters are process-wide (and the Valkey ones cluster-wide), so each
test reads a value before and after what it does and checks the difference.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
import pytest
from django.test import Client
from prometheus_client.parser import text_string_to_metric_families

from opentinker.egress import parse_networks
from opentinker.spec import JobState
from portal.actors import Actor
from portal.models import Job
from portal.services.ingest import metrics_ingest
from portal.services.jobs import job_transition
from portal.services.scheduler import schedule_pass
from tests.api.test_stream import Viewer, running_uvicorn
from tests.workers.conftest import make_pool, set_quota, submit

pytestmark = pytest.mark.django_db
BASE = Path(__file__).resolve().parents[2]
DASHBOARD = BASE / "deploy" / "grafana" / "opentinker.json"
TOKEN = "m" * 40
SCRAPER = {"HTTP_AUTHORIZATION": f"Bearer {TOKEN}"}
JOB_ROUTE = "api/v1/jobs/<str:job_id>"


@pytest.fixture
def scrape_on(settings):
    settings.METRICS_TOKEN = TOKEN
    settings.METRICS_ALLOW_FROM = ()


Samples = dict[tuple[str, frozenset], float]


def scrape(**extra) -> Samples:
    resp = Client().get("/metrics", **{**SCRAPER, **extra})
    assert resp.status_code == 200, resp.content
    assert resp["Content-Type"].startswith("text/plain; version=")
    samples: Samples = {}
    for family in text_string_to_metric_families(resp.content.decode()):
        for s in family.samples:
            samples[(s.name, frozenset(s.labels.items()))] = s.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def exposed_names() -> set[str]:
    """Every series name a query may use, families with no sample yet included (a counter as ``_total``)."""
    resp = Client().get("/metrics", **SCRAPER)
    names: set[str] = set()
    for family in text_string_to_metric_families(resp.content.decode()):
        names.add(family.name + ("_total" if family.type == "counter" else ""))
        names.update(s.name for s in family.samples)
    return names


def series(samples: Samples, name: str) -> list[dict[str, str]]:
    return [dict(labels) for (n, labels) in samples if n == name]


# --- who may scrape ---


def test_metrics_are_absent_until_the_operator_configures_a_credential(settings, as_alice):
    settings.METRICS_TOKEN, settings.METRICS_ALLOW_FROM = "", ()
    assert Client().get("/metrics", **SCRAPER).status_code == 404
    # A tenant's own API token is no key to it either.
    assert as_alice.get("/metrics").status_code == 404


def test_the_scraper_needs_the_bearer_token(scrape_on, as_alice):
    for headers in ({}, {"HTTP_AUTHORIZATION": "Bearer " + "x" * 40}, {"HTTP_AUTHORIZATION": TOKEN}):
        resp = Client().get("/metrics", **headers)
        assert resp.status_code == 401
        assert resp["WWW-Authenticate"] == 'Bearer realm="metrics"'
        assert b"opentinker_" not in resp.content
    assert as_alice.get("/metrics").status_code == 401  # a tenant's token: refused
    assert Client().get("/metrics", **SCRAPER).status_code == 200
    assert Client().post("/metrics", **SCRAPER).status_code == 405


def test_an_allow_listed_peer_needs_no_token_and_a_forwarded_address_is_not_believed(settings):
    settings.METRICS_TOKEN = ""
    settings.METRICS_ALLOW_FROM = parse_networks("10.1.0.0/16, fd00::1")
    assert Client(REMOTE_ADDR="10.1.2.3").get("/metrics").status_code == 200
    assert Client(REMOTE_ADDR="fd00::1").get("/metrics").status_code == 200
    outside = Client(REMOTE_ADDR="192.0.2.7")
    assert outside.get("/metrics").status_code == 401
    assert outside.get("/metrics", HTTP_X_FORWARDED_FOR="10.1.2.3").status_code == 401


# --- requests per route ---


def test_requests_are_counted_and_timed_by_route_pattern_never_by_path(scrape_on, as_alice):
    before = scrape()
    ids = [uuid.uuid4() for _ in range(3)]
    for job_id in ids:
        assert as_alice.get(f"/api/v1/jobs/{job_id}").status_code == 404
    assert as_alice.get("/api/v1/jobs").status_code == 200
    assert as_alice.get("/api/v1/no-such-thing").status_code == 404
    after = scrape()

    def delta(name, **labels):
        return value(after, name, **labels) - value(before, name, **labels)

    assert delta("opentinker_http_requests_total", route=JOB_ROUTE, method="GET", status="404") == 3
    assert delta("opentinker_http_request_duration_seconds_count", route=JOB_ROUTE, method="GET") == 3
    assert (
        delta("opentinker_http_request_duration_seconds_bucket", route=JOB_ROUTE, method="GET", le="+Inf")
        == 3
    )
    assert delta("opentinker_http_requests_total", route="api/v1/jobs", method="GET", status="200") == 1
    assert delta("opentinker_http_requests_total", route="<unmatched>", method="GET", status="404") == 1
    # No label anywhere holds a job id or a raw path: the label values are bounded by the URL patterns.
    text = json.dumps([sorted(labels) for (_, labels) in after])
    assert not any(str(job_id) in text for job_id in ids)
    assert "no-such-thing" not in text


def test_an_unusual_method_is_labelled_other(scrape_on, as_alice):
    before = scrape()
    as_alice.generic("PROPFIND", "/api/v1/jobs")
    after = scrape()
    labels = {"route": "api/v1/jobs", "method": "other", "status": "405"}
    assert (
        value(after, "opentinker_http_requests_total", **labels)
        - value(before, "opentinker_http_requests_total", **labels)
        == 1
    )


# --- jobs, queue, scheduler, ingest, runtime ---


def test_jobs_by_state_and_the_queue_per_pool_come_from_the_rows(scrape_on, acme, globex):
    set_quota(acme, max_queued_jobs=50)
    for i in range(3):
        submit(acme, gpus=1, name=f"q{i}")
    submit(globex, gpus=1, name="pinned", pool="gpu-b")
    cancelled = submit(globex, gpus=1, name="gone")
    job_transition(job=cancelled, to=JobState.CANCELLED, actor=Actor.system("test"))
    samples = scrape()
    by_state = {
        labels["state"]: value(samples, "opentinker_jobs", **labels)
        for labels in series(samples, "opentinker_jobs")
    }
    assert by_state == {s.value: 0 for s in JobState} | {"queued": 4, "cancelled": 1}
    assert value(samples, "opentinker_queue_length", pool="") == 3
    assert value(samples, "opentinker_queue_length", pool="gpu-b") == 1
    assert value(samples, "opentinker_queue_oldest_wait_seconds", pool="") >= 0
    assert value(samples, "opentinker_metrics_source_up", source="database") == 1
    assert value(samples, "opentinker_metrics_source_up", source="valkey") == 1


def test_a_scheduling_pass_counts_its_admissions_per_pool(scrape_on, acme):
    make_pool("gpu-a", 4)
    set_quota(acme, max_gpus=4)
    for i in range(3):
        submit(acme, gpus=2, name=f"j{i}")
    before = value(scrape(), "opentinker_scheduler_admissions_total", pool="gpu-a")
    assert len(schedule_pass().admitted) == 2
    after = scrape()
    assert value(after, "opentinker_scheduler_admissions_total", pool="gpu-a") - before == 2
    assert value(after, "opentinker_queue_length", pool="") == 1
    # A pass that admits nothing counts nothing.
    assert schedule_pass().admitted == []
    assert value(scrape(), "opentinker_scheduler_admissions_total", pool="gpu-a") - before == 2


def test_a_pass_that_reclaims_borrowed_capacity_counts_its_preemptions(scrape_on, acme, globex):
    make_pool("gpu-a", 8)
    set_quota(acme, max_gpus=2, borrowing_limit_gpus=6, max_queued_jobs=50)
    set_quota(globex, max_gpus=4, borrowing_limit_gpus=0)
    for i in range(4):
        submit(acme, gpus=2, name=f"a{i}")
    before = scrape()
    assert len(schedule_pass().admitted) == 4  # the idle pool lets acme borrow
    submit(globex, gpus=4, name="owner")
    assert len(schedule_pass().preempted) == 2  # the owner's 4 GPUs come back from two borrowed jobs
    after = scrape()
    counted = {"admissions": 4, "preemptions": 2}
    for what, n in counted.items():
        name = f"opentinker_scheduler_{what}_total"
        assert value(after, name, pool="gpu-a") - value(before, name, pool="gpu-a") == n


def _running(org, name) -> Job:
    job = submit(org, name=name)
    for state in (JobState.ADMITTED, JobState.RUNNING):
        job = job_transition(job=job, to=state, actor=Actor.system("test"))
    return job


def test_running_jobs_show_their_latest_step_time_and_tokens_per_second(
    scrape_on, acme, globex, django_capture_on_commit_callbacks
):
    job, other = _running(acme, "a"), _running(globex, "g")
    before = value(scrape(), "opentinker_ingest_metric_points_total")
    points = [
        {"step": s, "name": n, "value": v * (s + 1)}
        for s in range(3)
        for n, v in (("time/step", 1.5), ("tokens_per_s", 100.0), ("reward", 0.1))
    ]
    with django_capture_on_commit_callbacks(execute=True):  # the points are counted once committed
        assert metrics_ingest(job=job, points=points) == (9, 9)
        assert metrics_ingest(job=job, points=points) == (9, 0)  # a retried batch stores (and counts) nothing
        assert metrics_ingest(job=other, points=[{"step": 7, "name": "time/step", "value": 2.0}]) == (1, 1)
    samples = scrape()
    assert value(samples, "opentinker_ingest_metric_points_total") - before == 10
    org = {"job": str(job.pk), "organization": acme.slug}
    assert value(samples, "opentinker_job_step_seconds", **org) == 4.5  # step 2's, the latest
    assert value(samples, "opentinker_job_tokens_per_second", **org) == 300.0
    assert value(samples, "opentinker_job_step_seconds", job=str(other.pk), organization=globex.slug) == 2.0
    assert {s["job"] for s in series(samples, "opentinker_job_tokens_per_second")} == {str(job.pk)}
    # A finished job's series go away: only running jobs are exposed, so their number stays bounded.
    job_transition(job=job, to=JobState.SUCCEEDED, actor=Actor.system("test"))
    assert {s["job"] for s in series(scrape(), "opentinker_job_step_seconds")} == {str(other.pk)}


# --- the dashboard ---


def _dashboard_queries() -> list[str]:
    exprs: list[str] = []

    def walk(node):
        if isinstance(node, dict):
            if isinstance(node.get("expr"), str):
                exprs.append(node["expr"])
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(json.loads(DASHBOARD.read_text()))
    return exprs


def test_every_metric_the_grafana_dashboard_queries_is_exposed(scrape_on, as_alice, acme):
    job = _running(acme, "dash")
    metrics_ingest(
        job=job,
        points=[
            {"step": 1, "name": "time/step", "value": 1.0},
            {"step": 1, "name": "tokens_per_s", "value": 9.0},
        ],
    )
    make_pool("gpu-a", 1)
    submit(acme, gpus=1, name="admit-me")
    schedule_pass()
    as_alice.get("/api/v1/jobs")
    exposed = exposed_names()
    queries = _dashboard_queries()
    assert len(queries) >= 10
    used = {m for q in queries for m in re.findall(r"\bopentinker_[a-z_]+", q)}
    assert used, "the dashboard queries no opentinker_ metric"
    assert sorted(used - exposed) == []


# --- several server processes ---

CHILD = """
import os, sys
import django
django.setup()
from portal.observability import metrics
metrics.observe_request("api/v1/jobs", "GET", 200, 0.02)
metrics.STREAM_CLIENTS.inc()
"""


def test_several_processes_sharing_a_directory_are_summed_by_whichever_answers(scrape_on, settings, tmp_path):
    """prometheus_client's multiprocess mode: each server process writes its values to
    PROMETHEUS_MULTIPROC_DIR and the one a scrape reaches sums them (one process alone shows a slice)."""
    env = {
        **os.environ,
        "PROMETHEUS_MULTIPROC_DIR": str(tmp_path),
        "DJANGO_SETTINGS_MODULE": "portal.settings",
    }
    for _ in range(2):
        subprocess.run([sys.executable, "-c", CHILD], env=env, cwd=BASE, check=True, timeout=120)
    settings.PROMETHEUS_MULTIPROC_DIR = str(tmp_path)
    samples = scrape()
    assert (
        value(samples, "opentinker_http_requests_total", route="api/v1/jobs", method="GET", status="200") == 2
    )
    assert (
        value(samples, "opentinker_http_request_duration_seconds_count", route="api/v1/jobs", method="GET")
        == 2
    )
    # The live stream gauge is a sum over processes (livesum: processes marked dead drop out).
    assert any(n == "opentinker_stream_clients" for n, _ in samples)
    # The database and Valkey series are still there, once, whichever process answered.
    assert value(samples, "opentinker_metrics_source_up", source="database") == 1


# --- live streams, under a real server ---


def _stream_clients(url: str) -> float:
    resp = httpx.get(f"{url}/metrics", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10)
    assert resp.status_code == 200
    for family in text_string_to_metric_families(resp.text):
        for s in family.samples:
            if s.name == "opentinker_stream_clients":
                return s.value
    raise AssertionError("opentinker_stream_clients is not exposed")


def _eventually(check, what: str, timeout: float = 60) -> None:
    """Ask again until the server reaches a state: each `check` is a scrape, paced by the server's answer (a
    viewer that left is noticed at the next keep-alive); the deadline only catches a hang."""
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"still not {what} after {timeout} s"


@pytest.mark.django_db(transaction=True)
def test_live_stream_clients_are_counted_while_connected(alice, acme, make_token):
    job = submit(acme, name="watched")
    # A viewer that left is noticed when the server next writes to it: keep-alives every second.
    with running_uvicorn(METRICS_TOKEN=TOKEN, SSE_HEARTBEAT_SECONDS="1", LIVE_POLL_SECONDS="1") as url:
        assert _stream_clients(url) == 0
        viewers = [Viewer(f"{url}/api/v1/jobs/{job.id}/stream", make_token(alice, acme)) for _ in range(2)]
        for v in viewers:
            assert v.status == 200
            v.take_until(lambda f: f[1] == "sync")
        assert _stream_clients(url) == 2
        viewers[0].close()
        _eventually(lambda: _stream_clients(url) == 1, "one client after a viewer left")
        viewers[1].close()
        _eventually(lambda: _stream_clients(url) == 0, "no client after both left")


def _requests_to(url: str, route: str) -> float:
    resp = httpx.get(f"{url}/metrics", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10)
    assert resp.status_code == 200
    for family in text_string_to_metric_families(resp.text):
        for s in family.samples:
            if s.name == "opentinker_http_requests_total" and s.labels["route"] == route:
                return s.value
    return 0.0


@pytest.mark.django_db(transaction=True)
def test_two_uvicorn_workers_sharing_the_directory_count_every_request(tmp_path):
    """The production shape: whichever worker answers a scrape reports the requests both served."""
    shared = {"METRICS_TOKEN": TOKEN, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    with running_uvicorn("--workers", "2", **shared) as url:
        with httpx.Client(base_url=url, timeout=10) as client:  # new connections: both workers take some
            for _ in range(40):
                assert client.get("/livez", headers={"Connection": "close"}).status_code == 200
        assert {_requests_to(url, "livez") for _ in range(6)} == {40}
        pids = {p.name.rsplit("_", 1)[-1] for p in tmp_path.glob("counter_*.db")}
        assert len(pids) == 2, "both workers wrote their counts"
