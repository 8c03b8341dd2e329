"""Several trainer ranks through the platform (`resources.trainer_ranks`), on the local CPU pool, with the
real runtime: the scheduler charges a slot per rank; the local driver's runtime starts its follower ranks as
processes of its own process group (gpu_runtime/ranks.py); a 2-rank job ends with the parameters of a
1-rank job; a dead rank re-queues the job saying which rank; a cancel leaves no rank process behind.
Actors: alice submits, bob (teammate) sees the job, charlie (outsider) gets 404."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import psutil
import pytest
from safetensors.torch import load_file

from opentinker.client import Client
from opentinker.errors import NotFound
from opentinker.spec import JobSpec
from portal import storage
from portal.actors import Actor
from portal.models import Allocation, Checkpoint, Job, JobLog, Metric
from portal.selectors.queue import queue_position
from portal.services.jobs import job_cancel, job_submit
from portal.services.scheduler import schedule_pass
from tests.api.test_stream import uvicorn_url  # noqa: F401 (fixture)
from tests.workers.conftest import make_pool
from tests.workers.test_local_driver import wait_for
from workers.supervisor import launch

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow, pytest.mark.timeout(400)]

SYSTEM = "Answer arithmetic questions with the number only."


def sft_spec(org_slug: str, ranks: int, *, steps: int = 2, name: str = "ranks") -> JobSpec:
    """SFT on 8 arithmetic chats: every step updates every weight, so a rank that trained on the wrong share
    (or not at all) shows in the parameters; 4 examples a step split 2 + 2 over two ranks."""
    uri = f"{storage.organization_prefix(org_slug)}/data/sft.jsonl"
    path = Path(uri.removeprefix("file://"))
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = [
        {
            "messages": [
                {"role": "system", "content": SYSTEM},
                {"role": "user", "content": f"What is {a} + {b}? Answer with the number only."},
                {"role": "assistant", "content": str(a + b)},
            ]
        }
        for a, b in [(1, 2), (3, 4), (5, 1), (2, 7), (8, 0), (6, 3), (4, 4), (9, 9)]
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return JobSpec.model_validate(
        dict(
            kind="sft",
            name=name,
            model={"base": "tiny-qwen2"},
            dataset={"uri": uri},
            algorithm=dict(steps=steps, batch_size=4, micro_batch_size=2, learning_rate=1e-3),
            checkpoint={"every_steps": 2, "keep_last": 2},
            resources={"cpus": 2, "memory_gb": 2, "max_hours": 0.2, "trainer_ranks": ranks},
            seed=1,
        )
    )


WAIT = 240.0  # seconds, only against a hang: a job of a few steps on a loaded 2-core box
# The 1-rank job's final weights and losses once a test here ran it: the Ray pool's 2-rank job
# (test_trainer_ranks_ray.py) has the same inputs and compares with them instead of running it again.
REFERENCE: dict = {}
ENDED = ("succeeded", "failed")


def group_processes(pgid: int) -> list[psutil.Process]:
    """The live processes of the runtime's process group (the runner is in a session of its own)."""
    found = []
    for p in psutil.process_iter():
        try:
            if os.getpgid(p.pid) == pgid and p.status() != psutil.STATUS_ZOMBIE:
                found.append(p)
        except (ProcessLookupError, psutil.Error):
            continue
    return found


def follower_ranks(pgid: int) -> list[psutil.Process]:
    ranks = []
    for p in group_processes(pgid):
        try:
            if p.cmdline()[1:4] == ["-m", "gpu_runtime", "rank"]:
                ranks.append(p)
        except psutil.Error:
            continue
    return ranks


def start(job_id) -> Allocation:
    assert str(job_id) in {str(j) for j in schedule_pass().admitted}
    alloc = Allocation.objects.get(job_id=job_id, released_at__isnull=True)
    assert launch(alloc.pk) == "launched"
    alloc.refresh_from_db()
    return alloc


def final_weights(job_id, step: int) -> dict:
    uri = Checkpoint.objects.get(job_id=job_id, step=step).uri
    return load_file(Path(uri.removeprefix("file://")) / "model.safetensors")


def logs(job_id) -> str:
    return "\n".join(JobLog.objects.filter(job_id=job_id).order_by("seq").values_list("line", flat=True))


@pytest.fixture
def real_runtime(runner_env, settings, uvicorn_url):  # noqa: F811
    settings.OPENTINKER_RUNTIME_COMMAND = None  # the real `python -m gpu_runtime run`
    settings.INGEST_BASE_URL = uvicorn_url
    return uvicorn_url


