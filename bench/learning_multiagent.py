"""The two-policy tic-tac-toe recipe over seeds: do both co-trained policies improve against the rule player?

    .venv/bin/python bench/learning_multiagent.py [--seeds 1 2 3] [--steps N] [--out DIR]
    .venv/bin/python bench/learning.py --multi-agent [...]          # the same

Each run is the README's multi-agent example, in process, through the same controllers as
`python -m gpu_runtime run`: the board-game SFT data (`gpu_runtime.data.board_sft`, data seed 0),
`example_multiagent_sft_spec` with the run's seed, then `example_multiagent_spec` from its checkpoint:
`alice` (full fine-tuning) and `bob` (LoRA) co-trained against each other in both seats, each evaluated in the
job against the rule-based player in both seats (greedy, held-out seeds) before the first update and at
the end.

The table, per seed and policy: illegal-move rate, the share of forced blocks made (moves where the rule
player was one stone from a line and the policy could not win at once) and win-or-draw rate against the rule
player in each seat (X, O) and the mean win-or-draw, before -> after the co-training job; how far each
trained parameter set moved (alice: the norm of its weights' change from the warm start; bob: the norm of its
LoRA update, scale * B @ A, summed over the adapted matrices); wall time of the SFT and co-training jobs
(the in-job evaluations included).

`--references` prints, first, what fixed players score on the same openings and the same metric
(win-or-draw against the rule player, mean over both seats): a random legal player, one that takes a winning
move when it has one, one that also blocks the opponent's, and the rule player itself. It shows which skill
the bar asks a policy to learn: blocking alone carries a random player from ~0.15 to ~0.85.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
from safetensors.torch import load_file

from bench.learning import QuietSink
from gpu_runtime.controller import EXIT_OK, Controller, LocalGroup, derive_seed
from gpu_runtime.data.board_sft import write_board_sft
from gpu_runtime.multiagent import MultiAgentController, MultiAgentGroup
from opentinker.env.builtin import BUILTINS
from opentinker.env.builtin.board import KInARow
from opentinker.spec import (
    EXAMPLE_MULTIAGENT_ENV_CONFIG,
    JobSpec,
    example_multiagent_sft_spec,
    example_multiagent_spec,
)

SFT_CONVERSATIONS = 3000


class RecordingSink(QuietSink):
    """Keeps every step's metrics (step 0 too: the in-job evaluation before the first update)."""

    def __init__(self) -> None:
        self.steps: dict[int, dict[str, float]] = {}

    def metrics(self, step: int, values: dict[str, float]) -> None:
        self.steps.setdefault(step, {}).update(values)


def with_steps(js: JobSpec, steps: int | None) -> JobSpec:
    if steps is None:
        return js
    return js.model_copy(update={"algorithm": js.algorithm.model_copy(update={"steps": steps})})


def warm_start(
    root: Path, seed: int, sft_steps: int | None = None, sft_config: dict[str, Any] | None = None
) -> tuple[str, float]:
    """Stage 1: the SFT data (the example's environment config, `sft_config` over it) and job; returns the
    checkpoint URI and the job's wall time."""
    config = {**EXAMPLE_MULTIAGENT_ENV_CONFIG, **(sft_config or {})}
    data = write_board_sft(root / "moves.jsonl", SFT_CONVERSATIONS, seed=0, **config)
    sft = example_multiagent_sft_spec(f"file://{data}")
    sft = with_steps(sft.model_copy(update={"seed": seed}), sft_steps)
    t = time.perf_counter()
    result = Controller(sft, RecordingSink(), LocalGroup(sft), f"file://{root}/sft").run()
    if result.exit_code != EXIT_OK:
        raise RuntimeError(f"the warm start ended {result.status}")
    return f"file://{root}/sft/step_{sft.algorithm.steps:06d}", time.perf_counter() - t


