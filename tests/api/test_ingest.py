"""Runtime ingest API: job tokens, metrics/events/logs/checkpoints/heartbeat/state, and what viewers then see.

Actors: alice (owner of acme, submits the job), bob (member of acme, reads it), charlie (outsider, owner of
globex, with a job and a job token of his own).
"""

from __future__ import annotations

import json
import time

import pytest
import redis
from django.conf import settings
from rest_framework.test import APIClient

from opentinker.spec import JobState, example_rl_spec
from portal import storage
from portal.actors import Actor
from portal.models import Checkpoint, Job, JobEvent, JobLog, Metric
from portal.services import live
from portal.services.job_tokens import job_runtime_env, job_token_issue, job_token_verify
from portal.services.jobs import job_cancel, job_submit, job_transition
from tests.conftest import client_for

pytestmark = pytest.mark.django_db
V1 = "/api/v1"
SHA = "ab" * 32


def _submit(org, user) -> Job:
    job, _ = job_submit(organization=org, actor=Actor.for_request(user), spec=example_rl_spec())
    return job


def _admit(job: Job) -> Job:
    return job_transition(job=job, to=JobState.ADMITTED, actor=Actor.system("scheduler"))


@pytest.fixture
def job(alice, acme) -> Job:
    return _admit(_submit(acme, alice))


@pytest.fixture
def runtime(job) -> APIClient:
    return client_for(job_token_issue(job))


@pytest.fixture
def charlie_job(charlie, globex) -> Job:
    return _admit(_submit(globex, charlie))


def url(job, endpoint: str) -> str:
    return f"{V1}/ingest/jobs/{job.id}/{endpoint}"


def post(client, job, endpoint, body):
    return client.post(url(job, endpoint), body, format="json")


def points(steps, name="reward", scale=1.0):
    return [{"step": s, "name": name, "value": s * scale} for s in steps]


# --- job tokens ---


def test_job_token_is_bound_to_job_attempt_and_expiry(job, charlie_job):
    token = job_token_issue(job)
    assert token.startswith(f"otj_{job.id}.0.")
    assert job_token_verify(token) == job
    body, _, sig = token.rpartition(".")
    assert job_token_verify(f"{body}.{'A' * 43}") is None  # forged signature
    # The same signature does not carry over to another job id or attempt, nor to a longer expiry.
    assert job_token_verify(token.replace(str(job.id), str(charlie_job.id))) is None
    assert job_token_verify(token.replace(f"{job.id}.0.", f"{job.id}.1.")) is None
    job_id, attempt, expiry = body.removeprefix("otj_").split(".")
    assert job_token_verify(f"otj_{job_id}.{attempt}.{int(expiry) + 1}.{sig}") is None
    assert job_token_verify(job_token_issue(job, ttl=-1)) is None  # expired
    for junk in ("", "otj_", "otk_abc_def", token + "x", token[:-1], "otj_" + "a" * 300, None):
        assert job_token_verify(junk) is None
    env = job_runtime_env(job, base_url="http://portal:8000/")
    assert env["OPENTINKER_INGEST_URL"] == f"http://portal:8000/api/v1/ingest/jobs/{job.id}"
    assert job_token_verify(env["OPENTINKER_JOB_TOKEN"]) == job


def test_requeued_job_invalidates_earlier_tokens(job, runtime):
    assert post(runtime, job, "state", {"state": "running"}).status_code == 200
    job_transition(job=job, to=JobState.QUEUED, actor=Actor.system("reaper"), reason="worker lost")
    for endpoint, body in [
        ("metrics", {"points": points([1])}),
        ("heartbeat", {}),
        ("state", {"state": "succeeded"}),
    ]:
        resp = post(runtime, job, endpoint, body)
        assert resp.status_code == 401, resp.content
        assert resp.json()["error"]["code"] == "authentication_failed"
    job.refresh_from_db()
    assert job.state == "queued" and job.attempt == 1 and not Metric.objects.filter(job=job).exists()
    # The next attempt's token works.
    _admit(job)
    fresh = client_for(job_token_issue(Job.objects.get(pk=job.pk)))
    assert post(fresh, job, "metrics", {"points": points([1])}).json() == {"received": 1, "inserted": 1}


