"""One test with a real `celery worker` (embedded beat) on the real Valkey broker and PostgreSQL.

Submission nudges the scheduler (schedule_soon), the worker registers the embedded `local` pool, admits,
launches and supervises the job, and the job survives `kill -9` of the worker: its runner is detached and
reports the outcome itself."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest
import redis
from django.conf import settings
from django.db import connection

from portal import health
from portal.celery import app
from portal.models import Allocation, ComputePool, Job, JobEvent, UsageRecord
from tests.workers.conftest import FAKE_RUNTIME, set_quota, submit
from tests.workers.test_local_driver import wait_for
from workers.tasks import schedule_soon

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.timeout(120)]


def start_worker(tmp_path, log_name, **extra_env):
    db = connection.settings_dict
    env = {
        **os.environ,
        "DATABASE_URL": (
            f"postgres://{db['USER']}:{db['PASSWORD'] or ''}@{db['HOST']}:{db['PORT']}/{db['NAME']}"
        ),
        "OPENTINKER_RUNTIME_COMMAND": json.dumps(FAKE_RUNTIME),
        "OPENTINKER_JOBS_DIR": str(tmp_path / "jobs"),
        "OPENTINKER_SCHEDULE_EVERY_S": "1",
        "OPENTINKER_SUPERVISE_EVERY_S": "1",
        "OPENTINKER_RUNNER_HEARTBEAT_S": "0.5",
        "OPENTINKER_LOCAL_CPU_SLOTS": "2",
        **extra_env,
    }
    log = open(tmp_path / log_name, "wb")  # noqa: SIM115
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "portal",
            "worker",
            "-B",
            "--pool=solo",
            "--loglevel=INFO",
            "--without-gossip",
            "--without-mingle",
            "-s",
            str(tmp_path / "beat-schedule"),
        ],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def test_real_worker_admits_launches_and_survives_its_own_death(acme, tmp_path):
    app.control.purge()  # stale nudges of earlier tests name rows that no longer exist (harmless, but slow)
    set_quota(acme, max_gpus=0)
    valkey = redis.Redis.from_url(settings.REDIS_URL)
    valkey.delete(health.BEAT_KEY, health.WORKER_KEY)
    worker = start_worker(tmp_path, "worker-1.log")
    try:
        pool = wait_for(
            lambda: ComputePool.objects.filter(name="local").first(), timeout=40, what="local pool"
        )
        assert pool.driver == "local"
        wait_for(lambda: ComputePool.objects.get(name="local").total_gpus == 2, what="capacity read")
        pool.refresh_from_db()
        assert pool.cpu_slots and pool.gpus_by_type == {"cpu-slot": 2} and pool.health == "healthy"
        # Its embedded beat and the worker itself leave the heartbeats /readyz looks for.
        wait_for(
            lambda: all(c.ok for c in health.check_valkey_and_heartbeats()),
            what="beat and worker heartbeats",
        )
        assert valkey.get(health.WORKER_KEY).decode().split(" ")[1].startswith("celery@")

        job = submit(acme, name="fake_steps-12_sleep-0.25")
        schedule_soon()  # what job_submit's caller does after commit
        wait_for(lambda: Job.objects.get(pk=job.pk).state == "running", timeout=30, what="running")
        os.killpg(worker.pid, signal.SIGKILL)  # the worker (and its embedded beat) die mid-job
        worker.wait(timeout=10)
        wait_for(lambda: Job.objects.get(pk=job.pk).state == "succeeded", timeout=40, what="success")
    finally:
        if worker.poll() is None:
            os.killpg(worker.pid, signal.SIGKILL)
            worker.wait(timeout=10)
    states = list(
        JobEvent.objects.filter(job=job, kind="state").order_by("seq").values_list("to_state", flat=True)
    )
    assert states == ["queued", "admitted", "running", "succeeded"]
    assert Allocation.objects.get(job=job).released_at is not None
    assert UsageRecord.objects.get(organization=acme).cpu_seconds > 2
