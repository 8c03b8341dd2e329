"""Write an SFT dataset of arithmetic problems in ArithmeticEnv's exact prompt format (chat JSONL).

A warm start on it teaches the answer format (digits, then end of turn), so RL starts with non-zero reward:

    python -m gpu_runtime.data.arithmetic_sft out.jsonl --n 200 --seed 0 --config '{"max_operand": 9}'

`out` may also be an object-store URI (`file://...` or `s3://...`, endpoint from AWS_ENDPOINT_URL): the demo
writes its warm-start data this way, so the platform process never imports the runtime.

Any ArithmeticEnv config works, `prompt_style` included (`"compact"`: "3+4=" without a system prompt); use the
same config as the RL job's environment so the warm start sees exactly the prompts RL will.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path
from typing import Any

from opentinker.env.builtin.arithmetic import _OPS, ArithmeticEnv


def arithmetic_conversations(n: int, *, seed: int = 0, **config: Any) -> list[list[dict[str, str]]]:
    """`n` conversations [system, user, assistant] with problems drawn from seeds derived from `seed`."""
    env = ArithmeticEnv(**config)
    rng = random.Random(seed)  # noqa: S311 (reproducible data, not secrets)
    out = []
    for _ in range(n):
        s = rng.randrange(2**31)
        prompt = env.reset(s).text
        a, op, b = env.problem(s)
        msgs = [{"role": "system", "content": env.system_prompt}] if env.system_prompt else []
        msgs += [{"role": "user", "content": prompt}, {"role": "assistant", "content": str(_OPS[op](a, b))}]
        out.append(msgs)
    return out


def arithmetic_sft_jsonl(n: int, *, seed: int = 0, **config: Any) -> bytes:
    """The dataset as chat JSONL, one {"messages": [...]} per line."""
    conversations = arithmetic_conversations(n, seed=seed, **config)
    return "".join(json.dumps({"messages": msgs}) + "\n" for msgs in conversations).encode()


def write_arithmetic_sft(path: str | Path, n: int, *, seed: int = 0, **config: Any) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(arithmetic_sft_jsonl(n, seed=seed, **config))
    return path


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m gpu_runtime.data.arithmetic_sft")
    p.add_argument("out", help="a file path, or a file:// or s3:// URI")
    p.add_argument("--n", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--config", default="{}", help="ArithmeticEnv config as JSON")
    args = p.parse_args(argv)
    config = json.loads(args.config)
    if "://" in args.out:
        from gpu_runtime import storage

        storage.write_bytes(args.out, arithmetic_sft_jsonl(args.n, seed=args.seed, **config))
        print(args.out)
    else:
        print(write_arithmetic_sft(args.out, args.n, seed=args.seed, **config))


if __name__ == "__main__":
    main()
