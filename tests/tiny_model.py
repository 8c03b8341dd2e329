"""A tiny model directory made with transformers (config, safetensors, the byte tokenizer's files) as bytes:
what tests push into the registry and what the model checker reads. No Django, so the runtime's tests (and
the GPU image's dry run) can use it."""

from __future__ import annotations

import functools
from pathlib import Path


def tiny_model_files(seed: int = 0) -> dict[str, bytes]:
    """config.json, model.safetensors and the tokenizer's files of a 29k-parameter Qwen2 (a fresh dict)."""
    return dict(_tiny_model_files(seed))


@functools.cache
def _tiny_model_files(seed: int) -> dict[str, bytes]:
    import tempfile

    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config

    from gpu_runtime.models import build_byte_tokenizer

    tok = build_byte_tokenizer()
    config = Qwen2Config(
        vocab_size=320,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        return {p.name: p.read_bytes() for p in sorted(Path(tmp).iterdir()) if p.is_file()}
