"""The trainer: one rank of the policy (and critic) model, FSDP2-sharded when a process group is up.

The controller drives it with three calls per step, identical on every rank (FSDP runs collectives in each
forward and backward, so every rank must make the same number of them — shards are padded with dummy
micro-batches to guarantee it):

- `logprobs(samples, n_micro)`: old/ref log-probs and critic values before any update (frozen);
- `train_minibatch(samples, norm, n_micro)`: forward/backward over micro-batches, then one optimizer step;
- `full_state_dict()` / checkpoint calls.
"""

from __future__ import annotations

import contextlib
import copy
import math
import random
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from gpu_runtime.algorithms import LossNorm, aggregate, kl_estimate, policy_loss, sft_loss, value_loss
from gpu_runtime.algorithms.losses import KLEstimator, LossAgg
from gpu_runtime.algorithms.registry import Loss, algorithm
from gpu_runtime.algorithms.schedule import lr_factor
from gpu_runtime.batch import MicroBatch, Sample, collate, split_micro, unshift
from gpu_runtime.models import load_model
from gpu_runtime.shared_prefix import (
    PrefixPlan,
    keep_kwargs,
    plan_for_samples,
    suffix_keep,
    suffix_logits,
    to_shifted,
)
from opentinker.spec import JobSpec

VALUE_CLIP = 0.2  # PPO value clipping range (not in the spec yet)


@dataclass(frozen=True)
class TrainerConfig:
    loss: Loss | None
    lr: float
    temperature: float
    clip_low: float
    clip_high: float
    kl_coef: float
    kl_estimator: KLEstimator
    kl_in_loss: bool
    loss_agg: LossAgg
    tis_cap: float | None
    max_grad_norm: float
    lora: dict[str, Any] | None
    critic: bool
    reference: bool  # a KL term: the reference model's log-probs are needed

    @classmethod
    def from_spec(cls, spec: JobSpec) -> TrainerConfig:
        a = spec.algorithm
        algo = algorithm(a.name)
        return cls(
            loss=algo.loss,
            lr=a.learning_rate,
            temperature=a.temperature,
            clip_low=a.clip_ratio_low,
            clip_high=a.clip_ratio_high,
            kl_coef=a.kl_coef,
            kl_estimator=a.kl_estimator,
            kl_in_loss=a.kl_placement == "loss" and a.kl_coef > 0,
            loss_agg=a.loss_agg,
            tis_cap=a.tis_cap,
            max_grad_norm=a.max_grad_norm,
            lora=spec.model.lora.model_dump() if spec.model.lora else None,
            critic=algo.critic,
            reference=algo.reference(a),
        )


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _shard(model: nn.Module, layers: nn.ModuleList | None, *, bf16: bool = False) -> None:
    # FSDP2: each decoder layer is one unit (all-gathered just in time), the root holds embeddings and head.
    # Mixed precision on GPU: fp32 master weights and optimizer, bf16 all-gathered compute, fp32 gradients.
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    kw = {"mp_policy": MixedPrecisionPolicy(torch.bfloat16, reduce_dtype=torch.float32)} if bf16 else {}
    for layer in layers or []:
        fully_shard(layer, **kw)
    fully_shard(model, **kw)


def _decoder_layers(model: nn.Module) -> nn.ModuleList | None:
    for m in model.modules():
        if isinstance(m, nn.ModuleList) and len(m) and "DecoderLayer" in type(m[0]).__name__:
            return m
    return None


