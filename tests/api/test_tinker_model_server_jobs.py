"""Model-server jobs (portal/services/model_servers.py) without a model server process: one live job per base
model however it is asked for, a new one once the last has ended, the API's call asking only while no
server holds the base's lease, and the supervisor's pass queueing one for a queue left waiting.
Actors: alice (acme) makes the calls; the job is the platform organization's, not acme's."""

from __future__ import annotations

import json
import uuid
from datetime import timedelta

import pytest
from django.db import IntegrityError, transaction
from django.utils import timezone

from api.tinker import queue
from portal.models import MODEL_SERVER_KIND, Job
from portal.services.model_servers import (
    FAILED_RETRY_AFTER_S,
    model_server_ensure,
    model_servers_reconcile,
)

pytestmark = pytest.mark.django_db


@pytest.fixture
def base():
    name = f"test-base-{uuid.uuid4().hex[:8]}"
    yield name
    queue.client().delete(queue.ops_key(name), queue.lease_key(name))


def test_one_live_job_per_base_model_and_a_new_one_after_it_ended(base, acme):
    job, created = model_server_ensure(base)
    assert created and (job.organization.slug, job.kind, job.state) == (
        "opentinker",
        MODEL_SERVER_KIND,
        "queued",
    )
    assert model_server_ensure(base) == (job, False)
    assert job.events.get().message == f"a Tinker call for {base} found no model server: starting one"
    with pytest.raises(IntegrityError), transaction.atomic():  # what a racing second API worker hits
        Job.objects.create(
            organization=job.organization, name=job.name, kind=MODEL_SERVER_KIND, spec={}, spec_version=1
        )
    Job.objects.filter(pk=job.pk).update(state="succeeded")  # it went idle and exited
    again, created = model_server_ensure(base)
    assert created and again.pk != job.pk
    assert not acme.jobs.exists()  # nobody's tenant job


def test_a_call_asks_for_a_server_only_while_none_holds_the_lease(base, settings):
    client = queue.client()
    client.set(queue.lease_key(base), "running-server", px=60_000)
    queue.enqueue(base, {"op": "x"})
    assert not Job.objects.filter(kind=MODEL_SERVER_KIND).exists()  # a server runs: one Valkey read, no job
    client.delete(queue.lease_key(base))
    settings.OPENTINKER_TINKER_AUTOSTART = False
    queue.enqueue(base, {"op": "x"})
    assert not Job.objects.filter(kind=MODEL_SERVER_KIND).exists()  # operators start servers by hand
    settings.OPENTINKER_TINKER_AUTOSTART = True
    queue.enqueue(base, {"op": "x"})
    assert Job.objects.get(kind=MODEL_SERVER_KIND).spec["model_server"]["base_model"] == base
    assert client.llen(queue.ops_key(base)) == 3  # every call waits in the queue meanwhile


def test_the_supervisor_queues_a_server_for_a_waiting_queue(base, settings):
    client = queue.client()
    client.rpush(queue.ops_key(base), json.dumps({"op": "x"}))
    client.set(queue.lease_key(base), "running-server", px=60_000)
    assert base not in model_servers_reconcile(client)  # served
    client.delete(queue.lease_key(base))
    settings.OPENTINKER_TINKER_AUTOSTART = False
    assert model_servers_reconcile(client) == []
    settings.OPENTINKER_TINKER_AUTOSTART = True
    assert base in model_servers_reconcile(client)
    assert base not in model_servers_reconcile(client)  # queued already: not a second job
    assert Job.objects.filter(kind=MODEL_SERVER_KIND, name=f"model server {base}").count() == 1


def test_a_failed_server_is_queued_again_after_a_growing_wait(base):
    """A server that fails (crashes, cannot start) is queued again only FAILED_RETRY_AFTER_S (30 s) after,
    not at the next call or supervisor pass (that loop would never end); each further failure within the
    hour doubles the wait."""
    client = queue.client()
    client.rpush(queue.ops_key(base), json.dumps({"op": "x"}))
    first, created = model_server_ensure(base)
    assert created and FAILED_RETRY_AFTER_S == 30
    Job.objects.filter(pk=first.pk).update(state="failed", finished_at=timezone.now())
    assert model_server_ensure(base) == (first, False)
    assert base not in model_servers_reconcile(client)
    queue.enqueue(base, {"op": "x"})
    assert Job.objects.filter(kind=MODEL_SERVER_KIND, name=first.name).count() == 1
    Job.objects.filter(pk=first.pk).update(finished_at=timezone.now() - timedelta(seconds=31))
    assert base in model_servers_reconcile(client)
    second = Job.objects.get(kind=MODEL_SERVER_KIND, name=first.name, state="queued")
    # It failed too: two failures in the hour, 60 s.
    ago_31 = timezone.now() - timedelta(seconds=31)
    Job.objects.filter(pk=second.pk).update(state="failed", finished_at=ago_31)
    assert base not in model_servers_reconcile(client)
    Job.objects.filter(pk=second.pk).update(finished_at=timezone.now() - timedelta(seconds=61))
    assert base in model_servers_reconcile(client)
    assert Job.objects.filter(kind=MODEL_SERVER_KIND, name=first.name).count() == 3


def test_the_platforms_monthly_gpu_hours_do_not_stop_its_model_servers(base, settings):
    """The platform organization's quota, as its migrations leave it: a model server on one GPU is admitted
    (env_registry 0002 gave it zeros: it waited for ever) whatever GPU-hours it used this month (a server runs
    for days; a monthly budget would stop every model server until the month ends)."""
    from portal.models import ComputePool, UsageRecord
    from portal.services.model_servers import platform_org
    from portal.services.scheduler import schedule_pass
    from portal.services.usage import month_start

    settings.OPENTINKER_TINKER_SERVER_GPUS = 1
    settings.OPENTINKER_TINKER_POOL = ""
    ComputePool.objects.create(
        name="gpu-ms", total_gpus=1, gpus_by_type={"H100": 1}, cpus=8, health=ComputePool.Health.HEALTHY
    )
    org = platform_org()
    assert (org.quota.max_gpus, org.quota.gpu_hours_per_month) == (1, 10_000_000)
    month = month_start(timezone.now())
    UsageRecord.objects.create(organization=org, month=month, gpu_seconds=500 * 3600)  # 500 GPU-hours
    job, created = model_server_ensure(base)
    assert created and job.gpus == 1
    assert job.pk in schedule_pass().admitted
