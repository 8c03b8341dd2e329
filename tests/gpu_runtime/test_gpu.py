"""GPU smoke test: the example job on one GPU, FSDP2 over NCCL at world size 1, bf16 mixed precision.

Skipped without CUDA (the project's CI and the 2-core box have none); run it on a GPU machine with
`pytest -m gpu tests/gpu_runtime/test_gpu.py`.
"""

from __future__ import annotations

import math

import pytest
import torch

from gpu_runtime.checkpoint import load as load_checkpoint
from gpu_runtime.controller import EXIT_OK, Controller, LocalGroup, RayGroup
from opentinker.spec import AlgorithmSpec, CheckpointSpec, ResourcesSpec, example_rl_spec
from tests.gpu_runtime.test_controller import REQUIRED, ListSink

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


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


def test_example_job_on_one_gpu_with_nccl_and_mixed_precision(ray_session, tmp_path):
    spec = _gpu_spec()
    sink = ListSink()
    group = RayGroup(spec, world_size=1)  # trainer rank and rollout worker share the one GPU
    try:
        (info,) = group.call("runtime_info", [()])
        assert info == {
            "device": "cuda:0",
            "backend": "nccl",
            "sharded": True,  # FSDP2, the multi-GPU code path, at world size 1
            "param_dtype": "torch.float32",  # master weights; compute is bf16 (FSDP MixedPrecisionPolicy)
            "mixed_precision": True,
        }
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
    # bf16 sampling vs bf16-autocast scoring: a small, measured gap (not 0, not garbage).
    assert 0 < steps[1]["logprob_gap"] < 0.5
    ck = [r for r in sink.records if r["type"] == "checkpoint"]
    assert [r["step"] for r in ck] == [2, 3]
    weights = load_checkpoint(ck[-1]["uri"]).weights
    assert all(v.device.type == "cpu" and v.dtype == torch.float32 for v in weights.values())


def test_example_job_on_one_gpu_in_process_uses_autocast_and_shared_prefixes(tmp_path):
    spec = _gpu_spec(steps=2)
    group = LocalGroup(spec)  # no process group: unsharded, autocast, each prompt run once per group
    (info,) = group.call("runtime_info", [()])
    assert info["device"] == "cuda:0" and info["backend"] is None and not info["sharded"]
    assert info["mixed_precision"] and group.ranks[0].trainer.share_prefix
    result = Controller(spec, ListSink(), group, f"file://{tmp_path}").run()
    assert result.exit_code == EXIT_OK and result.step == 2
    # From random weights rewards are mostly 0 (flat groups, zero advantage): only finiteness is checked.
    assert all(math.isfinite(h["loss"]) and math.isfinite(h["grad_norm"]) for h in result.history)
