"""Datasets for SFT jobs: chat JSONL from object storage, tokenized with assistant-only loss masks."""

from gpu_runtime.data.sft import SFTDataset, encode_chat, load_chat_jsonl

__all__ = ["SFTDataset", "encode_chat", "load_chat_jsonl"]
