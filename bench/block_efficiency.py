"""Can the tic-tac-toe warm start learn to block, by RL or SFT, within a job's worth of examples? (issue 11)

    .venv/bin/python bench/block_efficiency.py file:///ckpt/sft/step_000320 rl --lr 3e-4 [--lora] [--steps 32]
    .venv/bin/python bench/block_efficiency.py file:///ckpt/sft/step_000320 sft --lr 1e-3
    .venv/bin/python bench/block_efficiency.py file:///ckpt/sft/step_000320 onegroup
    .venv/bin/python bench/block_efficiency.py file:///ckpt/sft/step_000320 fit --fit-n 448 --epochs 16
    ... --style lines    # the `lines` prompt style (the warm start must be trained on it)
    .venv/bin/python bench/block_efficiency.py tiny-qwen2 fit --arch hidden_size=512,num_hidden_layers=8
    .venv/bin/python bench/block_efficiency.py tiny-qwen2 fit --render cells   # a bare board as the prompt
    ... fit --render cells --epochs 16 --rl-steps 64 --rl-lr 3e-4   # then `rl` from that SFT state
    .venv/bin/python bench/block_efficiency.py - mlp --fit-n 448 --epochs 100 --lr 1e-3   # the data check

BASE is the warm start's checkpoint URI, or a preset name for a random init (`tiny-qwen2`). `--arch` (with a
preset BASE) overrides the preset's Qwen2 shape for this run only: a larger or deeper random-init model, to
tell whether the model's size limits what it learns (registered in process under a derived name).

Positions are the tactics puzzles of the multi-agent example (`threat_openings: 1, move_limit: 2`: the mover
must block at exactly one cell), prompted exactly as the rule player's recorded conversations are
(`gpu_runtime.data.board_sft`). Everything trains through the platform's `Trainer.train_minibatch` with the
example's policy settings (alice: full fine-tuning; `--lora`: bob's adapter), in process, no rollout engine:

- `rl`: a contextual bandit with exact credit. Each step samples 8 answers (temperature 1, whole vocabulary)
  on each of 8 new positions; reward 0 for the block, -1 for anything else (the opponent wins, or illegal);
  GRPO advantages per position, one update on the move token and its end-of-turn token.
- `sft`: the block as the label, 64 new positions per step (the same number of examples per update).
- `fit`: SFT for `--epochs` passes over `--fit-n` distinct training positions: the block rate on them and
  on the held-out ones (does it fit what it sees? does it generalise?).
- `onegroup`: the mechanism check: the warm start's p(block) spread over held-out positions (and the share
  of groups of 8 expected to have no variance), then one group with known rewards (3 blocks, 5 misses) and
  one update, for alice and for bob: the change of log p(block) and of the misses.

Prints one JSON line per evaluation: greedy block and legal rates on 256 held-out positions, and the greedy
block rate on the first 64 training positions. The puzzle positions are few (~770 distinct prompts): the
held-out ones are distinct and no training draw repeats them (before, ~90% of them were also trained on).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import random
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from gpu_runtime.algorithms.advantages import grpo_advantages
from gpu_runtime.algorithms.losses import LossNorm
from gpu_runtime.algorithms.registry import algorithm
from gpu_runtime.batch import Sample
from gpu_runtime.data.board_sft import board_conversation
from gpu_runtime.data.sft import _render
from gpu_runtime.multiagent import resolve
from gpu_runtime.trainer import Trainer
from opentinker.env.builtin import BUILTINS
from opentinker.env.builtin.board import DIGIT_STYLES
from opentinker.spec import JobSpec, example_multiagent_spec

CONFIG = {"opening": 2, "prompt_style": "compact", "threat_openings": 1, "move_limit": 2}
POSITIONS, GROUP = 8, 8  # RL: positions per step, samples per position; SFT: POSITIONS * GROUP examples
Position = tuple[list[int], int, set[int]]  # prompt ids, the block cell (0-8), the free cells


def derived_preset(base: str, arch: str) -> str:
    """Register `base`'s preset with `arch`'s overrides (`key=int,...`) under a derived name, in process."""
    from gpu_runtime.models import PRESET_CONFIGS
    from opentinker.spec import MODEL_PRESETS

    if base not in PRESET_CONFIGS:
        raise SystemExit("--arch needs a preset BASE (random init)")
    over = {k: int(v) for k, v in (kv.split("=") for kv in arch.split(","))}
    name = base + "-" + "-".join(f"{k}{v}" for k, v in over.items())
    PRESET_CONFIGS[name] = PRESET_CONFIGS[base] | over
    MODEL_PRESETS[name] = MODEL_PRESETS[base]
    return name


def policy(base: str, name: str, lr: float | None, steps: int) -> JobSpec:
    spec = example_multiagent_spec(base)
    spec = spec.model_copy(update={"algorithm": spec.algorithm.model_copy(update={"steps": steps})})
    js = resolve(spec).specs[name]
    if lr is None:
        return js
    return js.model_copy(update={"algorithm": js.algorithm.model_copy(update={"learning_rate": lr})})


def position(tok: Any, seed: int) -> Position | None:
    """The mover's prompt of a puzzle with exactly one block cell and no win of its own, else None."""
    env = BUILTINS["tic-tac-toe"](**CONFIG)
    env.reset(seed)
    mover = env.active_roles()[0]
    me, them = env.mark(mover), env.mark(env.other(mover))
    free = [(r, c) for r in range(3) for c in range(3) if env.board[r][c] == "."]
    wins = [(r, c) for r, c in free if env.wins(r, c, them)]
    if any(env.wins(r, c, me) for r, c in free) or len(wins) != 1:
        return None
    conv = board_conversation("tic-tac-toe", seed, mover, noise=0.0, rng=random.Random(0), **CONFIG)  # noqa: S311
    k = next(i for i, m in enumerate(conv) if m["role"] == "assistant")
    block = wins[0][0] * 3 + wins[0][1]
    assert conv[k]["content"].strip() == str(block + 1)  # the rule player's recorded answer is the block
    return _render(tok, conv[:k], generation_prompt=True), block, {r * 3 + c for r, c in free}


