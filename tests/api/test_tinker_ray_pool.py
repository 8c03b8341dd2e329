"""A Tinker model server on a Ray pool, for real: the test session's Ray cluster (tests/ray_session.py) is the
Tinker pool (`OPENTINKER_TINKER_POOL`); the official `tinker` SDK creates a LoRA training client, which queues
the platform's model-server job; the scheduler admits it on the Ray pool and the `ray` driver submits it as a
Ray job (`python -m gpu_runtime run spec.json`, like every job on a Ray pool), which redeems its bootstrap
token for its model-server token and queue URL (neither is in the cluster's Job API). forward_backward,
optim_step and a sample complete; then the server idles out, the supervisor's pass sees the Ray job
succeed, the job succeeds and its allocation ends.

Actors: alice (owner of acme) trains; bob (member of acme) and charlie (outsider, globex) see nothing of the
platform's job."""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import sys

import pytest
import tinker
from tinker import types

from api.tinker import queue
from api.tinker.auth import sdk_key
from opentinker.spec import JobState
from portal.models import MODEL_SERVER_KIND, Allocation, ComputePool, Job, JobLog
from portal.services.pools import pool_create
from portal.services.scheduler import schedule_pass
from tests.api import tinker_live
from tests.api.tinker_live import BASE_MODEL, WAIT, datum
from tests.workers.test_local_driver import supervised, wait_for
from workers.drivers.ray import RayDriver, submission_id
from workers.supervisor import launch, pools_refresh

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow, pytest.mark.timeout(600)]
platform = tinker_live.platform
DATA = [datum([ord(c) % 200 + 3 for c in "the cat sat on the mat."])]
IDLE_S = 6  # the server's idle exit: long enough for the test's gaps between calls on a loaded box


def server_job() -> Job:
    return Job.objects.get(kind=MODEL_SERVER_KIND)


@pytest.fixture
def ray_tinker_pool(platform, ray_job_api, settings, tmp_path):
    settings.OPENTINKER_LOCAL_POOL = ""  # only the Ray pool
    settings.OPENTINKER_TINKER_POOL = "ray-tinker"
    settings.OPENTINKER_TINKER_AUTOSTART = True
    settings.OPENTINKER_TINKER_IDLE_EXIT_S = IDLE_S
    settings.OPENTINKER_TINKER_LEASE_TTL_S = 6
    settings.OPENTINKER_JOBS_DIR = str(tmp_path / "jobs")
    settings.INGEST_BASE_URL = platform
    settings.OPENTINKER_RAY_RUNTIME_COMMAND = [sys.executable, "-m", "gpu_runtime", "run"]
    settings.OPENTINKER_RAY_ENV_VARS = {"OMP_NUM_THREADS": "1", "TINKER_TELEMETRY": "0"}
    pool = pool_create(name="ray-tinker", driver="ray", ray_address=ray_job_api)
    pools_refresh()
    pool.refresh_from_db()
    # The session cluster: two nodes of two CPUs: four CPU slots; on a GPU machine, its GPUs on the head
    # (the server then takes one).
    assert pool.health == ComputePool.Health.HEALTHY and (pool.total_gpus == 4 or not pool.cpu_slots)
    settings.OPENTINKER_TINKER_SERVER_GPUS = 0 if pool.cpu_slots else 1
    yield pool
    for alloc in Allocation.objects.filter(released_at__isnull=True, runtime_handle__startswith="otk-"):
        with contextlib.suppress(Exception):  # a failed test leaves no model server on the shared cluster
            RayDriver(pool).client.stop_job(alloc.runtime_handle)


