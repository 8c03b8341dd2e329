"""Jobs API: submit, list, detail, cancel, metrics, events, checkpoints.
Actors: alice (owner of acme), bob (member, sometimes viewer), charlie (outsider, owner of globex)."""

from __future__ import annotations

import hashlib
import uuid
from pathlib import Path

import pytest
from django.conf import settings

from opentinker.spec import JobState, example_rl_spec
from portal.actors import Actor
from portal.models import Checkpoint, Job, JobEvent, Membership, Metric, Role
from portal.services.jobs import job_transition
from portal.storage import organization_prefix

pytestmark = pytest.mark.django_db

SPEC = example_rl_spec().model_dump(mode="json")


def submit(client, **overrides):
    body = {**SPEC, **overrides}
    r = client.post("/api/v1/jobs", body, format="json")
    assert r.status_code == 201, r.json()
    return r.json()


def test_submit_stores_the_validated_spec_and_records_who(as_alice, acme):
    job = submit(as_alice)
    assert job["state"] == "queued"
    assert job["organization"] == "acme"
    assert job["created_by"] == "alice"
    assert job["kind"] == "rl" and job["name"] == "arithmetic-grpo"
    assert job["spec"]["algorithm"]["group_size"] == 4
    assert job["spec"]["spec_version"] == 1
    row = Job.objects.get(pk=job["id"])
    assert row.organization == acme and row.gpus == 0
    (event,) = JobEvent.objects.filter(job=row)
    assert (event.seq, event.to_state, event.actor_label) == (1, "queued", "alice (token alice-test)")


def test_detail_for_the_three_actors(as_alice, as_bob, as_charlie):
    job = submit(as_alice)
    assert as_alice.get(f"/api/v1/jobs/{job['id']}").json()["id"] == job["id"]
    assert as_bob.get(f"/api/v1/jobs/{job['id']}").json()["id"] == job["id"]
    r = as_charlie.get(f"/api/v1/jobs/{job['id']}")
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    assert as_alice.get(f"/api/v1/jobs/{uuid.uuid4()}").status_code == 404
    assert as_alice.get("/api/v1/jobs/not-a-uuid").status_code == 404


def test_list_filters_and_pagination(as_alice, as_charlie):
    ids = [submit(as_alice, name=f"run-{i}")["id"] for i in range(5)]
    sft = submit(
        as_alice,
        kind="sft",
        environment=None,
        dataset={"uri": f"{organization_prefix('acme')}/data/d.jsonl"},
        algorithm={"name": "sft"},
        name="tune",
    )
    as_alice.post(f"/api/v1/jobs/{ids[0]}/cancel", {}, format="json")

    page = as_alice.get("/api/v1/jobs?limit=2").json()
    assert page["count"] == 6 and len(page["results"]) == 2 and page["next"] and page["previous"] is None
    # Newest first.
    assert page["results"][0]["id"] == sft["id"]
    second = as_alice.get("/api/v1/jobs?limit=2&offset=2").json()
    assert [j["id"] for j in second["results"]] == [ids[3], ids[2]]

    assert {j["id"] for j in as_alice.get("/api/v1/jobs?kind=sft").json()["results"]} == {sft["id"]}
    assert {j["id"] for j in as_alice.get("/api/v1/jobs?state=cancelled").json()["results"]} == {ids[0]}
    both = as_alice.get("/api/v1/jobs?state=cancelled&state=queued").json()
    assert both["count"] == 6
    assert {j["id"] for j in as_alice.get("/api/v1/jobs?name=run-3").json()["results"]} == {ids[3]}
    assert as_charlie.get("/api/v1/jobs").json()["count"] == 0

    bad = as_alice.get("/api/v1/jobs?state=sleeping")
    assert bad.status_code == 400 and "state" in bad.json()["error"]["fields"]
    assert as_alice.get("/api/v1/jobs?limit=100000").status_code == 400
    assert as_alice.get("/api/v1/jobs?colour=red").status_code == 400


