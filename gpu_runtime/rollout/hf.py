"""Hugging Face transformers rollout engine: batched `generate` with a KV cache (CPU and GPU).

`generate` samples; the log-prob of each sampled id is recomputed from the raw logits it returns
(`output_logits=True`) as log softmax(logits / T), the same distribution the trainer scores. With top_p < 1
the sampler draws from a truncated distribution, so these log-probs are not exactly the sampler's: the gap
metric shows it and truncated importance sampling (`tis_cap`) corrects for it.

Sampling is batch-wise (`generate` has no per-row generators): with per-request `seeds`, a batch samples from
torch's RNG seeded by a hash of its requests' seeds (and forked: the global state is left as it was), else
from the global RNG. A prompt's tokens thus depend on the batch it was sampled in (unlike our decode loop and
vLLM), but rollout workers that seed the global RNG alike (a step's parts) do not draw the same noise.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Literal

import torch
from torch import nn
from transformers import DynamicCache, GenerationConfig

from gpu_runtime.rollout.base import GenerateResult, RolloutEngine, SamplingParams
from gpu_runtime.shared_prefix import cache_kwarg, plan_prefixes, prefill


class HFEngine(RolloutEngine):
    def __init__(
        self,
        model: nn.Module,
        *,
        pad_id: int,
        device: str = "cpu",
        cache: Literal["dynamic", "static"] = "dynamic",
        max_batch: int = 256,
    ) -> None:
        self.model = model.to(device).eval()
        self.pad_id = pad_id
        self.device = device
        self.cache = cache
        self.max_batch = max_batch
        # A group's samples share their prompt: prefill it once and expand the KV cache (shared_prefix.py).
        self.share_prefix = True

    def load_weights(self, state_dict: dict[str, torch.Tensor]) -> None:
        # strict: a silently ignored key is how LoRA updates fail to reach the sampler in other frameworks
        self.model.load_state_dict(state_dict, strict=True)

    @torch.no_grad()
    def generate(
        self, prompts: list[list[int]], sampling: SamplingParams, seeds: Sequence[int] | None = None
    ) -> GenerateResult:
        out = GenerateResult([], [], [])
        for i in range(0, len(prompts), self.max_batch):
            chunk = prompts[i : i + self.max_batch]
            if seeds is None or sampling.greedy:
                part = self._generate(chunk, sampling)
            else:
                key = repr(("hf-batch", list(seeds[i : i + self.max_batch]))).encode()
                seed = int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") >> 1
                cuda = [torch.device(self.device)] if torch.device(self.device).type == "cuda" else []
                with torch.random.fork_rng(devices=cuda):
                    torch.manual_seed(seed)
                    part = self._generate(chunk, sampling)
            out.token_ids += part.token_ids
            out.logprobs += part.logprobs
            out.finished += part.finished
        return out

    def _generate(self, prompts: list[list[int]], sp: SamplingParams) -> GenerateResult:
        # Left padding: every prompt ends at the same column, so new tokens are appended in lockstep.
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        attn = torch.zeros((len(prompts), width), dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, width - len(p) :] = torch.tensor(p)
            attn[i, width - len(p) :] = 1
        prefilled = (
            self._shared_prefill(prompts, width) if self.share_prefix and self.cache == "dynamic" else None
        )
        stop = list(sp.stop_ids)
        gen_cfg = GenerationConfig(
            max_new_tokens=sp.max_new_tokens,
            do_sample=not sp.greedy,
            temperature=sp.temperature if not sp.greedy else None,
            top_p=sp.top_p if not sp.greedy else None,
            top_k=None,
            eos_token_id=stop or None,
            pad_token_id=self.pad_id,
            output_logits=True,
            return_dict_in_generate=True,
            cache_implementation="static" if self.cache == "static" else None,
        )
        res = self.model.generate(
            input_ids=ids.to(self.device),
            attention_mask=attn.to(self.device),
            generation_config=gen_cfg,
            **({cache_kwarg(self.model): prefilled} if prefilled is not None else {}),
        )
        new = res.sequences[:, width:].cpu()
        logits = torch.stack(res.logits, dim=1).float().cpu()  # [B, new, V], raw (before any warper)
        logp = torch.log_softmax(logits / sp.temperature, -1).gather(-1, new.unsqueeze(-1)).squeeze(-1)
        result = GenerateResult([], [], [])
        stop_set = set(stop)
        for row, lrow in zip(new.tolist(), logp.tolist(), strict=True):
            n = next((j + 1 for j, t in enumerate(row) if t in stop_set), None)
            finished = n is not None
            n = min(n if n is not None else sp.max_new_tokens, len(row))
            result.token_ids.append(row[:n])
            result.logprobs.append(lrow[:n])
            result.finished.append(finished)
        return result

    def _shared_prefill(self, prompts: list[list[int]], width: int) -> DynamicCache | None:
        """The KV cache of every prompt but its last token, computed once per distinct prompt and expanded to
        one row per prompt, laid out as `generate` expects for the left-padded batch of width `width`; then
        `generate` only runs the last prompt token and the new ones. None when no prompt repeats."""
        plan = plan_prefixes(prompts, [len(p) - 1 for p in prompts], self.pad_id)
        if plan is None:
            return None
        # Pad every prefix to the batch's full left padding (width - 1 columns), as generate lays it out.
        pad = width - 1 - plan.prefix_ids.shape[1]
        plan.prefix_ids = nn.functional.pad(plan.prefix_ids, (pad, 0), value=self.pad_id)
        plan.prefix_attn = nn.functional.pad(plan.prefix_attn, (pad, 0), value=0)
        # generate derives positions as cumsum(attention) - 1, with 1 on padding: match it exactly.
        plan.prefix_pos = (plan.prefix_attn.cumsum(-1) - 1).masked_fill(plan.prefix_attn == 0, 1)
        return prefill(self.model, plan, self.device)
