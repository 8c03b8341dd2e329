"""`python -m gpu_runtime merge-lora SRC -o DST`: a LoRA checkpoint merged into a full Hugging Face model.

SRC is a downloaded checkpoint step directory (`opentinker jobs download ID`): the PEFT adapter
(adapter_config.json, adapter_model.safetensors), the base's config and tokenizer, and meta.json whose spec
names the base model and the seed a preset base is initialized from. Or a Tinker adapter (`opentinker tinker
weights download`), whose meta.json names the model server's base and seed (`base_model`, `base_seed`).
DST gets config.json, model.safetensors and the tokenizer: loadable by `AutoModelForCausalLM.from_pretrained`
with no PEFT.

Multi-agent checkpoints hold one subdirectory per trained policy; each becomes DST/<policy>. A policy trained
without LoRA is copied as it is (its trainer state left out). This lives in the runtime, not the SDK: the
merge needs torch and peft, which the SDK must not depend on (pyproject's import-linter contracts).

DST appears complete or not at all: it is written to a `.partial` directory beside it, then renamed.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

ADAPTER = "adapter_model.safetensors"
FULL = "model.safetensors"
SKIP = {"trainer_state.pt", "meta.json", ADAPTER, "adapter_config.json"}


class MergeError(Exception):
    pass


def merge_checkpoint(src: Path, dst: Path, *, base: str | None = None) -> list[Path]:
    """Merge SRC into DST (which must not exist); returns the model directories written."""
    if dst.exists():
        raise MergeError(f"{dst} already exists")
    meta_path = src / "meta.json"
    meta: dict[str, Any] = json.loads(meta_path.read_text()) if meta_path.exists() else {}
    spec: dict[str, Any] = meta.get("spec", {})
    seed = int(spec.get("seed", 0))
    if "base_model" in meta:  # a Tinker adapter: its server's base, initialized from the server's seed
        if base is not None and base != meta["base_model"]:
            raise MergeError(f"{src} was trained on {meta['base_model']!r}, not on {base!r}")
        base = str(meta["base_model"])
        # Saved before the seed was recorded: the model server's default --seed, 0.
        seed = int(meta.get("base_seed", 0))
    partial = dst.parent / f".{dst.name}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    try:
        if _is_model(src):
            _merge_one(src, partial, base or _base_of(spec, None), seed)
            written = [dst]
        else:
            policies = sorted(p for p in src.iterdir() if p.is_dir() and _is_model(p))
            if not policies:
                raise MergeError(f"{src} holds no adapter or model (expected {ADAPTER} or {FULL})")
            for p in policies:
                _merge_one(p, partial / p.name, base or _base_of(spec, p.name), seed)
            written = [dst / p.name for p in policies]
        os.replace(partial, dst)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return written


def _is_model(d: Path) -> bool:
    return (d / ADAPTER).exists() or (d / FULL).exists()


def _base_of(spec: dict[str, Any], policy: str | None) -> str:
    model = spec.get("model") or {}
    if policy is not None:
        p = ((spec.get("multi_agent") or {}).get("policies") or {}).get(policy) or {}
        model = p.get("model") or model
    if not model.get("base"):
        raise MergeError("the checkpoint's meta.json names no base model: pass --base")
    return str(model["base"])


def _untie_if_adapted(model: Any, src: Path) -> None:
    """A base whose output layer shares the input embeddings' weight (tie_word_embeddings), under an adapter
    of its output layer (Tinker's train_unembed): merging into the shared weight would change the embeddings
    too. The output layer gets its own copy first, and the merged model's config says it is not tied."""
    config = json.loads((src / "adapter_config.json").read_text())
    targets = config.get("target_modules") or []
    if "lm_head" not in targets or not getattr(model.config, "tie_word_embeddings", False):
        return
    import torch

    head = model.get_output_embeddings()
    head.weight = torch.nn.Parameter(model.get_input_embeddings().weight.detach().clone())
    model.config.tie_word_embeddings = False


def _merge_one(src: Path, out: Path, base: str, seed: int) -> None:
    out.mkdir(parents=True)
    if not (src / ADAPTER).exists():  # full fine-tuning: already a Hugging Face model
        for f in src.iterdir():
            if f.is_file() and f.name not in SKIP:
                shutil.copy2(f, out / f.name)
        return
    try:
        from peft import PeftModel
    except ImportError:
        raise MergeError("merging a LoRA adapter needs peft: pip install peft") from None
    from transformers import AutoTokenizer

    from gpu_runtime.models import load_model

    # The base exactly as the job built it: a preset is a seeded random init, a URI a Hugging Face directory.
    loaded = load_model(base, seed=seed)
    _untie_if_adapted(loaded.model, src)
    merged = PeftModel.from_pretrained(loaded.model, src).merge_and_unload()
    merged.save_pretrained(out, safe_serialization=True)
    has_tokenizer = (src / "tokenizer.json").exists() or (src / "tokenizer_config.json").exists()
    tokenizer = AutoTokenizer.from_pretrained(src) if has_tokenizer else loaded.tokenizer
    tokenizer.save_pretrained(out)