def positions(
    tok: Any, seed: int, n: int, *, unique: bool = False, exclude: frozenset[tuple[int, ...]] = frozenset()
) -> list[Position]:
    """`n` puzzle positions drawn from `seed`, none whose prompt is in `exclude`; `unique`: no prompt twice.
    The puzzles are few (2,048 draws hold ~640 distinct prompts), so a held-out set must be excluded
    explicitly: 256 draws of another seed share ~90% of their prompts with 2,048 training draws."""
    rng = random.Random(seed)  # noqa: S311 (reproducible positions)
    out: list[Position] = []
    seen = set(exclude)
    for _ in range(200 * n):
        if len(out) == n:
            return out
        p = position(tok, rng.randrange(2**31))
        if p and tuple(p[0]) not in seen:
            out.append(p)
            if unique:
                seen.add(tuple(p[0]))
    raise ValueError(f"fewer than {n} puzzle positions outside the excluded ones")


def rerender(tok: Any, pos: list[Position], render: str) -> list[Position]:
    """The same positions with the prompt replaced by a bare board (fit `--render`): `cells`, the 9 cells from
    the mover's side (`m` own, `t` the opponent's, `.` free) then `=`; `marks`, the mover's mark then the 9
    cells as `X` / `O` / `.`, then `=`. No chat template, no row breaks, no list of free cells."""
    if render == "chat":
        return pos
    out = []
    for ids, block, free in pos:
        user = tok.decode(ids).split("<|im_end|>")[0].split("\n")  # <|im_start|>user, mark, 3 rows, free
        me, cells = user[1], "".join(user[2:5])
        assert CONFIG["prompt_style"] == "compact" and len(cells) == 9, user
        if render == "cells":
            text = "".join("m" if c == me else "." if c.isdigit() else "t" for c in cells)
        else:
            text = me + "".join("." if c.isdigit() else c for c in cells)
        out.append((tok.encode(text + "=", add_special_tokens=False), block, free))
    return out


def held_out(tok: Any) -> list[Position]:
    """256 distinct evaluation positions; training draws exclude them (`keys`)."""
    return positions(tok, 12345, 256, unique=True)


def keys(pos: list[Position]) -> frozenset[tuple[int, ...]]:
    return frozenset(tuple(p[0]) for p in pos)


