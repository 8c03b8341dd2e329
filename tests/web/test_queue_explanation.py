"""The queue's explanation is computed once for everybody per short window, not per viewer and refresh:
job pages (refreshed every few seconds by each viewer) read their job's position and reason from the shared
explanation in the Django cache (Valkey); a scheduling pass drops it; the admin queue computes it fresh.

Counted with the scheduler's own counter of read-only plans (READ_ONLY_PLANS), no patching."""

from __future__ import annotations

import re

import pytest

from portal.models import Allocation, Job
from portal.scheduling.explanation import READ_ONLY_PLANS
from portal.services.scheduler import schedule_pass
from portal.services.supervision import job_process_exited
from tests.web.pages import signed_in
from tests.workers.conftest import make_pool, set_quota, submit

pytestmark = pytest.mark.django_db


def status(client, job) -> tuple[str, str]:
    html = client.get(f"/jobs/{job.pk}/status/").content.decode()
    position = re.search(r'id="queue-position">([^<]*)<', html)[1]
    return position, re.search(r'id="queue-reason">([^<]*)<', html)[1]


def test_two_viewers_refreshing_share_one_plan_until_the_next_pass(settings, make_user, alice, bob, acme):
    settings.OPENTINKER_QUEUE_EXPLAIN_S = 60  # a slow test machine must not see the window lapse
    make_pool("gpu-a", 1)
    set_quota(acme, max_gpus=1, max_queued_jobs=10)
    running = submit(acme, gpus=1, name="running")
    assert schedule_pass().admitted == [running.pk]
    waiting = submit(acme, gpus=1, name="waiting")
    as_alice, as_bob = signed_in(alice, acme), signed_in(bob, acme)
    quota_wait = "quota: the organization holds 1 of its 1 concurrent GPUs; this job needs 1 more"

    before = READ_ONLY_PLANS["computed"]
    for _ in range(2):  # two refreshes each
        assert status(as_alice, waiting) == ("position 1 of 1 waiting", quota_wait)
        assert status(as_bob, waiting) == ("position 1 of 1 waiting", quota_wait)
    assert READ_ONLY_PLANS["computed"] - before == 1

    # A job queued since is not in it: its page recomputes once, and the others read the new one.
    later = submit(acme, gpus=1, name="later")
    assert status(as_bob, later) == ("position 2 of 2 waiting", quota_wait)
    assert status(as_alice, waiting) == ("position 1 of 2 waiting", quota_wait)
    assert READ_ONLY_PLANS["computed"] - before == 2

    # The running job ends and a pass admits `waiting`: the pass dropped the explanation, so the next view
    # recomputes it and `later` now waits alone.
    Job.objects.filter(pk=running.pk).update(state="running")
    job_process_exited(allocation_id=Allocation.objects.get(job=running).pk, exit_code=0)
    assert schedule_pass().admitted == [waiting.pk]
    assert status(as_alice, later) == ("position 1 of 1 waiting", quota_wait)
    assert status(as_bob, later) == ("position 1 of 1 waiting", quota_wait)
    assert READ_ONLY_PLANS["computed"] - before == 3


def test_the_admin_queue_is_fresh_and_shares_what_it_computed(settings, make_user, alice, acme):
    settings.OPENTINKER_QUEUE_EXPLAIN_S = 60
    staffer = make_user("staffer", staff=True)
    make_pool("gpu-a", 1)
    set_quota(acme, max_gpus=1)
    job = submit(acme, gpus=1, name="waits")
    set_quota(acme, max_gpus=0)  # lowered after submission: the job waits on its quota
    as_staff, as_alice = signed_in(staffer), signed_in(alice, acme)
    before = READ_ONLY_PLANS["computed"]
    for _ in range(2):  # staff act on what they see: every view is computed now
        assert 'data-testid="reason">quota: asks for 1 GPUs; the organization may hold at most 0' in (
            as_staff.get("/console/queue/").content.decode()
        )
    assert READ_ONLY_PLANS["computed"] - before == 2
    # ... and the job page reads what the admin view computed.
    assert status(as_alice, job)[0] == "position 1 of 1 waiting"
    assert READ_ONLY_PLANS["computed"] - before == 2


def test_a_zero_window_computes_every_view(settings, alice, acme):
    settings.OPENTINKER_QUEUE_EXPLAIN_S = 0
    make_pool("gpu-a", 1)
    set_quota(acme, max_gpus=1)
    job = submit(acme, gpus=1, name="waits")
    set_quota(acme, max_gpus=0)  # lowered after submission: the job waits on its quota
    client = signed_in(alice, acme)
    before = READ_ONLY_PLANS["computed"]
    status(client, job)
    status(client, job)
    assert READ_ONLY_PLANS["computed"] - before == 2