def token_logprobs(
    model: nn.Module,
    mb: MicroBatch,
    temperature: float,
    *,
    entropy: bool = False,
    plan: PrefixPlan | None = None,
    keep: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log pi(token_t | tokens_<t) under the SAMPLING temperature (the rollout sampled from softmax(z/T); the
    trainer must score the same distribution, checklist item 4).
    Returns [B, T-1] log-probs (and entropies). With a `plan`, each group's shared prompt runs once
    (`gpu_runtime.shared_prefix`); the result has the same layout. With `keep` ([B, T-1], the loss mask),
    only the positions some row keeps are projected onto the vocabulary, and positions not kept read 0."""
    device = mb.input_ids.device
    if plan is not None:
        cols = _kept_columns(suffix_keep(keep, plan) if keep is not None else None)
        logits = suffix_logits(model, plan, device, cols)
        targets = plan.suffix_ids[:, 1:].to(device)
        width = targets.shape[1]
    else:
        cols = _kept_columns(keep)
        ids, attn = mb.input_ids, mb.attention_mask
        logits = model(input_ids=ids, attention_mask=attn, use_cache=False, **keep_kwargs(model, cols)).logits
        if cols is not None and logits.shape[1] != len(cols):  # the model projected every position
            logits = logits[:, cols.to(device)]
        targets, width = mb.target_ids, mb.target_ids.shape[1]
    if cols is None:
        logits = logits[:, :width]
    else:
        cols = cols.to(device)
        targets = targets[:, cols]
    logp_all = torch.log_softmax(logits.float() / temperature, dim=-1)
    logp = logp_all.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    ent = None
    if entropy:
        with torch.no_grad():
            ent = -(logp_all.exp() * logp_all).sum(-1)
    if cols is not None:  # back to every position (0 where nothing was kept)
        logp = logp.new_zeros((logp.shape[0], width)).index_copy(1, cols, logp)
        ent = ent.new_zeros((ent.shape[0], width)).index_copy(1, cols, ent) if ent is not None else None
    if plan is not None:
        length = mb.input_ids.shape[1]
        logp = to_shifted(logp, plan, length)
        ent = to_shifted(ent, plan, length) if ent is not None else None
    if keep is not None:  # kept columns hold other rows' untrained positions too: 0 there as well
        drop = ~keep.bool().to(device)
        logp = logp.masked_fill(drop, 0.0)
        ent = ent.masked_fill(drop, 0.0) if ent is not None else None
    return logp, ent


def _kept_columns(keep: torch.Tensor | None) -> torch.Tensor | None:
    """Positions (columns) that any row keeps; None for all of them."""
    if keep is None:
        return None
    cols = keep.bool().any(0).nonzero().squeeze(-1)
    return None if len(cols) == keep.shape[1] else cols.cpu()


class ValueModel(nn.Module):
    """PPO critic: the policy's transformer body with a scalar head; V is read where the next token is
    predicted, so values line up with the shifted targets."""

    def __init__(self, causal_lm: nn.Module) -> None:
        super().__init__()
        self.body = copy.deepcopy(causal_lm.model)
        self.head = nn.Linear(causal_lm.config.hidden_size, 1)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        h = self.body(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
        # In the hidden states' dtype: under FSDP mixed precision the head's weights are bf16 too.
        return self.head(h[:, :-1]).float().squeeze(-1)


def _numpy_rng_plain() -> tuple[str, torch.Tensor, int, int, float]:
    # numpy's state with its key array as a tensor: a checkpoint's trainer state is loaded with
    # weights_only=True, which rebuilds no numpy arrays.
    name, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)  # the legacy form: a tuple
    assert isinstance(keys, np.ndarray)
    return str(name), torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)


class Trainer:
    def __init__(self, spec: JobSpec, *, device: str = "cpu") -> None:
        self.spec = spec
        self.cfg = TrainerConfig.from_spec(spec)
        self.device = device
        self.rank, self.world_size = _world()
        # FSDP2 whenever a process group is up: several ranks, or one GPU rank under NCCL (same code path).
        self.sharded = dist.is_available() and dist.is_initialized()
        # Each group's prompt forward (and backward) once instead of once per sample (shared_prefix.py).
        self.share_prefix = True
        # Mixed precision on GPU (dtype "auto"): fp32 weights, bf16 compute (FSDP's policy or autocast).
        self.amp = device.startswith("cuda") and spec.model.dtype == "auto"
        dtype = torch.float32 if spec.model.dtype == "auto" else getattr(torch, spec.model.dtype)
        loaded = load_model(spec.model.base, seed=spec.seed, dtype=dtype)
        self.tokenizer = loaded.tokenizer
        model = loaded.model.to(device)
        self.ref: nn.Module | None = None
        if self.cfg.reference and not self.cfg.lora:
            # Full fine-tuning: a frozen copy of the initial policy. With LoRA the base model with the
            # adapter disabled *is* the reference, so no copy is kept.
            self.ref = copy.deepcopy(model).eval().requires_grad_(False)
        self.critic: ValueModel | None = ValueModel(model).to(device) if self.cfg.critic else None
        if self.cfg.lora:
            from peft import LoraConfig, get_peft_model

            lc = self.cfg.lora
            # The adapter's initial weights from the job's seed, not from whatever the global generator
            # holds: every rank, the in-process and the Ray path, and a rerun start from the same adapter.
            cuda = [torch.device(device).index or 0] if device.startswith("cuda") else []
            with torch.random.fork_rng(devices=cuda):
                torch.manual_seed(spec.seed)
                model = get_peft_model(
                    model,
                    LoraConfig(
                        r=lc["rank"],
                        lora_alpha=lc["alpha"],
                        lora_dropout=lc["dropout"],
                        target_modules=lc["target_modules"],
                        task_type="CAUSAL_LM",
                    ),
                )
        self.model = model
        if self.sharded:
            for m in (self.model, self.ref, self.critic):
                if m is not None:
                    _shard(m, _decoder_layers(m), bf16=self.amp)
        params = [p for p in self.model.parameters() if p.requires_grad]
        # Fused AdamW on GPU: one kernel over all parameters (FSDP2's DTensors too) instead of a launch per
        # tensor and op; the CPU keeps torch's default.
        fused = True if device.startswith("cuda") else None
        self.optimizer = torch.optim.AdamW(
            params, lr=self.cfg.lr, betas=(0.9, 0.999), weight_decay=0.0, fused=fused
        )
        # The spec's schedule over job steps; an RL step takes epochs x minibatches optimizer steps. The
        # scheduler's state is in every checkpoint, so a resumed job continues the same curve.
        a = spec.algorithm
        per_step = a.epochs * a.minibatches if spec.kind.value == "rl" else 1
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer,
            lambda i: lr_factor(
                i // per_step,
                total=a.steps,
                warmup=a.lr_warmup_steps,
                schedule=a.lr_schedule,
                min_ratio=a.lr_min_ratio,
            ),
        )
        self.critic_opt = (
            torch.optim.AdamW(self.critic.parameters(), lr=self.cfg.lr * 10, fused=fused)
            if self.critic is not None
            else None
        )

    # ---- frozen passes -------------------------------------------------------------------------------
    @torch.no_grad()
    def logprobs(self, samples: list[Sample], n_micro: int, *, old: bool, ref: bool, values: bool) -> None:
        """Fill `old_logprobs` / `ref_logprobs` / `values` of `samples` in place (frozen before updating)."""
        self.model.eval()
        for chunk in split_micro(samples, n_micro):
            mb = collate(chunk).to(self.device)
            lengths = [len(s.token_ids) for s in chunk]
            plan = self._plan(chunk)
            if old:
                with self._autocast():
                    lp, _ = token_logprobs(self.model, mb, self.cfg.temperature, plan=plan, keep=mb.loss_mask)
                for s, row in zip(chunk, unshift(lp, lengths), strict=True):
                    s.old_logprobs = row
            if ref:
                lp = self._ref_logprobs(mb, plan)
                for s, row in zip(chunk, unshift(lp, lengths), strict=True):
                    s.ref_logprobs = row
            if values and self.critic is not None:
                with self._autocast():
                    v = self.critic(mb.input_ids, mb.attention_mask)
                for s, row in zip(chunk, unshift(v, lengths), strict=True):
                    s.values = row
        self.model.train()

    def _plan(self, chunk: list[Sample]) -> PrefixPlan | None:
        plan = plan_for_samples(chunk) if self.share_prefix else None
        if self.sharded:
            # A shared-prefix micro-batch runs every layer twice (FSDP all-gathers each time): all ranks must
            # take the same path for it, the shared one only if every rank can.
            flag = torch.tensor([int(plan is not None)], device=self.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MIN)
            plan = plan if flag.item() else None
        return plan

    def _keep_layers_gathered(self, keep: bool) -> None:
        """Under FSDP, a shared-prefix micro-batch's backward goes through each layer twice (suffix, then the
        prefix it attended to): the layers must stay all-gathered from their first forward until the whole
        backward is done, or the second pass finds freed storage. `False` reshards them all again."""
        if not self.sharded:
            return
        for layer in _decoder_layers(self.model) or []:
            layer.set_reshard_after_forward(not keep, recurse=False)
            layer.set_reshard_after_backward(not keep, recurse=False)
            if not keep:
                layer.reshard()

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        # Unsharded GPU ranks: autocast to bf16 (sharded ones get bf16 compute from FSDP's policy).
        if self.amp and not self.sharded:
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _ref_logprobs(self, mb: MicroBatch, plan: PrefixPlan | None) -> torch.Tensor:
        with self._autocast():
            if self.ref is not None:
                return token_logprobs(self.ref, mb, self.cfg.temperature, plan=plan, keep=mb.loss_mask)[0]
            with self.model.disable_adapter():  # LoRA: the base model is the reference
                return token_logprobs(self.model, mb, self.cfg.temperature, plan=plan, keep=mb.loss_mask)[0]

    # ---- updates -------------------------------------------------------------------------------------
    def train_minibatch(self, samples: list[Sample], norm: LossNorm, n_micro: int) -> dict[str, float]:
        """Accumulate gradients over `n_micro` micro-batches, then take one optimizer step.

        Returns sums over this rank's generated tokens (the controller adds ranks up and divides once).
        """
        c = self.cfg
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        sums = dict.fromkeys(("tokens", "loss", "kl", "entropy", "clip", "gap", "ratio", "is_weight"), 0.0)
        # Extremes of the importance ratio over this rank's generated tokens (merged by max / min).
        sums["ratio_max"], sums["ratio_min"] = -math.inf, math.inf
        for chunk in split_micro(samples, n_micro):
            mb = collate(chunk).to(self.device)
            m = mb.loss_mask
            plan = self._plan(chunk)
            self._keep_layers_gathered(plan is not None)
            with self._autocast():
                logp, ent = token_logprobs(self.model, mb, c.temperature, entropy=True, plan=plan, keep=m)
            if c.loss == "sft":
                tok_loss = sft_loss(logp)
                old = logp.detach()
                kl = torch.zeros_like(logp)
                out = None
            else:
                # One epoch, one mini-batch (on-policy): old log-probs ARE the current ones, so the ratio is
                # exactly 1 by construction rather than up to the noise of a second forward pass.
                old = mb.old_logprobs if mb.old_logprobs is not None else logp.detach()
                out = policy_loss(
                    logp,
                    old,
                    mb.advantages,
                    clip_low=c.clip_low,
                    clip_high=c.clip_high,
                    rollout_logp=mb.rollout_logprobs,
                    tis_cap=c.tis_cap,
                )
                tok_loss = out.loss
                kl = torch.zeros_like(logp)
                if mb.ref_logprobs is not None:
                    kl = kl_estimate(logp, mb.ref_logprobs, c.kl_estimator)
                    if c.kl_in_loss:
                        tok_loss = tok_loss + c.kl_coef * kl
            loss = aggregate(tok_loss, m, c.loss_agg, norm)
            loss.backward()
            with torch.no_grad():
                sums["tokens"] += float(m.sum())
                sums["loss"] += float(loss) / norm.world_size
                sums["kl"] += float((kl.detach() * m).sum())
                sums["entropy"] += float((ent * m).sum())
                sums["gap"] += float(((old - mb.rollout_logprobs).abs() * m).sum())
                if out is not None:
                    sums["clip"] += float((out.clipped * m).sum())
                    sums["ratio"] += float((out.ratio * m).sum())
                    sums["is_weight"] += float((out.is_weight * m).sum())
                    if m.any():
                        sel = out.ratio[m > 0]
                        sums["ratio_max"] = max(sums["ratio_max"], float(sel.max()))
                        sums["ratio_min"] = min(sums["ratio_min"], float(sel.min()))
        self._keep_layers_gathered(False)  # every layer sharded again: the step updates the shards
        sums["lr"] = self.optimizer.param_groups[0]["lr"]  # the rate this step uses
        sums["grad_norm"] = self._step(self.model, self.optimizer)  # before clipping
        self.scheduler.step()
        return sums

    def train_critic(self, samples: list[Sample], norm: LossNorm, n_micro: int) -> dict[str, float]:
        assert self.critic is not None and self.critic_opt is not None
        self.critic_opt.zero_grad(set_to_none=True)
        total = 0.0
        for chunk in split_micro(samples, n_micro):
            mb = collate(chunk).to(self.device)
            with self._autocast():
                v = self.critic(mb.input_ids, mb.attention_mask)
            old_v = mb.values if mb.values is not None else v.detach()
            loss = aggregate(value_loss(v, old_v, mb.returns, VALUE_CLIP), mb.loss_mask, "token-mean", norm)
            loss.backward()
            total += float(loss.detach()) / norm.world_size
        gn = self._step(self.critic, self.critic_opt)
        return {"value_loss": total, "value_grad_norm": gn}

    def _step(self, model: nn.Module, opt: torch.optim.Optimizer) -> float:
        params = [p for p in model.parameters() if p.requires_grad]
        gn = torch.nn.utils.clip_grad_norm_(params, self.cfg.max_grad_norm)
        if hasattr(gn, "full_tensor"):  # DTensor under FSDP2
            gn = gn.full_tensor()
        gn = float(gn)
        if math.isfinite(gn):
            opt.step()
        else:  # a non-finite gradient would poison the weights and Adam's moments: skip the step
            opt.zero_grad(set_to_none=True)
        return gn

    # ---- weights and state ---------------------------------------------------------------------------
    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """Full (unsharded) policy weights in Hugging Face names, LoRA merged: what the rollout engine loads.

        Every rank must call it (FSDP all-gathers); only rank 0 gets the tensors."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        lora = self.cfg.lora is not None
        if lora:
            self.model.merge_adapter()
        try:
            if self.sharded:
                sd = get_model_state_dict(
                    self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
                )
            else:
                sd = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        finally:
            if lora:
                self.model.unmerge_adapter()
        if lora:
            sd = {
                k.removeprefix("base_model.model.").replace(".base_layer.", "."): v
                for k, v in sd.items()
                if "lora_" not in k
            }
        return sd

    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        from peft import get_peft_model_state_dict

        return {k: v.detach().clone() for k, v in get_peft_model_state_dict(self.model).items()}

    def train_state(self) -> dict[str, Any]:
        """Optimizer, scheduler and RNG state for exact resume (full, rank-independent tensors)."""
        state: dict[str, Any] = {
            "scheduler": self.scheduler.state_dict(),
            "rng": {
                "torch": torch.get_rng_state(),
                "python": random.getstate(),
                "numpy": _numpy_rng_plain(),
                **({"cuda": torch.cuda.get_rng_state_all()} if self.device.startswith("cuda") else {}),
            },
        }
        if self.sharded:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

            state["optimizer"] = get_optimizer_state_dict(
                self.model, self.optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
            )
        else:
            state["optimizer"] = self.optimizer.state_dict()
        if self.critic is not None and self.critic_opt is not None:
            state["critic"] = {k: v.detach().clone() for k, v in self.critic.state_dict().items()}
            state["critic_optimizer"] = self.critic_opt.state_dict()
        return state

    def load(self, weights: dict[str, torch.Tensor], state: dict[str, Any], *, adapter: bool) -> None:
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        if adapter:
            from peft import set_peft_model_state_dict

            set_peft_model_state_dict(self.model, weights)
        elif self.sharded:
            set_model_state_dict(self.model, weights, options=StateDictOptions(full_state_dict=True))
        else:
            self.model.load_state_dict(weights)
        if self.sharded:
            set_optimizer_state_dict(
                self.model, self.optimizer, state["optimizer"], options=StateDictOptions(full_state_dict=True)
            )
        else:
            self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"]["torch"])
        random.setstate(state["rng"]["python"])
        name, keys, *rest = state["rng"]["numpy"]
        keys = keys.numpy() if isinstance(keys, torch.Tensor) else keys  # an array in older checkpoints
        np.random.set_state((name, keys.astype(np.uint32), *rest))
        if "cuda" in state["rng"] and self.device.startswith("cuda"):
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])
        if self.critic is not None and self.critic_opt is not None and "critic" in state:
            self.critic.load_state_dict(state["critic"])
            self.critic_opt.load_state_dict(state["critic_optimizer"])
