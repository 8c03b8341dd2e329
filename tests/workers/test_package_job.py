"""A tenant's own environment package in a job, end to end on the embedded default: alice pushes a package
with the SDK (validated in the sandbox by the live server), submits a job with `acme/flaky@latest`, the
scheduler admits it, the local driver launches the real `python -m gpu_runtime run`, which fetches the pinned
archive with its job token, checks its sha256, runs every episode in the sandbox and reports reward metrics:
`succeeded`. A second job whose stored archive was tampered with after submission fails with the sha256
mismatch as its reason, before any episode runs. Charlie (outsider) sees neither job."""

from __future__ import annotations

import time

import pytest

from env_registry.models import EnvironmentVersion
from opentinker.client import Client
from opentinker.errors import NotFound
from opentinker.spec import AlgorithmSpec, CheckpointSpec, EnvironmentSpec, ResourcesSpec, example_rl_spec
from portal import storage
from portal.models import Allocation, Job
from portal.services.scheduler import schedule_pass
from tests.api.test_stream import uvicorn_url  # noqa: F401 (fixture)
from tests.gpu_runtime.test_env_packages import write_package
from tests.workers.conftest import make_pool
from workers.supervisor import launch

pytestmark = [
    pytest.mark.django_db(transaction=True),
    pytest.mark.usefixtures("builtin_envs"),
    pytest.mark.slow,
    pytest.mark.timeout(300),
]
FINAL = ("succeeded", "failed", "cancelled")


def run_to_the_end(sdk, spec, before_launch=lambda: None) -> tuple[object, str]:
    job = sdk.jobs.submit(spec)
    before_launch()
    assert job.id in {str(j) for j in schedule_pass().admitted}
    assert launch(Allocation.objects.get(job_id=job.id, released_at__isnull=True).pk) == "launched"
    deadline = time.monotonic() + 200
    while (current := sdk.jobs.get(job.id)).state.value not in FINAL:
        assert time.monotonic() < deadline, f"job still {current.state.value}"
        time.sleep(0.5)
    logs = "\n".join(Job.objects.get(pk=job.id).logs.values_list("line", flat=True))
    return current, logs


def test_a_pushed_package_runs_sandboxed_in_a_job(
    uvicorn_url,  # noqa: F811
    runner_env,
    settings,
    tmp_path,
    alice,
    acme,
    charlie,
    globex,
    make_token,
):
    settings.OPENTINKER_RUNTIME_COMMAND = None  # the real `python -m gpu_runtime run`
    settings.INGEST_BASE_URL = uvicorn_url
    make_pool("local", 2, cpu_slots=True, cpus=2)
    spec = example_rl_spec().model_copy(
        update={
            "environment": EnvironmentSpec(ref="acme/flaky@latest"),
            "algorithm": AlgorithmSpec(name="grpo", steps=2, batch_size=2, group_size=2, max_new_tokens=4),
            "checkpoint": CheckpointSpec(every_steps=2, keep_last=1),
            "resources": ResourcesSpec(gpus=0, cpus=2, memory_gb=2, max_hours=0.2),
        }
    )
    with (
        Client(uvicorn_url, make_token(alice, acme)) as sdk,
        Client(uvicorn_url, make_token(charlie, globex)) as out,
    ):
        pushed = sdk.envs.push(write_package(tmp_path / "flaky"))
        assert [v["status"] for v in pushed.versions] == ["valid"], pushed.versions
        version = EnvironmentVersion.objects.get(package__name="flaky")

        job, logs = run_to_the_end(sdk, spec)
        assert job.state.value == "succeeded", f"{job.state_reason}\n{logs[-3000:]}"
        pinned = job.spec["environment"]
        assert (pinned["ref"], pinned["sha256"]) == ("acme/flaky@1.0.0", version.sha256)  # latest, pinned
        (reward,) = sdk.jobs.metrics(job.id, names=["reward/mean"])
        assert reward.steps == [1, 2]
        assert all(0.0 <= v <= 1.0 for v in reward.values)
        (failed,) = sdk.jobs.metrics(job.id, names=["episodes/failed"])
        assert failed.values == [0.0, 0.0]

        # The stored archive changes after submission (a corrupted or swapped object): the runtime refuses it.
        path = storage.local_path(version.archive_uri)
        original = path.read_bytes()
        try:
            bad, logs = run_to_the_end(
                sdk, spec.model_copy(update={"name": "tampered"}), lambda: path.write_bytes(original + b"!")
            )
        finally:
            path.write_bytes(original)
        assert bad.state.value == "failed", logs[-2000:]
        reason = f"environment archive sha256 mismatch: the job is pinned to {version.sha256}, the archive is"
        assert reason in bad.state_reason, bad.state_reason
        assert "episode failed" not in logs  # refused before any episode ran

        for j in (job, bad):
            with pytest.raises(NotFound):
                out.jobs.get(j.id)
