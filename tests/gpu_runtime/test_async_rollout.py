"""Asynchronous (off-policy) RL (spec `algorithm.async_rollout`, gpu_runtime.async_rollout): the schedule
bounds staleness exactly, rollout runs while the trainer updates, the loss's importance weights are taken
against the behaviour policy's log-probs, and a checkpointed async run resumes exactly."""

from __future__ import annotations

import copy
import threading

import pytest
import torch
from pydantic import ValidationError

from gpu_runtime.async_rollout import Batch, RolloutPipeline
from gpu_runtime.controller import EXIT_OK, Controller, LocalGroup, RayGroup
from gpu_runtime.workers import RankWorker
from opentinker.spec import JobSpec
from tests.gpu_runtime.conftest import small_spec
from tests.gpu_runtime.test_controller import ListSink, _params, coin_env, run  # noqa: F401 (fixture)

HANG_GUARD_S = 60  # only a hang reaches it


class FakeJob:
    """A trainer whose weights are its version (updates applied) and a rollout engine holding the weights
    last pushed to it: a batch is the version of the weights that sampled it."""

    def __init__(self) -> None:
        self.trainer_version = 0
        self.engine_version = -1  # nothing pushed yet
        self.produced: list[int] = []

    def snapshot(self) -> dict[str, torch.Tensor]:
        return {"v": torch.tensor(self.trainer_version)}

    def push(self, weights: dict[str, torch.Tensor]) -> None:
        self.engine_version = int(weights["v"])

    def produce(self, step: int) -> int:
        self.produced.append(step)
        return self.engine_version


@pytest.mark.parametrize(
    ("max_staleness", "first", "behaviour", "staleness"),
    [
        (1, 1, [0, 0, 1, 2, 3, 4], [0, 1, 1, 1, 1, 1]),
        (2, 1, [0, 0, 0, 1, 2, 3], [0, 1, 2, 2, 2, 2]),
        (1, 4, [3, 3, 4], [0, 1, 1]),  # a run (re)started at step 4: the trainer has 3 updates
    ],
)
def test_the_schedule_bounds_staleness_exactly(max_staleness, first, behaviour, staleness):
    job = FakeJob()
    job.trainer_version = first - 1
    pipe = RolloutPipeline(
        produce=job.produce,
        snapshot=job.snapshot,
        push=job.push,
        max_staleness=max_staleness,
        last_step=6,
    )
    got, stale = [], []
    for step in range(first, 7):
        sampled_by, m = pipe.take(step)
        got.append(sampled_by)
        stale.append(m["async/staleness"])
        assert m["async/behaviour_version"] == sampled_by
        job.trainer_version += 1  # this step's update
    pipe.close()
    assert got == behaviour
    assert stale == staleness
    assert job.produced == list(range(first, 7))  # in order, none past last_step


def test_restore_drops_batches_staler_than_the_bound():
    job = FakeJob()
    job.trainer_version = 4  # resumed after step 4
    pipe = RolloutPipeline(
        produce=job.produce, snapshot=job.snapshot, push=job.push, max_staleness=1, last_step=7
    )
    # Saved by a max_staleness=2 run: step 5's batch by version 3 (1 update old when step 5 trains: kept),
    # step 6's by version 3 too (2 updates old at step 6: sampled again).
    pipe.restore({5: Batch(-5, 3, 0.1), 6: Batch(-6, 3, 0.1)})
    value, m = pipe.take(5)
    assert (value, m["async/staleness"]) == (-5, 1.0)
    job.trainer_version += 1
    value, m = pipe.take(6)
    assert (value, m["async/staleness"]) == (4, 1.0)
    assert job.produced[0] == 6  # step 5's batch came from the checkpoint (7's may still be running)
    pipe.close()


def test_the_next_rollout_runs_while_the_trainer_updates():
    """Step 2's rollout must start while step 1's 'update' (the code between two takes) is still running:
    the update waits for it to start. A synchronous pipeline would never run it there (a hang, caught)."""
    job = FakeJob()
    started = threading.Event()

    def produce(step: int) -> int:
        if step == 2:
            started.set()
        return job.produce(step)

    pipe = RolloutPipeline(
        produce=produce, snapshot=job.snapshot, push=job.push, max_staleness=1, last_step=3
    )
    pipe.take(1)
    assert started.wait(HANG_GUARD_S), "step 2's rollout did not run during step 1's update"
    job.trainer_version += 1
    _, m = pipe.take(2)
    assert m["async/staleness"] == 1.0
    pipe.close()


