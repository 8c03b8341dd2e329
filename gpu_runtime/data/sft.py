"""SFT data: chat JSONL (`{"messages": [{"role", "content"}, ...]}` per line) to training samples.

Each conversation is rendered with the tokenizer's chat template; the loss mask is 1 exactly on the tokens the
policy would generate for each assistant turn — its content and its end-of-turn token — and 0 on system, user
and tool turns and on template separators (checklist item 6). That is the same token span a rollout samples,
so an SFT warm start teaches precisely what RL later scores.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from typing import Any

from gpu_runtime import storage
from gpu_runtime.batch import Sample

Message = dict[str, str]


def load_chat_jsonl(uri: str) -> list[list[Message]]:
    """Conversations from a `file://` or `s3://` JSONL object; a malformed line is an error naming it."""
    text = storage.read_bytes(uri).decode("utf-8")
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            msgs = json.loads(line)["messages"]
            if not isinstance(msgs, list) or not all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in msgs
            ):
                raise TypeError("messages must be a list of {role, content} strings")
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{uri} line {n}: not a chat record ({e})") from None
        out.append([{"role": m["role"], "content": m["content"]} for m in msgs])
    if not out:
        raise ValueError(f"{uri}: no conversations")
    return out


def _render(tokenizer: Any, messages: list[Message], *, generation_prompt: bool) -> list[int]:
    ids = tokenizer.apply_chat_template(
        messages, tokenize=True, return_dict=False, add_generation_prompt=generation_prompt
    )
    return list(ids)


def encode_chat(
    tokenizer: Any, messages: list[Message], max_len: int | None = None
) -> tuple[list[int], list[int]]:
    """(token ids, loss mask) of one conversation; mask 1 on assistant content + its end-of-turn token."""
    eos = tokenizer.eos_token_id
    ids = _render(tokenizer, messages, generation_prompt=False)
    mask = [0] * len(ids)
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        start = len(_render(tokenizer, messages[:i], generation_prompt=True))
        end = len(_render(tokenizer, messages[: i + 1], generation_prompt=False))
        if ids[:end] != _render(tokenizer, messages[: i + 1], generation_prompt=False):
            raise ValueError("the chat template does not render a conversation as a prefix of its extension")
        # Tokens after the end-of-turn token (e.g. ChatML's "\n") are template, never generated.
        seg = ids[start:end]
        stop = next((j + 1 for j, t in enumerate(seg) if t == eos), len(seg))
        for t in range(start, start + stop):
            mask[t] = 1
    if max_len is not None and len(ids) > max_len:
        ids, mask = ids[:max_len], mask[:max_len]
    return ids, mask


@dataclass
class SFTDataset:
    """Tokenized conversations; `batch(step)` is a pure function of (seed, step), so resume is exact."""

    ids: list[list[int]]
    masks: list[list[int]]
    seed: int
    _epoch_order: tuple[int, list[int]] | None = field(default=None, init=False, repr=False, compare=False)

    @classmethod
    def from_uri(cls, uri: str, tokenizer: Any, *, seed: int, max_len: int | None = None) -> SFTDataset:
        ids, masks = [], []
        for conv in load_chat_jsonl(uri):
            i, m = encode_chat(tokenizer, conv, max_len)
            if sum(m[1:]):  # a conversation with nothing to learn would only dilute the token-mean
                ids.append(i)
                masks.append(m)
        if not ids:
            raise ValueError(f"{uri}: no conversation has an assistant turn to train on")
        return cls(ids, masks, seed)

    def __len__(self) -> int:
        return len(self.ids)

    def _order(self, epoch: int) -> list[int]:
        # One shuffle per epoch, kept: shuffling anew for every example cost ~0.1 s a step at 2,000 rows.
        if self._epoch_order is None or self._epoch_order[0] != epoch:
            order = list(range(len(self)))
            random.Random(f"{self.seed}/{epoch}").shuffle(order)  # noqa: S311 (shuffling)
            self._epoch_order = (epoch, order)
        return self._epoch_order[1]

    def batch(self, step: int, batch_size: int) -> list[Sample]:
        """Examples (step-1)*B .. step*B-1 of the stream of per-epoch shuffles (steps count from 1)."""
        out = []
        for p in range((step - 1) * batch_size, step * batch_size):
            epoch, k = divmod(p, len(self))
            i = self._order(epoch)[k]
            n = len(self.ids[i])
            out.append(
                Sample(
                    token_ids=list(self.ids[i]),
                    mask=list(self.masks[i]),
                    rollout_logprobs=[0.0] * n,
                    token_rewards=[0.0] * n,
                    reward=0.0,
                    group_id=i,
                )
            )
        return out
