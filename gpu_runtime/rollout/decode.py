"""Our own decode loop for rollout: a preallocated (static) KV cache, one fixed-shape step per token, and
sampling that only ever sees the last position's logits.

Why not `generate` (`HFEngine`): it returns [B, new, V] logits, which HFEngine stacks and copies to the host
as fp32 (V = 151,936 for Qwen2.5), and even with a static cache and a compiled forward its Python loop (logits
processors, stopping criteria, cache bookkeeping) is what limits throughput on a GPU (issue 4). Here:

- prompts are left-padded to one width W, so at step t every row writes cache column W + t (the static
  cache's single write position); position ids count each row's real tokens, the 2D mask hides the padding;
- each distinct prompt is prefilled once (a GRPO group's samples share it: `shared_prefix.plan_prefixes`)
  and its keys and values are copied into its rows of the static cache;
- a step computes only the last position's logits [B, V] and only they go to fp32. The sampled id is
  argmax(z/T - log E) with E ~ Exp(1) (the exponential race: an exact draw from softmax(z/T), no normalising
  or cumulative sums); its log-prob is z/T - logsumexp(z/T). Top-p sorts only when top_p < 1. The noise is
  per request: each row draws its E from a generator seeded with that prompt's own seed, so a prompt's tokens
  do not depend on the other rows of the batch (how a step's episodes are split across rollout workers or
  batched by turn), up to float differences in the forward itself;
- finished rows keep running (fixed shapes) but emit pad and are not returned; whether all rows are finished
  is read on the host only every `sync_every` steps, so the loop does not wait for the GPU in between;
- on CUDA the one-token step (forward and sampling) is compiled with mode="reduce-overhead" (CUDA graphs) for
  a batch padded to a power of two and a cache length rounded up, with every buffer kept across calls, so one
  graph serves every call of a job.

Returns what HFEngine returns: ids through the first stop id (inclusive), their log-probs under
softmax(logits / T) (before top-p truncation, as HFEngine reports them), and whether a stop id ended the row.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import AttentionInterface, DynamicCache, StaticCache
from transformers.cache_utils import StaticLayer
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from gpu_runtime.rollout.base import GenerateResult, RolloutEngine, SamplingParams
from gpu_runtime.shared_prefix import cache_kwarg, plan_prefixes

COMPILE_ENV = "OPENTINKER_DECODE_COMPILE"  # "0": no torch.compile on CUDA (eager steps)
GQA_ATTENTION = "opentinker_gqa_decode"
CACHE_ROUND = 64  # CUDA: cache length rounded up to this, so prompt widths that differ a little share a graph
MAX_NEW_TOKENS = 32768


def _gqa_decode_attention(
    module: nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    **kwargs,
) -> tuple[Tensor, None]:
    """SDPA where a one-token query runs on the key/value heads (queries [B, Hkv, n_rep, D]) instead of
    repeating the cache n_rep times. transformers does this only when not compiling; compiled it materialises
    `repeat_kv`, which at Qwen2.5-0.5B's 14 query / 2 KV heads writes and reads 7 copies of the whole KV cache
    per layer and step."""
    n_rep = getattr(module, "num_key_value_groups", 1)
    if query.shape[2] != 1 or n_rep == 1 or kwargs.get("dropout", 0.0):
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    b, h, _, d = query.shape
    q = query.reshape(b, h // n_rep, n_rep, d)
    if attention_mask is not None and attention_mask.shape[1] != 1:  # per-head mask [B, H, 1, L]
        attention_mask = attention_mask.reshape(b, h // n_rep, n_rep, attention_mask.shape[-1])
    out = F.scaled_dot_product_attention(q, key, value, attn_mask=attention_mask, scale=kwargs.get("scaling"))
    return out.reshape(b, h, 1, d).transpose(1, 2).contiguous(), None


AttentionInterface.register(GQA_ATTENTION, _gqa_decode_attention)
AttentionMaskInterface.register(GQA_ATTENTION, sdpa_mask)


def _last_logits(
    model: nn.Module, cache_name: str, cache: StaticCache, tokens: Tensor, pos: Tensor, attn: Tensor
) -> Tensor:
    # `cache_name` is looked up outside (`cache_kwarg` inspects signatures: nothing to trace)
    out = model(
        input_ids=tokens,
        attention_mask=attn,
        position_ids=pos,
        use_cache=True,
        logits_to_keep=1,
        **{cache_name: cache},
    )
    return out.logits[:, -1]


def _choose(logits: Tensor, temperature: float, noise: Tensor | None) -> tuple[Tensor, Tensor]:
    """(ids, their log-probs under softmax(logits / T)); noise None = greedy. fp32 only here, [B, V]."""
    z = logits.float() / temperature
    ids = z.argmax(-1) if noise is None else (z - noise.log()).argmax(-1)
    logp = z.gather(-1, ids.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(z, -1)
    return ids, logp


def _choose_top_p(logits: Tensor, temperature: float, top_p: float, noise: Tensor) -> tuple[Tensor, Tensor]:
    """Nucleus sampling: the smallest set of most likely ids whose mass reaches top_p (as transformers'
    TopPLogitsWarper keeps it), raced with the same noise; the log-prob is of the untruncated distribution."""
    z = logits.float() / temperature
    sz, order = z.sort(-1, descending=True)
    p = torch.softmax(sz, -1)
    # dropped: the mass of the ids before it already reaches top_p (so the top id always stays)
    drop_sorted = (p.cumsum(-1) - p) >= top_p
    drop = torch.zeros_like(drop_sorted).scatter_(-1, order, drop_sorted)
    ids = (z - noise.log()).masked_fill(drop, float("-inf")).argmax(-1)
    logp = z.gather(-1, ids.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(z, -1)
    return ids, logp


def _decode_step(
    model: nn.Module,
    cache_name: str,
    cache: StaticCache,
    tokens: Tensor,
    pos: Tensor,
    attn: Tensor,
    noise: Tensor | None,
    temperature: float,
) -> tuple[Tensor, Tensor]:
    return _choose(_last_logits(model, cache_name, cache, tokens, pos, attn), temperature, noise)


@dataclass
class _Buffers:
    """Everything a step reads, allocated once per (batch, cache length) and reused: CUDA graphs replay on
    fixed addresses, and a job's calls all have the same shapes."""

    batch: int
    length: int
    cache: StaticCache
    tokens: Tensor  # [B, 1] the token fed at the next step
    pos: Tensor  # [B, 1] its position id
    attn: Tensor  # [B, L] bool, which cache columns each row attends to
    noise: Tensor  # [B, V] fp32, Exp(1) draws for the sampling race