def test_tokens_do_not_cross_between_ingest_and_the_rest_of_the_api(job, runtime, alice, acme, make_token):
    # A job token is nothing outside ingest...
    for path in (f"{V1}/jobs/{job.id}", f"{V1}/jobs/{job.id}/metrics", f"{V1}/me", f"{V1}/jobs"):
        resp = runtime.get(path)
        assert resp.status_code == 401, (path, resp.content)
    assert runtime.post(f"{V1}/jobs/{job.id}/cancel", {}, format="json").status_code == 401
    # ...and a user token (or session, or nothing) is nothing on ingest, whatever its scopes.
    session = APIClient()
    session.force_login(alice)
    for client in (client_for(make_token(alice, acme)), session, APIClient()):
        resp = post(client, job, "metrics", {"points": points([1])})
        assert resp.status_code == 401, resp.content
        assert resp.json()["error"]["code"] in ("authentication_failed", "not_authenticated")
    assert not Metric.objects.exists()


def test_outsider_job_token_cannot_touch_acme_job(job, charlie_job):
    """charlie's runtime (a valid token for his own job) gets 404 on acme's job, as for no job at all."""
    charlie_runtime = client_for(job_token_issue(charlie_job))
    bodies = {
        "metrics": {"points": points([1])},
        "events": {"kind": "info", "message": "hi"},
        "logs": {"lines": [{"line": "x"}]},
        "checkpoints": {"step": 1, "uri": "file:///x", "files": [{"name": "a", "size": 1, "sha256": SHA}]},
        "heartbeat": {},
        "state": {"state": "failed"},
    }
    before = (job.state, JobEvent.objects.filter(job=job).count())
    for endpoint, body in bodies.items():
        real = post(charlie_runtime, job, endpoint, body)
        fake = charlie_runtime.post(
            f"{V1}/ingest/jobs/00000000-0000-4000-8000-000000000000/{endpoint}", body, format="json"
        )
        assert real.status_code == fake.status_code == 404, real.content
        assert real.json() == fake.json()
        assert str(job.id) not in real.content.decode()
    job.refresh_from_db()
    assert (job.state, JobEvent.objects.filter(job=job).count()) == before
    assert not Metric.objects.exists() and not JobLog.objects.exists() and not Checkpoint.objects.exists()


# --- metrics ---


def test_metrics_are_idempotent_on_job_name_and_step(job, runtime, as_alice, as_bob, as_charlie):
    first = points(range(10)) + points(range(10), name="loss", scale=0.5)
    assert post(runtime, job, "metrics", {"points": first}).json() == {"received": 20, "inserted": 20}
    # A retried batch changes nothing; an overlapping one adds only the new points, keeping first values.
    assert post(runtime, job, "metrics", {"points": first}).json() == {"received": 20, "inserted": 0}
    overlap = points(range(5, 15), scale=100.0)
    assert post(runtime, job, "metrics", {"points": overlap}).json() == {"received": 10, "inserted": 5}
    assert Metric.objects.filter(job=job).count() == 25
    series = {s["name"]: s for s in as_bob.get(f"{V1}/jobs/{job.id}/metrics").json()["series"]}
    assert series["reward"]["steps"] == list(range(15))
    assert series["reward"]["values"] == [float(s) for s in range(10)] + [s * 100.0 for s in range(10, 15)]
    assert series["loss"]["values"] == [s * 0.5 for s in range(10)]
    assert as_alice.get(f"{V1}/jobs/{job.id}/metrics").status_code == 200
    assert as_charlie.get(f"{V1}/jobs/{job.id}/metrics").status_code == 404


def test_a_point_repeated_within_a_batch_keeps_its_first_value(job, runtime):
    body = {"points": [{"step": 3, "name": "r", "value": 1}, {"step": 3, "name": "r", "value": 2}]}
    assert post(runtime, job, "metrics", body).json() == {"received": 2, "inserted": 1}
    assert Metric.objects.get(job=job).value == 1.0


