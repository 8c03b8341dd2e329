"""job_set_priority: a platform admin re-orders a job within its organization's queue."""

from __future__ import annotations

import pytest

from opentinker.spec import JobState
from portal.actors import Actor
from portal.errors import Conflict, DomainError
from portal.models import Job, JobEvent
from portal.services.jobs import job_set_priority, job_transition
from portal.services.scheduler import schedule_pass
from tests.workers.conftest import make_pool, set_quota, submit

pytestmark = pytest.mark.django_db
ADMIN = Actor.system("ops-admin")


def test_the_raised_job_starts_first(acme):
    make_pool("gpu-a", 1)
    set_quota(acme, max_gpus=1)
    first = submit(acme, gpus=1, name="first")
    second = submit(acme, gpus=1, name="second")
    job_set_priority(job=second, priority=5, actor=ADMIN, reason="deadline")
    assert schedule_pass().admitted == [second.pk]
    second.refresh_from_db()
    assert (second.priority, second.spec["priority"], second.state) == (5, 5, "admitted")
    event = JobEvent.objects.filter(job=second, kind="info").get()
    assert event.message == "priority changed from 0 to 5 by ops-admin: deadline"
    assert event.data == {"priority": [0, 5]}
    assert Job.objects.get(pk=first.pk).state == "queued"


@pytest.mark.parametrize("bad", [11, -11, True, "3", 2.5])
def test_out_of_range_or_not_an_integer_is_refused(acme, bad):
    job = submit(acme, name="j")
    with pytest.raises(DomainError) as e:
        job_set_priority(job=job, priority=bad, actor=ADMIN)
    assert e.value.field == "priority"
    job.refresh_from_db()
    assert job.priority == 0 and job.spec["priority"] == 0


def test_a_finished_job_keeps_its_priority_and_the_same_value_records_nothing(acme):
    job = submit(acme, name="j")
    events = JobEvent.objects.filter(job=job).count()
    job_set_priority(job=job, priority=0, actor=ADMIN)
    assert JobEvent.objects.filter(job=job).count() == events
    job_transition(job=job, to=JobState.CANCELLED, actor=ADMIN)
    with pytest.raises(Conflict, match="already finished"):
        job_set_priority(job=job, priority=3, actor=ADMIN)
    assert Job.objects.get(pk=job.pk).priority == 0