def _next_pow2(n: int) -> int:
    return 1 << (n - 1).bit_length()


class StaticDecodeEngine(RolloutEngine):
    """Rollout with our own decode loop (see the module docstring).

    Sampling seeds are per prompt (`generate(..., seeds=)`; the rollout collector derives them from the step's
    seed and each request's episode index and turn). Without them, the engine draws one per prompt from its
    generator. `seed`: None (default) seeds that generator at every `generate` call from the global torch RNG,
    so `torch.manual_seed(s)` before a call fixes its samples; an int seeds it once and the calls continue
    one stream.
    `compile`: None = on CUDA unless OPENTINKER_DECODE_COMPILE=0, never on CPU. `pad_batch`: pad each chunk
    to a power of two (default: when compiling, so the graph count stays small)."""

    def __init__(
        self,
        model: nn.Module,
        *,
        pad_id: int,
        device: str | torch.device = "cpu",
        max_batch: int = 256,
        compile: bool | None = None,
        fullgraph: bool = False,
        pad_batch: bool | None = None,
        seed: int | None = None,
        sync_every: int | None = None,
    ) -> None:
        self.device = torch.device(device)
        if not self.supports(model):
            raise ValueError(
                f"{type(model).__name__}: the static decode loop needs full attention in every layer "
                "(no sliding-window or linear layers); use HFEngine"
            )
        if max_batch < 1:
            raise ValueError("max_batch must be >= 1")
        self.model = model.to(self.device).eval()
        if self.model.config._attn_implementation == "sdpa":
            self.model.set_attn_implementation(GQA_ATTENTION)
        self.pad_id = pad_id
        self.max_batch = max_batch
        self._cache_name = cache_kwarg(self.model)
        cuda = self.device.type == "cuda"
        if compile is None:
            compile = cuda and os.environ.get(COMPILE_ENV, "1") != "0"
        if compile and not cuda:
            raise ValueError("compile=True needs CUDA: the compiled step is a CUDA graph")
        self.compiled = compile
        self.pad_batch = compile if pad_batch is None else pad_batch
        # A host read of "all finished?" waits for the GPU; on CPU it costs nothing and saves whole steps.
        self.sync_every = sync_every or (8 if cuda else 1)
        self.seed = seed
        self.generator = torch.Generator(device=self.device)
        if seed is not None:
            self.generator.manual_seed(seed)
        self._bufs: _Buffers | None = None
        if compile:
            # A graph per batch bucket, cache length, greedy or not, temperature (and engine): a process with
            # several engines (tests, multi-policy jobs) passes dynamo's default limit of 8 per function,
            # after which the step would silently run eagerly.
            cfg = torch._dynamo.config
            cfg.recompile_limit = max(cfg.recompile_limit, 64)
            opts = dict(mode="reduce-overhead", fullgraph=fullgraph, dynamic=False)
            self._step = torch.compile(_decode_step, **opts)
            self._logits = torch.compile(_last_logits, **opts)
        else:
            self._step, self._logits = _decode_step, _last_logits

    @staticmethod
    def supports(model: nn.Module) -> bool:
        config = getattr(model, "config", None)
        if config is None:
            return False
        try:
            layers = StaticCache(config=config, max_cache_len=1).layers
        except (ValueError, KeyError, TypeError):
            return False
        return bool(layers) and all(type(layer) is StaticLayer for layer in layers)

    def load_weights(self, state_dict: dict[str, torch.Tensor]) -> None:
        # strict: a silently ignored key is how LoRA updates fail to reach the sampler in other frameworks.
        # load_state_dict copies in place, so the parameters keep the addresses the CUDA graphs captured.
        self.model.load_state_dict(state_dict, strict=True)

    @torch.no_grad()
    def generate(
        self, prompts: list[list[int]], sampling: SamplingParams, seeds: Sequence[int] | None = None
    ) -> GenerateResult:
        self._validate(prompts, sampling)
        if seeds is not None and len(seeds) != len(prompts):
            raise ValueError(f"{len(seeds)} seeds for {len(prompts)} prompts")
        if sampling.greedy:
            seeds = []
        elif seeds is None:
            if self.seed is None:
                self.generator.manual_seed(int(torch.randint(0, 2**62, (1,)).item()))
            drawn = torch.randint(0, 2**62, (len(prompts),), generator=self.generator, device=self.device)
            seeds = drawn.tolist()
        elif any(not 0 <= s < 2**63 for s in seeds):
            raise ValueError("seeds must be in [0, 2**63)")
        out = GenerateResult([], [], [])
        for i in range(0, len(prompts), self.max_batch):
            part = self._generate(prompts[i : i + self.max_batch], sampling, seeds[i : i + self.max_batch])
            out.token_ids += part.token_ids
            out.logprobs += part.logprobs
            out.finished += part.finished
        return out

    def _validate(self, prompts: list[list[int]], sp: SamplingParams) -> None:
        vocab = self.model.config.vocab_size
        if not prompts:
            raise ValueError("no prompts")
        if any(not p for p in prompts):
            raise ValueError("every prompt needs at least one token")
        if any(t < 0 or t >= vocab for p in prompts for t in p):
            raise ValueError(f"prompt token ids must be in [0, {vocab})")
        if not 0 <= sp.max_new_tokens <= MAX_NEW_TOKENS:
            raise ValueError(f"max_new_tokens must be in [0, {MAX_NEW_TOKENS}]")
        if not sp.temperature > 0:
            raise ValueError("temperature must be > 0")
        if not 0 < sp.top_p <= 1:
            raise ValueError("top_p must be in (0, 1]")
        limit = getattr(self.model.config, "max_position_embeddings", None)
        longest = max(len(p) for p in prompts) + sp.max_new_tokens
        if limit is not None and longest > limit:
            raise ValueError(f"prompt + max_new_tokens = {longest} exceeds the model's {limit} positions")

    def _buffers(self, batch: int, length: int) -> _Buffers:
        b = self._bufs
        if b is not None and b.batch == batch and b.length == length:
            return b
        self._bufs = None  # free the previous cache before allocating the next
        cfg = self.model.config
        dtype = next(self.model.parameters()).dtype
        heads = cfg.num_key_value_heads
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        cache = StaticCache(config=cfg, max_cache_len=length)
        cache.early_initialization(batch, heads, head_dim, dtype, self.device)
        dev = self.device
        b = _Buffers(
            batch=batch,
            length=length,
            cache=cache,
            tokens=torch.zeros((batch, 1), dtype=torch.long, device=dev),
            pos=torch.zeros((batch, 1), dtype=torch.long, device=dev),
            attn=torch.zeros((batch, length), dtype=torch.bool, device=dev),
            noise=torch.ones((batch, cfg.vocab_size), dtype=torch.float32, device=dev),
        )
        if self.compiled:  # the graphs read these in place instead of copying them in at every replay
            for t in (b.tokens, b.pos, b.attn, b.noise):
                torch._dynamo.mark_static_address(t)
        self._bufs = b
        return b

    def _prefill(self, prompts: list[list[int]], bufs: _Buffers, width: int) -> Tensor:
        """Run each distinct prompt once, copy its keys and values into its rows of the static cache (padding
        rows copy the first prompt), set the mask and positions; returns the first token's logits [B, V]."""
        n = len(prompts)
        plan = plan_prefixes(prompts, [len(p) for p in prompts], self.pad_id)
        if plan is not None:  # whole prompts repeat: the plan's "prefixes" are the distinct prompts
            ids, attn, pos, inverse = plan.prefix_ids, plan.prefix_attn, plan.prefix_pos, plan.inverse
        else:
            ids = torch.full((n, width), self.pad_id, dtype=torch.long)
            attn = torch.zeros((n, width), dtype=torch.long)
            for i, p in enumerate(prompts):
                ids[i, width - len(p) :] = torch.tensor(p)
                attn[i, width - len(p) :] = 1
            pos = (attn.cumsum(-1) - 1).clamp(min=0)
            inverse = torch.arange(n)
        rows = torch.cat([inverse, inverse[:1].expand(bufs.batch - n)]).to(self.device)
        dyn = DynamicCache(config=self.model.config)
        out = self.model(
            input_ids=ids.to(self.device),
            attention_mask=attn.to(self.device),
            position_ids=pos.to(self.device),
            use_cache=True,
            logits_to_keep=1,
            **{self._cache_name: dyn},
        )
        for static, prefilled in zip(bufs.cache.layers, dyn.layers, strict=True):
            static.keys[:, :, :width].copy_(prefilled.keys.index_select(0, rows))
            static.values[:, :, :width].copy_(prefilled.values.index_select(0, rows))
            static.cumulative_length.fill_(width)  # in place: the graphs hold its address
        bufs.attn.zero_()
        bufs.attn[:, :width].copy_(attn.to(self.device, torch.bool).index_select(0, rows))
        bufs.pos.copy_(attn.sum(-1, keepdim=True).to(self.device).index_select(0, rows))
        return out.logits[:, -1].index_select(0, rows)

    def _pick(
        self, logits: Tensor | None, bufs: _Buffers, sp: SamplingParams, rows: list[torch.Generator]
    ) -> tuple[Tensor, Tensor]:
        """The next ids and log-probs: from `logits` (the prefill's), or from one step on the buffers.
        `rows`: each request's generator (its row's noise; padding rows keep whatever noise they hold)."""
        noise = None
        if not sp.greedy:
            for r, g in enumerate(rows):
                bufs.noise[r].exponential_(generator=g)
            noise = bufs.noise
        args = (self.model, self._cache_name, bufs.cache, bufs.tokens, bufs.pos, bufs.attn)
        if sp.top_p < 1 and noise is not None:
            if logits is None:
                self._mark_step()
                logits = self._logits(*args)
            return _choose_top_p(logits, sp.temperature, sp.top_p, noise)
        if logits is not None:
            return _choose(logits, sp.temperature, noise)
        self._mark_step()
        return self._step(*args, noise, sp.temperature)

    def _mark_step(self) -> None:
        if self.compiled:  # a new iteration: the previous replay's outputs have been consumed
            torch.compiler.cudagraph_mark_step_begin()

    def _generate(self, prompts: list[list[int]], sp: SamplingParams, seeds: Sequence[int]) -> GenerateResult:
        n, max_new = len(prompts), sp.max_new_tokens
        if max_new == 0:
            return GenerateResult([[] for _ in prompts], [[] for _ in prompts], [False] * n)
        width = max(len(p) for p in prompts)
        batch = min(_next_pow2(n), self.max_batch) if self.pad_batch else n  # generate chunks by max_batch
        length = width + max_new
        if self.compiled:
            length = -(-length // CACHE_ROUND) * CACHE_ROUND
        held = self._bufs
        if self.pad_batch and held is not None and held.batch >= n and held.length >= length:
            # A smaller call (a tail chunk, an eval) reuses the buffers it fits in, and so their graph: extra
            # rows count as finished, extra cache columns stay masked.
            batch, length = held.batch, held.length
        bufs = self._buffers(batch, length)
        dev = self.device
        out_ids = torch.full((batch, max_new), self.pad_id, dtype=torch.long, device=dev)
        out_logp = torch.zeros((batch, max_new), dtype=torch.float32, device=dev)
        count = torch.zeros(batch, dtype=torch.long, device=dev)
        done = torch.arange(batch, device=dev) >= n  # padding rows count as finished from the start
        stop = torch.tensor(sorted(set(sp.stop_ids)), dtype=torch.long, device=dev) if sp.stop_ids else None
        pad = torch.tensor(self.pad_id, dtype=torch.long, device=dev)

        rows = [torch.Generator(device=dev).manual_seed(s) for s in seeds]
        ids, logp = self._pick(self._prefill(prompts, bufs, width), bufs, sp, rows)
        for t in range(max_new):
            if t > 0:
                bufs.attn[:, width + t - 1] = True  # the column the fed token is written to
                ids, logp = self._pick(None, bufs, sp, rows)
                bufs.pos += 1
            ids = torch.where(done, pad, ids)
            out_ids[:, t] = ids
            out_logp[:, t] = logp
            count += ~done
            if stop is not None:
                done |= torch.isin(ids, stop)
            bufs.tokens.copy_(ids.unsqueeze(1))
            if stop is not None and (t + 1) % self.sync_every == 0 and t + 1 < max_new and bool(done.all()):
                break

        counts = count[:n].tolist()
        ids_rows = out_ids[:n].tolist()
        logp_rows = out_logp[:n].tolist()
        finished = done[:n].tolist()
        return GenerateResult(
            token_ids=[r[:c] for r, c in zip(ids_rows, counts, strict=True)],
            logprobs=[r[:c] for r, c in zip(logp_rows, counts, strict=True)],
            finished=finished,
        )
