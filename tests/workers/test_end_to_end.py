"""The main flow on the embedded default, with the real runtime: submit with the SDK, admitted by the
scheduler, launched on the local pool by the local driver, `python -m gpu_runtime run` training and reporting
through the ingest API of a real uvicorn server, metrics visible through the API and SSE while it runs, a
checkpoint recorded, `succeeded`, CPU-seconds accounted. Actors: alice runs the job, charlie (outsider) sees
none of it."""

from __future__ import annotations

import threading
import time

import pytest

from opentinker.client import Client
from opentinker.errors import NotFound
from opentinker.spec import AlgorithmSpec, CheckpointSpec, ResourcesSpec, example_rl_spec
from portal.models import Allocation, Checkpoint, Job, JobEvent, Metric
from portal.services.scheduler import schedule_pass
from tests.api.test_stream import uvicorn_url  # noqa: F401 (fixture)
from tests.workers.conftest import make_pool
from workers.supervisor import launch

pytestmark = [
    pytest.mark.django_db(transaction=True),
    pytest.mark.usefixtures("builtin_envs"),
    pytest.mark.slow,
    pytest.mark.timeout(300),
]


def test_example_job_end_to_end(uvicorn_url, runner_env, settings, alice, acme, charlie, globex, make_token):  # noqa: F811
    settings.OPENTINKER_RUNTIME_COMMAND = None  # the real `python -m gpu_runtime run`
    settings.INGEST_BASE_URL = uvicorn_url
    make_pool("local", 2, cpu_slots=True, cpus=2)
    spec = example_rl_spec().model_copy(
        update={
            "algorithm": AlgorithmSpec(name="grpo", steps=3, batch_size=2, group_size=2, max_new_tokens=4),
            "checkpoint": CheckpointSpec(every_steps=2, keep_last=2),
            "resources": ResourcesSpec(gpus=0, cpus=2, memory_gb=2, max_hours=0.2),
        }
    )
    with (
        Client(uvicorn_url, make_token(alice, acme)) as sdk,
        Client(uvicorn_url, make_token(charlie, globex)) as out,
    ):
        job = sdk.jobs.submit(spec)
        assert job.state.value == "queued"

        assert job.id in {str(j) for j in schedule_pass().admitted}
        alloc = Allocation.objects.get(job_id=job.id, released_at__isnull=True)
        assert launch(alloc.pk) == "launched"

        frames: list = []
        watcher = threading.Thread(target=lambda: frames.extend(sdk.jobs.watch(job.id)), daemon=True)
        watcher.start()

        deadline = time.monotonic() + 240
        while (current := sdk.jobs.get(job.id)).state.value not in ("succeeded", "failed", "cancelled"):
            assert time.monotonic() < deadline, f"job still {current.state.value}"
            time.sleep(0.5)
        logs = "\n".join(Job.objects.get(pk=job.id).logs.values_list("line", flat=True))
        assert current.state.value == "succeeded", f"{current.state_reason}\n{logs[-3000:]}"
        # Visible while it ran: step 1's metric was stored before the runtime checkpointed its last step,
        # hence before the job ended (an order of events, where a 0.5 s poll had to fall between the first
        # metric and the end, which a fast machine may not leave time for).
        first = Metric.objects.get(job_id=job.id, name="reward/mean", step=1)
        last_checkpoint = Checkpoint.objects.get(job_id=job.id, step=3)
        ended = JobEvent.objects.get(job_id=job.id, kind="state", to_state="succeeded")
        assert first.created_at < last_checkpoint.created_at < ended.created_at

        (reward,) = sdk.jobs.metrics(job.id, names=["reward/mean"])
        assert reward.steps == [1, 2, 3]  # every step once: none missing, none duplicated
        checkpoints = sdk.jobs.checkpoints(job.id)
        assert [c.step for c in checkpoints][-1] == 3 and checkpoints[0].files
        assert f"/orgs/acme/jobs/{job.id}/" in checkpoints[0].uri

        watcher.join(timeout=60)
        kinds = [f.type for f in frames]
        assert "metrics" in kinds and kinds[-1] == "end", kinds
        finished = next(i for i, f in enumerate(frames) if f.type == "state" and f.state == "succeeded")
        assert kinds.index("metrics") < finished  # the stream showed a metric before the end
        streamed = sorted({(p.name, p.step) for f in frames for p in f.points if p.name == "reward/mean"})
        assert streamed == [("reward/mean", 1), ("reward/mean", 2), ("reward/mean", 3)]

        (month, *_) = sdk._call("GET", "/org/usage")
        assert month["cpu_hours"] > 0 and month["gpu_hours"] == 0  # a CPU job: CPU-seconds accounted

        with pytest.raises(NotFound):
            out.jobs.get(job.id)
