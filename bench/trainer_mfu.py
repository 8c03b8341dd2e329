"""The trainer alone: one GRPO update (forward, backward, AdamW) per step, MFU over a few batch sizes.

    python bench/trainer_mfu.py [--device cpu|cuda] [--preset qwen2.5-0.5b-shape] [--prompt-len 128]
                                [--completion-len 256] [--batches 16,32,64,128] [--modes plain,fsdp]
                                [--steps 3] [--peak-tflops 989]

What `bench/rl_step.py`'s update column holds, without rollout: `Trainer.train_minibatch` on synthetic
sequences (random prompt and completion tokens, every prompt distinct, so no shared-prefix saving inflates
the number), one micro-batch of `B` sequences per step. Modes: `plain` is the in-process trainer
(`LocalGroup`: unsharded, bf16 autocast on GPU); `fsdp` the same after joining a world-size-1 process group
(NCCL on GPU, gloo on CPU): FSDP2 with its bf16 mixed-precision policy, the path of Ray and multi-GPU jobs.
MFU = 6 x parameters x tokens per step / step time / the GPU's dense bf16 peak (H100/H200 SXM: 989 TFLOP/s);
attention's own FLOPs are not counted, as in rl_step.py. Each configuration: one warm-up step, then the
median of `--steps`.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

SEED = 1
MAX_TOKENS = 1 << 20  # per step: a bound well above what one 0.5B micro-batch fits on a 141 GB GPU


def _spec(args: argparse.Namespace):
    from opentinker.spec import JobSpec

    return JobSpec.model_validate(
        {
            "kind": "rl",
            "model": {"base": args.preset},
            "environment": {"ref": "opentinker/arithmetic@1.0.0"},
            "algorithm": {
                "name": "grpo",
                "steps": 1000,
                "batch_size": max(args.batches),
                "group_size": 1,
                "max_new_tokens": args.completion_len,
                "micro_batch_size": max(args.batches),
                "learning_rate": 1e-6,
                "loss_agg": "token-mean",
            },
            "resources": {"gpus": int(args.device == "cuda"), "cpus": args.threads + 1},
            "seed": SEED,
        }
    )


def _samples(batch: int, prompt_len: int, completion_len: int):
    from gpu_runtime.batch import Sample

    g = torch.Generator().manual_seed(SEED)
    n = prompt_len + completion_len
    out = []
    for i in range(batch):
        ids = torch.randint(0, 256, (n,), generator=g).tolist()  # byte tokens
        mask = [0] * prompt_len + [1] * completion_len
        adv = [(1.0 if i % 2 else -1.0) * m for m in mask]  # half the group above, half below its mean
        out.append(Sample(ids, mask, [0.0] * n, [0.0] * n, 0.0, i, advantages=adv))
    return out


def _sweep(args: argparse.Namespace, mode: str) -> tuple[list[list[str]], int]:
    from gpu_runtime.algorithms import LossNorm
    from gpu_runtime.trainer import Trainer

    trainer = Trainer(_spec(args), device=args.device)  # one per mode: a 0.5B random init takes seconds
    assert trainer.sharded == (mode == "fsdp")
    n_params = sum(p.numel() for p in trainer.model.parameters())  # DTensors report their global size
    rows = []
    for batch in args.batches:
        samples = _samples(batch, args.prompt_len, args.completion_len)
        norm = LossNorm(tokens=batch * args.completion_len, seqs=batch, norm_len=args.completion_len)
        if args.device == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        times = []
        for step in range(args.steps + 1):
            if args.device == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            sums = trainer.train_minibatch(samples, norm, 1)  # ends in float(grad_norm): synchronized
            if args.device == "cuda":
                torch.cuda.synchronize()
            if step:  # step 0 is the warm-up
                times.append(time.perf_counter() - t)
        s = statistics.median(times)
        tokens = batch * (args.prompt_len + args.completion_len)
        tflops = 6 * n_params * tokens / s / 1e12
        steps = " ".join(f"{x:.3f}s" for x in times)
        print(f"  {mode} B={batch}: {steps}, grad norm {sums['grad_norm']:.3f}", file=sys.stderr)
        row = [mode, str(batch), f"{tokens:,}", f"{s:.3f}", f"{tokens / s:,.0f}", f"{tflops:.2f}"]
        if args.device == "cuda":
            row += [f"{tflops / args.peak_tflops:.1%}", f"{torch.cuda.max_memory_allocated() / 2**30:.1f}"]
        rows.append(row)
    return rows, n_params


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--preset", default="qwen2.5-0.5b-shape")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--completion-len", type=int, default=256)
    p.add_argument("--batches", default="16,32,64,128", help="sequences per step, comma-separated")
    p.add_argument("--modes", default="plain,fsdp", help="comma-separated: plain, fsdp")
    p.add_argument("--steps", type=int, default=3, help="timed steps after one warm-up")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak (H100/H200 SXM: 989)")
    args = p.parse_args(argv)
    try:
        args.batches = [int(b) for b in args.batches.split(",")]
    except ValueError:
        args.batches = []
    modes = args.modes.split(",")
    if args.device == "cuda" and not torch.cuda.is_available():
        print("--device cuda: no CUDA device here", file=sys.stderr)
        return 2
    if (
        not args.batches
        or min(args.batches) < 1
        or args.steps < 1
        or min(args.prompt_len, args.completion_len) < 1
    ):
        print("--batches: positive integers; --steps, --prompt-len, --completion-len >= 1", file=sys.stderr)
        return 2
    if max(args.batches) * (args.prompt_len + args.completion_len) > MAX_TOKENS:
        print(f"at most {MAX_TOKENS} tokens per step (batch x (prompt + completion))", file=sys.stderr)
        return 2
    if set(modes) - {"plain", "fsdp"} or not modes:
        print("--modes: plain and/or fsdp", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)

    rows, n_params = [], 0
    for mode in ("plain", "fsdp"):  # plain first: a process group, once up, makes every Trainer sharded
        if mode not in modes:
            continue
        if mode == "fsdp":
            import torch.distributed as dist

            from gpu_runtime.controller import free_port

            backend = "nccl" if args.device == "cuda" else "gloo"
            dist.init_process_group(
                backend, init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1
            )
        more, n_params = _sweep(args, mode)
        rows += more
    if "fsdp" in modes:
        torch.distributed.destroy_process_group()

    print(
        f"\ntrainer update: {args.preset} ({n_params / 1e6:.1f}M params), {args.device}; sequences of "
        f"{args.prompt_len} prompt + {args.completion_len} completion tokens, one micro-batch per step; "
        f"median of {args.steps} steps after 1 warm-up"
    )
    cols = ["mode", "B", "tokens/step", "step s", "tokens/s", "TFLOP/s"]
    if args.device == "cuda":
        cols += [f"MFU (of {args.peak_tflops:g})", "peak GiB"]
    widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(cols)]
    print("  ".join(c.ljust(w) for c, w in zip(cols, widths, strict=True)))
    for r in rows:
        print("  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