@pytest.mark.parametrize(
    ("raw", "field"),
    [
        ('{"points": [{"step": 1, "name": "r", "value": NaN}]}', "body"),
        ('{"points": [{"step": 1, "name": "r", "value": Infinity}]}', "body"),
        (
            '{"points": [{"step": 1, "name": "r", "value": 1}, {"step": 2, "name": "r", "value": 1e999}]}',
            None,
        ),
    ],
)
def test_metrics_refuse_non_finite_values(job, runtime, raw, field):
    resp = runtime.generic("POST", url(job, "metrics"), raw, content_type="application/json")
    assert resp.status_code == 400, resp.content
    if field is None:
        assert resp.json()["error"]["fields"] == {"points.1.value": ["must be finite (no NaN or infinity)"]}
    assert not Metric.objects.exists()


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"points": []}, "points"),
        ({"points": "nope"}, "points"),
        ({}, "points"),
        ({"points": points([1]), "extra": 1}, "extra"),
        ({"points": [{"step": -1, "name": "r", "value": 1}]}, "points.0.step"),
        ({"points": [{"step": 2**31, "name": "r", "value": 1}]}, "points.0.step"),
        ({"points": [{"step": 1.5, "name": "r", "value": 1}]}, "points.0.step"),
        ({"points": [{"step": True, "name": "r", "value": 1}]}, "points.0.step"),
        ({"points": [{"step": 1, "name": "", "value": 1}]}, "points.0.name"),
        ({"points": [{"step": 1, "name": "x" * 101, "value": 1}]}, "points.0.name"),
        ({"points": [{"step": 1, "name": "a\nb", "value": 1}]}, "points.0.name"),
        ({"points": [{"step": 1, "name": "r", "value": "1"}]}, "points.0.value"),
        ({"points": [{"step": 1, "name": "r", "value": None}]}, "points.0.value"),
        ({"points": [{"step": 1, "name": "r", "value": False}]}, "points.0.value"),
        ({"points": [{"step": 1, "name": "r"}]}, "points.0.value"),
        ({"points": [{"step": 1, "name": "r", "value": 1, "x": 2}]}, "points.0.x"),
        ({"points": points(range(5001))}, "points"),
    ],
)
def test_metrics_refuse_bad_points_and_store_nothing(job, runtime, body, field, settings):
    settings.API_MAX_BODY_BYTES = 1 << 20
    resp = post(runtime, job, "metrics", body)
    assert resp.status_code == 400, resp.content
    assert field in resp.json()["error"]["fields"], resp.json()
    assert not Metric.objects.exists()


def test_a_full_batch_of_5000_points_is_accepted(job, runtime):
    # Compact JSON with short values: a batch must also fit API_MAX_BODY_BYTES (256 KiB by default).
    raw = json.dumps(
        {"points": [{"step": i, "name": "r", "value": i / 8} for i in range(5000)]}, separators=(",", ":")
    )
    assert len(raw) < settings.API_MAX_BODY_BYTES
    resp = runtime.generic("POST", url(job, "metrics"), raw, content_type="application/json")
    assert resp.json() == {"received": 5000, "inserted": 5000}
    assert Metric.objects.filter(job=job).count() == 5000


# --- events, logs, checkpoints ---


def test_events_are_recorded_for_the_team(job, runtime, as_bob, as_charlie):
    resp = post(runtime, job, "events", {"kind": "warning", "message": "loss spiked", "data": {"step": 7}})
    assert resp.status_code == 201, resp.content
    events = as_bob.get(f"{V1}/jobs/{job.id}/events").json()["results"]
    assert events[-1] | {"created_at": None} == {
        "seq": resp.json()["seq"],
        "kind": "warning",
        "created_at": None,
        "actor": "runtime",
        "from_state": "",
        "to_state": "",
        "message": "loss spiked",
        "data": {"step": 7},
    }
    assert as_charlie.get(f"{V1}/jobs/{job.id}/events").status_code == 404
    for bad in (
        {"kind": "state", "message": "x"},
        {"kind": "info"},
        {"kind": "info", "message": "x", "y": 1},
    ):
        assert post(runtime, job, "events", bad).status_code == 400


def test_log_lines_are_numbered_in_order(job, runtime):
    r1 = post(runtime, job, "logs", {"lines": [{"line": "a"}, {"line": "b\n", "stream": "stderr"}]})
    r2 = post(runtime, job, "logs", {"lines": [{"line": "x" * 5000}]})
    assert (r1.status_code, r1.json(), r2.json()) == (
        201,
        {"first_seq": 1, "last_seq": 2},
        {"first_seq": 3, "last_seq": 3},
    )
    rows = list(JobLog.objects.filter(job=job).order_by("seq").values_list("seq", "stream", "line"))
    assert rows == [(1, "stdout", "a"), (2, "stderr", "b"), (3, "stdout", "x" * 4000)]
    for bad in ({"lines": []}, {"lines": [{"line": "a", "stream": "stdin"}]}, {"lines": [{}]}):
        assert post(runtime, job, "logs", bad).status_code == 400
    assert post(runtime, job, "logs", {"lines": [{"line": "a"}] * 1001}).status_code == 400


