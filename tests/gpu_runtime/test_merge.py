"""`python -m gpu_runtime merge-lora`: a multi-agent checkpoint (a LoRA policy, a fully trained one) becomes
one plain Hugging Face model per policy, with the same logits as the adapted model it came from."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model, get_peft_model_state_dict
from transformers import AutoModelForCausalLM

from gpu_runtime import checkpoint
from gpu_runtime.cli import main
from gpu_runtime.merge import MergeError, merge_checkpoint
from gpu_runtime.models import load_model

SEED = 3
SPEC = {
    "seed": SEED,
    "model": {"base": "tiny-qwen2"},
    "multi_agent": {"policies": {"solver": {"model": {"base": "tiny-qwen2", "lora": {"rank": 2}}}}},
}


@pytest.fixture
def multi_agent_checkpoint(tmp_path: Path):
    """step_000004/{solver (LoRA), proposer (full)}/ and meta.json, as MultiAgentController.save writes it."""
    src = tmp_path / "step_000004"
    loaded = load_model("tiny-qwen2", seed=SEED)
    torch.manual_seed(0)
    peft = get_peft_model(loaded.model, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():  # a trained adapter: B away from its zero init
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    checkpoint.write_model(
        src / "solver",
        get_peft_model_state_dict(peft),
        True,
        {"optimizer": {}},
        loaded.model.config,
        loaded.tokenizer,
        peft.peft_config["default"],
    )
    full = load_model("tiny-qwen2", seed=SEED + 1)
    checkpoint.write_model(
        src / "proposer", full.model.state_dict(), False, {"optimizer": {}}, full.model.config, full.tokenizer
    )
    (src / "meta.json").write_text(json.dumps({"step": 4, "spec": SPEC}))
    return src, peft.eval(), full.model


def test_each_policy_becomes_a_plain_model_with_the_adapted_logits(multi_agent_checkpoint, tmp_path):
    src, peft, _ = multi_agent_checkpoint
    dst = tmp_path / "merged"
    assert merge_checkpoint(src, dst) == [dst / "proposer", dst / "solver"]
    ids = torch.tensor([[5, 17, 99, 3]])
    with torch.no_grad():
        expected = peft(ids).logits
        solver = AutoModelForCausalLM.from_pretrained(dst / "solver").eval()
        assert torch.allclose(solver(ids).logits, expected, atol=1e-5)
        base = load_model("tiny-qwen2", seed=SEED).model.eval()
        with peft.disable_adapter():
            assert not torch.allclose(base(ids).logits, expected, atol=1e-3)  # the adapter mattered
    assert sorted(p.name for p in (dst / "proposer").iterdir()) == sorted(
        p.name for p in (src / "proposer").iterdir() if p.name != "trainer_state.pt"
    )
    assert not (dst / "solver" / "adapter_model.safetensors").exists()
    assert not list(tmp_path.glob(".merged*"))


def test_refusals(multi_agent_checkpoint, tmp_path, capsys):
    src, _, _ = multi_agent_checkpoint
    (tmp_path / "taken").mkdir()
    with pytest.raises(MergeError, match="already exists"):
        merge_checkpoint(src, tmp_path / "taken")
    (src / "meta.json").write_text(json.dumps({"step": 4}))
    with pytest.raises(MergeError, match="names no base model: pass --base"):
        merge_checkpoint(src, tmp_path / "out")
    assert not (tmp_path / "out").exists() and not (tmp_path / ".out.partial").exists()
    # The CLI: a clear message and exit 1; with --base it works.
    assert main(["merge-lora", str(src / "proposer"), "-o", str(tmp_path / "x"), "--base", "nope"]) == 0
    (tmp_path / "empty").mkdir()
    assert main(["merge-lora", str(tmp_path / "empty"), "-o", str(tmp_path / "y")]) == 1
    assert "holds no adapter or model" in capsys.readouterr().err
