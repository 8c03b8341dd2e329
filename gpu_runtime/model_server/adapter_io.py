"""An adapter on storage: a PEFT adapter directory (`adapter_config.json` + `adapter_model.safetensors`, which
`peft.PeftModel.from_pretrained(base, dir)` loads onto the base), plus, for a training state, the AdamW
moments (`optimizer.safetensors`) and, for an evicted adapter, its pending gradients (`grads.safetensors`).
`meta.json` (our LoRA config, step count, base model and its seed) is written last: the storage helpers
publish a directory whole.

Everything is safetensors or JSON: nothing read back is unpickled.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig as PeftLoraConfig
from safetensors.torch import load_file, save_file
from torch import nn

from gpu_runtime import storage
from gpu_runtime.model_server.lora import (
    ATTN_MODULES,
    MLP_MODULES,
    UNEMBED_MODULES,
    LoraAdapter,
    LoraPair,
    MultiLoraModel,
)
from gpu_runtime.model_server.types import LoraConfig, ModelServerError

WEIGHTS = "adapter_model.safetensors"
OPTIMIZER = "optimizer.safetensors"
GRADS = "grads.safetensors"
META = "meta.json"
_A, _B = ".lora_A.weight", ".lora_B.weight"
_PREFIX = "base_model.model."


def save_adapter(
    adapter: LoraAdapter,
    uri: str,
    *,
    base_model: str,
    base_seed: int,
    optimizer: bool,
    grads: bool = False,
) -> None:
    """Publish the adapter at `uri` (file:// or s3://): the PEFT files always; Adam state and gradients when
    asked. `base_seed`: the seed a preset base was initialized from (the server's --seed), which a merge
    needs to rebuild the same base."""
    staging = Path(tempfile.mkdtemp(prefix="otk-adapter-"))
    try:
        params = adapter.named_parameters()
        write_peft(adapter, staging, base_model=base_model)
        if optimizer:
            save_file(_optimizer_tensors(adapter), str(staging / OPTIMIZER))
        if grads and adapter.has_grad():
            pending = {k: p.grad.detach().cpu() for k, p in params.items() if p.grad is not None}
            save_file(pending, str(staging / GRADS))
        meta = {
            "lora_config": {
                "rank": adapter.config.rank,
                "seed": adapter.config.seed,
                "train_mlp": adapter.config.train_mlp,
                "train_attn": adapter.config.train_attn,
                "train_unembed": adapter.config.train_unembed,
            },
            "lora_alpha": adapter.alpha,
            "steps": adapter.steps,
            "base_model": base_model,
            "base_seed": base_seed,
            "optimizer": optimizer,
        }
        (staging / META).write_text(json.dumps(meta, indent=1))
        storage.publish_dir(staging, uri)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def write_peft(adapter: LoraAdapter, directory: Path, *, base_model: str) -> None:
    """The adapter's PEFT files (`adapter_config.json`, `adapter_model.safetensors`) into `directory`."""
    params = adapter.named_parameters()
    save_file({k: p.detach().cpu().contiguous() for k, p in params.items()}, str(directory / WEIGHTS))
    PeftLoraConfig(
        r=adapter.config.rank,
        lora_alpha=adapter.alpha,
        lora_dropout=0.0,
        bias="none",
        task_type="CAUSAL_LM",
        target_modules=sorted({name.rsplit(".", 1)[-1] for name in adapter.pairs}),
        base_model_name_or_path=base_model,
    ).save_pretrained(str(directory))


def load_adapter(host: MultiLoraModel, uri: str, *, optimizer: bool, grads: bool = False) -> LoraAdapter:
    """The adapter saved at `uri`, on the host's device; its Adam state if `optimizer` (an error if none was
    saved), its pending gradients if `grads`. A plain PEFT directory (no meta.json) loads too."""
    try:
        directory = storage.download_prefix(uri)
    except Exception as exc:  # boto3's and the filesystem's errors differ; the caller needs one kind
        raise ModelServerError(f"cannot read saved state {uri!r}: {exc}") from exc
    try:
        return _load_from(host, directory, uri, optimizer=optimizer, grads=grads)
    finally:
        if not uri.startswith("file://"):  # a download: ours to remove (everything is read into memory)
            shutil.rmtree(directory, ignore_errors=True)


def _load_from(
    host: MultiLoraModel, directory: Path, uri: str, *, optimizer: bool, grads: bool
) -> LoraAdapter:
    if not (directory / WEIGHTS).is_file():
        raise ModelServerError(f"no saved adapter at {uri!r}")
    peft_cfg = json.loads((directory / "adapter_config.json").read_text())
    meta: dict[str, Any] = json.loads((directory / META).read_text()) if (directory / META).is_file() else {}
    config = LoraConfig(**meta["lora_config"]) if "lora_config" in meta else _config_from_peft(peft_cfg)
    tensors = load_file(str(directory / WEIGHTS), device=str(host.device))
    shapes = host.shapes(config)
    pairs: dict[str, LoraPair] = {}
    for name, (fan_in, fan_out) in shapes.items():
        a, b = tensors.get(f"{_PREFIX}{name}{_A}"), tensors.get(f"{_PREFIX}{name}{_B}")
        if a is None or b is None:
            raise ModelServerError(f"saved adapter at {uri!r} lacks {name}: not saved from this base model?")
        if a.shape != (config.rank, fan_in) or b.shape != (fan_out, config.rank):
            raise ModelServerError(f"saved adapter at {uri!r}: {name} has the wrong shape for this base")
        pairs[name] = LoraPair(nn.Parameter(a.float()), nn.Parameter(b.float()))
    adapter = LoraAdapter(config, pairs, alpha=float(peft_cfg.get("lora_alpha", meta.get("lora_alpha", 32))))
    adapter.steps = int(meta.get("steps", 0))
    if optimizer:
        if not (directory / OPTIMIZER).is_file():
            raise ModelServerError(f"saved state at {uri!r} has no optimizer state")
        _load_optimizer(adapter, load_file(str(directory / OPTIMIZER), device=str(host.device)))
    if grads and (directory / GRADS).is_file():
        for key, g in load_file(str(directory / GRADS), device=str(host.device)).items():
            adapter.named_parameters()[key].grad = g
    return adapter


def _config_from_peft(cfg: dict[str, Any]) -> LoraConfig:
    targets = set(cfg.get("target_modules") or ())
    return LoraConfig(
        rank=int(cfg["r"]),
        train_attn=bool(targets & set(ATTN_MODULES)),
        train_mlp=bool(targets & set(MLP_MODULES)),
        train_unembed=bool(targets & set(UNEMBED_MODULES)),
    )


def _optimizer_tensors(adapter: LoraAdapter) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for key, p in adapter.named_parameters().items():
        state = adapter.optimizer.state.get(p, {})
        for field in ("exp_avg", "exp_avg_sq", "step"):
            if field in state:
                out[f"{key}.{field}"] = torch.as_tensor(state[field]).detach().cpu().contiguous()
    return out


def _load_optimizer(adapter: LoraAdapter, tensors: dict[str, torch.Tensor]) -> None:
    for key, p in adapter.named_parameters().items():
        names = (f for f in ("exp_avg", "exp_avg_sq", "step") if f"{key}.{f}" in tensors)
        fields = {f: tensors[f"{key}.{f}"] for f in names}
        if fields:
            # step stays a CPU float tensor, as torch's AdamW keeps it
            fields["step"] = fields["step"].to("cpu", torch.float32)
            adapter.optimizer.state[p] = fields