class Probe:
    def __init__(self, trainer: Trainer) -> None:
        self.t = trainer
        tok = trainer.tokenizer
        self.eos = tok.eos_token_id
        self.digits = [tok.convert_tokens_to_ids(str(d)) for d in range(1, 10)]

    @torch.no_grad()
    def logits(self, prompts: list[list[int]]) -> torch.Tensor:
        """The first answer token's logits after each prompt."""
        self.t.model.eval()
        out = [self.t.model(input_ids=torch.tensor([p])).logits[0, -1].float() for p in prompts]
        self.t.model.train()
        return torch.stack(out)

    def evaluate(self, pos: list[Position]) -> tuple[float, float]:
        """Greedy block rate and legal rate."""
        best = self.logits([p[0] for p in pos]).argmax(-1).tolist()
        block = sum(a == self.digits[p[1]] for a, p in zip(best, pos, strict=True)) / len(pos)
        legal = sum(a in self.digits and self.digits.index(a) in p[2] for a, p in zip(best, pos, strict=True))
        return block, legal / len(pos)

    def sample(self, prompt: list[int], token: int, advantage: float, group: int) -> Sample:
        ids = [*prompt, token, self.eos]
        mask = [0] * len(prompt) + [1, 1]
        n = len(ids)
        return Sample(ids, mask, [0.0] * n, [0.0] * n, 0.0, group, advantages=[advantage * m for m in mask])


def bandit(probe: Probe, batch: list[Position]) -> list[Sample]:
    """GROUP sampled answers per position, reward 0 for the block and -1 otherwise, GRPO advantages."""
    probs = torch.softmax(probe.logits([p[0] for p in batch]), -1)
    drawn = [(i, d) for i in range(len(batch)) for d in torch.multinomial(probs[i], GROUP, True).tolist()]
    rewards = torch.tensor([0.0 if d == probe.digits[batch[i][1]] else -1.0 for i, d in drawn])
    adv = grpo_advantages(rewards.double(), torch.tensor([i for i, _ in drawn])).tolist()
    return [probe.sample(batch[i][0], d, a, i) for (i, d), a in zip(drawn, adv, strict=True)]


def update(t: Trainer, samples: list[Sample]) -> dict[str, float]:
    norm = LossNorm(tokens=sum(s.n_generated for s in samples), seqs=len(samples), norm_len=4)
    return t.train_minibatch(samples, norm, 1)


def train(args: argparse.Namespace) -> None:
    t = Trainer(policy(args.base, "bob" if args.lora else "alice", args.lr, args.steps))
    torch.manual_seed(args.seed)  # the RL answers' sampling
    if args.mode == "sft":
        t.cfg = dataclasses.replace(t.cfg, loss="sft")
    probe = Probe(t)
    held = held_out(t.tokenizer)
    per_step = POSITIONS * (GROUP if args.mode == "sft" else 1)
    stream = positions(t.tokenizer, 777, per_step * args.steps, exclude=keys(held))
    cpu0, norms = time.process_time(), []

    def report(step: int) -> None:
        block, legal = probe.evaluate(held)
        row = {"mode": args.mode, "lr": args.lr, "lora": args.lora, "style": CONFIG["prompt_style"]}
        row |= {"decisions": step * POSITIONS * GROUP}
        row |= {"block": block, "legal": legal, "train_block": probe.evaluate(stream[:64])[0]}
        if norms:
            row |= {
                "grad_norm_mean": round(sum(norms) / len(norms), 3),
                "cpu_s": round(time.process_time() - cpu0),
            }
        print(json.dumps(row), flush=True)

    report(0)
    for step in range(1, args.steps + 1):
        batch = stream[(step - 1) * per_step : step * per_step]
        samples: list[Sample] = []
        if args.mode == "rl":
            samples = bandit(probe, batch)
        else:
            samples = [probe.sample(p[0], probe.digits[p[1]], 0.0, i) for i, p in enumerate(batch)]
        norms.append(update(t, samples)["grad_norm"])
        if step in (4, 8, 16, 32, 64, 128) or step == args.steps:
            report(step)


