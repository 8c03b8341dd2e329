"""Scale-out: N rollout workers and trainer ranks on several nodes (issue 14, item 3).

The 2-node test runs on the session's Ray cluster (two nodes of two CPUs each, `ray_session`): 2 rollout
workers and 2 trainer ranks across the nodes give the parameters of 1 worker and 1 rank in process, which
rolls out the whole step in one batch. Sampling at T = 1, top-p 1: the noise is per request (job seed, step,
episode index, turn), so the 2 workers draw the tokens the 1 worker draws. PPO: the critic's values give
every token an advantage though a random tiny model earns no reward.
"""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from gpu_runtime import checkpoint
from gpu_runtime.controller import EXIT_OK, Controller, LocalGroup, RayGroup
from gpu_runtime.models import load_model
from gpu_runtime.placement import plan
from gpu_runtime.rollout_pool import RolloutPool, split_groups
from gpu_runtime.workers import RolloutWorker
from opentinker.spec import JobSpec
from tests.gpu_runtime.conftest import small_spec
from tests.gpu_runtime.test_controller import ListSink

LR = 1e-3


def test_split_groups_gives_whole_groups_in_order():
    ids = [7, 7, 3, 3, 9, 9, 1, 1, 5, 5]  # five groups of two
    assert split_groups(ids, 1) == [range(0, 10)]
    assert split_groups(ids, 2) == [range(0, 6), range(6, 10)]
    assert split_groups(ids, 3) == [range(0, 4), range(4, 8), range(8, 10)]
    assert split_groups([4, 5, 6], 5) == [range(0, 1), range(1, 2), range(2, 3), range(0), range(0)]
    # an eval call: every episode a group of its own
    assert split_groups(list(range(5)), 2) == [range(0, 3), range(3, 5)]


class InProcessRay:
    """Just enough of Ray for `RolloutPool` over in-process workers: `.remote` calls run at once."""

    class Actor:
        def __init__(self, obj) -> None:
            self.obj = obj

        def __getattr__(self, name):
            method = getattr(self.obj, name)
            return type("Method", (), {"remote": staticmethod(method)})

    def get(self, refs):
        return refs

    def put(self, value):
        return value


def test_two_rollout_workers_sample_the_tokens_of_one():
    """Sampling noise is per request (job seed, step, episode index, turn), not per worker: a step split over
    2 workers (3 groups and 2 groups, other batch shapes) gives the very tokens 1 worker gives, at T = 1,
    top-p 1; the next step's seed gives other tokens."""
    spec = small_spec(batch_size=5, group_size=2, max_new_tokens=6, temperature=1.0, top_p=1.0)
    workers = [RolloutWorker(spec.model_dump_json()) for _ in range(2)]
    env_seeds = [s for s in (11, 12, 13, 14, 15) for _ in range(2)]
    ray = InProcessRay()

    def tokens(pool: RolloutPool, torch_seed: int) -> list[tuple[list[int], list[float], int]]:
        samples, stats = pool.collect(env_seeds, env_seeds, torch_seed)
        assert stats["episodes/total"] == 10.0 and len(samples) == 10
        return [(s.token_ids, s.rollout_logprobs, s.group_id) for s in samples]

    one = tokens(RolloutPool(ray, [InProcessRay.Actor(workers[0])]), 7)
    two = tokens(RolloutPool(ray, [InProcessRay.Actor(w) for w in workers]), 7)
    assert [t for t, _, g in two] == [t for t, _, g in one]
    assert [g for *_, g in two] == env_seeds
    gap = max(
        abs(a - b)
        for (_, la, _), (_, lb, _) in zip(one, two, strict=True)
        for a, b in zip(la, lb, strict=True)
    )
    assert gap < 1e-5
    # sampled, not collapsed: a group's two samples differ somewhere, and another step seed moves them
    assert any(one[i][0] != one[i + 1][0] for i in range(0, 10, 2))
    assert tokens(RolloutPool(ray, [InProcessRay.Actor(workers[1])]), 8) != one