class SpyGroup(LocalGroup):
    """Before each update: a copy of its samples and the trainer's own log-probs of them then (pi_old)."""

    def __init__(self, spec):
        super().__init__(spec)
        self.updates: list[tuple[list, list]] = []

    def train_minibatch(self, shards, norm, n_micro):
        samples = copy.deepcopy(shards[0])
        probe = copy.deepcopy(samples)
        self.ranks[0].trainer.logprobs(probe, n_micro, old=True, ref=False, values=False)
        self.updates.append((samples, [s.old_logprobs for s in probe]))
        return super().train_minibatch(shards, norm, n_micro)


def _masked(rows: list[list[float]], samples) -> torch.Tensor:
    return torch.tensor(
        [x for row, s in zip(rows, samples, strict=True) for x, m in zip(row, s.mask, strict=True) if m]
    )


def test_importance_weights_are_against_the_behaviour_policy(coin_env):  # noqa: F811
    spec = small_spec(steps=3, learning_rate=1e-2, batch_size=4, async_rollout={"max_staleness": 1})
    assert spec.algorithm.tis_cap == 2.0  # async turns the correction on
    group, sink = SpyGroup(spec), ListSink()
    assert Controller(spec, sink, group, None).run().exit_code == EXIT_OK
    m = sink.metric_steps()
    assert [m[k]["async/staleness"] for k in (1, 2, 3)] == [0.0, 1.0, 1.0]
    assert [m[k]["async/behaviour_version"] for k in (1, 2, 3)] == [0.0, 0.0, 1.0]
    # Step 2 trains on episodes sampled by the initial weights (version 0) while the trainer holds version 1.
    samples, old = group.updates[1]
    behaviour = _masked([s.rollout_logprobs for s in samples], samples)
    fresh = RankWorker(spec.model_dump_json())  # the initial weights, as the rollout engine had them
    probe = copy.deepcopy(samples)
    fresh.trainer.logprobs(probe, 1, old=True, ref=False, values=False)
    v0 = _masked([s.old_logprobs for s in probe], samples)
    v1 = _masked(old, samples)
    assert torch.allclose(behaviour, v0, atol=1e-4)  # the engine's own log-probs, by the old weights
    assert (v1 - v0).abs().max() > 0.05  # one update at 1e-2 moved them: the batch really is off-policy
    expected = torch.exp(v1 - behaviour).clamp(max=2.0).mean()
    assert m[2]["is_weight/mean"] == pytest.approx(float(expected), abs=1e-5)
    assert abs(m[2]["is_weight/mean"] - 1.0) > 1e-3  # on-policy log-probs would give 1 exactly
    assert m[2]["logprob_gap"] == pytest.approx(float((v1 - behaviour).abs().mean()), abs=1e-5)
    for k in (1, 2, 3):  # the rollout's rate is over its own (background) time, not the step's wait for it
        generated = m[k]["tokens_per_s"] * m[k]["time/step"]
        assert generated > 0
        assert m[k]["rollout/tokens_per_s"] * m[k]["async/rollout_s"] == pytest.approx(generated, rel=1e-9)


def test_an_async_run_resumes_exactly(tmp_path, coin_env):  # noqa: F811
    spec = small_spec(steps=4, learning_rate=1e-3, async_rollout={"max_staleness": 1})
    _, sink_a = run(spec, f"file://{tmp_path}/a")
    ckpts = {r["step"]: r["uri"] for r in sink_a.records if r["type"] == "checkpoint"}
    assert sorted(ckpts) == [2, 4]
    resumed, sink_b = run(spec, f"file://{tmp_path}/b", resume=ckpts[2])
    assert resumed.exit_code == EXIT_OK
    assert sorted(sink_b.metric_steps()) == [3, 4]
    for step in (3, 4):
        a, b = sink_a.metric_steps()[step], sink_b.metric_steps()[step]
        timings = [k for k in a if k.startswith(("time/", "tokens_per_s", "rollout/tokens_per_s"))]
        timings += ["async/rollout_s", "async/wait_s", "async/hidden_frac"]
        assert {k: v for k, v in a.items() if k not in timings} == {
            k: v for k, v in b.items() if k not in timings
        }, step
    ck_b = {r["step"]: r["uri"] for r in sink_b.records if r["type"] == "checkpoint"}
    pa, pb = _params(ckpts[4]), _params(ck_b[4])
    assert all(torch.equal(pa[k], pb[k]) for k in pa)


