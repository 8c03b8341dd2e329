"""Merging a downloaded LoRA adapter into its base, with the runtime's tool in a subprocess
(`python -m gpu_runtime merge-lora`): the SDK itself never imports torch or peft. Used by `jobs download
--merge-lora` and `tinker weights download --merge-lora`."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from opentinker.errors import OpenTinkerError


def merge_lora(adapter_dir: Path, dest: Path, *, base: str | None = None) -> None:
    """`base`: the base model when the adapter's meta.json names none; a Tinker adapter's meta.json names its
    server's base and seed, and a `base` that differs is refused."""
    cmd = [sys.executable, "-m", "gpu_runtime", "merge-lora", str(adapter_dir), "-o", str(dest)]
    cmd += ["--base", base] if base else []
    try:
        done = subprocess.run(cmd, check=False)
    except OSError as exc:
        raise OpenTinkerError(f"could not run the merge: {exc}", code="merge_failed") from None
    if done.returncode != 0:
        raise OpenTinkerError(
            "merging the adapter needs the runtime's packages (torch, transformers, peft) in this Python; "
            "or download without --merge-lora and run `python -m gpu_runtime merge-lora DIR -o OUT` "
            "where they are",
            code="merge_failed",
        )
