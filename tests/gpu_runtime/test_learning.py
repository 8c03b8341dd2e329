"""Learning, end to end on CPU: SFT warm start -> GRPO from its checkpoint -> greedy eval on held-out seeds.

Issue 4's bar: greedy exact-match accuracy from the untrained level to >= 0.8 within 10 minutes, the RL stage
alone adding >= 0.3, with fixed seeds. Every stage is a separate job run through the controller API, exactly
as `python -m gpu_runtime run` runs it; the RL job starts from the SFT checkpoint via `model.base`.

STATUS: the chain runs, but tiny-qwen2 does not yet leave the plateau where it answers with the marginal
distribution of sums (SFT loss ~1.2-1.4 nats/token, greedy accuracy <= 0.07): measured with SFT 150 x 8
examples at lr 1e-3, 200 x 16 at 2e-3 (214 s), and even with a compact "3+4=" prompt 150 x 16 at 2e-3 and
1e-2. Hence `xfail(strict)` with `run=False` by default so the suite stays fast; OPENTINKER_LEARNING_TEST=1
runs it (and it must then pass).
"""

from __future__ import annotations

import os
import time

import pytest

from gpu_runtime.controller import EXIT_OK, Controller, LocalGroup
from gpu_runtime.data.arithmetic_sft import write_arithmetic_sft
from opentinker.spec import JobSpec
from tests.gpu_runtime.test_controller import ListSink

ENV = {"ref": "opentinker/arithmetic@1.0.0", "config": {"max_operand": 9}}  # single-digit addition
SEED = 1
SFT = dict(steps=30, batch_size=32, micro_batch_size=32, learning_rate=1e-3)
RL = dict(
    name="grpo", steps=20, batch_size=8, group_size=8, micro_batch_size=64, learning_rate=3e-4,
    max_new_tokens=4, max_grad_norm=1.0,
)  # fmt: skip
EVAL_EPISODES = dict(batch_size=25, group_size=8, max_new_tokens=4)  # 200 greedy episodes


def _job(prefix: str | None, **spec) -> tuple[list[dict], float]:
    js = JobSpec.model_validate(
        {"seed": SEED, "resources": {"cpus": 2}, "checkpoint": {"every_steps": 10_000}, **spec}
    )
    t = time.perf_counter()
    result = Controller(js, ListSink(), LocalGroup(js), prefix).run()
    assert result.exit_code == EXIT_OK, result
    return result.history, time.perf_counter() - t


def _accuracy(base: str) -> float:
    hist, _ = _job(None, kind="eval", model={"base": base}, environment=ENV, algorithm=EVAL_EPISODES)
    return hist[0]["eval/accuracy"]


@pytest.mark.slow
@pytest.mark.xfail(
    os.environ.get("OPENTINKER_LEARNING_TEST") != "1",
    reason="tiny-qwen2 does not learn single-digit addition within budget yet (see module docstring)",
    run=False,
    strict=True,
)
def test_sft_then_grpo_reaches_080_greedy_accuracy(tmp_path):
    t0 = time.perf_counter()
    data = write_arithmetic_sft(tmp_path / "arith.jsonl", 500, seed=0, **ENV["config"])
    a_init = _accuracy("tiny-qwen2")
    sft_hist, sft_s = _job(
        f"file://{tmp_path}/sft", kind="sft", model={"base": "tiny-qwen2"},
        dataset={"uri": f"file://{data}"}, algorithm=SFT,
    )  # fmt: skip
    sft_ckpt = f"file://{tmp_path}/sft/step_{SFT['steps']:06d}"
    a0 = _accuracy(sft_ckpt)
    rl_hist, rl_s = _job(
        f"file://{tmp_path}/rl", kind="rl", model={"base": sft_ckpt}, environment=ENV, algorithm=RL
    )
    a1 = _accuracy(f"file://{tmp_path}/rl/step_{RL['steps']:06d}")
    total = time.perf_counter() - t0
    print(f"\nuntrained {a_init:.3f} | after SFT ({sft_s:.0f}s) {a0:.3f} | after GRPO ({rl_s:.0f}s) {a1:.3f}")
    print("SFT loss:", " ".join(f"{h['loss']:.2f}" for h in sft_hist))
    print("GRPO reward/mean:", " ".join(f"{h['reward/mean']:.2f}" for h in rl_hist))
    print(f"total {total:.0f}s")
    assert a1 >= 0.8
    assert a1 - a0 >= 0.3
    assert total < 600