def _job(**over):
    base = {
        "kind": "rl",
        "model": {"base": "tiny-qwen2"},
        "environment": {"ref": "opentinker/arithmetic@1.0.0"},
        "algorithm": {"async_rollout": {}},
    }
    return {**base, **over}


def test_the_spec_option_turns_on_the_correction_and_refuses_what_it_cannot_run():
    spec = JobSpec.model_validate(_job())
    assert (spec.algorithm.async_rollout.max_staleness, spec.algorithm.tis_cap) == (1, 2.0)
    spec = JobSpec.model_validate(_job(algorithm={"async_rollout": {"max_staleness": 2}, "tis_cap": 5}))
    assert (spec.algorithm.async_rollout.max_staleness, spec.algorithm.tis_cap) == (2, 5.0)
    assert spec.algorithm.with_steps(3).async_rollout == spec.algorithm.async_rollout
    assert JobSpec.model_validate(_job(algorithm={})).algorithm.tis_cap is None  # synchronous: unchanged
    refused = [
        (_job(algorithm={"async_rollout": {"max_staleness": 0}}), "greater than or equal to 1"),
        (_job(algorithm={"async_rollout": {"lag": 1}}), "Extra inputs are not permitted"),
        (_job(kind="eval", algorithm={"name": "eval", "async_rollout": {}}), "async_rollout is for rl jobs"),
        (
            _job(multi_agent={"policies": {"p": {}}, "roles": {"x": "p"}}),
            "not supported for multi-agent jobs yet",
        ),
    ]
    for data, why in refused:
        with pytest.raises(ValidationError, match=why):
            JobSpec.model_validate(data)


def test_lora_dropout_is_refused_with_an_in_process_rollout(coin_env):  # noqa: F811
    spec = small_spec(lora={"rank": 4, "dropout": 0.1}, async_rollout={"max_staleness": 1})
    with pytest.raises(ValueError, match="LoRA dropout needs the rollout worker in its own process"):
        run(spec, None)


def test_model_dropout_is_refused_with_an_in_process_rollout(coin_env, tmp_path):  # noqa: F811
    """Not only LoRA's: any dropout of the model draws from the global RNG the rollout thread reseeds."""
    from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

    from gpu_runtime.async_rollout import dropout_sources
    from gpu_runtime.models import build_byte_tokenizer, load_model, preset_config

    assert dropout_sources(load_model("tiny-qwen2").model) == []
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=16, n_positions=8))
    found = dropout_sources(gpt2)
    assert "transformer.drop (p=0.1)" in found and "transformer.h.0.attn.attn_dropout (p=0.1)" in found
    assert {"config.attn_pdrop=0.1", "config.embd_pdrop=0.1", "config.resid_pdrop=0.1"} <= set(found)

    tokenizer = build_byte_tokenizer()  # tiny-qwen2 as a model directory, with attention dropout
    config = preset_config("tiny-qwen2", tokenizer)
    config.attention_dropout = 0.1
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "m")
    tokenizer.save_pretrained(tmp_path / "m")
    spec = small_spec(async_rollout={"max_staleness": 1})
    spec = spec.model_copy(update={"model": spec.model.model_copy(update={"base": f"file://{tmp_path}/m"})})
    with pytest.raises(ValueError) as e:
        run(spec, None)
    assert str(e.value).startswith(
        "async_rollout with a model that has dropout (config.attention_dropout=0.1) needs the rollout worker "
        "in its own process (--ray)"
    )


@pytest.mark.slow
def test_async_with_the_rollout_worker_as_a_ray_actor(ray_session, tmp_path):
    """The background thread waits on the actor's calls (the rollout runs in the actor's process)."""
    spec = small_spec(steps=3, async_rollout={"max_staleness": 1})
    sink = ListSink()
    group = RayGroup(spec, world_size=1)
    try:
        result = Controller(spec, sink, group, f"file://{tmp_path}").run()
    finally:
        group.shutdown()
    assert result.exit_code == EXIT_OK
    m = sink.metric_steps()
    assert [(m[k]["async/staleness"], m[k]["async/behaviour_version"]) for k in (1, 2, 3)] == [
        (0.0, 0.0),
        (1.0, 0.0),
        (1.0, 1.0),
    ]
    assert [r["step"] for r in sink.records if r["type"] == "checkpoint"] == [2, 3]
