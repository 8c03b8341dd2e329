"""Recorded episodes: the runtime's ingest (idempotent per step, size-limited, retention) and the read.

Actors: alice (owner of acme, submits the job), bob (member of acme, reads it), charlie (outsider, owner of
globex): charlie gets 404 for acme's job, exactly as for a job that does not exist.
"""

from __future__ import annotations

import uuid

import pytest
from django.conf import settings

from gpu_runtime.batch import Sample
from gpu_runtime.rollout_log import EpisodeTrace, TurnTrace, record
from opentinker.spec import JobState, example_rl_spec
from portal.actors import Actor
from portal.models import Job, RolloutStep
from portal.services import rollouts
from portal.services.job_tokens import job_token_issue
from portal.services.jobs import job_submit, job_transition
from tests.api.test_stream import uvicorn_url  # noqa: F401 (fixture)
from tests.conftest import client_for

pytestmark = pytest.mark.django_db
V1 = "/api/v1"


def episode(reward: float, *, role: str = "agent", game: int | None = None, index: int = 0) -> dict:
    """An episode exactly as the runtime records it (gpu_runtime.rollout_log.record)."""
    ids = [ord(c) for c in "What is 2+2?4"]
    trace = EpisodeTrace(12, "done", [TurnTrace(12, 13, reward, "4", False, {"answer": 4})], 0.0, game)
    zeros = [0.0] * len(ids)
    s = Sample(ids, [0] * 12 + [1], zeros, zeros, reward, 7, role, trace=trace)
    return record(s, index, lambda t: "".join(map(chr, t)), 2000)


@pytest.fixture
def job(alice, acme) -> Job:
    job, _ = job_submit(organization=acme, actor=Actor.for_request(alice), spec=example_rl_spec())
    return job_transition(job=job, to=JobState.ADMITTED, actor=Actor.system("scheduler"))


@pytest.fixture
def runtime(job):
    return client_for(job_token_issue(job))


def ingest(runtime, job, body):
    return runtime.post(f"{V1}/ingest/jobs/{job.id}/rollouts", body, format="json")


def test_the_team_reads_a_step_the_outsider_gets_404(job, runtime, as_alice, as_bob, as_charlie):
    resp = ingest(runtime, job, {"step": 1, "episodes": [episode(1.0), episode(0.0, index=1)]})
    assert resp.status_code == 201, resp.content
    assert ingest(runtime, job, {"step": 2, "episodes": [episode(0.5)]}).status_code == 201
    for client in (as_alice, as_bob):
        body = client.get(f"{V1}/jobs/{job.id}/rollouts", {"step": 1}).json()
        assert body["step"] == 1 and body["steps"] == [1, 2]
        assert body["episodes"] == [episode(1.0), episode(0.0, index=1)]
        first = body["episodes"][0]
        assert first["prompt"] == "What is 2+2?" and first["turns"][0]["text"] == "4"
        assert client.get(f"{V1}/jobs/{job.id}/rollouts").json()["step"] == 2  # the latest by default
    for url in (f"{V1}/jobs/{job.id}/rollouts", f"{V1}/jobs/{uuid.uuid4()}/rollouts"):
        resp = as_charlie.get(url, {"step": 1})
        assert resp.status_code == 404 and resp.json()["error"]["code"] == "not_found"
    missing = as_bob.get(f"{V1}/jobs/{job.id}/rollouts", {"step": 9})
    assert missing.status_code == 404 and "step 9" in missing.json()["error"]["message"]
    assert as_bob.get(f"{V1}/jobs/{job.id}/rollouts", {"step": "x"}).status_code == 400


def test_ingest_is_idempotent_per_step(job, runtime, as_bob):
    body = {"step": 3, "episodes": [episode(1.0)]}
    assert ingest(runtime, job, body).status_code == 201
    again = ingest(runtime, job, {"step": 3, "episodes": [episode(-1.0)]})  # a resumed step re-sent
    assert again.status_code == 200 and again.json()["episodes"] == 1
    assert RolloutStep.objects.filter(job=job).count() == 1
    assert as_bob.get(f"{V1}/jobs/{job.id}/rollouts").json()["episodes"][0]["reward"] == -1.0


