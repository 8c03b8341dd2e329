"""The ``ray`` driver against a real two-node Ray cluster started on this machine (``ray_cluster.py``).

One test, so the cluster starts once: the pool's capacity and health are read from the cluster's nodes; the
real ``python -m gpu_runtime run`` job is submitted through the Job Submission API (idempotent per attempt),
followed by supervisor passes, reports metrics and a checkpoint over HTTP to a live uvicorn, and ends
``succeeded``; meanwhile a second job (the fake runtime) on the other node is cancelled and stopped through
``stop_job``; when the cluster goes away the pool is reported down. Actors: acme's jobs; globex (outsider)
sees none of them through the API.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time

import httpx
import pytest

from opentinker.spec import AlgorithmSpec, CheckpointSpec, EnvironmentSpec, ResourcesSpec, example_rl_spec
from portal.actors import Actor
from portal.models import Allocation, Checkpoint, ComputePool, Job, JobLog, Metric
from portal.services.jobs import job_cancel, job_submit
from portal.services.pools import pool_create
from portal.services.scheduler import schedule_pass
from tests.api.test_stream import uvicorn_url  # noqa: F401 (fixture)
from tests.conftest import client_for
from tests.workers.conftest import FAKE_RUNTIME, set_quota
from tests.workers.ray_cluster import start_cluster, wait_for
from workers.drivers.ray import RayDriver, submission_id
from workers.supervisor import launch, pools_refresh, supervise

SECRET = "sk-env-ray-4f1c9e-not-for-the-job-api"

pytestmark = [
    pytest.mark.django_db(transaction=True),
    pytest.mark.usefixtures("builtin_envs"),
    pytest.mark.slow,
    pytest.mark.timeout(240),
]


@pytest.fixture
def ray_cluster():
    cluster = start_cluster(cpus_per_node=1, nodes=2)
    try:
        yield cluster
    finally:
        cluster.stop()  # exactly its own processes: nothing of it is left running


def submit(org, spec):
    job, _ = job_submit(organization=org, actor=Actor.system("test"), spec=spec)
    return job


def test_ray_pool_runs_a_real_job_to_success_and_stops_a_cancelled_one(
    ray_cluster,
    uvicorn_url,  # noqa: F811
    runner_env,
    settings,
    acme,
    globex,
    alice,
    charlie,
    make_token,
):
    settings.OPENTINKER_LOCAL_POOL = ""  # only the ray pool
    settings.INGEST_BASE_URL = uvicorn_url
    settings.OPENTINKER_RAY_RUNTIME_COMMAND = [sys.executable, "-m", "gpu_runtime", "run"]
    set_quota(acme, max_gpus=0, max_queued_jobs=10)
    pool = pool_create(name="ray-a", driver="ray", ray_address=ray_cluster.dashboard_url)

    # Capacity and health from the cluster: two alive nodes of one CPU each, no GPU: two CPU slots.
    def refreshed():
        pools_refresh()
        pool.refresh_from_db()
        return pool.total_gpus == 2

    wait_for(refreshed, 30, "both nodes in the pool's capacity")
    assert (pool.health, pool.cpu_slots, pool.gpus_by_type, pool.cpus) == (
        "healthy",
        True,
        {"cpu-slot": 2},
        2,
    )

    spec = example_rl_spec().model_copy(
        update={
            "algorithm": AlgorithmSpec(name="grpo", steps=3, batch_size=2, group_size=2, max_new_tokens=4),
            "checkpoint": CheckpointSpec(every_steps=2, keep_last=2),
            "resources": ResourcesSpec(gpus=0, cpus=1, memory_gb=2, max_hours=0.2, pool="ray-a"),
        }
    )
    real = submit(acme, spec)
    # The fake job's remote environment needs a secret: it must reach the job, yet not its runtime_env.
    assert (
        client_for(make_token(alice, acme))
        .post("/api/v1/org/env-secrets", {"name": "openenv", "value": SECRET}, format="json")
        .status_code
        == 201
    )
    fake = submit(
        acme,
        example_rl_spec().model_copy(
            update={
                "name": "fake_steps-300_sleep-0.2",
                "environment": EnvironmentSpec(ref="https://env.example/arithmetic", secret="openenv"),
                "resources": ResourcesSpec(gpus=0, cpus=1, memory_gb=1, max_hours=0.2, pool="ray-a"),
            }
        ),
    )
    assert set(schedule_pass().admitted) == {real.pk, fake.pk}
    real_alloc = Allocation.objects.get(job=real, released_at__isnull=True)
    assert launch(real_alloc.pk) == "launched"
    settings.OPENTINKER_RAY_RUNTIME_COMMAND = FAKE_RUNTIME
    fake_alloc = Allocation.objects.get(job=fake, released_at__isnull=True)
    assert launch(fake_alloc.pk) == "launched"
    real_alloc.refresh_from_db()
    assert real_alloc.runtime_handle == submission_id(real_alloc) == f"otk-{real.pk}-0"
    assert real_alloc.runtime_host == ray_cluster.dashboard_url
    assert Job.objects.get(pk=real.pk).state == "running"

    # A retried launch finds its submission: no second Ray job for the same attempt.
    driver = RayDriver(pool)
    work = runner_env / "jobs" / str(real.pk) / "attempt-0"
    assert driver.launch(real_alloc, work, work / "spec.json", {}).handle == real_alloc.runtime_handle
    ours = [j for j in driver.client.list_jobs() if (j.submission_id or "").startswith("otk-")]
    assert sorted(j.submission_id for j in ours) == sorted([f"otk-{real.pk}-0", f"otk-{fake.pk}-0"])

    # What anyone with the cluster's Job API reads: no job token, no environment secret, only a bootstrap.
    bootstraps = {}
    for j in ours:
        runtime_env = driver.client.get_job_info(j.submission_id).runtime_env
        env_vars = runtime_env["env_vars"]
        assert not {"OPENTINKER_JOB_TOKEN", "OPENTINKER_ENV_SECRET"} & set(env_vars), sorted(env_vars)
        assert SECRET not in json.dumps(runtime_env) and "otj_" not in json.dumps(runtime_env)
        bootstraps[j.submission_id] = env_vars["OPENTINKER_BOOTSTRAP_TOKEN"]
        assert bootstraps[j.submission_id].startswith("otb_")

    # The fake job runs on the other node, printing a line every 0.2 s: supervisor passes copy what it printed
    # so far into the job's log (the portal's live tail) while it still runs.
    fake_alloc.refresh_from_db()

    def fake_lines():
        return list(JobLog.objects.filter(job=fake).order_by("seq").values_list("line", flat=True))

    wait_for(lambda: supervise() and "step 2" in fake_lines(), 60, "fake step 2 in the job's log")
    assert str(driver.client.get_job_status(fake_alloc.runtime_handle)) == "RUNNING"
    assert Job.objects.get(pk=fake.pk).state == "running"
    # It got its job token and its environment secret by redeeming the bootstrap token...
    assert any(
        f"token=True bootstrap=True secret={hashlib.sha256(SECRET.encode()).hexdigest()[:12]}" in line
        for line in fake_lines()
    ), fake_lines()[:5]
    # ... which is spent: the copy in the cluster's job API is worth nothing.
    spent = httpx.post(
        f"{uvicorn_url}/api/v1/ingest/jobs/{fake.pk}/bootstrap",
        headers={"Authorization": f"Bearer {bootstraps[fake_alloc.runtime_handle]}"},
    )
    assert spent.status_code == 401, spent.text
    # Cancelling it stops the Ray job (SIGTERM at a step boundary).
    job_cancel(job=fake, actor=Actor.system("test"))

    deadline = time.monotonic() + 150
    while {Job.objects.get(pk=j.pk).state for j in (real, fake)} - {"succeeded", "cancelled", "failed"}:
        supervise()  # what beat runs every few seconds
        assert time.monotonic() < deadline, [Job.objects.get(pk=j.pk).state for j in (real, fake)]
        time.sleep(0.5)

    fake.refresh_from_db()
    assert fake.state == "cancelled", fake.state_reason
    assert str(driver.client.get_job_status(fake_alloc.runtime_handle)) == "STOPPED"
    # Copied over many passes, while it ran and after: every line of the Ray job's log once, in order.
    ray_log = driver.client.get_job_logs(fake_alloc.runtime_handle).splitlines()
    assert fake_lines() == ray_log and "step 1" in ray_log and ray_log[-1].startswith("stopping before step")
    real.refresh_from_db()
    logs = "\n".join(JobLog.objects.filter(job=real).values_list("line", flat=True))
    assert real.state == "succeeded", f"{real.state_reason}\n{logs[-3000:]}"
    steps = list(
        Metric.objects.filter(job=real, name="reward/mean").order_by("step").values_list("step", flat=True)
    )
    assert steps == [1, 2, 3]  # ingested over HTTP from inside the Ray job: none missing, none twice
    assert list(Checkpoint.objects.filter(job=real).order_by("step").values_list("step", flat=True))[-1] == 3
    assert "Running entrypoint for job" in logs  # the Ray job's log, captured into the job's log
    assert Allocation.objects.filter(job__in=[real, fake], released_at__isnull=True).count() == 0

    assert client_for(make_token(charlie, globex)).get(f"/api/v1/jobs/{real.pk}").status_code == 404
    assert client_for(make_token(alice, acme)).get(f"/api/v1/jobs/{real.pk}").json()["state"] == "succeeded"

    # The cluster goes away: the pool is reported down and admits nothing.
    ray_cluster.stop()
    pools_refresh()
    pool.refresh_from_db()
    assert pool.health == ComputePool.Health.DOWN and pool.health_message
