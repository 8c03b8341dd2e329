"""The model server core on a CUDA GPU (skipped without one; `bench/gpu_check.sh` runs `-m gpu` tests): the
batched multi-adapter pass against each adapter alone in fp32, and a bf16 base (adapters stay fp32) that
learns, samples and round-trips its state."""

from __future__ import annotations

import math

import pytest
import torch

from gpu_runtime.model_server import (
    AdamParams,
    ForwardBackward,
    LoraConfig,
    ModelServer,
    OptimStep,
    Sample,
    SampleResult,
    SamplingParams,
    SaveState,
)
from tests.gpu_runtime.test_model_server import CALLS, _ce, _fb, _grads, _server, _warm_up

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def test_batched_forward_backward_equals_each_adapter_alone_on_cuda():
    batched, alone = _server(device="cuda"), _server(device="cuda")
    _warm_up(batched)
    _warm_up(alone)
    for mid, op in CALLS.items():
        batched.submit(mid, 3, op)
    for o in batched.step():
        got, ref = o.unwrap(), _fb(alone, o.model_id, 3, CALLS[o.model_id])
        assert isinstance(got, type(ref))
        assert got.metrics["loss:sum"] == pytest.approx(ref.metrics["loss:sum"], rel=1e-3, abs=1e-4)
        for g, r in zip(got.loss_fn_outputs, ref.loss_fn_outputs, strict=True):
            torch.testing.assert_close(g["logprobs"], r["logprobs"], rtol=1e-3, atol=1e-4)
        ref_g = _grads(alone, o.model_id)
        for k, g in _grads(batched, o.model_id).items():
            torch.testing.assert_close(g, ref_g[k], rtol=1e-3, atol=1e-5)


def test_a_bf16_base_learns_samples_and_resumes(tmp_path):
    s = ModelServer("tiny-qwen2", device="cuda", dtype=torch.bfloat16)
    s.create_model("a", LoraConfig(rank=8, seed=1))
    data = [_ce(list(b"12+7=19\n")), _ce(list(b"3+4=7\n"))]
    losses = []
    for step in range(25):
        losses.append(_fb(s, "a", 2 * step + 1, ForwardBackward(data, "cross_entropy")).metrics["loss:sum"])
        s.call("a", 2 * step + 2, OptimStep(AdamParams(learning_rate=5e-3)))
    assert losses[-1] < 0.5 * losses[0], losses
    out = s.call("a", 51, Sample(list(b"12+7="), 4, SamplingParams(max_tokens=4, seed=1, stop=[])))
    assert isinstance(out, SampleResult)
    assert all(len(q.tokens) == 4 and all(math.isfinite(x) for x in q.logprobs) for q in out.sequences)
    s.call("a", 52, SaveState(f"file://{tmp_path}/state"))
    s.create_model_from_state("b", f"file://{tmp_path}/state", optimizer=True)
    probe = ForwardBackward(data, "cross_entropy", forward_only=True)
    a_loss = _fb(s, "a", 53, probe).metrics["loss:sum"]
    assert _fb(s, "b", 1, probe).metrics["loss:sum"] == pytest.approx(a_loss, rel=1e-5)
