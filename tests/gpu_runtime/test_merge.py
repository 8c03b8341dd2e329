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


def test_a_tinker_adapter_merges_onto_the_base_its_server_seeded(tmp_path):
    """A model server started with --seed 3 built its preset base from seed 3: the adapter's meta.json says
    so, and the merge rebuilds that base, not the default seed 0's."""
    from peft import PeftModel

    from gpu_runtime.model_server import AdamParams, Datum, ForwardBackward, ModelServer, OptimStep, SaveState
    from gpu_runtime.model_server import LoraConfig as TinkerLora

    prompt = [257, 10, 20, 30, 40]
    server = ModelServer("tiny-qwen2", seed=SEED)
    server.create_model("m", TinkerLora(rank=2, seed=1))
    datum = Datum(prompt[:-1], {"target_tokens": prompt[1:], "weights": [1.0] * 4})
    server.call("m", 1, ForwardBackward([datum], "cross_entropy"))
    server.call("m", 2, OptimStep(AdamParams(learning_rate=1e-2)))
    server.call("m", 3, SaveState(f"file://{tmp_path}/sw", for_sampler=True))
    meta = json.loads((tmp_path / "sw" / "meta.json").read_text())
    assert (meta["base_model"], meta["base_seed"]) == ("tiny-qwen2", SEED)

    assert merge_checkpoint(tmp_path / "sw", tmp_path / "merged", base="tiny-qwen2") == [tmp_path / "merged"]
    ids = torch.tensor([prompt])
    with torch.no_grad():
        merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()(ids).logits
        on = {
            s: PeftModel.from_pretrained(load_model("tiny-qwen2", seed=s).model, tmp_path / "sw")
            for s in (0, SEED)
        }
        expected, on_seed_0 = (on[s].eval()(ids).logits for s in (SEED, 0))
    torch.testing.assert_close(merged, expected, rtol=1e-4, atol=1e-5)
    assert (merged - on_seed_0).abs().max() > 1e-2  # the seed matters: seed 0's base is another model

    with pytest.raises(MergeError, match=r"sw was trained on 'tiny-qwen2', not on 'qwen2.5-0.5b-shape'"):
        merge_checkpoint(tmp_path / "sw", tmp_path / "other", base="qwen2.5-0.5b-shape")
    assert not (tmp_path / "other").exists() and not (tmp_path / ".other.partial").exists()
