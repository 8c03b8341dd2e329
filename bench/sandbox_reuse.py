"""Sandbox process reuse, before/after: a multi-agent package's games with a process per game
(`OPENTINKER_SANDBOX_POOL_SIZE=0`, the old behaviour) and with processes reused across the job's games.

    .venv/bin/python bench/sandbox_reuse.py [--steps 4 --batch 4 --group 4]

Prints, per setting: the median sandbox round trip of a sequential game (process start included when not
reused), and a 2-policy tiny-qwen2 job on the package: median `time/rollout` per step after the first (the
first starts the pool) and the processes started for all its games.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from gpu_runtime import env_packages
from gpu_runtime.cli import run_job
from gpu_runtime.sink import JsonlSink
from opentinker.env.codec import ByteCodec
from opentinker.env.multiagent import MultiAgentProtocol, RulePolicy
from opentinker.env.protocol import Budget
from opentinker.env.sandbox import SandboxedMultiAgentEnvironment, SandboxPool
from opentinker.spec import JobSpec

SOURCE = """
from opentinker.env.base import Observation
from opentinker.env.multiagent import MultiAgentEnvironment, MultiStepResult, TurnOrder


class Duel(MultiAgentEnvironment):
    name = "duel"
    roles = ("left", "right")
    turn_order = TurnOrder.SIMULTANEOUS

    def reset(self, seed):
        self.round = 0
        return {r: Observation(f"{r}, game {seed}: speak") for r in self.roles}

    def step(self, actions):
        self.round += 1
        rewards = {r: (sum(a.encode()) % 3) / 2 for r, a in actions.items()}
        done = self.round >= 2
        return MultiStepResult({} if done else {r: Observation("again") for r in self.roles}, rewards, done)

    def rule_based_action(self, role):
        return "ok"
"""
MANIFEST = {
    "name": "duel",
    "version": "1.0.0",
    "entrypoint": "duel_env:Duel",
    "protocol": "multi-agent",
    "roles": ["left", "right"],
}


def game_overhead(pkg: Path, size: int, n: int = 10) -> float:
    pool = SandboxPool("duel_env:Duel", package_dir=pkg, size=size)
    codec, protocol, took = ByteCodec(), MultiAgentProtocol(Budget(max_turns=4, max_new_tokens=4)), []
    try:
        for seed in range(n):
            t = time.perf_counter()
            env = SandboxedMultiAgentEnvironment(pool=pool)
            try:
                protocol.run(env, {"left": RulePolicy(), "right": RulePolicy()}, codec, seed)
            finally:
                env.close()
            took.append(time.perf_counter() - t)
    finally:
        pool.close()
    return statistics.median(took)


def job(pkg: Path, size: int, args) -> tuple[float, int, int]:
    os.environ["OPENTINKER_ENV_PACKAGE"] = str(pkg)
    os.environ["OPENTINKER_SANDBOX_POOL_SIZE"] = str(size)
    env_packages._factories.clear()
    spec = JobSpec.model_validate(
        {
            "kind": "rl",
            "model": {"base": "tiny-qwen2"},
            "environment": {"ref": "bench/duel@1.0.0"},
            "algorithm": {
                "name": "grpo", "steps": args.steps, "batch_size": args.batch, "group_size": args.group,
                "max_new_tokens": 4, "micro_batch_size": 16,
            },
            "checkpoint": {"every_steps": 1000},
            "multi_agent": {"policies": {"pl": {}, "pr": {}}, "roles": {"left": "pl", "right": "pr"}},
        }
    )  # fmt: skip
    out = io.StringIO()
    with tempfile.TemporaryDirectory() as ck:
        assert run_job(spec, JsonlSink(out), f"file://{ck}") == 0, out.getvalue()[-2000:]
    steps = [r for r in map(json.loads, out.getvalue().splitlines()) if r["type"] == "metrics"]
    (factory,) = env_packages._factories.values()
    factory.close()
    rollout = statistics.median(r["time/rollout"] for r in steps[1:] or steps)
    return rollout, factory.pool.spawned, args.steps * args.batch * args.group


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--group", type=int, default=4)
    p.add_argument("--pool", type=int, default=16)
    args = p.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        pkg = Path(tmp)
        (pkg / "opentinker.json").write_text(json.dumps(MANIFEST))
        (pkg / "duel_env.py").write_text(SOURCE)
        print(
            "| sandbox processes | game round trip (median) | job time/rollout per step | processes/games |"
        )
        print("|---|---|---|---|")
        for size, label in ((0, "one per game (before)"), (args.pool, f"reused, pool {args.pool} (after)")):
            overhead = game_overhead(pkg, size)
            rollout, spawned, games = job(pkg, size, args)
            print(f"| {label} | {overhead * 1000:.1f} ms | {rollout:.2f} s | {spawned}/{games} |", flush=True)


if __name__ == "__main__":
    main()
