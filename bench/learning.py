"""The example recipe of `make demo`, over seeds and rollout engines: does it learn, how fast, how steadily?

    .venv/bin/python bench/learning.py [--seeds 1 2 3] [--engines static hf] [--recipes now before]
                                       [--out DIR]
    .venv/bin/python bench/learning.py --multi-agent [...]      # the two-policy tic-tac-toe recipe

Each run is what `make demo` runs, in process, through the same controller as `python -m gpu_runtime run`:
the arithmetic SFT data (2,000 conversations, data seed 0), `example_sft_spec` with the run's seed, then
`example_grpo_spec` from its last checkpoint, then a greedy eval of 200 episodes on held-out seeds (the eval
job's seed stream, disjoint from training's) after each stage. `--engines` picks the rollout engine
(`OPENTINKER_ROLLOUT_ENGINE`: `static` is our decode loop, `hf` is HFEngine).

The table: greedy accuracy after SFT and after GRPO, wall time of each training stage and of both together
(evals not included), and the GRPO diagnostics a practitioner reads to tell a healthy run from a collapsing
one, over the last 20 steps: entropy, KL to the warm-start model, pre-clip gradient norm, fraction of groups
with zero reward variance, importance-ratio range, mean response length and truncated fraction; `drop` is the
largest fall of the 5-step mean sampled reward below its running best (a collapse shows as a large drop).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gpu_runtime.controller import EXIT_OK, Controller, LocalGroup
from gpu_runtime.data.arithmetic_sft import write_arithmetic_sft
from gpu_runtime.sink import Sink
from gpu_runtime.workers import ENGINE_ENV
from opentinker.spec import EXAMPLE_ENV_CONFIG, JobSpec, example_grpo_spec, example_sft_spec

EVAL = dict(batch_size=25, group_size=8, max_new_tokens=4)  # 200 greedy episodes
TAIL = 20  # diagnostics are averaged over the last TAIL GRPO steps


class QuietSink(Sink):
    """Keeps nothing: the bench reads the controller's history."""

    def metrics(self, step: int, values: dict[str, float]) -> None: ...
    def event(self, kind: str, **data: object) -> None: ...
    def log(self, line: str) -> None: ...
    def checkpoint(self, step: int, uri: str, files: list[dict]) -> None: ...
    def heartbeat(self) -> None: ...
    def should_cancel(self) -> bool:
        return False


def run_job(js: JobSpec, prefix: str | None) -> tuple[list[dict[str, float]], float]:
    t = time.perf_counter()
    result = Controller(js, QuietSink(), LocalGroup(js), prefix).run()
    if result.exit_code != EXIT_OK:
        raise RuntimeError(f"{js.name or js.kind.value} ended {result.status}")
    return result.history, time.perf_counter() - t


def greedy_accuracy(base: str, config: dict) -> float:
    js = JobSpec.model_validate(
        {
            "seed": 1,
            "kind": "eval",
            "model": {"base": base},
            "environment": {"ref": "opentinker/arithmetic@1.0.0", "config": config},
            "algorithm": EVAL,
        }
    )
    return run_job(js, None)[0][0]["eval/accuracy"]


def largest_drop(rewards: list[float], window: int = 5) -> float:
    """The largest fall of the moving-average reward below its running best (0 for a run that never falls)."""
    best, drop = -float("inf"), 0.0
    for i in range(window, len(rewards) + 1):
        avg = sum(rewards[i - window : i]) / window
        best = max(best, avg)
        drop = max(drop, best - avg)
    return drop


# The GRPO stage before issue 11 (its collapse is told in tests/gpu_runtime/test_learning.py): 200 steps at a
# constant 1e-4, one on-policy update per step, no KL term. A tiny KL coefficient keeps a reference model so
# that the KL to the warm start is measured; at 1e-12 it changes nothing else.
BEFORE_ISSUE_11 = dict(
    steps=200, minibatches=1, micro_batch_size=128, lr_warmup_steps=0, lr_schedule="constant", kl_coef=1e-12
)


def grpo_spec(recipe: str, base: str, seed: int) -> JobSpec:
    rl = example_grpo_spec(base)
    if recipe == "before":
        rl = rl.model_copy(update={"algorithm": rl.algorithm.model_copy(update=BEFORE_ISSUE_11)})
    return JobSpec.model_validate({**rl.model_dump(), "seed": seed})