def test_cancel_queued_job_is_immediate_and_recorded(as_alice, as_charlie):
    job = submit(as_alice)
    assert as_charlie.post(f"/api/v1/jobs/{job['id']}/cancel", {}, format="json").status_code == 404
    r = as_alice.post(f"/api/v1/jobs/{job['id']}/cancel", {"reason": "wrong seed"}, format="json")
    assert r.status_code == 200
    assert r.json()["state"] == "cancelled" and r.json()["state_reason"] == "wrong seed"
    assert r.json()["finished_at"] is not None
    events = as_alice.get(f"/api/v1/jobs/{job['id']}/events").json()["results"]
    assert [(e["seq"], e["from_state"], e["to_state"], e["message"]) for e in events] == [
        (1, "", "queued", "submitted"),
        (2, "queued", "cancelled", "wrong seed"),
    ]
    assert events[1]["actor"] == "alice (token alice-test)"
    # Cancelling a finished job is a conflict, and changes nothing.
    again = as_alice.post(f"/api/v1/jobs/{job['id']}/cancel", {}, format="json")
    assert again.status_code == 409 and again.json()["error"]["code"] == "conflict"
    assert JobEvent.objects.filter(job_id=job["id"]).count() == 2


def test_cancel_running_job_asks_runtime_to_stop(as_alice, as_bob):
    job = Job.objects.get(pk=submit(as_alice)["id"])
    system = Actor.system("scheduler")
    job_transition(job=job, to=JobState.ADMITTED, actor=system, reason="admitted on pool local")
    job_transition(job=job, to=JobState.RUNNING, actor=system)
    r = as_bob.post(f"/api/v1/jobs/{job.pk}/cancel", {}, format="json")
    assert r.status_code == 200 and r.json()["state"] == "cancelling"
    assert r.json()["state_reason"] == "cancelled by bob (token bob-test)"
    # Asking twice is harmless.
    assert as_bob.post(f"/api/v1/jobs/{job.pk}/cancel", {}, format="json").json()["state"] == "cancelling"
    job_transition(job=job, to=JobState.CANCELLED, actor=Actor.system("runtime"), reason="stopped at step 7")
    detail = as_alice.get(f"/api/v1/jobs/{job.pk}").json()
    assert detail["state"] == "cancelled" and detail["started_at"] and detail["finished_at"]
    states = [
        (e["from_state"], e["to_state"], e["actor"])
        for e in as_alice.get(f"/api/v1/jobs/{job.pk}/events").json()["results"]
    ]
    assert states == [
        ("", "queued", "alice (token alice-test)"),
        ("queued", "admitted", "scheduler"),
        ("admitted", "running", "scheduler"),
        ("running", "cancelling", "bob (token bob-test)"),
        ("cancelling", "cancelled", "runtime"),
    ]


def test_viewer_reads_but_cannot_submit_or_cancel(alice, bob, acme, make_token, as_alice):
    job = submit(as_alice)
    Membership.objects.filter(user=bob, organization=acme).update(role=Role.VIEWER)
    from tests.conftest import client_for

    as_viewer = client_for(make_token(bob, acme))
    assert as_viewer.get(f"/api/v1/jobs/{job['id']}").status_code == 200
    assert as_viewer.post("/api/v1/jobs", SPEC, format="json").status_code == 403
    assert as_viewer.post(f"/api/v1/jobs/{job['id']}/cancel", {}, format="json").status_code == 403
    assert Job.objects.get(pk=job["id"]).state == "queued"


def test_event_paging(as_alice):
    job = Job.objects.get(pk=submit(as_alice)["id"])
    sys = Actor.system()
    for _ in range(3):  # queued -> admitted -> queued ... re-queues are events too
        job_transition(job=job, to=JobState.ADMITTED, actor=sys)
        job_transition(job=job, to=JobState.QUEUED, actor=sys, reason="preempted")
    page = as_alice.get(f"/api/v1/jobs/{job.pk}/events?limit=4").json()
    assert [e["seq"] for e in page["results"]] == [1, 2, 3, 4] and page["next_after"] == 4
    rest = as_alice.get(f"/api/v1/jobs/{job.pk}/events?after=4&limit=4").json()
    assert [e["seq"] for e in rest["results"]] == [5, 6, 7] and rest["next_after"] is None
    assert as_alice.get(f"/api/v1/jobs/{job.pk}").json()["attempt"] == 3


