"""Racing submissions never exceed the queued-jobs quota, and events of one job stay gap-free.
Actors: alice and bob (acme) race each other; charlie (globex) races in his own organization."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
from django.db import connection

from opentinker.spec import JobState, example_rl_spec
from portal.actors import Actor
from portal.models import Job, JobEvent, Quota
from portal.services.jobs import job_transition
from tests.conftest import client_for

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.usefixtures("builtin_envs")]

SPEC = example_rl_spec().model_dump(mode="json")


def _race(fns):
    """Run every function in its own thread, all released at once."""
    barrier = threading.Barrier(len(fns))

    def run(fn):
        try:
            barrier.wait()
            return fn()
        finally:
            connection.close()  # each thread has its own connection

    with ThreadPoolExecutor(len(fns)) as pool:
        return list(pool.map(run, fns))


def test_racing_submissions_respect_the_queue_limit(alice, bob, charlie, acme, globex, make_token):
    Quota.objects.filter(organization=acme).update(max_queued_jobs=5)
    Quota.objects.filter(organization=globex).update(max_queued_jobs=3)
    secrets = {
        "alice": make_token(alice, acme),
        "bob": make_token(bob, acme),
        "charlie": make_token(charlie, globex),
    }

    def submit(who):
        return lambda: client_for(secrets[who]).post("/api/v1/jobs", SPEC, format="json").status_code

    calls = [submit("alice")] * 8 + [submit("bob")] * 8 + [submit("charlie")] * 8
    codes = _race(calls)
    assert sorted(codes).count(201) == 5 + 3
    assert set(codes) == {201, 429}
    assert Job.objects.filter(organization=acme).count() == 5
    assert Job.objects.filter(organization=globex).count() == 3


def test_concurrent_state_changes_keep_event_numbers_gap_free(as_alice):
    job_id = as_alice.post("/api/v1/jobs", SPEC, format="json").json()["id"]
    job = Job.objects.get(pk=job_id)
    system = Actor.system()
    job_transition(job=job, to=JobState.ADMITTED, actor=system)
    job_transition(job=job, to=JobState.RUNNING, actor=system)

    def cancel():
        return as_alice.post(f"/api/v1/jobs/{job_id}/cancel", {}, format="json").status_code

    def finish():
        try:
            job_transition(job=job, to=JobState.SUCCEEDED, actor=Actor.system("runtime"))
            return "finished"
        except Exception as e:  # the loser of the race gets a Conflict
            return type(e).__name__

    results = _race([cancel, finish, cancel, finish])
    seqs = list(JobEvent.objects.filter(job=job).order_by("seq").values_list("seq", flat=True))
    assert seqs == list(range(1, len(seqs) + 1))
    job.refresh_from_db()
    assert job.state in ("succeeded", "cancelling")
    # Exactly one transition out of running happened.
    assert JobEvent.objects.filter(job=job, from_state="running").count() == 1
    assert results.count("finished") == 1  # the job finished exactly once, whoever came first
