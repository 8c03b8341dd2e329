"""Hugging Face transformers rollout engine: batched `generate` with a KV cache (CPU and GPU).

`generate` samples; the log-prob of each sampled id is recomputed from the raw logits it returns
(`output_logits=True`) as log softmax(logits / T), the same distribution the trainer scores. With top_p < 1
the sampler draws from a truncated distribution, so these log-probs are not exactly the sampler's: the gap
metric shows it and truncated importance sampling (`tis_cap`) corrects for it.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn
from transformers import GenerationConfig

from gpu_runtime.rollout.base import GenerateResult, RolloutEngine, SamplingParams


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

    def load_weights(self, state_dict: dict[str, torch.Tensor]) -> None:
        # strict: a silently ignored key is how LoRA updates fail to reach the sampler in other frameworks
        self.model.load_state_dict(state_dict, strict=True)

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], sampling: SamplingParams) -> GenerateResult:
        out = GenerateResult([], [], [])
        for i in range(0, len(prompts), self.max_batch):
            part = self._generate(prompts[i : i + self.max_batch], sampling)
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
            input_ids=ids.to(self.device), attention_mask=attn.to(self.device), generation_config=gen_cfg
        )
        new = res.sequences[:, width:].cpu()
        logits = torch.stack(res.logits, dim=1).float().cpu()  # [B, new, V], raw (before any warper)
        logp = torch.log_softmax(logits / sp.temperature, -1).gather(-1, new.unsqueeze(-1)).squeeze(-1)
        result = GenerateResult([], [], [])
        stop_set = set(stop)
        for row, lrow in zip(new.tolist(), logp.tolist(), strict=True):
            n = next((j + 1 for j, t in enumerate(row) if t in stop_set), None)
            finished = n is not None
            n = n if finished else sp.max_new_tokens
            n = min(n, len(row))
            result.token_ids.append(row[:n])
            result.logprobs.append(lrow[:n])
            result.finished.append(finished)
        return result