def test_illegal_transitions_are_refused():
    from portal.services.jobs import TRANSITIONS

    assert TRANSITIONS[JobState.SUCCEEDED] == frozenset()
    assert JobState.RUNNING not in TRANSITIONS[JobState.QUEUED]


def test_illegal_transition_raises_and_records_nothing(as_alice):
    from portal.errors import Conflict

    job = Job.objects.get(pk=submit(as_alice)["id"])
    with pytest.raises(Conflict):
        job_transition(job=job, to=JobState.SUCCEEDED, actor=Actor.system())
    job.refresh_from_db()
    assert job.state == "queued" and job.events.count() == 1


def test_metrics_query_by_name_range_and_downsampled(as_alice, as_charlie):
    job = Job.objects.get(pk=submit(as_alice)["id"])
    Metric.objects.bulk_create(
        [Metric(job=job, name="reward/mean", step=s, value=float(s)) for s in range(100)]
        + [Metric(job=job, name="kl", step=s, value=0.5) for s in range(0, 100, 10)]
    )
    url = f"/api/v1/jobs/{job.pk}/metrics"
    full = as_alice.get(url).json()["series"]
    assert [s["name"] for s in full] == ["kl", "reward/mean"]
    assert full[1]["steps"] == list(range(100)) and full[1]["values"] == [float(s) for s in range(100)]
    assert full[1]["downsampled"] is False

    ranged = as_alice.get(f"{url}?name=reward/mean&step_min=10&step_max=14").json()["series"]
    assert ranged == [
        {
            "name": "reward/mean",
            "steps": [10, 11, 12, 13, 14],
            "values": [10.0, 11.0, 12.0, 13.0, 14.0],
            "downsampled": False,
        }
    ]

    # 100 points into 10 buckets of 10 steps: each bucket reports its last step and its mean.
    down = as_alice.get(f"{url}?name=reward/mean&max_points=10").json()["series"][0]
    assert down["downsampled"] is True
    assert down["steps"] == [9, 19, 29, 39, 49, 59, 69, 79, 89, 99]
    assert down["values"] == [4.5, 14.5, 24.5, 34.5, 44.5, 54.5, 64.5, 74.5, 84.5, 94.5]
    # A series shorter than max_points is returned whole.
    assert as_alice.get(f"{url}?name=kl&max_points=10").json()["series"][0]["downsampled"] is False

    assert as_alice.get(f"{url}?step_min=5&step_max=1").status_code == 400
    assert as_alice.get(f"{url}?max_points=0").status_code == 400
    assert as_charlie.get(url).status_code == 404


def _write_checkpoint(job, step: int) -> Checkpoint:
    root = Path(settings.OBJECT_STORE_URL.removeprefix("file://"))
    prefix = f"jobs/{job.pk}/checkpoints/step-{step}"
    files = []
    for name, payload in (("model.safetensors", b"weights" * 100), ("optimizer/state.pt", b"adam")):
        path = root / prefix / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(payload)
        files.append({"name": name, "size": len(payload), "sha256": hashlib.sha256(payload).hexdigest()})
    return Checkpoint.objects.create(
        job=job,
        step=step,
        uri=f"{settings.OBJECT_STORE_URL}/{prefix}",
        files=files,
        size_bytes=sum(f["size"] for f in files),
    )


@pytest.fixture
def object_store(tmp_path, settings):
    settings.OBJECT_STORE_URL = f"file://{tmp_path / 'objects'}"
    return tmp_path / "objects"


