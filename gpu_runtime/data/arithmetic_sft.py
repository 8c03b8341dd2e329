"""Write an SFT dataset of arithmetic problems in ArithmeticEnv's exact prompt format (chat JSONL).

A warm start on it teaches the answer format (digits, then end of turn), so RL starts with non-zero reward:

    python -m gpu_runtime.data.arithmetic_sft out.jsonl --n 200 --seed 0 --config '{"max_operand": 9}'

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


def write_arithmetic_sft(path: str | Path, n: int, *, seed: int = 0, **config: Any) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for msgs in arithmetic_conversations(n, seed=seed, **config):
            f.write(json.dumps({"messages": msgs}) + "\n")
    return path


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m gpu_runtime.data.arithmetic_sft")
    p.add_argument("out")
    p.add_argument("--n", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--config", default="{}", help="ArithmeticEnv config as JSON")
    args = p.parse_args(argv)
    print(write_arithmetic_sft(args.out, args.n, seed=args.seed, **json.loads(args.config)))


if __name__ == "__main__":
    main()