def test_ingest_refuses_oversized_and_malformed_bodies(job, runtime):
    big = episode(1.0)
    big["prompt"] = "x" * 20_000
    resp = ingest(runtime, job, {"step": 1, "episodes": [big] * 16})  # ~320 KiB
    assert resp.status_code == 413
    bad = episode(1.0)
    del bad["reward"]
    resp = ingest(runtime, job, {"step": 1, "episodes": [bad]})
    assert resp.status_code == 400 and "episodes.0.reward" in resp.json()["error"]["fields"]
    assert ingest(runtime, job, {"step": 1, "episodes": []}).status_code == 400
    assert ingest(runtime, job, {"step": 1, "episodes": [episode(0.0)], "x": 1}).status_code == 400
    assert not RolloutStep.objects.filter(job=job).exists()
    assert settings.API_MAX_BODY_BYTES == 256 * 1024


def test_a_finished_job_takes_no_more_rollouts(job, runtime):
    job_transition(job=job, to=JobState.CANCELLED, actor=Actor.system("test"))
    assert ingest(runtime, job, {"step": 1, "episodes": [episode(1.0)]}).status_code == 409


def test_retention_keeps_the_last_steps_and_every_tenth_before_them(job):
    for step in range(1, 46):
        rollouts.rollouts_record(job=job, step=step, episodes=[episode(float(step))])
    kept = list(RolloutStep.objects.filter(job=job).order_by("step").values_list("step", flat=True))
    assert kept == [10, 20, *range(26, 46)]  # the last 20 steps (26-45), and steps 10 and 20
    # At most MAX_STEPS steps per job, the oldest thinned steps going first.
    for step in range(50, 50 + 10 * rollouts.MAX_STEPS, 10):
        rollouts.rollouts_record(job=job, step=step, episodes=[episode(0.0)])
    kept = list(RolloutStep.objects.filter(job=job).order_by("step").values_list("step", flat=True))
    assert len(kept) == rollouts.MAX_STEPS and kept[-1] == 50 + 10 * (rollouts.MAX_STEPS - 1)


def test_an_old_step_re_sent_is_kept_by_its_own_write(job, runtime, as_bob):
    """Answered 201 and readable: the retention that runs after the write never deletes what it just wrote."""
    for step in range(100, 100 + 10 * rollouts.MAX_STEPS, 10):
        rollouts.rollouts_record(job=job, step=step, episodes=[episode(0.0)])
    resp = ingest(runtime, job, {"step": 3, "episodes": [episode(1.0)]})
    assert resp.status_code == 201
    got = as_bob.get(f"{V1}/jobs/{job.id}/rollouts", {"step": 3})
    assert got.status_code == 200 and got.json()["episodes"][0]["reward"] == 1.0
    assert RolloutStep.objects.filter(job=job).count() == rollouts.MAX_STEPS  # the oldest other step went
    assert not RolloutStep.objects.filter(job=job, step=100).exists()


def test_a_multi_agent_game_keeps_its_roles(job, runtime, as_bob):
    eps = [episode(1.0, role="x", game=0), episode(-1.0, role="o", game=0, index=1)]
    assert ingest(runtime, job, {"step": 1, "episodes": eps}).status_code == 201
    got = as_bob.get(f"{V1}/jobs/{job.id}/rollouts").json()["episodes"]
    assert [(e["game"], e["role"], e["reward"]) for e in got] == [(0, "x", 1.0), (0, "o", -1.0)]


@pytest.mark.slow
@pytest.mark.django_db(transaction=True)
def test_a_real_job_ships_its_rollouts_through_the_ingest_api(uvicorn_url, job, as_bob):  # noqa: F811
    """The runtime (in process) -> HttpSink -> uvicorn -> PostgreSQL -> the read API, end to end."""
    from gpu_runtime.controller import EXIT_OK, Controller, LocalGroup
    from gpu_runtime.sink import HttpSink
    from tests.gpu_runtime.conftest import small_spec

    spec = small_spec(steps=2, batch_size=2, group_size=3)
    spec = spec.model_copy(update={"rollouts": spec.rollouts.model_copy(update={"per_step": 3})})
    sink = HttpSink(f"{uvicorn_url}/api/v1/ingest/jobs/{job.id}", job_token_issue(job), retries=1)
    assert Controller(spec, sink, LocalGroup(spec), None).run().exit_code == EXIT_OK
    body = as_bob.get(f"{V1}/jobs/{job.id}/rollouts", {"step": 1}).json()
    assert body["steps"] == [1, 2] and len(body["episodes"]) == 3
    best, worst = body["episodes"][:2]
    assert best["reward"] >= worst["reward"] and "Answer with the number only." in best["prompt"]
    assert best["tokens"]["generated"] == best["turns"][0]["tokens"]["generated"] > 0
