"""Production mode, smoke test: the platform image's processes, started with exactly the commands the images
and deployment files give them (deploy/processes.py: migrate, web, worker, beat; the settings module the image
sets), in production mode against PostgreSQL, Valkey and moto's S3; the example job submitted through the SDK
succeeds, its metrics come back through the API, its checkpoint lies in S3, /readyz sees beat and the worker,
and the image's HEALTHCHECK passes. The pool is a `local` one (OPENTINKER_LOCAL_POOL): the images run jobs
on Ray pools, whose driver tests/workers/test_ray_driver.py covers."""

from __future__ import annotations

import hashlib
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from django.conf import settings
from django.db import connection

from deploy.processes import PROCESSES
from opentinker.client import Client
from opentinker.spec import AlgorithmSpec, CheckpointSpec, ResourcesSpec, example_rl_spec
from portal.celery import app
from tests.uvicorn_ready import wait_listening

pytestmark = [
    pytest.mark.django_db(transaction=True),
    pytest.mark.usefixtures("builtin_envs"),
    pytest.mark.slow,
    pytest.mark.timeout(420),
]

BASE = Path(__file__).resolve().parents[2]


def argv(role: str) -> list[str]:
    """The image's command for a role, with this machine's Python for the image's `python`."""
    command = PROCESSES[role]
    assert command[0] == "python"
    return [sys.executable, *command[1:]]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def production_env(tmp_path: Path, port: int, s3_endpoint: str) -> dict[str, str]:
    db = connection.settings_dict
    peppers = ",".join(f"{k}:{v}" for k, v in settings.TOKEN_PEPPERS.items())  # the tokens made here
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENTINKER_", "DJANGO_"))}
    env.update(
        {
            # What the image and compose.yaml / the Helm chart set.
            "DJANGO_SETTINGS_MODULE": "portal.settings",
            "OPENTINKER_MODE": "production",
            "OPENTINKER_VAR_DIR": str(tmp_path / "var"),
            "SECRET_KEY": hashlib.sha256(b"smoke").hexdigest(),
            "TOKEN_PEPPERS": peppers,
            "ALLOWED_HOSTS": "127.0.0.1",
            "CSRF_TRUSTED_ORIGINS": "https://127.0.0.1",
            "SECURE_SSL_REDIRECT": "false",  # the TLS proxy's job (compose.yaml, the chart)
            "DATABASE_URL": (
                f"postgres://{db['USER']}:{db['PASSWORD'] or ''}@{db['HOST']}:{db['PORT']}/{db['NAME']}"
            ),
            "REDIS_URL": settings.REDIS_URL,
            "OBJECT_STORE_URL": "s3://otk-store/store",
            "S3_ENDPOINT_URL": s3_endpoint,
            "INGEST_BASE_URL": f"http://127.0.0.1:{port}",
            "PORT": str(port),
            "LOG_LEVEL": "INFO",  # uvicorn says when each worker serves (tests/uvicorn_ready.py)
            "LOG_FORMAT": "json",
            # The test's pool: this machine, with the runtime reaching moto as a Ray job reaches MinIO.
            "OPENTINKER_LOCAL_POOL": "local",
            "OPENTINKER_LOCAL_CPU_SLOTS": "2",
            "OPENTINKER_JOBS_DIR": str(tmp_path / "jobs"),
            "AWS_ENDPOINT_URL": s3_endpoint,
            "OPENTINKER_RUNTIME_PASS_ENV": (
                "AWS_ACCESS_KEY_ID,AWS_SECRET_ACCESS_KEY,AWS_DEFAULT_REGION,AWS_ENDPOINT_URL"
            ),
            # Passes every second, not every 5 s: the test waits less, nothing else changes.
            "OPENTINKER_SCHEDULE_EVERY_S": "1",
            "OPENTINKER_SUPERVISE_EVERY_S": "1",
            "OPENTINKER_RUNNER_HEARTBEAT_S": "1",
            "API_RATE_LIMIT": "100000/min",
        }
    )
    return env


def test_the_images_processes_run_the_example_job_in_production_mode(
    s3_store, alice, acme, make_token, tmp_path
):
    app.control.purge()  # earlier tests' nudges name rows that no longer exist
    port = _free_port()
    env = production_env(tmp_path, port, s3_store.endpoint)
    base = f"http://127.0.0.1:{port}"

    migrate = subprocess.run(argv("migrate"), cwd=BASE, env=env, capture_output=True, text=True, timeout=300)
    assert migrate.returncode == 0, migrate.stderr[-3000:]
    assert (
        "No migrations to apply." in migrate.stdout
    )  # the test database is migrated: a no-op, in production

    procs: list[subprocess.Popen] = []
    logs = {role: (tmp_path / f"{role}.log").open("wb") for role in ("web", "worker", "beat")}
    try:
        web = subprocess.Popen(
            argv("web"),
            cwd=BASE,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        procs.append(web)
        for role in ("worker", "beat"):
            procs.append(
                subprocess.Popen(
                    argv(role),
                    cwd=BASE,
                    env=env,
                    stdout=logs[role],
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            )
        wait_listening(web, sink=logs["web"], workers=2, port=port)

        spec = example_rl_spec().model_copy(
            update={
                "algorithm": AlgorithmSpec(
                    name="grpo", steps=2, batch_size=2, group_size=2, max_new_tokens=4
                ),
                "checkpoint": CheckpointSpec(every_steps=2, keep_last=1),
                "resources": ResourcesSpec(gpus=0, cpus=2, memory_gb=2, max_hours=0.2),
            }
        )
        with Client(base, make_token(alice, acme)) as sdk:
            job = sdk.jobs.submit(spec)
            frames = list(sdk.jobs.watch(job.id))  # the live stream ends when the job does
            assert frames[-1].type == "end", [f.type for f in frames]
            done = sdk.jobs.get(job.id)
            assert done.state.value == "succeeded", done.state_reason
            (reward,) = sdk.jobs.metrics(job.id, names=["reward/mean"])
            assert reward.steps == [1, 2]
            (checkpoint,) = sdk.jobs.checkpoints(job.id)
        assert checkpoint.step == 2 and checkpoint.uri.startswith(
            f"s3://otk-store/store/orgs/acme/jobs/{job.id}/"
        )
        key = checkpoint.uri.removeprefix("s3://otk-store/")
        for f in checkpoint.files:  # written by the runtime to S3, as recorded
            body = s3_store.client.get_object(Bucket="otk-store", Key=f"{key}/{f.name}")["Body"].read()
            assert hashlib.sha256(body).hexdigest() == f.sha256

        # Beat and the worker leave their heartbeats (each pass, each task): readiness sees every part.
        ready = httpx.get(f"{base}/readyz", timeout=30)
        assert ready.status_code == 200, ready.text
        assert set(ready.json()["checks"]) >= {"database", "valkey", "object_store", "beat", "worker"}
        health = subprocess.run(
            [sys.executable, "deploy/healthcheck.py"], cwd=BASE, env=env, capture_output=True, text=True
        )
        assert health.returncode == 0, health.stderr  # the image's HEALTHCHECK
    finally:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)
        for log in logs.values():
            log.close()
