"""Chat codecs: how the protocol turns environment messages into token ids.

`HFChatCodec` wraps a Hugging Face tokenizer and its chat template; `ByteCodec` is a dependency-free codec
(bytes + a few special ids) for tests and demos. Both only encode environment messages: generated ids are
appended as sampled and decoded for the environment, never re-encoded.
"""

from __future__ import annotations

from typing import Any

from opentinker.env.protocol import Message

_PLACEHOLDER_USER = "\x00user\x00"
_PLACEHOLDER_ASSISTANT = "\x00assistant\x00"


class HFChatCodec:
    """Encode with `tokenizer.apply_chat_template`.

    A follow-up message is encoded as the difference between a template rendering with a placeholder
    assistant turn and one with the message appended, cut right after the assistant's end-of-turn token; this
    keeps the template's own separators without re-encoding the generated turn.
    """

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        eos = tokenizer.eos_token_id
        self.eos_id: int = eos[0] if isinstance(eos, list) else eos
        self.stop_ids = frozenset([self.eos_id])

    def _ids(self, messages: list[Message], **kw: Any) -> list[int]:
        # return_dict=False: transformers 5 otherwise returns a BatchEncoding (a UserDict, not a dict).
        out = self.tokenizer.apply_chat_template(messages, tokenize=True, return_dict=False, **kw)
        return list(out)

    def encode_prompt(self, messages: list[Message], tools: list[dict[str, Any]] | None = None) -> list[int]:
        return self._ids(messages, tools=tools, add_generation_prompt=True)

    def encode_followup(self, message: Message, *, closed: bool) -> list[int]:
        base = [
            {"role": "user", "content": _PLACEHOLDER_USER},
            {"role": "assistant", "content": _PLACEHOLDER_ASSISTANT},
        ]
        before = self._ids(base)
        after = self._ids([*base, message], add_generation_prompt=True)
        if after[: len(before)] != before:
            raise ValueError("the chat template does not render a conversation as a prefix of its extension")
        # Tokens the template puts after the assistant's end-of-turn token (e.g. "\n") are not generated.
        end = max(i for i, t in enumerate(before) if t == self.eos_id) + 1
        prefix = before[end:]
        return ([] if closed else [self.eos_id]) + prefix + after[len(before) :]

    def decode(self, token_ids: list[int]) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=True)


class ByteCodec:
    """Text as UTF-8 bytes (ids 0-255) plus special ids: BOS 256, END 257 (end of a turn), and one header id
    per role from 258. A message renders as `[header] bytes [END]`."""

    BOS, END = 256, 257
    ROLES = ("system", "user", "assistant", "tool")

    def __init__(self) -> None:
        self.stop_ids = frozenset([self.END])

    def header(self, role: str) -> int:
        return 258 + self.ROLES.index(role)

    def message(self, m: Message) -> list[int]:
        return [self.header(m["role"]), *m["content"].encode(), self.END]

    def encode_prompt(self, messages: list[Message], tools: list[dict[str, Any]] | None = None) -> list[int]:
        ids = [self.BOS]
        if tools:
            import json

            ids += self.message({"role": "system", "content": "tools: " + json.dumps(tools)})
        for m in messages:
            ids += self.message(m)
        return [*ids, self.header("assistant")]

    def encode_followup(self, message: Message, *, closed: bool) -> list[int]:
        return ([] if closed else [self.END]) + self.message(message) + [self.header("assistant")]

    def encode_text(self, text: str) -> list[int]:
        """For scripted policies in tests: the ids a policy would generate for `text`, ended by END."""
        return [*text.encode(), self.END]

    def decode(self, token_ids: list[int]) -> str:
        return bytes(t for t in token_ids if t < 256).decode(errors="replace")