def test_placement_plan():
    cpu = plan(gpus=0, world_size=2, rollout_workers=2, cpus=2)
    assert cpu.bundles == [{"CPU": 0.5}] * 4 and not cpu.colocate
    # The job's admitted CPUs, shared evenly: not what the (shared) cluster has free.
    assert plan(gpus=0, world_size=1, rollout_workers=2, cpus=6).bundles == [{"CPU": 2.0}] * 3
    many = plan(gpus=0, world_size=1, rollout_workers=255, cpus=1)  # never an empty bundle
    assert many.bundles == [{"CPU": 0.01}] * 256
    one_gpu = plan(gpus=1, world_size=1, rollout_workers=1, cpus=8)
    assert one_gpu.colocate and one_gpu.bundles == [{"CPU": 2, "GPU": 1}] and one_gpu.worker_bundle(1, 0) == 0
    four = plan(gpus=4, world_size=2, rollout_workers=2, cpus=8)
    assert four.bundles == [{"CPU": 1, "GPU": 1}] * 4 and four.worker_bundle(2, 1) == 3
    with pytest.raises(ValueError, match=r"resources\.gpus must be at least 4, not 3"):
        plan(gpus=3, world_size=2, rollout_workers=2, cpus=8)


def test_gpus_for_rollout_workers_validated_at_submission():
    base = small_spec().model_dump()
    base["resources"].update(rollout_workers=2, gpus=2)
    with pytest.raises(ValueError, match=r"rollout_workers \(2\) on GPUs .* gpus must be at least 3, not 2"):
        JobSpec.model_validate(base)
    base["resources"]["gpus"] = 3
    assert JobSpec.model_validate(base).resources.gpus == 3
    base["resources"]["gpus"] = 0  # CPUs: the workers share the job's cpus
    assert JobSpec.model_validate(base).resources.rollout_workers == 2


def test_rollout_workers_validated():
    base = small_spec().model_dump()  # 2 prompts a step
    base["resources"]["rollout_workers"] = 3
    with pytest.raises(ValueError, match=r"rollout_workers \(3\) must not exceed the step's groups \(2\)"):
        JobSpec.model_validate(base)
    base["resources"].update(rollout_workers=2, placement="everywhere")
    with pytest.raises(ValueError, match="placement"):
        JobSpec.model_validate(base)
    base["resources"]["placement"] = "spread"
    spec = JobSpec.model_validate(base)
    with pytest.raises(ValueError, match="rollout_workers > 1 needs Ray"):
        LocalGroup(spec)


def _spec(url: str, **resources) -> JobSpec:
    from tests.gpu_runtime.test_failure_policy import remote_spec

    base = remote_spec(url, steps=2).model_dump()
    base["algorithm"].update(
        name="ppo", batch_size=4, group_size=2, minibatches=2, learning_rate=LR, max_new_tokens=4
    )
    base["checkpoint"].update(every_steps=1)
    base["resources"].update(resources)
    return JobSpec.model_validate(base)


@pytest.fixture
def parity_url(monkeypatch):
    """A loopback OpenEnv server whose reward is a function of the episode's seed: a random tiny model's
    answers are alike (and mostly undecodable bytes), so the reward cannot come from them; varied rewards
    make the update a real one."""
    from tests.gpu_runtime.test_failure_policy import OneShot, SayObservation, allow, serve

    class BySeed(OneShot):
        def reset(self, seed=None, episode_id=None, **kwargs):
            self.seed = seed or 0
            return super().reset(seed, episode_id, **kwargs)

        def step(self, action, timeout_s=None, **kwargs):
            self._state.step_count += 1
            return SayObservation(prompt="done", reward=(self.seed % 7) / 6, done=True)

    for url, _ in serve(BySeed, max_concurrent_envs=16):
        allow(monkeypatch, url)  # the egress allow-list the rollout workers get from the driver
        yield url


