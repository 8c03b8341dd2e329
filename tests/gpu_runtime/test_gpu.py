"""GPU smoke test: the example job on one GPU, FSDP2 over NCCL at world size 1, bf16 mixed precision.

Skipped without CUDA (the project's CI and the 2-core box have none). On a GPU machine `bench/gpu_check.sh`
runs them (with every other GPU check); by hand: `pytest -m gpu tests/gpu_runtime`. The NCCL job runs twice:
with the trainer rank in this process (no Ray: the lent GPU machines cannot carry Ray's wheel) and, where Ray
is installed, with trainer rank and rollout worker as Ray actors.
"""

from __future__ import annotations

import math

import pytest
import torch

from gpu_runtime.checkpoint import load as load_checkpoint
from gpu_runtime.controller import EXIT_OK, Controller, LocalGroup, RayGroup, free_port
from gpu_runtime.workers import RankWorker, RolloutWorker
from opentinker.spec import AlgorithmSpec, CheckpointSpec, JobSpec, ResourcesSpec, example_rl_spec
from tests.gpu_runtime.test_controller import REQUIRED, ListSink

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

NCCL_RUNTIME = {
    "device": "cuda:0",
    "backend": "nccl",
    "sharded": True,  # FSDP2, the multi-GPU code path, at world size 1
    "param_dtype": "torch.float32",  # master weights; compute is bf16 (FSDP MixedPrecisionPolicy)
    "mixed_precision": True,
}


class NcclGroup(LocalGroup):
    """World size 1 in this process, but the trainer rank joins an NCCL process group (as a Ray actor or a
    launched rank would): the same FSDP2 code path as a multi-GPU job, without Ray."""

    def __init__(self, spec: JobSpec) -> None:
        js = spec.model_dump_json()
        self.ranks = [RankWorker(js, 0, 1, f"127.0.0.1:{free_port()}")]
        self.rollout = RolloutWorker(js)
        self.world_size = 1

    def shutdown(self) -> None:
        self.leave_process_group()  # destroys the process group: later tests run without one


@pytest.fixture
def ray_or_skip(request):
    pytest.importorskip("ray")
    return request.getfixturevalue("ray_session")


def _gpu_spec(steps: int = 3):
    return example_rl_spec().model_copy(
        update={
            "algorithm": AlgorithmSpec(
                name="grpo", steps=steps, batch_size=8, group_size=4, max_new_tokens=16, micro_batch_size=32
            ),
            "resources": ResourcesSpec(gpus=1, cpus=2, memory_gb=8, max_hours=0.2),
            "checkpoint": CheckpointSpec(every_steps=2, keep_last=2),
        }
    )


def _check_nccl_job(group, tmp_path) -> None:
    spec = _gpu_spec()
    sink = ListSink()
    try:
        (info,) = group.runtime_info()
        assert info == NCCL_RUNTIME
        result = Controller(spec, sink, group, f"file://{tmp_path}").run()
    finally:
        group.shutdown()
    assert result.exit_code == EXIT_OK and result.step == 3
    steps = sink.metric_steps()
    assert sorted(steps) == [1, 2, 3]
    for m in steps.values():
        missing = [k for k in REQUIRED if k not in m]
        assert not missing, missing
        assert all(math.isfinite(m[k]) for k in REQUIRED), m
        assert m["ratio/mean"] == 1.0  # one epoch, one mini-batch: exactly on-policy
    # bf16 sampling vs bf16-compute scoring: a small, measured gap (not 0, not garbage).
    assert 0 < steps[1]["logprob_gap"] < 0.5
    ck = [r for r in sink.records if r["type"] == "checkpoint"]
    assert [r["step"] for r in ck] == [2, 3]
    weights = load_checkpoint(ck[-1]["uri"]).weights
    assert all(v.device.type == "cpu" and v.dtype == torch.float32 for v in weights.values())


def test_example_job_on_one_gpu_with_nccl_and_mixed_precision(tmp_path):
    group = NcclGroup(_gpu_spec())
    fused = group.ranks[0].trainer.optimizer.defaults["fused"]
    _check_nccl_job(group, tmp_path)
    assert fused is True  # one fused AdamW kernel over FSDP2's DTensors
    assert not torch.distributed.is_initialized()


def test_example_job_on_one_gpu_with_nccl_as_ray_actors(ray_or_skip, tmp_path):
    # Trainer rank and rollout worker share the one GPU (half a GPU bundle each).
    _check_nccl_job(RayGroup(_gpu_spec(), world_size=1), tmp_path)


def test_example_job_on_one_gpu_in_process_uses_autocast_and_shared_prefixes(tmp_path):
    spec = _gpu_spec(steps=2)
    group = LocalGroup(spec)  # no process group: unsharded, autocast, each prompt run once per group
    (info,) = group.runtime_info()
    assert info["device"] == "cuda:0" and info["backend"] is None and not info["sharded"]
    assert info["mixed_precision"] and group.ranks[0].trainer.share_prefix
    assert group.ranks[0].trainer.optimizer.defaults["fused"] is True
    result = Controller(spec, ListSink(), group, f"file://{tmp_path}").run()
    assert result.exit_code == EXIT_OK and result.step == 2
    # From random weights rewards are mostly 0 (flat groups, zero advantage): only finiteness is checked.
    assert all(math.isfinite(h["loss"]) and math.isfinite(h["grad_norm"]) for h in result.history)