def run_recipe(recipe: str, seed: int, engine: str, root: Path, data: str) -> dict[str, float]:
    os.environ[ENGINE_ENV] = engine
    sft = example_sft_spec(data).model_copy(update={"seed": seed})
    _, sft_s = run_job(sft, f"file://{root}/sft")
    sft_ckpt = f"file://{root}/sft/step_{sft.algorithm.steps:06d}"
    rl = grpo_spec(recipe, sft_ckpt, seed)
    rl_hist, rl_s = run_job(rl, f"file://{root}/rl")
    config = dict(rl.environment.config) if rl.environment else {}
    tail = rl_hist[-TAIL:]

    def mean(key: str) -> float:
        return statistics.fmean(h.get(key, float("nan")) for h in tail)

    return {
        "recipe": recipe,
        "seed": seed,
        "engine": engine,
        "sft_acc": greedy_accuracy(sft_ckpt, config),
        "rl_acc": greedy_accuracy(f"file://{root}/rl/step_{rl.algorithm.steps:06d}", config),
        "sft_s": sft_s,
        "rl_s": rl_s,
        "total_s": sft_s + rl_s,
        "entropy": mean("entropy"),
        "kl": mean("kl"),
        "grad_norm": mean("grad_norm"),
        "zero_std": mean("groups/zero_std_frac"),
        "ratio_max": max(h.get("ratio/max", 1.0) for h in tail),
        "ratio_min": min(h.get("ratio/min", 1.0) for h in tail),
        "resp_len": mean("response_length/mean"),
        "trunc": mean("response/truncated_frac"),
        "drop": largest_drop([h["reward/mean"] for h in rl_hist]),
        "final_reward": mean("reward/mean"),
    }


COLUMNS = [
    ("recipe", "{}"), ("seed", "{:d}"), ("engine", "{}"), ("sft_acc", "{:.3f}"), ("rl_acc", "{:.3f}"),
    ("sft_s", "{:.0f}"), ("rl_s", "{:.0f}"), ("total_s", "{:.0f}"), ("final_reward", "{:.3f}"),
    ("drop", "{:.3f}"),
    ("entropy", "{:.3f}"), ("kl", "{:.4f}"), ("grad_norm", "{:.2f}"), ("zero_std", "{:.2f}"),
    ("ratio_min", "{:.3f}"), ("ratio_max", "{:.3f}"), ("resp_len", "{:.2f}"), ("trunc", "{:.3f}"),
]  # fmt: skip


def print_table(rows: list[dict]) -> None:
    cells = [[fmt.format(r[k]) for k, fmt in COLUMNS] for r in rows]
    widths = [max(len(k), *(len(c[i]) for c in cells)) for i, (k, _) in enumerate(COLUMNS)]
    print("  ".join(k.rjust(w) for (k, _), w in zip(COLUMNS, widths, strict=True)))
    for c in cells:
        print("  ".join(v.rjust(w) for v, w in zip(c, widths, strict=True)), flush=True)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--multi-agent", action="store_true", help="the two-policy tic-tac-toe recipe instead")
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--engines", nargs="+", default=["static", "hf"], choices=["static", "hf"])
    ap.add_argument(
        "--recipes",
        nargs="+",
        default=["now"],
        choices=["now", "before"],
        help="`before`: the GRPO stage as it was before issue 11, side by side",
    )
    ap.add_argument("--out", help="keep checkpoints here (default: a temporary directory)")
    argv = sys.argv[1:] if argv is None else argv
    if "--multi-agent" in argv:  # its own options (--seeds, --steps, ...) go to the multi-agent bench
        from bench import learning_multiagent

        learning_multiagent.main([a for a in argv if a != "--multi-agent"])
        return
    args = ap.parse_args(argv)
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError, StopIteration):
        cpu = next(
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        )
    print(f"# example recipe (arithmetic, tiny-qwen2) on {cpu}, {os.cpu_count()} CPUs", flush=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.out or tmp)
        data = root / "arith.jsonl"
        data.parent.mkdir(parents=True, exist_ok=True)
        write_arithmetic_sft(data, 2000, seed=0, **EXAMPLE_ENV_CONFIG)
        for recipe in args.recipes:
            for engine in args.engines:
                for seed in args.seeds:
                    out = root / f"{recipe}-{engine}-{seed}"
                    rows.append(run_recipe(recipe, seed, engine, out, f"file://{data}"))
                    r = rows[-1]
                    print(
                        f"  {recipe} seed {seed} {engine}: SFT {r['sft_acc']:.3f} -> GRPO {r['rl_acc']:.3f}"
                        f" in {r['total_s']:.0f} s",
                        file=sys.stderr,
                        flush=True,
                    )
    print_table(rows)


if __name__ == "__main__":
    main()
