"""`python -m gpu_runtime.model_server serve ...`: the model server process (see serve.py)."""

from __future__ import annotations

import argparse
import logging
import sys

from gpu_runtime.model_server import serve


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gpu_runtime.model_server")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("serve", help="serve one base model's Tinker API queue")
    run.add_argument("--base-model", required=True)
    run.add_argument("--queue-url", required=True, help="the platform's Valkey/Redis URL")
    run.add_argument("--ingest-url", required=True, help="http://<platform>/tinker/ingest/outcomes")
    run.add_argument("--device", default="cpu")
    run.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    run.add_argument("--seed", type=int, default=0)
    run.add_argument(
        "--sampler",
        default="decode",
        choices=["decode", "vllm"],
        help="who serves sample / compute_logprobs: our decode loop, or vLLM's multi-LoRA (the vllm extra)",
    )
    run.add_argument(
        "--spill-uri",
        default="",
        help="file:// or s3:// prefix where a stopping server parks its training clients for the next one",
    )
    run.add_argument(
        "--idle-exit-s", type=float, default=0.0, help="stop after this many seconds without work (0: never)"
    )
    run.add_argument(
        "--lease-ttl-s",
        type=float,
        default=serve.LEASE_TTL_S,
        help="the base model's one-server lease: how long a killed server's lease outlives it",
    )
    args = parser.parse_args(argv)
    if args.lease_ttl_s <= 0:
        parser.error(f"--lease-ttl-s must be positive, not {args.lease_ttl_s}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # not a line per posted outcome
    return serve.main(args)


if __name__ == "__main__":
    sys.exit(main())
