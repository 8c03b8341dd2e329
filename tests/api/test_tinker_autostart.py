"""Model servers started on demand (portal/services/model_servers.py), with the official `tinker` SDK: no
model server runs; creating a training client queues a model-server job of the platform organization, the
scheduler admits it on the local pool, the local driver starts it (`python -m gpu_runtime run spec.json` under
`workers.runner`) and the SDK's call, which simply waited, completes. A second organization's client on the
same base uses the same server (one job). The server killed, supervision re-queues the job and the restarted
server answers the SDK: the killed server's training client fails clearly, a new one works. Idle, the server
exits, the job succeeds and its allocation is released.

Actors: alice (owner of acme) trains, bob (member of acme) and charlie (outsider, globex) see nothing of the
platform's job; charlie's client shares the server and cannot see alice's model."""

from __future__ import annotations

import concurrent.futures
import contextlib
import os
import signal
import time

import pytest
import tinker
from django.db import connection
from tinker import types

from api.tinker import queue
from api.tinker.auth import sdk_key
from opentinker.spec import JobState
from portal.models import MODEL_SERVER_KIND, Allocation, ComputePool, Job
from portal.services.scheduler import schedule_pass
from tests.api import tinker_live
from tests.api.tinker_live import BASE_MODEL, WAIT, datum, post
from tests.workers.test_local_driver import wait_for
from workers.supervisor import launch

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow, pytest.mark.timeout(600)]
platform = tinker_live.platform
DATA = [datum([ord(c) % 200 + 3 for c in "the cat sat on the mat."])]
IDLE_S = 6  # the server's idle exit: long enough for the test's gaps between calls on a loaded box


def server_job() -> Job:
    return Job.objects.get(kind=MODEL_SERVER_KIND)


def start_admitted() -> Allocation:
    """What the platform's beat does: a scheduling pass, then the launcher."""
    job = server_job()
    assert job.pk in schedule_pass().admitted
    alloc = Allocation.objects.get(job=job, released_at__isnull=True)
    assert alloc.pool.name == "local" and (alloc.gpus, alloc.slots) == (0, 1)
    assert launch(alloc.pk) == "launched"
    return Allocation.objects.get(pk=alloc.pk)  # with the runtime's process group


@pytest.fixture
def on_demand(platform, settings, monkeypatch, tmp_path):
    settings.OPENTINKER_TINKER_AUTOSTART = True
    settings.OPENTINKER_TINKER_IDLE_EXIT_S = IDLE_S
    # The restarted server waits up to this long for the killed one's lease (mostly hidden by its start-up);
    # a live server renews it every third: with a TTL of 2 s, its lease thread left unscheduled for 1.3 s on
    # a loaded box would let it lapse (the server exits 3, the job fails).
    settings.OPENTINKER_TINKER_LEASE_TTL_S = 6
    settings.OPENTINKER_RUNTIME_COMMAND = None  # the real `python -m gpu_runtime run`
    settings.OPENTINKER_JOBS_DIR = str(tmp_path / "jobs")
    settings.INGEST_BASE_URL = platform
    db = connection.settings_dict
    url = f"postgres://{db['USER']}:{db['PASSWORD'] or ''}@{db['HOST']}:{db['PORT']}/{db['NAME']}"
    monkeypatch.setenv("DATABASE_URL", url)
    monkeypatch.setenv("OPENTINKER_RUNNER_HEARTBEAT_S", "0.5")
    monkeypatch.setenv("OPENTINKER_RUNTIME_PASS_ENV", "OMP_NUM_THREADS")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    ComputePool.objects.create(
        name="local",
        total_gpus=2,
        gpus_by_type={"cpu-slot": 2},
        cpus=2,
        cpu_slots=True,
        health=ComputePool.Health.HEALTHY,
    )
    yield platform
    for alloc in Allocation.objects.filter(released_at__isnull=True).exclude(runtime_handle=""):
        if alloc.runtime_handle.isdigit():  # a failed test leaves no model server behind
            with contextlib.suppress(ProcessLookupError):
                os.killpg(int(alloc.runtime_handle), signal.SIGKILL)


