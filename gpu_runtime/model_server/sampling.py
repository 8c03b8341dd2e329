"""Sampling and prompt log-probs with one adapter (or the base), on our decode loop.

The decode loop prefills each distinct prompt once and copies its cache into the sampled rows, so rows are
regrouped between prefill and decode; routing therefore selects one adapter for a whole call (every row),
which is what a Tinker sampling client asks for. Not yet: per-row adapters inside one decode batch, top_k,
CUDA graphs (the decode step is traced per adapter routing, so compile is off here).
"""

from __future__ import annotations

import math

import torch
from transformers import PreTrainedTokenizerBase

from gpu_runtime.model_server.logprobs import token_logprobs
from gpu_runtime.model_server.lora import LoraAdapter, MultiLoraModel
from gpu_runtime.model_server.types import ModelServerError, Sample, SampledSequence, SampleResult
from gpu_runtime.rollout.base import SamplingParams as EngineParams
from gpu_runtime.rollout.decode import StaticDecodeEngine


class AdapterSampler:
    def __init__(self, host: MultiLoraModel, tokenizer: PreTrainedTokenizerBase) -> None:
        self.host = host
        self.tokenizer = tokenizer
        self.eos_id: int = tokenizer.eos_token_id
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_id
        self.engine = StaticDecodeEngine(host.model, pad_id=pad, device=host.device, compile=False)

    @torch.no_grad()
    def sample(self, adapter: LoraAdapter | None, req: Sample) -> SampleResult:
        sp = req.sampling_params
        if sp.top_k not in (-1, 0):
            raise ModelServerError("top_k is not supported yet (use -1)")
        if req.num_samples < 1:
            raise ModelServerError("num_samples must be >= 1")
        if sp.temperature < 0:
            raise ModelServerError("temperature must be >= 0")
        stop: list[int | str] = list(sp.stop) if sp.stop is not None else [self.eos_id]
        stop_strings = [s for s in stop if isinstance(s, str)]
        stop_ids = tuple(int(s) for s in stop if not isinstance(s, str))
        greedy = sp.temperature == 0
        params = EngineParams(
            max_new_tokens=sp.max_tokens,
            temperature=1.0 if greedy else sp.temperature,
            top_p=sp.top_p,
            stop_ids=stop_ids,
            greedy=greedy,
        )
        # a seed fixes this call's draws; without one the engine draws a fresh seed from the global RNG
        self.engine.seed = sp.seed
        if sp.seed is not None:
            self.engine.generator.manual_seed(sp.seed)
        prompt = [int(t) for t in req.prompt]
        try:
            with self.host.router.use([(adapter, None)] if adapter else []):
                out = self.engine.generate([prompt] * req.num_samples, params)
        except ValueError as exc:  # the engine's input checks (token range, lengths, top_p)
            raise ModelServerError(str(exc)) from exc
        sequences = []
        for ids, lps, finished in zip(out.token_ids, out.logprobs, out.finished, strict=True):
            cut = self._stop_string_end(ids, stop_strings)
            if cut is not None:
                ids, lps, finished = ids[:cut], lps[:cut], True
            sequences.append(SampledSequence(ids, lps, "stop" if finished else "length"))
        prompt_lps = self.compute_logprobs(adapter, prompt) if req.prompt_logprobs else None
        return SampleResult(sequences, prompt_lps)

    def _stop_string_end(self, ids: list[int], stops: list[str]) -> int | None:
        """How many tokens reach the end of the first stop string in the decoded text (None: none occurs)."""
        if not stops or not any(s in self.tokenizer.decode(ids) for s in stops):
            return None
        for k in range(1, len(ids) + 1):
            text = self.tokenizer.decode(ids[:k])
            if any(s in text for s in stops):
                return k
        return None

    @torch.no_grad()
    def compute_logprobs(self, adapter: LoraAdapter | None, prompt: list[int]) -> list[float]:
        """log p(prompt[t] | prompt[:t]) for each token; the first has no context: NaN."""
        if not prompt:
            raise ModelServerError("prompt is empty")
        vocab = self.host.model.config.vocab_size
        if any(t < 0 or t >= vocab for t in prompt):
            raise ModelServerError(f"prompt token ids must be in [0, {vocab})")
        if len(prompt) == 1:
            return [math.nan]
        target = torch.as_tensor(prompt[1:], dtype=torch.long)
        lp = token_logprobs(self.host, [prompt[:-1]], [target], [adapter])[0]
        return [math.nan, *lp.tolist()]
