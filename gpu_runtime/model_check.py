"""Validation of an uploaded model directory with transformers, run in the environment sandbox.

The web tier never imports transformers or torch, and an uploaded model is not trusted: the registry copies
this file alone, next to the model's files, into a sandbox (opentinker.env.sandbox: no network, read-only
files, limits) and calls `ModelCheck(model_dir).reset(0)`, which returns what it found or raises with the
reason. So this module imports nothing of the project (the sandbox blocks `gpu_runtime`), only the standard
library, torch and transformers. `python -m gpu_runtime.model_check DIR` runs the same checks locally.

Checks: the config loads without remote code and names a causal LM architecture transformers implements; the
tokenizer loads without remote code and fits the vocabulary; the weights (safetensors) hold exactly the
parameters that architecture has, in a dtype the trainer loads.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}


def _safetensors_params(root: Path) -> tuple[dict[str, list[int]], set[str]]:
    shapes: dict[str, list[int]] = {}
    dtypes: set[str] = set()
    for f in sorted(root.rglob("*.safetensors")):
        with f.open("rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(n))
        for name, meta in header.items():
            if name == "__metadata__":
                continue
            if meta["dtype"] not in DTYPES:
                raise ValueError(
                    f"{f.name}: tensor {name} is {meta['dtype']}, not one of {', '.join(DTYPES)}"
                )
            shapes[name] = list(meta["shape"])
            dtypes.add(DTYPES[meta["dtype"]])
    if not shapes:
        raise ValueError("no safetensors weights")
    return shapes, dtypes


def check_adapter_dir(root: Path) -> dict[str, Any]:
    """A PEFT LoRA adapter: its config loads (peft, no remote code) and its weights are LoRA matrices only.
    Whether it fits its base is checked when a job merges it (the base is not in the sandbox)."""
    from peft import LoraConfig

    try:
        config = LoraConfig.from_pretrained(str(root))
    except Exception as e:
        raise ValueError(f"adapter_config.json does not load: {e}") from None
    shapes, dtypes = _safetensors_params(root)
    stray = sorted(n for n in shapes if "lora_" not in n)
    if stray:
        raise ValueError(
            f"the adapter's weights hold {len(stray)} tensors that are not LoRA's, e.g. {stray[0]}"
        )
    parameters = 0
    for shape in shapes.values():
        n = 1
        for d in shape:
            n *= d
        parameters += n
    return {
        "kind": "adapter",
        "peft_type": "LORA",
        "r": int(config.r),
        "lora_alpha": float(config.lora_alpha),
        "target_modules": sorted(config.target_modules or []),
        "parameters": parameters,
        "dtypes": sorted(dtypes),
    }


def check_model_dir(path: str | Path) -> dict[str, Any]:
    """What the model is (model_type, parameters, dtypes, ...), or ValueError saying why it cannot be used."""
    if (Path(path) / "adapter_config.json").is_file() and not (Path(path) / "config.json").is_file():
        return check_adapter_dir(Path(path))
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    root = Path(path)
    try:
        config = AutoConfig.from_pretrained(root, trust_remote_code=False, local_files_only=True)
    except Exception as e:
        raise ValueError(f"config.json does not load: {e}") from None
    if getattr(config, "auto_map", None):
        raise ValueError("config.json needs remote code (auto_map)")
    model_type = getattr(config, "model_type", "")
    if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise ValueError(f"model_type {model_type!r} is not a causal language model transformers supports")
    try:
        tokenizer = AutoTokenizer.from_pretrained(root, trust_remote_code=False, local_files_only=True)
    except Exception as e:
        raise ValueError(f"the tokenizer does not load: {e}") from None
    vocab = int(getattr(config, "vocab_size", 0) or 0)
    if len(tokenizer) > vocab:
        raise ValueError(f"the tokenizer has {len(tokenizer)} tokens but the model's vocab_size is {vocab}")
    shapes, dtypes = _safetensors_params(root)
    # The architecture's own parameters, on the meta device (no memory): names and shapes must match the
    # weights, or the trainer would start from random values for what is missing.
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    expected = {name: list(p.shape) for name, p in model.named_parameters()}
    missing = sorted(set(expected) - set(shapes))
    unexpected = sorted(set(shapes) - set(model.state_dict()))
    if missing:
        raise ValueError(f"the weights lack {len(missing)} of the model's tensors, e.g. {missing[0]}")
    if unexpected:
        raise ValueError(
            f"the weights hold {len(unexpected)} tensors the model has not, e.g. {unexpected[0]}"
        )
    wrong = [n for n, s in expected.items() if shapes[n] != s]
    if wrong:
        raise ValueError(
            f"tensor {wrong[0]} has shape {shapes[wrong[0]]}, the model needs {expected[wrong[0]]}"
        )
    return {
        "model_type": model_type,
        "architectures": list(getattr(config, "architectures", None) or []),
        "parameters": sum(p.numel() for p in model.parameters()),
        "dtypes": sorted(dtypes),
        "vocab_size": vocab,
        "tokenizer": type(tokenizer).__name__,
        "tokenizer_size": len(tokenizer),
        "chat_template": bool(getattr(tokenizer, "chat_template", None)),
    }


class ModelCheck:
    """The sandbox's entrypoint (`model_check:ModelCheck`): `reset` runs the checks and returns the report."""

    system_prompt = ""

    def __init__(self, model_dir: str) -> None:
        self.model_dir = model_dir

    def reset(self, seed: int) -> dict[str, Any]:
        return check_model_dir(self.model_dir)

    def close(self) -> None:
        return None


def main(argv: list[str] | None = None) -> int:
    """`python -m gpu_runtime.model_check DIR`: the sandbox's checks on a local directory (JSON report)."""
    import sys

    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m gpu_runtime.model_check MODEL_DIR", file=sys.stderr)
        return 2
    try:
        report = check_model_dir(args[0])
    except ValueError as e:
        print(f"invalid: {e}", file=sys.stderr)
        return 1
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
