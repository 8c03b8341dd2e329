"""FSDP2 over gloo with 2 CPU ranks vs 1 rank; the Ray controller path (one Ray session per test run)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.multiprocessing as mp

from gpu_runtime.algorithms import LossNorm
from gpu_runtime.batch import split_micro
from gpu_runtime.controller import EXIT_OK, Controller, RayGroup, free_port
from gpu_runtime.shared_prefix import plan_for_samples
from gpu_runtime.workers import RankWorker
from tests.gpu_runtime.conftest import small_spec
from tests.gpu_runtime.test_controller import REQUIRED, ListSink
from tests.gpu_runtime.test_trainer import _samples


def _step(worker: RankWorker, samples, rank: int, ws: int, micro: int) -> dict:
    shard = samples[rank::ws]
    norm = LossNorm(sum(s.n_generated for s in samples), len(samples), norm_len=4, world_size=ws)
    n_micro = math.ceil(max(len(samples[r::ws]) for r in range(ws)) / micro)
    sums = worker.train_minibatch(shard, norm, n_micro)
    return {"sums": sums, "params": worker.full_state_dict()}


def _rank_main(rank: int, ws: int, port: int, spec_json: str, samples, out: str) -> None:
    torch.set_num_threads(1)
    w = RankWorker(spec_json, rank, ws, f"127.0.0.1:{port}")
    res = _step(w, samples, rank, ws, micro=2)
    if rank == 0:
        torch.save(res, out)
    w.shutdown()


@pytest.mark.slow
def test_fsdp2_two_ranks_match_one_rank(tmp_path):
    spec_json = small_spec(learning_rate=1e-3, loss_agg="token-mean").model_dump_json()
    samples = _samples(7)  # uneven: rank 0 gets 4 sequences (2 micro-batches of 2), rank 1 gets 3 (2 + 1)
    # Samples 0 and 1, and 2 and 3, share their prompts: one rank's first two micro-batches take the
    # shared-prefix path, FSDP ranks take the plain one (see Trainer.share_prefix); the results must agree.
    for a, b in ((0, 1), (2, 3)):
        pa, pb, sb = samples[a].mask.index(1), samples[b].mask.index(1), samples[b]
        sb.token_ids = samples[a].token_ids[:pa] + sb.token_ids[pb:]
        for name in ("mask", "rollout_logprobs", "token_rewards", "advantages"):
            setattr(sb, name, [type(getattr(sb, name)[0])(0)] * pa + getattr(sb, name)[pb:])
    assert all(plan_for_samples(c) is not None for c in split_micro(samples, 4)[:2])
    single = _step(RankWorker(spec_json), samples, 0, 1, micro=2)
    out = str(tmp_path / "ws2.pt")
    mp.spawn(_rank_main, args=(2, free_port(), spec_json, samples, out), nprocs=2, join=True)
    two = torch.load(out, weights_only=False)
    rank0_tokens = sum(s.n_generated for s in samples[0::2])
    assert two["sums"]["tokens"] == rank0_tokens  # rank 0's own share; the controller adds ranks up
    assert two["sums"]["grad_norm"] == pytest.approx(single["sums"]["grad_norm"], rel=1e-4)
    assert set(two["params"]) == set(single["params"])
    worst = max((two["params"][k] - single["params"][k]).abs().max().item() for k in single["params"])
    # lr 1e-3: Adam's first step moves every weight by ~1e-3, so a wrong gradient shows as ~1e-3; float
    # reassociation (shared vs plain forward) flips near-zero gradient signs by up to ~2e-5.
    assert worst < 5e-5, worst


@pytest.mark.slow
def test_ray_controller_runs_the_job(ray_session, tmp_path):
    spec = small_spec(steps=2)
    sink = ListSink()
    group = RayGroup(spec, world_size=1)
    try:
        result = Controller(spec, sink, group, f"file://{tmp_path}").run()
    finally:
        group.shutdown()
    assert result.exit_code == EXIT_OK
    steps = sink.metric_steps()
    assert sorted(steps) == [1, 2] and all(k in steps[2] for k in REQUIRED)
    assert [r["step"] for r in sink.records if r["type"] == "checkpoint"] == [2]
