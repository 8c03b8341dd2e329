"""Helpers of the scheduler and supervision tests: pools, quotas and jobs made the real way."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from django.db import connection

from opentinker.spec import EnvironmentSpec, ResourcesSpec, example_rl_spec
from portal.actors import Actor
from portal.models import ComputePool, Quota
from portal.services.jobs import job_submit

FAKE_RUNTIME = [sys.executable, str(Path(__file__).with_name("fake_runtime.py"))]


def make_pool(name="gpu-a", slots=8, *, cpu_slots=False, cpus=64, driver="local", **kw) -> ComputePool:
    return ComputePool.objects.create(
        name=name,
        driver=driver,
        total_gpus=slots,
        gpus_by_type={"cpu-slot" if cpu_slots else "H100": slots},
        cpus=cpus,
        cpu_slots=cpu_slots,
        health=ComputePool.Health.HEALTHY,
        **kw,
    )


def set_quota(org, **fields) -> Quota:
    Quota.objects.filter(organization=org).update(**fields)
    return Quota.objects.get(organization=org)


def submit(org, *, gpus=0, name="job", priority=0, pool=None, cpus=1, max_hours=1.0):
    spec = example_rl_spec().model_copy(
        update={
            "name": name,
            "priority": priority,
            # A remote environment: no registry row needed (transactional tests flush the built-ins).
            "environment": EnvironmentSpec(ref="https://env.example/arithmetic"),
            "resources": ResourcesSpec(gpus=gpus, cpus=cpus, memory_gb=1, max_hours=max_hours, pool=pool),
        }
    )
    job, _ = job_submit(organization=org, actor=Actor.system("test"), spec=spec)
    return job


@pytest.fixture
def runner_env(settings, monkeypatch, tmp_path):
    """Runners are separate processes: point them at the test database and the fake runtime (their settings
    come from the environment; this process's from ``settings``)."""
    db = connection.settings_dict
    url = f"postgres://{db['USER']}:{db['PASSWORD'] or ''}@{db['HOST']}:{db['PORT']}/{db['NAME']}"
    monkeypatch.setenv("DATABASE_URL", url)
    monkeypatch.setenv("OPENTINKER_RUNNER_HEARTBEAT_S", "0.5")
    monkeypatch.setenv("OPENTINKER_STOP_GRACE_S", "5")
    settings.OPENTINKER_STOP_GRACE_S = 5
    settings.OPENTINKER_RUNTIME_COMMAND = FAKE_RUNTIME
    settings.OPENTINKER_JOBS_DIR = str(tmp_path / "jobs")
    return tmp_path