def test_checkpoint_must_lie_in_the_jobs_own_prefix(job, runtime, charlie_job, globex, as_bob):
    own = f"{storage.organization_prefix('acme')}/jobs/{job.id}"
    files = [
        {"name": "model.safetensors", "size": 10, "sha256": SHA},
        {"name": "opt/state.pt", "size": 5, "sha256": SHA},
    ]
    resp = post(runtime, job, "checkpoints", {"step": 5, "uri": f"{own}/step-5", "files": files})
    assert resp.status_code == 201, resp.content
    assert resp.json() | {"id": None} == {"id": None, "step": 5, "uri": f"{own}/step-5", "size_bytes": 15}
    listed = as_bob.get(f"{V1}/jobs/{job.id}/checkpoints").json()["results"]
    assert [(c["step"], [f["name"] for f in c["files"]]) for c in listed] == [
        (5, ["model.safetensors", "opt/state.pt"])
    ]
    # The same step again replaces the record (a resumed attempt saved it anew).
    again = post(runtime, job, "checkpoints", {"step": 5, "uri": f"{own}/step-5b", "files": files[:1]})
    assert again.status_code == 200 and again.json()["size_bytes"] == 10
    assert Checkpoint.objects.get(job=job).uri == f"{own}/step-5b"
    messages = list(JobEvent.objects.filter(job=job, kind="info").values_list("message", flat=True))
    assert messages == ["checkpoint saved at step 5", "checkpoint replaced at step 5"]
    outside = [
        own,  # the prefix itself, not inside it
        f"{own}-other/step-1",
        f"{own}/../{charlie_job.id}/step-1",
        f"{storage.organization_prefix('acme')}/jobs/{charlie_job.id}/step-1",
        f"{storage.organization_prefix(globex.slug)}/jobs/{job.id}/step-1",
        f"s3://elsewhere/orgs/acme/jobs/{job.id}/step-1",
        f"/orgs/acme/jobs/{job.id}/step-1",
    ]
    for uri in outside:
        resp = post(runtime, job, "checkpoints", {"step": 9, "uri": uri, "files": files})
        assert resp.status_code == 400, (uri, resp.content)
        assert "uri" in resp.json()["error"]["fields"]
    for bad_file in (
        {"name": "../x", "size": 1, "sha256": SHA},
        {"name": "/abs", "size": 1, "sha256": SHA},
        {"name": "a", "size": -1, "sha256": SHA},
        {"name": "a", "size": 1, "sha256": "AB" * 32},
    ):
        resp = post(runtime, job, "checkpoints", {"step": 9, "uri": f"{own}/s9", "files": [bad_file]})
        assert resp.status_code == 400, (bad_file, resp.content)
    assert not Checkpoint.objects.filter(step=9).exists()


# --- heartbeat, state, cancel ---


def test_runtime_lifecycle_running_to_succeeded(job, runtime, as_bob):
    assert post(runtime, job, "heartbeat", {}).json() == {"cancel": False, "state": "admitted"}
    assert post(runtime, job, "state", {"state": "running"}).json() == {"cancel": False, "state": "running"}
    assert post(runtime, job, "state", {"state": "running"}).json() == {"cancel": False, "state": "running"}
    hb = post(runtime, job, "heartbeat", {"step": 3})
    assert hb.json() == {"cancel": False, "state": "running"}
    job.refresh_from_db()
    assert job.last_heartbeat_at is not None
    done = post(runtime, job, "state", {"state": "succeeded", "reason": "50 steps"})
    assert done.json() == {"cancel": True, "state": "succeeded"}
    transitions = [
        (e["from_state"], e["to_state"], e["actor"])
        for e in as_bob.get(f"{V1}/jobs/{job.id}/events").json()["results"]
        if e["kind"] == "state"
    ]
    assert transitions == [
        ("", "queued", "alice"),
        ("queued", "admitted", "scheduler"),
        ("admitted", "running", "runtime"),
        ("running", "succeeded", "runtime"),
    ]
    # A finished job takes no more writes, but still answers the heartbeat (stop).
    for endpoint, body in [
        ("metrics", {"points": points([1])}),
        ("events", {"kind": "info", "message": "late"}),
        ("logs", {"lines": [{"line": "late"}]}),
        ("state", {"state": "failed"}),
    ]:
        resp = post(runtime, job, endpoint, body)
        assert resp.status_code == 409, (endpoint, resp.content)
    assert post(runtime, job, "state", {"state": "succeeded"}).status_code == 200  # a retried report
    assert post(runtime, job, "heartbeat", {}).json() == {"cancel": True, "state": "succeeded"}
    for bad in ({"state": "queued"}, {"state": "cancelling"}, {"state": "nope"}, {}):
        assert post(runtime, job, "state", bad).status_code == 400


