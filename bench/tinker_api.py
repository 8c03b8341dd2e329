"""The Tinker model server's engine in-process: forward_backward + optim_step throughput, and sample
throughput, for 1, 4 and 8 tenants' LoRA adapters on one base, batched across adapters (one pass per round
over every tenant's rows, each row routed to its adapter) vs one adapter at a time (what peers without
multi-LoRA batching do).

    python bench/tinker_api.py [--device cpu|cuda] [--preset tiny-qwen2] [--tenants 1,4,8] [--datums 4]
                               [--tokens 64] [--rank 16] [--rounds 5] [--threads N] [--only train|sample]
                               [--samples 4] [--prompt 16] [--new 32] [--sampler decode|vllm]

forward_backward: a round is each tenant's forward_backward (`--datums` sequences of `--tokens` random
tokens, cross_entropy) and optim_step; tokens/s counts every tenant's tokens. sample: a round is each
tenant's `sample` call (`--samples` sequences of `--new` tokens, no stop, temperature 1, seeded, from a
`--prompt`-token prompt of its own): one batched decode loop for all tenants vs one call at a time; tokens/s
counts sampled tokens; `--sampler vllm` adds a column: the same calls served by the model server's vLLM
sampler (OPENTINKER_TINKER_SAMPLER=vllm: one generate call, each request with its tenant's LoRA). The median
of `--rounds` after one warm-up round. The API's own overhead per call
(protobuf, queue, long-poll): bench/tinker_api_overhead.py.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from gpu_runtime.model_server import (
    AdamParams,
    Datum,
    ForwardBackward,
    LoraConfig,
    ModelServer,
    OptimStep,
    Sample,
    SamplingParams,
)
from gpu_runtime.models import torch_dtype


def _round(server: ModelServer, tenants: list[str], seq: int, data: list[Datum], batched: bool) -> float:
    sync = torch.cuda.synchronize if server.host.device.type == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    op = ForwardBackward(data, "cross_entropy")
    if batched:  # every tenant's call queued first: the engine runs them as one pass
        for t in tenants:
            server.submit(t, seq, op)
        server.run_until_idle()
    else:
        for t in tenants:
            server.call(t, seq, op)
    for t in tenants:
        server.submit(t, seq + 1, OptimStep(AdamParams(learning_rate=1e-4)))
    server.run_until_idle()
    sync()
    return time.perf_counter() - start


def _sample_round(server: ModelServer, calls: dict[str, Sample], seq: int, batched: bool) -> float:
    sync = torch.cuda.synchronize if server.host.device.type == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    if batched:  # every tenant's call queued first: the engine decodes them in one loop
        for t, op in calls.items():
            server.submit(t, seq, op)
        server.run_until_idle()
    else:
        for t, op in calls.items():
            server.call(t, seq, op)
    sync()
    return time.perf_counter() - start


def _servers(
    args: argparse.Namespace, n: int, sampler: str = "decode", unembed: bool = True
) -> tuple[ModelServer, list[str]]:
    dtype = torch_dtype("auto", device=args.device)
    server = ModelServer(args.preset, device=args.device, dtype=dtype, sampler=sampler)
    tenants = [f"t{i}" for i in range(n)]
    for i, t in enumerate(tenants):
        server.create_model(t, LoraConfig(rank=args.rank, seed=i, train_unembed=unembed))
    return server, tenants


def _row(n: int, rates: dict[bool, float]) -> str:
    return f"| {n} | {rates[False]:,.0f} | {rates[True]:,.0f} | {rates[True] / rates[False]:.2f}x |"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--preset", default="tiny-qwen2")
    p.add_argument("--tenants", default="1,4,8")
    p.add_argument("--datums", type=int, default=4)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--only", choices=["train", "sample"], help="one table only")
    p.add_argument("--samples", type=int, default=4, help="sample: sequences per call")
    p.add_argument("--prompt", type=int, default=16, help="sample: prompt tokens")
    p.add_argument("--new", type=int, default=32, help="sample: tokens sampled per sequence")
    p.add_argument(
        "--sampler",
        choices=["decode", "vllm"],
        default="decode",
        help="sample: vllm adds a column, the model server's vLLM multi-LoRA sampler (the vllm extra)",
    )
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 256, (args.datums, args.tokens + 1), generator=gen).tolist()
    data = [Datum(x[:-1], {"target_tokens": x[1:], "weights": [1.0] * args.tokens}) for x in ids]
    print(f"{args.preset} on {args.device}, rank {args.rank}, {torch.get_num_threads()} CPU threads")
    tenant_counts = [int(x) for x in args.tenants.split(",")]
    if args.only != "sample":
        print(f"\nforward_backward + optim_step, {args.datums} x {args.tokens} tokens per tenant and round")
        print("| tenants | one adapter at a time (tokens/s) | batched across adapters | speed-up |")
        print("|---:|---:|---:|---:|")
        for n in tenant_counts:
            rates = {}
            for batched in (False, True):
                server, tenants = _servers(args, n)
                rounds = range(args.rounds + 1)
                times = [_round(server, tenants, 2 * r + 1, data, batched) for r in rounds][1:]
                rates[batched] = n * args.datums * args.tokens / statistics.median(times)
            print(_row(n, rates))
    if args.only != "train":
        vllm = args.sampler == "vllm"
        shape = f"{args.samples} x {args.new} tokens from a {args.prompt}-token prompt"
        # vLLM takes no LoRA on a tied lm_head (tiny-qwen2's): with the vllm column, no adapter has one
        note = ", adapters without lm_head (vLLM serves them all)" if vllm else ""
        print(f"\nsample, {shape} per tenant and round{note}")
        head = "| tenants | one adapter at a time (sampled tokens/s) | batched across adapters | speed-up |"
        print(head + (" vLLM multi-LoRA, one generate call | vLLM vs batched |" if vllm else ""))
        print("|---:|---:|---:|---:|" + ("---:|---:|" if vllm else ""))
        for n in tenant_counts:
            prompts = torch.randint(0, 256, (n, args.prompt), generator=gen).tolist()
            params = SamplingParams(max_tokens=args.new, seed=1, stop=[])
            sample_rates: dict[tuple[str, bool], float] = {}
            runs = [("decode", False), ("decode", True)] + ([("vllm", True)] if vllm else [])
            for sampler, batched in runs:
                server, tenants = _servers(args, n, sampler, unembed=not vllm)
                calls = {t: Sample(prompts[i], args.samples, params) for i, t in enumerate(tenants)}
                times = [_sample_round(server, calls, r + 1, batched) for r in range(args.rounds + 1)][1:]
                sample_rates[(sampler, batched)] = n * args.samples * args.new / statistics.median(times)
                server.close()  # a vLLM engine is parked for the next server (no second start-up)
            row = _row(n, {False: sample_rates[("decode", False)], True: sample_rates[("decode", True)]})
            if vllm:
                v, b = sample_rates[("vllm", True)], sample_rates[("decode", True)]
                row += f" {v:,.0f} | {v / b:.2f}x |"
            print(row)


if __name__ == "__main__":
    main()