def merged(js: JobSpec, override: dict[str, Any] | None) -> JobSpec:
    """`js` with `override` (a partial spec, e.g. `{"environment": {"config": {"threat_openings": 1}}}`)
    merged in, key by key: recipe variants without editing the example."""
    if not override:
        return js

    def merge(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
        out = dict(a)
        for k, v in b.items():
            out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
        return out

    return JobSpec.model_validate(merge(js.model_dump(mode="json"), override))


def co_train(
    root: Path, base: str, seed: int, steps: int | None = None, override: dict[str, Any] | None = None
) -> tuple[JobSpec, dict, float]:
    """Stage 2: the two-policy job; returns its spec, every step's metrics and its wall time."""
    spec = example_multiagent_spec(base).model_copy(update={"seed": seed})
    spec = with_steps(merged(spec, override), steps)
    sink = RecordingSink()
    group = MultiAgentGroup(spec)
    t = time.perf_counter()
    try:
        result = MultiAgentController(spec, sink, group, f"file://{root}/rl").run()
    finally:
        group.shutdown()
    if result.exit_code != EXIT_OK:
        raise RuntimeError(f"the co-training job ended {result.status}")
    return spec, sink.steps, time.perf_counter() - t


def _weights(d: Path) -> dict[str, torch.Tensor]:
    name = "adapter_model.safetensors" if (d / "adapter_model.safetensors").exists() else "model.safetensors"
    return load_file(d / name)


def parameter_change(base: str, final: str, policy: str, spec: JobSpec) -> float:
    """The L2 norm of what training changed in `policy`: full weights against the warm start, or the LoRA
    update scale * B @ A of every adapted matrix."""
    got = _weights(Path(final.removeprefix("file://")) / policy)
    lora = spec.multi_agent.policies[policy].model.lora if spec.multi_agent.policies[policy].model else None
    if lora is None:
        warm = _weights(Path(base.removeprefix("file://")))
        return math.sqrt(sum(float((got[k].float() - warm[k].float()).pow(2).sum()) for k in warm))
    scale = lora.alpha / lora.rank
    total = 0.0
    for k, a in got.items():
        if "lora_A" in k:
            b = got[k.replace("lora_A", "lora_B")]
            total += float((scale * b.float() @ a.float()).pow(2).sum())
    return math.sqrt(total)


def summary(before: dict[str, float], after: dict[str, float], policy: str) -> dict[str, float]:
    out = {}
    for when, m in (("before", before), ("after", after)):
        p = f"eval/vs_rule/{policy}"
        out[f"illegal_{when}"] = m[f"{p}/illegal_rate"]
        out[f"wd_{when}"] = m[f"{p}/win_or_draw"]
        for role in ("x", "o"):
            out[f"wd_{role}_{when}"] = m[f"{p}/{role}/win_or_draw"]
            out[f"illegal_{role}_{when}"] = m[f"{p}/{role}/illegal_rate"]
            # Forced blocks made (NaN: the seat never faced one).
            out[f"block_{role}_{when}"] = m.get(f"{p}/{role}/block_rate", math.nan)
    return out


def run(
    seed: int,
    root: Path,
    *,
    sft_steps: int | None = None,
    steps: int | None = None,
    override: dict[str, Any] | None = None,
    sft_config: dict[str, Any] | None = None,
) -> list[dict]:
    base, sft_s = warm_start(root, seed, sft_steps, sft_config)
    spec, metrics, rl_s = co_train(root, base, seed, steps, override)
    last = max(metrics)
    final = f"file://{root}/rl/step_{last:06d}"
    rows = []
    for policy in spec.multi_agent.trained:
        row = {"seed": seed, "policy": policy, "sft_s": sft_s, "rl_s": rl_s}
        row["kind"] = "lora" if spec.multi_agent.policies[policy].model else "full"
        row.update(summary(metrics[0], metrics[last], policy))
        row["delta"] = parameter_change(base, final, policy, spec)
        rows.append(row)
    return rows


REFERENCE_PLAYERS = ("random legal", "takes a win", "takes a win, blocks a loss", "rule player")


def _reference_move(player: str, env: KInARow, role: str, rng: random.Random) -> str:
    free = [(r, c) for r in range(env.n) for c in range(env.n) if env.board[r][c] == "."]
    if player == "rule player":
        return env.rule_based_action(role)
    marks = [env.mark(role)] + ([env.mark(env.other(role))] if "blocks" in player else [])
    if player != "random legal":
        for mark in marks:  # own win first, then the opponent's (a block)
            hit = next(((r, c) for r, c in free if env.wins(r, c, mark)), None)
            if hit:
                return f"{hit[0] + 1} {hit[1] + 1}"
    r, c = rng.choice(free)
    return f"{r + 1} {c + 1}"


def reference_win_or_draw(player: str, seed: int, games: int) -> dict[str, float]:
    """A fixed player's win-or-draw rate against the rule player in each seat, on the openings the
    co-training job evaluates on (its seed's), and the mean over seats."""
    rng = random.Random(seed)  # noqa: S311 (a reproducible random player)
    seeds = [derive_seed(seed, -8, i) for i in range(games)]
    out: dict[str, float] = {}
    for seat in ("x", "o"):
        good = 0
        for game_seed in seeds:
            env = BUILTINS["tic-tac-toe"](**EXAMPLE_MULTIAGENT_ENV_CONFIG)
            assert isinstance(env, KInARow)
            env.reset(game_seed)
            while True:
                role = env.active_roles()[0]
                mine = role == seat
                move = _reference_move(player, env, role, rng) if mine else env.rule_based_action(role)
                result = env.step({role: move})
                if result.done:
                    good += result.info.get("winner") in (seat, None)
                    break
        out[seat] = good / games
    out["mean"] = (out["x"] + out["o"]) / 2
    return out


def reference_table(seeds: list[int], games: int) -> str:
    lines = ["| player | " + " | ".join(f"seed {s}: X / O / mean" for s in seeds) + " |"]
    lines.append("|---|" + "---|" * len(seeds))
    for player in REFERENCE_PLAYERS:
        cells = []
        for s in seeds:
            r = reference_win_or_draw(player, s, games)
            cells.append(f"{r['x']:.2f} / {r['o']:.2f} / {r['mean']:.2f}")
        lines.append(f"| {player} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def table(rows: list[dict]) -> str:
    head = (
        "| seed | policy | illegal X | illegal O | blocks X | blocks O | win-or-draw X | win-or-draw O "
        "| win-or-draw (mean) | change | ‖Δθ‖ | SFT s | co-train s |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|"
    )
    lines = [head]
    for r in rows:
        lines.append(
            f"| {r['seed']} | {r['policy']} ({r['kind']}) "
            f"| {r['illegal_x_before']:.2f} → {r['illegal_x_after']:.2f} "
            f"| {r['illegal_o_before']:.2f} → {r['illegal_o_after']:.2f} "
            f"| {r['block_x_before']:.2f} → {r['block_x_after']:.2f} "
            f"| {r['block_o_before']:.2f} → {r['block_o_after']:.2f} "
            f"| {r['wd_x_before']:.2f} → {r['wd_x_after']:.2f} "
            f"| {r['wd_o_before']:.2f} → {r['wd_o_after']:.2f} "
            f"| {r['wd_before']:.2f} → {r['wd_after']:.2f} | {r['wd_after'] - r['wd_before']:+.2f} "
            f"| {r['delta']:.3f} | {r['sft_s']:.0f} | {r['rl_s']:.0f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="bench/learning_multiagent.py", description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--sft-steps", type=int, default=None, help="override the warm start's steps")
    ap.add_argument("--steps", type=int, default=None, help="override the co-training job's steps")
    ap.add_argument("--out", default=None, help="keep checkpoints under this directory")
    ap.add_argument(
        "--override",
        type=json.loads,
        default=None,
        help="a partial co-training spec (JSON) merged into the example's, e.g. the forced-block curriculum "
        '\'{"environment": {"config": {"threat_openings": 0.5}}, '
        '"multi_agent": {"eval_vs_rule": {"environment_config": {"threat_openings": 0}}}}\'',
    )
    ap.add_argument(
        "--sft-config",
        type=json.loads,
        default=None,
        help="environment config (JSON) over the example's for the warm start's data, e.g. a prompt style "
        'that --override gives the co-training job too: \'{"prompt_style": "mover"}\'',
    )
    ap.add_argument("--references", action="store_true", help="first the fixed players' scores (no training)")
    args = ap.parse_args(argv)
    info = Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []
    cpu = next((ln.split(":", 1)[1].strip() for ln in info if "model name" in ln), platform.processor())
    print(f"# {cpu}, {os.cpu_count()} CPUs, torch {torch.__version__}", flush=True)
    if args.references:
        mapping = example_multiagent_spec("tiny-qwen2").multi_agent
        assert mapping is not None and mapping.eval_vs_rule is not None
        print(reference_table(args.seeds, mapping.eval_vs_rule.games) + "\n", flush=True)
    rows: list[dict] = []
    with contextlib.ExitStack() as stack:
        out = Path(args.out) if args.out else Path(stack.enter_context(tempfile.TemporaryDirectory()))
        for seed in args.seeds:
            got = run(
                seed,
                out / f"seed{seed}",
                sft_steps=args.sft_steps,
                steps=args.steps,
                override=args.override,
                sft_config=args.sft_config,
            )
            for r in got:
                print(
                    f"seed {seed} {r['policy']}: "
                    f"illegal {r['illegal_before']:.2f} -> {r['illegal_after']:.2f}, "
                    f"win-or-draw {r['wd_before']:.2f} -> {r['wd_after']:.2f}, |dtheta| {r['delta']:.3f} "
                    f"(SFT {r['sft_s']:.0f}s, co-train {r['rl_s']:.0f}s)",
                    flush=True,
                )
            rows += got
    print()
    print(table(rows))


if __name__ == "__main__":
    main()