def test_a_training_client_starts_a_model_server_which_is_restarted_and_stops_when_idle(
    on_demand, alice, bob, charlie, acme, globex, make_token, as_bob
):
    started = time.monotonic()
    key = sdk_key(make_token(alice, acme, scopes=["tinker"]))
    charlie_key = sdk_key(make_token(charlie, globex, scopes=["tinker"]))
    assert not queue.client().exists(queue.lease_key(BASE_MODEL)) and not Job.objects.exists()
    service = tinker.ServiceClient(base_url=f"{on_demand}/tinker", api_key=key)
    pool = concurrent.futures.ThreadPoolExecutor(2)
    creating = pool.submit(
        lambda: service.create_lora_training_client(base_model=BASE_MODEL, rank=4, seed=0).result(WAIT)
    )

    # The call queued a model-server job of the platform organization; the SDK waits meanwhile.
    job = wait_for(lambda: Job.objects.filter(kind=MODEL_SERVER_KIND).first(), WAIT, "the model-server job")
    assert isinstance(job, Job)
    assert (job.organization.slug, job.organization.is_platform) == ("opentinker", True)
    assert (job.state, job.name, job.gpus) == ("queued", f"model server {BASE_MODEL}", 0)
    assert job.spec["model_server"]["base_model"] == BASE_MODEL
    assert job.spec["model_server"]["idle_exit_s"] == IDLE_S
    assert not creating.done()
    # Charlie's training client on the same base while it starts: the same job, not a second one.
    charlie_service = tinker.ServiceClient(base_url=f"{on_demand}/tinker", api_key=charlie_key)
    charlies = pool.submit(
        lambda: charlie_service.create_lora_training_client(base_model=BASE_MODEL, rank=4).result(WAIT)
    )
    first = start_admitted()
    trainer = creating.result(timeout=WAIT)
    theirs = charlies.result(timeout=WAIT)
    assert Job.objects.filter(kind=MODEL_SERVER_KIND).count() == 1
    assert server_job().state == "running"
    loss = trainer.forward_backward(DATA, "cross_entropy").result(timeout=WAIT).metrics["loss:sum"]
    assert loss > 0
    trainer.optim_step(types.AdamParams(learning_rate=1e-2)).result(timeout=WAIT)
    assert queue.client().get(queue.lease_key(BASE_MODEL)) is not None
    # Tenancy: the platform's job is nobody's job; charlie cannot see alice's model.
    assert as_bob.get("/api/v1/jobs").json()["count"] == 0
    info = post(on_demand, charlie_key, "get_info", {"model_id": trainer.model_id})
    assert info.status_code == 404
    assert theirs.model_id != trainer.model_id

    # Killed: the runner reports the signal, the job is re-queued (lost) and started again.
    os.killpg(int(first.runtime_handle), signal.SIGKILL)
    wait_for(lambda: server_job().state == JobState.QUEUED, WAIT, "the re-queue")
    assert server_job().attempt == 1
    assert Allocation.objects.get(pk=first.pk).release_reason.startswith("lost: runtime killed by signal 9")
    second = start_admitted()
    assert second.attempt == 1 and second.pk != first.pk
    # The dead server held alice's adapter in memory (no park on SIGKILL): her next call fails clearly...
    with pytest.raises(Exception, match="not on this model server"):
        trainer.forward_backward(DATA, "cross_entropy").result(timeout=WAIT)
    # ...and a new training client is served by the restarted server.
    again = service.create_lora_training_client(base_model=BASE_MODEL, rank=4, seed=0).result(timeout=WAIT)
    assert again.forward(DATA, "cross_entropy").result(timeout=WAIT).metrics["loss:sum"] == pytest.approx(
        loss, rel=1e-4
    )  # the same seed, the same fresh adapter, the same loss

    # No more calls: the server exits after IDLE_S, the job succeeds, its capacity is free again.
    wait_for(lambda: server_job().state == JobState.SUCCEEDED, WAIT, "the idle exit")
    done = Allocation.objects.get(pk=second.pk)
    assert done.released_at is not None and done.release_reason == "succeeded" and done.exit_code == 0
    assert not Allocation.objects.filter(released_at__isnull=True).exists()
    assert not queue.client().exists(queue.lease_key(BASE_MODEL))  # released on the way out
    pool.shutdown()
    print(f"on-demand model server test: {time.monotonic() - started:.0f} s")
