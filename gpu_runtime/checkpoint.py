"""Checkpoints: Hugging Face layout plus everything needed for an exact resume.

<prefix>/step_000005/
    model.safetensors, config.json, tokenizer files     (full fine-tuning: loadable by from_pretrained)
    adapter_model.safetensors, adapter_config.json      (LoRA: a PEFT adapter, mergeable into the base)
    trainer_state.pt                                    optimizer, scheduler, RNG (and critic) state: plain
                                                        data only, loaded with weights_only=True (no pickles)
    meta.json                                           step, data state; written last = complete
"""

from __future__ import annotations

import json
import pickle
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from gpu_runtime import storage
from opentinker.storage import file_sha256

STATE = "trainer_state.pt"


class CheckpointError(ValueError):
    pass


def step_name(step: int) -> str:
    return f"step_{step:06d}"


@dataclass
class Loaded:
    step: int
    weights: dict[str, torch.Tensor]
    adapter: bool
    state: dict[str, Any]
    meta: dict[str, Any]


def save(
    prefix: str,
    step: int,
    *,
    weights: dict[str, torch.Tensor],
    adapter: bool,
    state: dict[str, Any],
    meta: dict[str, Any],
    config: Any = None,
    tokenizer: Any = None,
    peft_config: Any = None,
    keep_last: int | None = None,
) -> tuple[str, list[dict[str, Any]]]:
    """Write one checkpoint; returns its URI and its file records [{name, size, sha256}]."""
    staging = Path(tempfile.mkdtemp(prefix="otk-ckpt-"))
    write_model(staging, weights, adapter, state, config, tokenizer, peft_config)
    return publish(staging, prefix, step, meta, keep_last)


def write_model(
    directory: Path,
    weights: dict[str, torch.Tensor],
    adapter: bool,
    state: dict[str, Any],
    config: Any = None,
    tokenizer: Any = None,
    peft_config: Any = None,
) -> None:
    """One model's files (HF layout or PEFT adapter, plus its trainer state) into a local directory."""
    directory.mkdir(parents=True, exist_ok=True)
    weights = {k: v.detach().contiguous().cpu() for k, v in weights.items()}
    if adapter:
        save_file(weights, directory / "adapter_model.safetensors", metadata={"format": "pt"})
        if peft_config is not None:
            peft_config.save_pretrained(directory)
    else:
        _save_tied(weights, directory / "model.safetensors")
    if config is not None:
        config.save_pretrained(directory)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
    torch.save(state, directory / STATE)
    # Checked here, not first at a resume: a state that a weights_only load refuses makes an unresumable
    # checkpoint.
    unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(directory / STATE)
    if unsafe:
        raise CheckpointError(
            f"the trainer state holds objects that are not plain data ({', '.join(unsafe)}): a resume "
            "loads it with weights_only=True (tensors, numbers, strings, lists, dicts) and would refuse it"
        )


def publish(
    staging: Path, prefix: str, step: int, meta: dict[str, Any], keep_last: int | None = None
) -> tuple[str, list[dict[str, Any]]]:
    """Write meta.json (last: it marks the checkpoint complete), list the files, upload, prune old steps."""
    (staging / "meta.json").write_text(json.dumps({"step": step, **meta}, indent=1))
    files = [
        {"name": str(p.relative_to(staging)), "size": p.stat().st_size, "sha256": file_sha256(p)}
        for p in sorted(staging.rglob("*"))
        if p.is_file()
    ]
    uri = storage.join(prefix, step_name(step))
    storage.publish_dir(staging, uri)
    if keep_last is not None:
        names = storage.list_dirs(prefix)
        for old in names[:-keep_last]:
            storage.remove_dir(storage.join(prefix, old))
    return uri, files


def _save_tied(weights: dict[str, torch.Tensor], path: Path) -> None:
    # safetensors refuses tensors sharing memory (tied embeddings): a shared tensor is stored as a copy, so
    # every key of the model's state dict is present and a strict load works.
    seen: set[int] = set()
    out = {}
    for k, v in weights.items():
        ptr = v.untyped_storage().data_ptr()
        out[k] = v.clone() if ptr in seen else v
        seen.add(ptr)
    save_file(out, path, metadata={"format": "pt"})


def resolve(uri: str) -> str:
    """A checkpoint directory URI: `uri` itself, or the latest complete checkpoint under a prefix."""
    names = storage.list_dirs(uri)
    if names and all(n.startswith("step_") for n in names):
        return storage.join(uri, names[-1])
    return uri


def load(uri: str) -> Loaded:
    local = storage.download_prefix(resolve(uri))
    meta = json.loads((local / "meta.json").read_text())
    weights, adapter, state = read_model(local)
    return Loaded(step=int(meta["step"]), weights=weights, adapter=adapter, state=state, meta=meta)


def read_model(directory: Path) -> tuple[dict[str, torch.Tensor], bool, dict[str, Any]]:
    """(weights, is_adapter, trainer state) of one model written by `write_model`."""
    adapter = (directory / "adapter_model.safetensors").exists()
    weights = load_file(directory / ("adapter_model.safetensors" if adapter else "model.safetensors"))
    return weights, adapter, read_state(directory / STATE)


# numpy arrays rebuild without running code (torch's documented allow-list for them): checkpoints written
# before the trainer stored numpy's RNG keys as a tensor hold them as an array, and stay resumable.
_NUMPY_ARRAYS = [np._core.multiarray._reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]  # type: ignore[attr-defined]


def read_state(path: Path) -> dict[str, Any]:
    """A trainer state as plain data. Nothing in a checkpoint is unpickled (a tenant can write one): a file
    that needs more than tensors, numbers, strings, lists and dicts is refused, whatever it holds."""
    try:
        with torch.serialization.safe_globals(_NUMPY_ARRAYS):
            state = torch.load(path, weights_only=True)
    except pickle.UnpicklingError as exc:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(exc))
        op = re.search(r"WeightsUnpickler error: \s*(.+?)\s*$", str(exc).split("Check the documentation")[0])
        why = (
            f"holds an object of {found.group(1)}, which only unpickling (running code) could rebuild"
            if found
            else f"is not plain data that a weights-only load reads ({op.group(1) if op else exc})"
        )
        raise CheckpointError(
            f"{path.name} {why}; trainer state is loaded as plain data only (tensors, numpy arrays, numbers, "
            "strings, lists, dicts): start a new job from its weights"
        ) from None
    except (RuntimeError, EOFError, OSError) as exc:  # not a torch file, truncated, unreadable
        raise CheckpointError(
            f"{path.name} is not a readable trainer state: {str(exc) or 'empty or truncated'}"
        ) from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path.name} holds a {type(state).__name__}, not a trainer state (a dict)")
    return state