def _run(spec: JobSpec, group, prefix: str) -> tuple[ListSink, dict[str, torch.Tensor]]:
    sink = ListSink()
    assert Controller(spec, sink, group, prefix).run().exit_code == EXIT_OK
    (first,) = [r["uri"] for r in sink.records if r["type"] == "checkpoint" and r["step"] == 1]
    return sink, checkpoint.load(first).weights


@pytest.mark.slow
def test_two_workers_and_two_ranks_on_two_nodes_match_one_of_each(ray_session, parity_url, tmp_path):
    ray = ray_session
    # 3 CPUs over 4 bundles: 0.75 each, so a 2-CPU node holds two of them at most and the group must take
    # both nodes (capacity decides, not SPREAD's best effort on a cluster other tests share).
    single = _spec(parity_url, cpus=3)
    reference = LocalGroup(single)  # one worker, the whole step in one batch
    # (Each worker, in process or an actor, takes the job's torch thread count: the same kernels' paths.)
    one_sink, one = _run(single, reference, f"file://{tmp_path}/one")

    spec = _spec(parity_url, cpus=3, rollout_workers=2, placement="spread")
    group = RayGroup(spec, world_size=2)
    try:

        def node(actor) -> str:
            return ray.get(actor.__ray_call__.remote(lambda _: ray.get_runtime_context().get_node_id()))

        ranks, workers = [node(a) for a in group.ranks], [node(a) for a in group.rollout_actors]
        two_sink, two = _run(spec, group, f"file://{tmp_path}/two")
    finally:
        group.shutdown()

    # Really on two nodes, two actors each (the bundles' size leaves no other way): whichever way SPREAD put
    # them, something crosses nodes (the ranks' collectives, or the weights to the workers). The ranks met
    # at rank 0's node address (on this machine's two-node cluster, this machine's address).
    print(f"ranks on {ranks}, rollout workers on {workers}")
    assert sorted(Counter(ranks + workers).values()) == [2, 2], (ranks, workers)
    address = {n["NodeID"]: n["NodeManagerAddress"] for n in ray.nodes()}
    assert group.master is not None and group.master.rsplit(":", 1)[0] == address[ranks[0]]

    # The same batch: groups merged in order (2 mini-batches of shuffled whole groups: another order puts
    # other groups together and moves the weights elsewhere).
    m1, m2 = one_sink.metric_steps(), two_sink.metric_steps()
    for k in ("reward/mean", "response_length/mean", "episodes/total", "kl", "entropy", "loss"):
        assert m2[1][k] == pytest.approx(m1[1][k], rel=1e-4, abs=1e-6), k
    assert m2[1]["episodes/total"] == 8.0
    assert set(two) == set(one)
    init = load_model(spec.model.base, seed=spec.seed).model.state_dict()

    def norm(d: dict[str, torch.Tensor]) -> float:
        return float(sum(v.double().pow(2).sum() for v in d.values()) ** 0.5)

    moved = norm({k: one[k] - init[k] for k in one})
    off = norm({k: two[k] - one[k] for k in one})
    print(f"update norm {moved:.6g}, 2x2 vs 1x1 difference {off:.6g} ({off / moved:.3g} of it)")
    # Adam's first steps move each weight by ~LR, so the update's norm is ~LR x sqrt(parameters); another
    # batch (or groups in another order: other mini-batches) moves them elsewhere, a difference of the same
    # order. Float reassociation across ranks only flips the sign of a few near-zero gradients.
    assert moved > 0.1 * LR * sum(v.numel() for v in one.values()) ** 0.5, moved
    assert off < 2e-3 * moved, (off, moved)

    # Step 2 rolled out with the weights of step 1 on BOTH workers: the trainer's log-probs of the sampled
    # tokens are the engines' own (a worker left with the initial weights shows a gap of ~LR).
    print(f"step 2 log-prob gap: {m1[2]['logprob_gap']:.3g} (1x1), {m2[2]['logprob_gap']:.3g} (2x2)")
    assert m2[2]["logprob_gap"] < 1e-5 and m1[2]["logprob_gap"] < 1e-5, (m1[2], m2[2])
