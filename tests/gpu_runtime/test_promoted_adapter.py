"""A LoRA checkpoint promoted into the registry (env_registry/model_promote.py) on a preset base: the
platform pins the base as the preset *and the job's seed* (a preset's weights are a seeded random init), and
a job loading the adapter starts from that base, whatever its own seed, with the adapter merged in."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model, get_peft_model_state_dict

from gpu_runtime import checkpoint
from gpu_runtime.models import ADAPTER_BASE_FILE, load_model

TRAINED_SEED, LOADING_SEED = 3, 11


def promoted_adapter(root: Path, pin: dict) -> torch.nn.Module:
    """The adapter's directory as promotion leaves it (no config.json, trainer state, meta.json); the adapted
    model it came from."""
    loaded = load_model("tiny-qwen2", seed=TRAINED_SEED)
    torch.manual_seed(0)
    peft = get_peft_model(loaded.model, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    state = get_peft_model_state_dict(peft)
    checkpoint.write_model(root, state, True, {}, None, loaded.tokenizer, peft.peft_config["default"])
    (root / checkpoint.STATE).unlink()
    (root / ADAPTER_BASE_FILE).write_text(json.dumps(pin))
    return peft.eval()


def test_the_pinned_seed_rebuilds_the_trained_base(tmp_path):
    peft = promoted_adapter(tmp_path / "a", {"base": "tiny-qwen2", "ref": "tiny-qwen2", "seed": TRAINED_SEED})
    ids = torch.tensor([[5, 17, 99, 3]])
    with torch.no_grad():
        expected = peft(ids).logits
        loaded = load_model(f"file://{tmp_path / 'a'}", seed=LOADING_SEED).model.eval()
        assert torch.allclose(loaded(ids).logits, expected, atol=1e-5)


def test_without_a_pinned_seed_the_loading_jobs_seed_builds_the_base(tmp_path):
    peft = promoted_adapter(tmp_path / "a", {"base": "tiny-qwen2", "ref": "tiny-qwen2"})
    ids = torch.tensor([[5, 17, 99, 3]])
    with torch.no_grad():
        expected = peft(ids).logits
        loaded = load_model(f"file://{tmp_path / 'a'}", seed=LOADING_SEED).model.eval()
        assert not torch.allclose(loaded(ids).logits, expected, atol=1e-3)