def test_cancel_reaches_the_runtime_through_the_heartbeat(job, runtime, alice):
    post(runtime, job, "state", {"state": "running"})
    job_cancel(job=Job.objects.get(pk=job.pk), actor=Actor.for_request(alice), reason="enough")
    assert post(runtime, job, "heartbeat", {}).json() == {"cancel": True, "state": "cancelling"}
    # Points of the last step still land while it stops.
    assert post(runtime, job, "metrics", {"points": points([9])}).json()["inserted"] == 1
    assert post(runtime, job, "state", {"state": "cancelled"}).json() == {
        "cancel": True,
        "state": "cancelled",
    }
    job.refresh_from_db()
    assert job.state == "cancelled" and job.finished_at is not None


def test_a_running_job_cannot_jump_to_cancelled(job, runtime):
    post(runtime, job, "state", {"state": "running"})
    resp = post(runtime, job, "state", {"state": "cancelled"})
    assert resp.status_code == 409 and resp.json()["error"]["code"] == "conflict"


def test_ingest_is_throttled_per_job(job, runtime, charlie_job, settings):
    settings.INGEST_RATE_LIMIT = "3/m"
    from django.core.cache import cache

    cache.delete(f"throttle_ingest_{job.pk}")
    codes = [post(runtime, job, "heartbeat", {}).status_code for _ in range(4)]
    assert codes == [200, 200, 200, 429]
    # Another job's runtime has its own budget.
    other = client_for(job_token_issue(charlie_job))
    cache.delete(f"throttle_ingest_{charlie_job.pk}")
    assert post(other, charlie_job, "heartbeat", {}).status_code == 200
    cache.delete(f"throttle_ingest_{job.pk}")
    cache.delete(f"throttle_ingest_{charlie_job.pk}")


# --- publication to the live feed ---


def _entries(job) -> list[tuple[str, dict]]:
    r = redis.Redis.from_url(settings.REDIS_URL)
    return [
        ({k.decode(): v.decode() for k, v in fields.items()}["t"], json.loads(fields[b"d"]))
        for _id, fields in r.xrange(live.stream_key(job.id))
    ]


def test_every_write_is_published_after_commit(job, runtime, django_capture_on_commit_callbacks):
    with django_capture_on_commit_callbacks(execute=True):
        post(runtime, job, "state", {"state": "running"})
        post(runtime, job, "metrics", {"points": points([1, 2])})
        post(runtime, job, "metrics", {"points": points([2, 3])})  # only step 3 is new
        post(runtime, job, "metrics", {"points": points([1])})  # nothing new: nothing published
        post(runtime, job, "events", {"kind": "info", "message": "hello"})
        post(runtime, job, "logs", {"lines": [{"line": "a"}, {"line": "b"}]})
    entries = _entries(job)
    assert [t for t, _ in entries] == ["state", "metrics", "metrics", "event", "log"]
    assert entries[0][1]["state"] == "running" and entries[0][1]["from_state"] == "admitted"
    assert entries[1][1] == {"points": points([1, 2])}
    assert entries[2][1] == {"points": points([3])}
    assert entries[3][1]["message"] == "hello" and entries[3][1]["seq"] == 4
    assert [(x["seq"], x["line"]) for x in entries[4][1]["lines"]] == [(1, "a"), (2, "b")]
    r = redis.Redis.from_url(settings.REDIS_URL)
    assert 0 < r.ttl(live.stream_key(job.id)) <= live.ttl_seconds()


def test_a_failed_publication_leaves_a_gap_marker(job, monkeypatch):
    dead = redis.Redis(host="127.0.0.1", port=1, socket_connect_timeout=0.2, socket_timeout=0.2)
    monkeypatch.setattr(live, "_client", dead)
    before = time.time()
    assert live.publish(job.id, "metrics", {"points": []}) is None  # never raises: ingest must go on
    monkeypatch.setattr(live, "_client", None)
    assert live.publish(job.id, "metrics", {"points": points([1])})
    entries = _entries(job)
    assert [t for t, _ in entries] == ["gap", "metrics"]
    assert before <= entries[0][1]["since"] <= time.time()
    live.publish(job.id, "metrics", {"points": points([2])})
    assert [t for t, _ in _entries(job)] == ["gap", "metrics", "metrics"]