def test_two_ranks_end_with_the_parameters_of_one(
    real_runtime, alice, bob, charlie, acme, globex, make_token
):
    make_pool("local", 3, cpu_slots=True, cpus=3)  # room for both: 1 slot + 2 slots
    with (
        Client(real_runtime, make_token(alice, acme)) as sdk,
        Client(real_runtime, make_token(bob, acme)) as mate,
        Client(real_runtime, make_token(charlie, globex)) as out,
    ):
        one = sdk.jobs.submit(sft_spec("acme", 1, name="one"))
        two = sdk.jobs.submit(sft_spec("acme", 2, name="two"))
        assert mate.jobs.get(two.id).spec["resources"]["trainer_ranks"] == 2
        with pytest.raises(NotFound):
            out.jobs.get(two.id)
        admitted = {str(j) for j in schedule_pass().admitted}
        assert admitted == {one.id, two.id}
        slots = {str(a.job_id): a.slots for a in Allocation.objects.filter(released_at__isnull=True)}
        assert slots == {one.id: 1, two.id: 2}  # a CPU slot per trainer rank
        for alloc in Allocation.objects.filter(released_at__isnull=True):
            assert launch(alloc.pk) == "launched"
        for job in (one, two):
            wait_for(lambda j=job: sdk.jobs.get(j.id).state.value in ENDED, timeout=WAIT, what="the end")
            current = sdk.jobs.get(job.id)
            assert current.state.value == "succeeded", f"{current.state_reason}\n{logs(job.id)[-3000:]}"
    assert "trainer ranks: 2, processes of this machine" in logs(two.id)
    assert "after the job" not in logs(two.id)  # rank 1 left the process group and exited 0 too
    assert "trainer ranks" not in logs(one.id)
    a, b = final_weights(one.id, 2), final_weights(two.id, 2)
    assert set(a) == set(b)
    worst = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
    # lr 1e-3: Adam moves every weight by ~1e-3 a step, so a rank's share lost or counted twice shows as
    # ~1e-3; float reassociation of the 2-rank reduction stays ~1e-6 (measured 2.4e-6).
    assert worst < 5e-5, worst
    # Metrics from rank 0 only, every step once, the loss averaged over the ranks as over one rank's batch.
    (l1, l2) = (
        list(Metric.objects.filter(job_id=j, name="loss").order_by("step").values_list("step", "value"))
        for j in (one.id, two.id)
    )
    assert [s for s, _ in l2] == [1, 2] and [v for _, v in l2] == pytest.approx([v for _, v in l1], rel=1e-4)
    REFERENCE.update(weights=a, loss=[v for _, v in l1])


def test_admission_charges_a_slot_per_rank(acme):
    make_pool("local", 1, cpu_slots=True, cpus=2)
    job = _submit(acme, sft_spec("acme", 2, name="too-wide"))
    result = schedule_pass()
    assert job.pk not in result.admitted
    reason = "capacity: needs 2 CPU slots (a slot per trainer rank); the largest pool it may use has 1"
    assert str(result.waiting[job.pk]) == reason
    assert queue_position(job.pk)["reason"] == reason  # what the job's page says
    assert Job.objects.get(pk=job.pk).state == "queued"


def _submit(org, spec: JobSpec) -> Job:
    job, _ = job_submit(organization=org, actor=Actor.system("test"), spec=spec)
    return job


def test_a_dead_rank_requeues_the_job_and_a_cancel_leaves_no_rank(real_runtime, acme):
    make_pool("local", 2, cpu_slots=True, cpus=2)
    job = _submit(acme, sft_spec("acme", 2, steps=500, name="long"))
    alloc = start(job.pk)
    pgid = int(alloc.runtime_handle)
    (follower,) = wait_for(lambda: follower_ranks(pgid), timeout=WAIT, what="rank 1's process")
    # Mid-training: a step's metric came from rank 0 after both ranks trained it.
    wait_for(lambda: Metric.objects.filter(job=job, name="loss").exists(), timeout=WAIT, what="a step")
    follower.send_signal(signal.SIGKILL)
    wait_for(lambda: Job.objects.get(pk=job.pk).state == "queued", timeout=WAIT, what="the re-queue")
    job.refresh_from_db()
    assert (job.attempt, job.state_reason) == (1, "runtime killed by signal 9")
    assert "job failed: trainer rank 1 was killed by signal 9" in logs(job.pk)
    wait_for(lambda: not group_processes(pgid), timeout=60, what="no process of the first attempt")

    alloc = start(job.pk)  # the second attempt
    pgid = int(alloc.runtime_handle)
    wait_for(lambda: follower_ranks(pgid), timeout=WAIT, what="rank 1's process")
    job_cancel(job=Job.objects.get(pk=job.pk), actor=Actor.system("test"))
    wait_for(lambda: Job.objects.get(pk=job.pk).state == "cancelled", timeout=WAIT, what="the cancel")
    wait_for(lambda: not group_processes(pgid), timeout=60, what="no process of the second attempt")
