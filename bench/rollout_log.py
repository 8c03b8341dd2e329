"""What the rollout log costs a step: the example RL job (tiny-qwen2, arithmetic, 4 prompts x 4 samples, 8 new
tokens) with `rollouts.per_step` = 0 (off), 8 (the default) and 64 (the most), in process.

    .venv/bin/python bench/rollout_log.py [--steps 8] [--repeats 2]

The table: median `time/step` and `time/rollout_log` over steps 2.. (step 1 loads the tokenizer), and the JSON
bytes a step's records make (what HttpSink posts to the ingest API). Runs alternate between settings so a
loaded machine slows them alike.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from gpu_runtime.controller import EXIT_OK, Controller, LocalGroup
from gpu_runtime.sink import JsonlSink
from opentinker.spec import JobSpec, example_rl_spec


class SizeSink(JsonlSink):
    """Encodes every record as HttpSink would, keeps only the rollouts' sizes."""

    def __init__(self) -> None:
        super().__init__(out=open("/dev/null", "w"))  # noqa: SIM115
        self.rollout_bytes: list[int] = []

    def rollouts(self, step: int, episodes: list[dict]) -> None:
        self.rollout_bytes.append(len(json.dumps({"step": step, "episodes": episodes})))


def spec(per_step: int, steps: int) -> JobSpec:
    body = example_rl_spec().model_dump()
    body["algorithm"]["steps"] = steps
    body["rollouts"]["per_step"] = per_step
    body["checkpoint"].update(every_steps=10_000, save_final=False)
    return JobSpec.model_validate(body)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(1)
    settings = (0, 8, 64)
    rows: dict[int, dict[str, list[float]]] = {n: {"step": [], "log": [], "bytes": []} for n in settings}
    for _ in range(args.repeats):
        for n in settings:
            js = spec(n, args.steps)
            sink = SizeSink()
            result = Controller(js, sink, LocalGroup(js), None).run()
            assert result.exit_code == EXIT_OK, result.status
            for m in result.history[1:]:
                rows[n]["step"].append(m["time/step"])
                rows[n]["log"].append(m.get("time/rollout_log", 0.0))
            rows[n]["bytes"] += sink.rollout_bytes
    print(f"example RL job, {args.steps} steps x {args.repeats} runs, torch threads 1")
    head = ("per_step", "time/step (s)", "time/rollout_log (ms)", "share", "bytes/step")
    print(" | ".join(f"{h:>{w}}" for h, w in zip(head, (8, 13, 21, 6, 10), strict=True)))
    print("-" * 72)
    for n in settings:
        step, log = statistics.median(rows[n]["step"]), statistics.median(rows[n]["log"])
        size = statistics.median(rows[n]["bytes"]) if rows[n]["bytes"] else 0
        print(f"{n:>8} | {step:>13.3f} | {log * 1000:>21.2f} | {log / step:>6.2%} | {size:>10.0f}")


if __name__ == "__main__":
    main()