def test_checkpoints_listed_with_working_download_links(as_alice, as_bob, as_charlie, object_store):
    job = Job.objects.get(pk=submit(as_alice)["id"])
    ck = _write_checkpoint(job, 5)
    listing = as_bob.get(f"/api/v1/jobs/{job.pk}/checkpoints").json()["results"]
    assert [(c["id"], c["step"], c["size_bytes"]) for c in listing] == [(ck.pk, 5, 704)]
    files = {f["name"]: f for f in listing[0]["files"]}
    link = files["optimizer/state.pt"]["download_url"]
    assert link == f"http://testserver/api/v1/jobs/{job.pk}/checkpoints/{ck.pk}/files/optimizer/state.pt"
    r = as_bob.get(link.removeprefix("http://testserver"))
    assert r.status_code == 200 and b"".join(r.streaming_content) == b"adam"
    assert "attachment" in r["Content-Disposition"]

    assert as_charlie.get(link.removeprefix("http://testserver")).status_code == 404
    assert as_charlie.get(f"/api/v1/jobs/{job.pk}/checkpoints").status_code == 404
    # Only recorded files, and nothing outside the checkpoint.
    base = f"/api/v1/jobs/{job.pk}/checkpoints/{ck.pk}/files"
    assert as_alice.get(f"{base}/other.bin").status_code == 404
    assert as_alice.get(f"{base}/../../../../etc/passwd").status_code == 404


def test_forged_checkpoint_uri_outside_the_store_is_not_served(as_alice, object_store, tmp_path):
    job = Job.objects.get(pk=submit(as_alice)["id"])
    secret = tmp_path / "secret.txt"
    secret.write_text("private")
    ck = Checkpoint.objects.create(job=job, step=1, uri=f"file://{tmp_path}", files=[{"name": "secret.txt"}])
    assert as_alice.get(f"/api/v1/jobs/{job.pk}/checkpoints/{ck.pk}/files/secret.txt").status_code == 404


def test_s3_checkpoint_link_redirects_to_a_presigned_url(as_alice, s3_store):
    import httpx

    s3_store.client.put_object(Bucket="otk-store", Key="store/ck/model.safetensors", Body=b"s3-weights")
    job = Job.objects.get(pk=submit(as_alice)["id"])
    ck = Checkpoint.objects.create(
        job=job,
        step=3,
        uri="s3://otk-store/store/ck",
        files=[{"name": "model.safetensors", "size": 10, "sha256": ""}],
    )
    r = as_alice.get(f"/api/v1/jobs/{job.pk}/checkpoints/{ck.pk}/files/model.safetensors")
    assert r.status_code == 302
    assert r["Location"].startswith(f"{s3_store.endpoint}/otk-store/store/ck/model.safetensors?")
    assert "X-Amz-Signature" in r["Location"] or "Signature=" in r["Location"]
    assert httpx.get(r["Location"]).content == b"s3-weights"


def test_idempotency_key_makes_retried_submissions_safe(as_alice, as_charlie):
    headers = {"HTTP_IDEMPOTENCY_KEY": "run-2026-11-25"}
    first = as_alice.post("/api/v1/jobs", SPEC, format="json", **headers)
    again = as_alice.post("/api/v1/jobs", SPEC, format="json", **headers)
    assert (first.status_code, again.status_code) == (201, 200)
    assert again.json()["id"] == first.json()["id"]
    assert Job.objects.count() == 1
    changed = as_alice.post("/api/v1/jobs", {**SPEC, "seed": 2}, format="json", **headers)
    assert changed.status_code == 409 and "Idempotency-Key" in changed.json()["error"]["message"]
    # Keys are per organization: the outsider's same key is a different job.
    assert as_charlie.post("/api/v1/jobs", SPEC, format="json", **headers).status_code == 201
    assert Job.objects.count() == 2


def test_submissions_count_as_uses_of_the_environment(as_alice):
    from env_registry.models import EnvironmentPackage

    arithmetic = EnvironmentPackage.objects.get(organization__slug="opentinker", name="arithmetic")
    before = arithmetic.usage_count
    headers = {"HTTP_IDEMPOTENCY_KEY": "count-me-once"}
    as_alice.post("/api/v1/jobs", SPEC, format="json", **headers)
    as_alice.post("/api/v1/jobs", SPEC, format="json", **headers)  # a retry is not a second use
    as_alice.post("/api/v1/jobs", {**SPEC, "environment": {"ref": "nobody/nothing@1.0.0"}}, format="json")
    arithmetic.refresh_from_db()
    assert arithmetic.usage_count == before + 1
