"""A lost model server is restarted only while something needs it (portal/services/model_servers.py
`model_server_demand`, applied by supervision's `job_requeue`), on the real PostgreSQL and Valkey: operations
queued, calls it had in flight, or a live session (unfinished, heartbeating within LIVE_SESSION_S) with a
training client or sampler on its base. Otherwise the job ends `succeeded` saying why, its capacity is freed,
and the next Tinker call queues a fresh server at once (no failure back-off). No process runs: the runtime's
loss is reported as its runner or the reaper would.
Actors: alice's (acme) and charlie's (globex) sessions; the job is the platform organization's."""

from __future__ import annotations

import json
import uuid
from datetime import timedelta

import pytest
from django.db import connection
from django.utils import timezone

from api.tinker import queue
from api.tinker.models import TinkerModel, TinkerSession
from portal.models import Allocation, Job
from portal.services import model_servers
from portal.services.model_servers import LIVE_SESSION_S, model_server_ensure
from portal.services.scheduler import schedule_pass
from portal.services.supervision import job_launched, job_process_exited
from tests.workers.conftest import make_pool

pytestmark = pytest.mark.django_db


@pytest.fixture
def base(settings):
    settings.OPENTINKER_TINKER_POOL = ""
    make_pool("local", slots=2, cpu_slots=True)
    name = f"test-base-{uuid.uuid4().hex[:8]}"
    yield name
    queue.client().delete(queue.ops_key(name), queue.claimed_key(name), queue.lease_key(name))


def running_server(base: str) -> tuple[Job, Allocation]:
    job, created = model_server_ensure(base)
    assert created and job.pk in schedule_pass().admitted
    alloc = Allocation.objects.get(job=job, released_at__isnull=True)
    assert job_launched(allocation_id=alloc.pk, handle="4242", host="a-node")
    return job, alloc


def session(org, user, base: str, *, beat_ago_s: float = 0.0, finished: bool = False) -> TinkerSession:
    s = TinkerSession.objects.create(organization=org, created_by=user)
    TinkerModel.objects.create(
        id=f"{s.pk}:train:0", organization=org, session=s, kind="train", base_model=base, lora_rank=4
    )
    TinkerSession.objects.filter(pk=s.pk).update(
        last_heartbeat_at=timezone.now() - timedelta(seconds=beat_ago_s),
        finished_at=timezone.now() if finished else None,
    )
    return s


@pytest.mark.parametrize("exit_code", [-9, None], ids=["killed", "runner-lost"])
def test_a_lost_server_nobody_needs_ends_and_the_next_call_starts_a_fresh_one(
    base, exit_code, acme, alice, globex, charlie
):
    # Nothing that may call it: a session silent for longer than LIVE_SESSION_S, a finished one (heartbeat
    # fresh), a live session on another base model.
    session(acme, alice, base, beat_ago_s=LIVE_SESSION_S + 60)
    session(acme, alice, base, finished=True)
    session(globex, charlie, f"{base}-other")
    job, alloc = running_server(base)

    job = job_process_exited(allocation_id=alloc.pk, exit_code=exit_code)
    assert job is not None and (job.state, job.attempt) == ("succeeded", 0)
    assert job.state_reason.endswith(
        f"not restarted: no Tinker call waits and no session is live for {base} (the next call starts a "
        "model server)"
    )
    alloc.refresh_from_db()
    assert alloc.released_at is not None and alloc.release_reason.startswith("lost: runtime")
    assert job.events.filter(data__restarted=False, to_state="succeeded").count() == 1
    # A call comes later: a fresh server is queued at once (a failed job would have held it back).
    fresh, created = model_server_ensure(base)
    assert created and fresh.pk != job.pk and fresh.state == "queued"


@pytest.mark.parametrize("need", ["live session", "queued operation", "call in flight"])
def test_a_lost_server_is_restarted_while_a_session_is_live_or_work_waits(base, need, acme, alice):
    session(acme, alice, base, beat_ago_s=LIVE_SESSION_S + 60)  # stale: needs nothing by itself
    if need == "live session":
        session(acme, alice, base, beat_ago_s=LIVE_SESSION_S / 2)
    elif need == "queued operation":
        queue.client().rpush(queue.ops_key(base), json.dumps({"op": "optim_step", "model_id": "m"}))
    else:  # claimed by the dead server: the restarted one fails it clearly
        queue.client().rpush(queue.claimed_key(base), json.dumps({"op": "optim_step", "future": "f"}))
    job, alloc = running_server(base)

    job = job_process_exited(allocation_id=alloc.pk, exit_code=-9)
    assert job is not None and (job.state, job.attempt) == ("queued", 1), job.state_reason
    assert Allocation.objects.get(pk=alloc.pk).release_reason == "lost: runtime killed by signal 9"
    assert model_server_ensure(base) == (job, False)  # the same job starts again


def test_a_session_check_that_fails_counts_as_needed(base, monkeypatch):
    def failing(base_model, since):
        with connection.cursor() as cursor:  # a query that fails inside the requeue's transaction
            cursor.execute("SELECT 1 / 0")
        return False

    monkeypatch.setattr(model_servers, "_live_sessions", failing)
    job, alloc = running_server(base)

    job = job_process_exited(allocation_id=alloc.pk, exit_code=-9)
    assert job is not None and (job.state, job.attempt) == ("queued", 1), job.state_reason
    assert Allocation.objects.get(pk=alloc.pk).release_reason == "lost: runtime killed by signal 9"