def fit(args: argparse.Namespace) -> None:
    """SFT for `--epochs` passes over `--fit-n` distinct training positions (disjoint from the held-out ones),
    batches of 64, reshuffled each epoch: does the model fit what it trains on, and does it generalise?"""
    t = Trainer(policy(args.base, "bob" if args.lora else "alice", args.lr, args.epochs * args.fit_n // 64))
    rl_cfg = t.cfg
    t.cfg = dataclasses.replace(t.cfg, loss="sft")
    params = sum(p.numel() for p in t.model.parameters())
    probe = Probe(t)
    held = held_out(t.tokenizer)
    train_set = positions(t.tokenizer, 777, args.fit_n, unique=True, exclude=keys(held))
    held_prompts = held
    held, train_set = rerender(t.tokenizer, held, args.render), rerender(t.tokenizer, train_set, args.render)
    rng = random.Random(args.seed)  # noqa: S311
    cpu0, wall0 = time.process_time(), time.monotonic()
    batch = POSITIONS * GROUP
    for epoch in range(args.epochs + 1):
        if epoch:
            order = rng.sample(train_set, len(train_set))
            for i in range(0, len(order) - batch + 1, batch):
                update(
                    t,
                    [
                        probe.sample(p[0], probe.digits[p[1]], 0.0, j)
                        for j, p in enumerate(order[i : i + batch])
                    ],
                )
        if epoch in (0, 1, 2, 4, 8, 16, 24, 32, 48, 64, 96) or epoch == args.epochs:
            train_block, train_legal = probe.evaluate(train_set)
            block, legal = probe.evaluate(held)
            row = {"mode": "fit", "lr": args.lr, "lora": args.lora, "style": CONFIG["prompt_style"]}
            row |= {"render": args.render}
            row |= {"n": args.fit_n, "epoch": epoch, "train_block": round(train_block, 3)}
            row |= {"train_legal": round(train_legal, 3), "block": round(block, 3), "legal": round(legal, 3)}
            row |= {
                "base": args.base,
                "params_m": round(params / 1e6, 1),
                "cpu_s": round(time.process_time() - cpu0),
            }
            print(json.dumps(row | {"wall_s": round(time.monotonic() - wall0)}), flush=True)
    if not args.rl_steps:
        return
    # Then the `rl` bandit from this SFT warm start, at `--rl-lr`, on positions outside the held-out ones
    # (the training positions and the rest): does exact-credit RL raise the held-out block rate further?
    t.cfg = rl_cfg
    if args.rl_lr:
        t.scheduler.base_lrs = [args.rl_lr for _ in t.scheduler.base_lrs]  # a constant schedule: the rate
        for group in t.optimizer.param_groups:
            group["lr"] = args.rl_lr
    torch.manual_seed(args.seed)
    pool = positions(t.tokenizer, 778, POSITIONS * args.rl_steps, exclude=keys(held_prompts))
    stream = rerender(t.tokenizer, pool, args.render)
    for step in range(1, args.rl_steps + 1):
        update(t, bandit(probe, stream[(step - 1) * POSITIONS : step * POSITIONS]))
        if step in (4, 8, 16, 32, 64, 128) or step == args.rl_steps:
            block, legal = probe.evaluate(held)
            row = {
                "mode": "fit+rl",
                "lr": args.lr,
                "rl_lr": args.rl_lr or args.lr,
                "render": args.render,
                "epochs": args.epochs,
            }
            row |= {"decisions": step * POSITIONS * GROUP, "block": round(block, 3), "legal": round(legal, 3)}
            print(json.dumps(row | {"train_block": round(probe.evaluate(train_set)[0], 3)}), flush=True)


def mlp(args: argparse.Namespace) -> None:
    """The data check: a 2-layer MLP (256 wide) on the board's one-hot cells, the same split as `fit`, SFT on
    the block: can a learner that sees the cells as cells generalise from `--fit-n` positions?"""
    from gpu_runtime.models import load_tokenizer

    tok = load_tokenizer("tiny-qwen2")
    held = held_out(tok)
    train_set = positions(tok, 777, args.fit_n, unique=True, exclude=keys(held))
    for render in ("cells", "marks"):
        code = {"m": 0, "t": 1, ".": 2} if render == "cells" else {"X": 0, "O": 1, ".": 2}

        def xy(pos: list[Position], render: str = render, code: dict[str, int] = code) -> tuple:
            boards = [tok.decode(p[0])[:-1] for p in rerender(tok, pos, render)]  # without the `=`
            x = torch.nn.functional.one_hot(
                torch.tensor([[code[c] for c in b[-9:]] for b in boards]), 3
            ).flatten(1)
            if render == "marks":  # and the mover's mark
                x = torch.cat([x, torch.tensor([[b[0] == "X"] for b in boards])], 1)
            return x.float(), torch.tensor([p[1] for p in pos])

        (xt, yt), (xh, yh) = xy(train_set), xy(held)
        torch.manual_seed(args.seed)
        net = torch.nn.Sequential(
            torch.nn.Linear(xt.shape[1], 256), torch.nn.ReLU(), torch.nn.Linear(256, 256), torch.nn.ReLU()
        )
        net.append(torch.nn.Linear(256, 9))
        opt = torch.optim.AdamW(net.parameters(), args.lr, weight_decay=0.0)
        for epoch in range(1, args.epochs + 1):
            perm = torch.randperm(len(xt))
            for i in range(0, len(xt) - 63, 64):
                j = perm[i : i + 64]
                opt.zero_grad()
                torch.nn.functional.cross_entropy(net(xt[j]), yt[j]).backward()
                opt.step()
            if epoch in (4, 10, 16, 50, 100, 200) or epoch == args.epochs:
                with torch.no_grad():
                    train_block = float((net(xt).argmax(-1) == yt).float().mean())
                    block = float((net(xh).argmax(-1) == yh).float().mean())
                row = {"mode": "mlp", "render": render, "n": args.fit_n, "epoch": epoch}
                print(json.dumps(row | {"train_block": round(train_block, 3), "block": round(block, 3)}))


def one_group(args: argparse.Namespace) -> None:
    for name in ("alice", "bob"):
        js = policy(args.base, name, None, 20)
        t = Trainer(js)
        probe = Probe(t)
        held = held_out(t.tokenizer)
        if name == "alice":
            lg = probe.logits([p[0] for p in held])
            pb = torch.softmax(lg, -1)[
                torch.arange(len(held)), torch.tensor([probe.digits[p[1]] for p in held])
            ]
            silent = float(((1 - pb) ** GROUP + pb**GROUP).mean())
            low, high = float((pb < 0.05).float().mean()), float((pb > 0.95).float().mean())
            print(
                f"held-out p(block): mean {float(pb.mean()):.3f}, < 0.05 on {low:.2f}, > 0.95 on {high:.2f}; "
                f"groups of {GROUP} without variance: {silent:.2f}"
            )
        prompt, block, free = held[0]
        misses = sorted(free - {block})[:3]
        answers = [block] * 3 + [misses[i % len(misses)] for i in range(5)]
        samples = []
        for d in answers:
            s = probe.sample(prompt, probe.digits[d], 0.0, 7)
            s.token_rewards[-1] = 0.0 if d == block else -1.0  # the game's outcome on the last token
            samples.append(s)
        algorithm("grpo").advantages(samples, js.algorithm)  # the platform's estimator

        before = _logp(probe, prompt, [block, *misses])
        out = update(t, samples)
        after = _logp(probe, prompt, [block, *misses])
        masked = [
            t.tokenizer.decode([i]) for i, m in zip(samples[0].token_ids, samples[0].mask, strict=True) if m
        ]
        print(
            f"{name}: advantages {sorted({round(s.advantages[-1], 3) for s in samples})} on {masked}; "
            "grad norm "
            f"before clipping {out['grad_norm']:.3f} (max {js.algorithm.max_grad_norm}), lr {out['lr']}, "
            f"clipped tokens {out['clip']:.0f}; d log p(block) {after[block] - before[block]:+.3f} "
            f"(p {math.exp(before[block]):.4f} -> {math.exp(after[block]):.4f}), misses "
            f"{[round(after[d] - before[d], 3) for d in misses]}"
        )


def _logp(probe: Probe, prompt: list[int], cells: list[int]) -> dict[int, float]:
    lp = torch.log_softmax(probe.logits([prompt])[0], -1)
    return {d: float(lp[probe.digits[d]]) for d in cells}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "base", help="the warm start (file:// URI of the SFT checkpoint), or a preset (random init)"
    )
    ap.add_argument("mode", choices=("rl", "sft", "fit", "onegroup", "mlp"))
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--lora", action="store_true", help="bob's LoRA adapter instead of alice's full weights")
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0, help="sampling seed (rl), shuffling seed (fit)")
    ap.add_argument(
        "--style",
        default="compact",
        choices=DIGIT_STYLES,  # the puzzles' recorded answer is the block's digit
        help="the board's prompt_style",
    )
    ap.add_argument(
        "--render",
        default="chat",
        choices=("chat", "cells", "marks"),
        help="fit: the prompt: the recipe's chat prompt, or a bare board (see rerender)",
    )
    ap.add_argument("--rl-steps", type=int, default=0, help="fit: then this many `rl` bandit steps")
    ap.add_argument("--rl-lr", type=float, help="fit: the rate of those steps (default: --lr)")
    ap.add_argument("--fit-n", type=int, default=1024, help="fit: distinct training positions")
    ap.add_argument("--epochs", type=int, default=8, help="fit: passes over them")
    ap.add_argument(
        "--arch", help="a preset BASE's shape overrides, e.g. hidden_size=512,num_hidden_layers=8"
    )
    args = ap.parse_args()
    if args.arch:
        args.base = derived_preset(args.base, args.arch)
    torch.set_num_threads(1)
    CONFIG["prompt_style"] = args.style  # the warm start must have been trained on the same style
    {"onegroup": one_group, "fit": fit, "mlp": mlp}.get(args.mode, train)(args)


if __name__ == "__main__":
    main()
