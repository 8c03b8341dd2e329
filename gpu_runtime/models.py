"""Models and tokenizers: named presets built from a config, or a Hugging Face directory from a URI.

Presets need no download: the tokenizer is a byte-level tokenizer built here from the fixed 256-byte alphabet
(every string round-trips, no training corpus to ship) plus the Qwen2 chat special tokens, wrapped as a
`PreTrainedTokenizerFast` with a ChatML template, so the rest of the runtime treats it like any HF tokenizer.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast, Qwen2Config

from gpu_runtime import storage

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

# ChatML, as Qwen2 uses; `add_generation_prompt` opens the assistant turn.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Qwen2 shapes. tiny-qwen2 is ~3M parameters: fast enough for CPU tests, big enough to learn arithmetic.
PRESET_CONFIGS: dict[str, dict[str, Any]] = {
    "tiny-qwen2": dict(
        hidden_size=256,
        intermediate_size=768,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
    ),
    # Qwen2.5-0.5B (config.json of the released model), randomly initialized.
    "qwen2.5-0.5b-shape": dict(
        hidden_size=896,
        intermediate_size=4864,
        num_hidden_layers=24,
        num_attention_heads=14,
        num_key_value_heads=2,
        max_position_embeddings=32768,
        rope_theta=1000000.0,
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
    ),
}


def build_byte_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level tokenizer: ids 0-255 are the bytes (GPT-2's byte map), then specials."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()  # the 256 printable stand-ins for bytes
    byte_chars = sorted(alphabet, key=lambda c: _BYTE_OF_CHAR[c])
    vocab = {c: i for i, c in enumerate(byte_chars)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIAL_TOKENS)
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",  # noqa: S106 (a token, not a password)
        pad_token="<|endoftext|>",  # noqa: S106
        bos_token=None,
        padding_side="left",
    )
    hf.chat_template = CHAT_TEMPLATE
    return hf


def _bytes_to_unicode() -> dict[int, str]:
    # GPT-2's reversible byte -> printable character map, which the ByteLevel pre-tokenizer uses.
    bs = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs), strict=True))


_BYTE_OF_CHAR = {c: b for b, c in _bytes_to_unicode().items()}


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: PreTrainedTokenizerFast


def preset_config(name: str, tokenizer: PreTrainedTokenizerFast) -> Qwen2Config:
    # Vocab rounded up to a multiple of 64 (tensor-core friendly); extra rows are never sampled in practice.
    vocab = (len(tokenizer) + 63) // 64 * 64
    return Qwen2Config(
        vocab_size=vocab,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
        attention_dropout=0.0,
        **PRESET_CONFIGS[name],
    )


def uri_to_path(uri: str) -> Path:
    """A local directory with the model at `uri`: the path itself for file://, a download of an s3:// one."""
    return storage.download_prefix(uri)


# Written by the platform beside a registry adapter's files (env_registry/model_registry.py): the preset or
# URI of the base model the adapter is merged into when a job loads it.
ADAPTER_BASE_FILE = "opentinker_base.json"


def _adapter_base(path: Path) -> str | None:
    marker = path / ADAPTER_BASE_FILE
    if not (marker.is_file() and (path / "adapter_config.json").is_file()):
        return None
    return str(json.loads(marker.read_text())["base"])


def _adapter_base_seed(path: Path) -> int | None:
    """The seed a preset base was built with, where the platform pinned one (an adapter promoted from a job
    on a preset: its base is that job's seeded random init, not the loading job's)."""
    seed = json.loads((path / ADAPTER_BASE_FILE).read_text()).get("seed")
    return int(seed) if isinstance(seed, int) and not isinstance(seed, bool) else None


def load_tokenizer(base: str) -> PreTrainedTokenizerFast:
    if base in PRESET_CONFIGS:
        return build_byte_tokenizer()
    path = uri_to_path(base)
    adapter_base = _adapter_base(path)
    if adapter_base is not None and not (path / "tokenizer_config.json").is_file():
        return load_tokenizer(adapter_base)  # an adapter without its own tokenizer uses its base's
    return AutoTokenizer.from_pretrained(path)


def load_model(base: str, *, seed: int = 0, dtype: torch.dtype = torch.float32) -> LoadedModel:
    """A preset (random init from `seed`) or a Hugging Face causal LM directory at a file:// or s3:// URI."""
    if base in PRESET_CONFIGS:
        tokenizer = build_byte_tokenizer()
        config = preset_config(base, tokenizer)
        # Seeded init: every process (trainer ranks, rollout workers) builds the same weights.
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    else:
        path = uri_to_path(base)
        adapter_base = _adapter_base(path)
        if adapter_base is not None:
            # A registry LoRA adapter: its base, with the adapter merged in (a plain model from then on).
            from peft import PeftModel

            pinned = _adapter_base_seed(path)
            loaded = load_model(adapter_base, seed=seed if pinned is None else pinned, dtype=dtype)
            model = PeftModel.from_pretrained(loaded.model, str(path)).merge_and_unload()
            tokenizer = load_tokenizer(base)
        else:
            tokenizer = AutoTokenizer.from_pretrained(path)
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return LoadedModel(model=model, tokenizer=tokenizer)


def torch_dtype(name: str, *, device: str) -> torch.dtype:
    if name == "auto":
        # bf16 on GPU; fp32 on CPU, where bf16 matmuls are slow and log-probs would drift.
        return torch.bfloat16 if device == "cuda" else torch.float32
    return getattr(torch, name)