def test_a_model_server_runs_as_a_ray_job_on_the_tinker_ray_pool_and_ends_when_idle(
    ray_tinker_pool, platform, alice, acme, make_token, as_bob, as_charlie
):
    key = sdk_key(make_token(alice, acme, scopes=["tinker"]))
    assert not queue.client().exists(queue.lease_key(BASE_MODEL)) and not Job.objects.exists()
    service = tinker.ServiceClient(base_url=f"{platform}/tinker", api_key=key)
    pool = concurrent.futures.ThreadPoolExecutor(1)
    creating = pool.submit(
        lambda: service.create_lora_training_client(base_model=BASE_MODEL, rank=4, seed=0).result(WAIT)
    )

    # The call queued the platform's model-server job for the Tinker pool; the scheduler admits it there.
    job = wait_for(lambda: Job.objects.filter(kind=MODEL_SERVER_KIND).first(), WAIT, "the model-server job")
    assert isinstance(job, Job) and job.pool == "ray-tinker" and job.organization.slug == "opentinker"
    assert job.pk in schedule_pass().admitted
    alloc = Allocation.objects.get(job=job, released_at__isnull=True)
    assert (alloc.pool.name, alloc.gpus) == ("ray-tinker", 0 if ray_tinker_pool.cpu_slots else 1)
    assert launch(alloc.pk) == "launched"
    alloc.refresh_from_db()
    assert alloc.runtime_handle == submission_id(alloc) == f"otk-{job.pk}-0"
    assert alloc.runtime_host == ray_tinker_pool.ray_address

    # What anyone with the cluster's Job API reads: a bootstrap token, not the model-server token, not
    # Valkey's URL (which may carry its password).
    driver = RayDriver(ray_tinker_pool)
    runtime_env = driver.client.get_job_info(alloc.runtime_handle).runtime_env
    env_vars = runtime_env["env_vars"]
    assert env_vars["OPENTINKER_BOOTSTRAP_TOKEN"].startswith("otb_")
    assert not {"OPENTINKER_MODEL_SERVER_TOKEN", "OPENTINKER_QUEUE_URL"} & set(env_vars)
    assert "otm_" not in json.dumps(runtime_env)

    # The SDK's call, which simply waited, completes once the Ray job serves; the supervisor's passes follow
    # the Ray job meanwhile (heartbeat, log copy).
    wait_for(supervised(creating.done), WAIT, "the training client")
    trainer = creating.result()
    assert server_job().state == "running"
    loss = trainer.forward_backward(DATA, "cross_entropy").result(timeout=WAIT).metrics["loss:sum"]
    assert loss > 0
    step = trainer.optim_step(types.AdamParams(learning_rate=1e-2)).result(timeout=WAIT)
    assert step.metrics["learning_rate:mean"] == pytest.approx(1e-2)
    sampler = trainer.save_weights_and_get_sampling_client().result(timeout=WAIT)
    params = types.SamplingParams(max_tokens=4, temperature=1.0, seed=1, stop=[])
    prompt = types.ModelInput.from_ints([5, 6, 7])
    samples = sampler.sample(prompt=prompt, num_samples=2, sampling_params=params).result(timeout=WAIT)
    assert [len(s.tokens) for s in samples.sequences] == [4, 4]
    assert queue.client().get(queue.lease_key(BASE_MODEL)) is not None
    # The platform's job is nobody's job.
    assert as_bob.get("/api/v1/jobs").json()["count"] == 0
    assert as_charlie.get(f"/api/v1/jobs/{job.pk}").status_code == 404

    # No more calls: the server exits after IDLE_S; a supervisor pass sees the Ray job succeed.
    wait_for(supervised(lambda: server_job().state == JobState.SUCCEEDED), WAIT, "the idle exit")
    assert str(driver.client.get_job_status(alloc.runtime_handle)) == "SUCCEEDED"
    done = Allocation.objects.get(pk=alloc.pk)
    assert done.released_at is not None and done.release_reason == "succeeded" and done.exit_code == 0
    assert not Allocation.objects.filter(released_at__isnull=True).exists()
    assert not queue.client().exists(queue.lease_key(BASE_MODEL))  # released on the way out
    lines = "\n".join(JobLog.objects.filter(job=job).values_list("line", flat=True))
    assert f"model server for {BASE_MODEL}: serving" in lines  # the Ray job's log, in the job's log
    pool.shutdown()
