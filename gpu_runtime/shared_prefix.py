"""Shared-prefix forward passes: a group's prompt is computed once, not once per sample.

GRPO-style batches hold `group_size` samples per prompt, and on small models and short answers the prompt is
most of every sequence (tiny-qwen2 on arithmetic: ~120 prompt tokens, <= 32 generated), so running each
prompt once and letting every sample of its group attend to that one KV cache removes most of the work,
both in rollout prefill and in the trainer's forward and backward (the gradient through the shared keys and
values is the sum over the group, exactly what the per-sample passes compute). Numerically it is the same
computation up to float reassociation; the tests check log-probs and gradients against the plain path.

The shared part of a sample is its leading run of untrained tokens (mask 0: the first prompt) minus its last
token, whose logits predict the first generated token; samples group by those token ids.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from transformers import DynamicCache

from gpu_runtime.batch import Sample

MIN_SHARED = 2  # a shared prefix shorter than this saves nothing


@dataclass
class PrefixPlan:
    """Unique prefixes (left-padded); per sample, which prefix it extends and its suffix (right-padded)."""

    prefix_ids: Tensor  # [U, P] left-padded
    prefix_attn: Tensor  # [U, P]
    prefix_pos: Tensor  # [U, P] position ids (0 on padding)
    inverse: Tensor  # [B] index into the U prefixes
    prefix_len: Tensor  # [B] real prefix length of each sample
    suffix_ids: Tensor  # [B, S] right-padded: token_ids[prefix_len:]
    suffix_attn: Tensor  # [B, S]


def _shareable_len(s: Sample) -> int:
    lead = next((i for i, m in enumerate(s.mask) if m), len(s.mask))
    return max(0, min(lead, len(s.token_ids)) - 1)


def plan_prefixes(token_ids: list[list[int]], shared_len: list[int], pad_id: int = 0) -> PrefixPlan | None:
    """Group sequences by their first `shared_len[i]` tokens; None when no two sequences share one."""
    index: dict[tuple[int, ...], int] = {}
    inverse = []
    for ids, n in zip(token_ids, shared_len, strict=True):
        inverse.append(index.setdefault(tuple(ids[:n]), len(index)))
    uniq = list(index)
    if len(uniq) == len(token_ids) or min(shared_len) < MIN_SHARED:
        return None
    P = max(len(u) for u in uniq)
    U = len(uniq)
    prefix_ids = torch.full((U, P), pad_id, dtype=torch.long)
    prefix_attn = torch.zeros((U, P), dtype=torch.long)
    for i, u in enumerate(uniq):
        prefix_ids[i, P - len(u) :] = torch.tensor(u)
        prefix_attn[i, P - len(u) :] = 1
    prefix_pos = (prefix_attn.cumsum(-1) - 1).clamp(min=0)
    suffixes = [ids[n:] for ids, n in zip(token_ids, shared_len, strict=True)]
    S = max(len(s) for s in suffixes)
    suffix_ids = torch.full((len(suffixes), S), pad_id, dtype=torch.long)
    suffix_attn = torch.zeros((len(suffixes), S), dtype=torch.long)
    for i, s in enumerate(suffixes):
        suffix_ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        suffix_attn[i, : len(s)] = 1
    return PrefixPlan(
        prefix_ids=prefix_ids,
        prefix_attn=prefix_attn,
        prefix_pos=prefix_pos,
        inverse=torch.tensor(inverse),
        prefix_len=torch.tensor(shared_len),
        suffix_ids=suffix_ids,
        suffix_attn=suffix_attn,
    )


def plan_for_samples(samples: list[Sample]) -> PrefixPlan | None:
    return plan_prefixes([s.token_ids for s in samples], [_shareable_len(s) for s in samples])


@functools.cache
def _cache_name(model_cls: Any) -> str:
    return "cache" if "cache" in inspect.signature(model_cls.forward).parameters else "past_key_values"


@functools.cache
def _takes_logits_to_keep(model_cls: Any) -> bool:
    return "logits_to_keep" in inspect.signature(model_cls.forward).parameters


def _base(model: nn.Module) -> nn.Module:
    return model.get_base_model() if hasattr(model, "get_base_model") else model  # PEFT wraps the HF model


def keep_kwargs(model: nn.Module, cols: Tensor | None) -> dict[str, Tensor]:
    """`logits_to_keep=cols` where the model takes it (every causal LM of transformers >= 4.50): the LM head
    then projects only those positions onto the vocabulary. With a 152k vocabulary and a 256-wide model
    that projection (and the log-softmax over it) is most of a forward pass, and most positions are prompt
    tokens that no loss reads. Models without the argument project every position (the caller slices)."""
    if cols is None or not _takes_logits_to_keep(type(_base(model))):
        return {}
    return {"logits_to_keep": cols}


def cache_kwarg(model: nn.Module) -> str:
    """The keyword a model (and `generate`) takes its KV cache by: transformers 5.x renamed `past_key_values`
    to `cache` (the old name warns, then goes in 5.40); older releases only know `past_key_values`."""
    return _cache_name(type(_base(model)))


def prefill(model: nn.Module, plan: PrefixPlan, device: torch.device | str) -> DynamicCache:
    """Run the unique prefixes once and expand their KV cache to one row per sample (differentiable: the
    expansion is an index_select, so gradients of the samples add up on their prefix)."""
    cache = DynamicCache(config=model.config)
    model(
        input_ids=plan.prefix_ids.to(device),
        attention_mask=plan.prefix_attn.to(device),
        position_ids=plan.prefix_pos.to(device),
        use_cache=True,
        **{cache_kwarg(model): cache},
    )
    cache.reorder_cache(plan.inverse.to(device))
    return cache


def suffix_logits(
    model: nn.Module, plan: PrefixPlan, device: torch.device | str, cols: Tensor | None = None
) -> Tensor:
    """Logits of every suffix position, [B, S, V]: position j predicts suffix token j+1. With `cols`, only
    those suffix positions, [B, len(cols), V] (see `keep_kwargs`)."""
    cache = prefill(model, plan, device)
    attn = torch.cat([plan.prefix_attn[plan.inverse], plan.suffix_attn], dim=1).to(device)
    pos = plan.prefix_len.unsqueeze(1) + torch.arange(plan.suffix_ids.shape[1]).unsqueeze(0)
    out = model(
        input_ids=plan.suffix_ids.to(device),
        attention_mask=attn,
        position_ids=pos.to(device),
        use_cache=True,
        **{cache_kwarg(model): cache},
        **keep_kwargs(model, cols),
    )
    if cols is not None and out.logits.shape[1] != len(cols):  # the model projected every position
        return out.logits[:, cols.to(out.logits.device)]
    return out.logits


def suffix_keep(keep: Tensor, plan: PrefixPlan) -> Tensor:
    """The collated shifted layout's mask [B, T-1] (index t-1: token t) -> the suffix layout [B, S-1]
    (index j: suffix token j+1, i.e. token prefix_len + j + 1): the inverse of `to_shifted`."""
    T1 = keep.shape[1]
    S1 = plan.suffix_ids.shape[1] - 1
    src = plan.prefix_len.to(keep.device).unsqueeze(1) + torch.arange(S1, device=keep.device).unsqueeze(0)
    inside = src < T1
    return keep.gather(1, src.clamp(max=max(T1 - 1, 0))).bool() & inside


def to_shifted(values: Tensor, plan: PrefixPlan, length: int) -> Tensor:
    """Suffix-layout per-position values [B, S-1] (index j: suffix token j+1) -> the collated shifted layout
    [B, length - 1] (index t-1: token t). Suffix token j+1 is token prefix_len + j + 1."""
    B, S1 = values.shape
    dst = plan.prefix_len.to(values.device).unsqueeze(1) + torch.arange(S1, device=values.device).unsqueeze(0)
    out = values.new_zeros((B, length - 1 + S1))  # room for the padded tail, sliced off below
    return out.scatter(1, dst, values)[:, : length - 1]
