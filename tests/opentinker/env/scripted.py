"""A scripted "policy" for protocol tests: it answers with fixed texts, encoded by the test codec."""

from __future__ import annotations

from opentinker.env.codec import ByteCodec
from opentinker.env.protocol import Generation


class Scripted:
    """generate(prompt_ids, max_new) -> the next scripted answer (cut at max_new, like a real sampler).

    Records every prompt it was given, so tests can check that each prompt extends the previous one.
    """

    def __init__(
        self, texts: list[str], codec: ByteCodec | None = None, logprob: float | None = None
    ) -> None:
        self.texts = list(texts)
        self.codec = codec or ByteCodec()
        self.prompts: list[list[int]] = []
        self.logprob = logprob

    def __call__(self, prompt_ids: list[int], max_new_tokens: int) -> Generation:
        self.prompts.append(list(prompt_ids))
        ids = self.codec.encode_text(self.texts.pop(0))
        finished = len(ids) <= max_new_tokens
        ids = ids[:max_new_tokens]
        lps = None if self.logprob is None else [self.logprob] * len(ids)
        return Generation(ids, lps, finished)
