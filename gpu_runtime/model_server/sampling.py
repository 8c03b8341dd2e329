"""Sampling and prompt log-probs for many calls of many adapters (or the base) in ONE batched decode loop.

`sample_many` takes the sample calls waiting on one base model, whatever adapter each names, and decodes
them together: each call's prompt is prefilled once (one row per call, left-padded, routed to the call's
adapter) and its keys and values copied into its `num_samples` rows of a static cache; every decode step is
one forward over every row, each row routed to its call's adapter by `lora`'s per-row routing (the routing
`forward_backward` uses; calls are ordered by adapter so each adapter's rows are one contiguous run).

Sampling is per row: each call keeps its own temperature, top_k, top_p, max_tokens, stops and random
stream. A call's draws come from its own generator (seeded by its `seed`, else from the global RNG), one
[num_samples, V] block of Exp(1) noise per step as the rollout decode loop draws them, so a seeded call
samples the same tokens whether it runs alone or batched with others (up to float rounding of the batched
forward). The sampled id is argmax(z/T - log E) (the exponential race, an exact draw from softmax(z/T));
top_k keeps the k most likely ids, then top_p the smallest set of those whose renormalised mass reaches
top_p (transformers' order: temperature, top-k, top-p). Reported log-probs are of the untruncated
softmax(z/T), as the rollout engines report them. temperature 0 = greedy (log-probs at T = 1).

Eager only (no CUDA graphs: the step's routing changes with the calls in the batch).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from transformers import DynamicCache, PreTrainedTokenizerBase, StaticCache

from gpu_runtime.model_server.logprobs import token_logprobs
from gpu_runtime.model_server.lora import LoraAdapter, MultiLoraModel, route_rows
from gpu_runtime.model_server.types import ModelServerError, Sample, SampledSequence, SampleResult
from gpu_runtime.rollout.decode import MAX_NEW_TOKENS, StaticDecodeEngine
from gpu_runtime.shared_prefix import cache_kwarg

MAX_ROWS = 256  # rows (samples) per decode pass; more calls run in several passes


@dataclass
class _Call:
    """One validated sample call, as rows of the batch."""

    adapter: LoraAdapter | None
    prompt: list[int]
    n: int
    max_new: int
    greedy: bool
    temperature: float  # 1.0 when greedy (the log-probs' temperature)
    top_k: int  # 0 = off
    top_p: float
    stop_ids: tuple[int, ...]
    stop_strings: list[str]
    generator: torch.Generator | None  # None: greedy


class AdapterSampler:
    def __init__(self, host: MultiLoraModel, tokenizer: PreTrainedTokenizerBase) -> None:
        self.host = host
        self.tokenizer = tokenizer
        self.eos_id: int = tokenizer.eos_token_id
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_id
        # the decode loop's model setup (eval mode, the grouped-query decode attention); its loop is not used
        StaticDecodeEngine(host.model, pad_id=self.pad_id, device=host.device, compile=False)
        self._cache_name = cache_kwarg(host.model)
        self.vocab: int = host.model.config.vocab_size
        self.positions: int | None = getattr(host.model.config, "max_position_embeddings", None)

    def sample(self, adapter: LoraAdapter | None, req: Sample) -> SampleResult:
        out = self.sample_many([(adapter, req)])[0]
        if isinstance(out, ModelServerError):
            raise out
        return out

    @torch.no_grad()
    def sample_many(
        self, calls: Sequence[tuple[LoraAdapter | None, Sample]]
    ) -> list[SampleResult | ModelServerError]:
        """Each call's result (or why it was refused), decoding every valid call in one batched loop."""
        results: list[SampleResult | ModelServerError | None] = [None] * len(calls)
        valid: list[tuple[int, _Call]] = []
        for i, (adapter, req) in enumerate(calls):
            try:
                valid.append((i, self._prepare(adapter, req)))
            except ModelServerError as exc:
                results[i] = exc
        # the same adapter's calls next to each other: its rows are one run (sliced, not gathered)
        first: dict[int, int] = {}
        for pos, (_, c) in enumerate(valid):
            first.setdefault(id(c.adapter), pos)
        valid.sort(key=lambda ic: first[id(ic[1].adapter)])
        chunks: list[list[tuple[int, _Call]]] = [[]]
        for item in valid:  # at most MAX_ROWS rows per pass (a call is never split)
            if chunks[-1] and sum(c.n for _, c in chunks[-1]) + item[1].n > MAX_ROWS:
                chunks.append([])
            chunks[-1].append(item)
        for chunk in chunks:
            if chunk:
                decoded = self._decode([c for _, c in chunk])
                for (i, _), seqs in zip(chunk, decoded, strict=True):
                    results[i] = SampleResult(seqs)
        ok = [isinstance(r, SampleResult) for r in results]
        want = [i for i, (_, q) in enumerate(calls) if q.prompt_logprobs and ok[i]]
        if want:
            prompts = [[int(t) for t in calls[i][1].prompt] for i in want]
            for i, lps in zip(want, self.prompt_logprobs([calls[i][0] for i in want], prompts), strict=True):
                result = results[i]
                assert isinstance(result, SampleResult)
                result.prompt_logprobs = lps
        assert all(r is not None for r in results)
        return [r for r in results if r is not None]

    def _prepare(self, adapter: LoraAdapter | None, req: Sample) -> _Call:
        sp = req.sampling_params
        if req.num_samples < 1:
            raise ModelServerError("num_samples must be >= 1")
        if req.num_samples > MAX_ROWS:
            raise ModelServerError(f"num_samples must be <= {MAX_ROWS}")
        if not (math.isfinite(sp.temperature) and sp.temperature >= 0):
            raise ModelServerError("temperature must be >= 0")
        if not 0 < sp.top_p <= 1:
            raise ModelServerError("top_p must be in (0, 1]")
        if sp.top_k < -1:
            raise ModelServerError(f"top_k must be -1 (off) or >= 1, got {sp.top_k}")
        if not 0 <= sp.max_tokens <= MAX_NEW_TOKENS:
            raise ModelServerError(f"max_tokens must be in [0, {MAX_NEW_TOKENS}]")
        prompt = [int(t) for t in req.prompt]
        if not prompt:
            raise ModelServerError("prompt is empty")
        if min(prompt) < 0 or max(prompt) >= self.vocab:
            raise ModelServerError(f"prompt token ids must be in [0, {self.vocab})")
        if self.positions is not None and len(prompt) + sp.max_tokens > self.positions:
            raise ModelServerError(
                f"prompt + max_tokens = {len(prompt) + sp.max_tokens} exceeds the model's {self.positions} "
                "positions"
            )
        stop: list[int | str] = list(sp.stop) if sp.stop is not None else [self.eos_id]
        greedy = sp.temperature == 0
        generator = None
        if not greedy:  # a seed fixes this call's draws; without one, a fresh seed from the global RNG
            seed = sp.seed if sp.seed is not None else int(torch.randint(0, 2**62, (1,)).item())
            generator = torch.Generator(device=self.host.device).manual_seed(seed)
        return _Call(
            adapter=adapter,
            prompt=prompt,
            n=req.num_samples,
            max_new=sp.max_tokens,
            greedy=greedy,
            temperature=1.0 if greedy else sp.temperature,
            top_k=sp.top_k if sp.top_k > 0 else 0,
            top_p=sp.top_p,
            stop_ids=tuple(sorted({int(s) for s in stop if not isinstance(s, str)})),
            stop_strings=[s for s in stop if isinstance(s, str)],
            generator=generator,
        )

    # ---- the batched decode loop ----

    def _decode(self, calls: list[_Call]) -> list[list[SampledSequence]]:
        """Decode every call's rows together; per call, its sequences."""
        dev, model, vocab = self.host.device, self.host.model, self.vocab
        of_row = torch.tensor([ci for ci, c in enumerate(calls) for _ in range(c.n)], device=dev)
        batch, steps = int(of_row.numel()), max(c.max_new for c in calls)
        if steps == 0:
            return [[SampledSequence([], [], "length") for _ in range(c.n)] for c in calls]
        width = max(len(c.prompt) for c in calls)
        row_adapters = [c.adapter for c in calls for _ in range(c.n)]
        route = route_rows(row_adapters, dev)

        def per_row(values: list[float] | list[int], dtype: torch.dtype) -> Tensor:
            return torch.tensor(values, dtype=dtype, device=dev).index_select(0, of_row)

        temperature = per_row([c.temperature for c in calls], torch.float32).unsqueeze(1)
        top_k = per_row([c.top_k if 0 < c.top_k < vocab else vocab for c in calls], torch.long)
        top_p = per_row([c.top_p for c in calls], torch.float32)
        max_new = per_row([c.max_new for c in calls], torch.long)
        n_stops = max(len(c.stop_ids) for c in calls)
        stops = None
        if n_stops:
            table = [list(c.stop_ids) + [-1] * (n_stops - len(c.stop_ids)) for c in calls]
            stops = torch.tensor(table, dtype=torch.long, device=dev).index_select(0, of_row)
        truncate = any(not c.greedy and (c.top_k or c.top_p < 1) for c in calls)

        # prefill: one row per call, left-padded to the widest prompt, each routed to its call's adapter
        ids = torch.full((len(calls), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(calls), width), dtype=torch.long)
        for i, c in enumerate(calls):
            ids[i, width - len(c.prompt) :] = torch.tensor(c.prompt)
            mask[i, width - len(c.prompt) :] = 1
        pos0 = (mask.cumsum(-1) - 1).clamp(min=0)
        dyn = DynamicCache(config=model.config)
        with self.host.router.use(route_rows([c.adapter for c in calls], dev)):
            out = model(
                input_ids=ids.to(dev),
                attention_mask=mask.to(dev),
                position_ids=pos0.to(dev),
                use_cache=True,
                logits_to_keep=1,
                **{self._cache_name: dyn},
            )
        cfg = model.config
        heads = cfg.num_key_value_heads
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        cache = StaticCache(config=cfg, max_cache_len=width + steps)
        cache.early_initialization(batch, heads, head_dim, next(model.parameters()).dtype, dev)
        for static, prefilled in zip(cache.layers, dyn.layers, strict=True):
            static.keys[:, :, :width].copy_(prefilled.keys.index_select(0, of_row))
            static.values[:, :, :width].copy_(prefilled.values.index_select(0, of_row))
            static.cumulative_length.fill_(width)
        del dyn
        attn = torch.zeros((batch, width + steps), dtype=torch.bool, device=dev)
        attn[:, :width] = mask.to(dev, torch.bool).index_select(0, of_row)
        pos = mask.sum(-1, keepdim=True).to(dev).index_select(0, of_row)
        logits = out.logits[:, -1].index_select(0, of_row)
        tokens = torch.zeros((batch, 1), dtype=torch.long, device=dev)

        out_ids = torch.full((batch, steps), self.pad_id, dtype=torch.long, device=dev)
        out_logp = torch.zeros((batch, steps), dtype=torch.float32, device=dev)
        count = torch.zeros(batch, dtype=torch.long, device=dev)
        done = max_new <= 0
        stopped = torch.zeros(batch, dtype=torch.bool, device=dev)
        pad = torch.tensor(self.pad_id, dtype=torch.long, device=dev)
        sync_every = 8 if dev.type == "cuda" else 1
        for t in range(steps):
            if t > 0:
                attn[:, width + t - 1] = True  # the column the fed token is written to
                with self.host.router.use(route):
                    logits = model(
                        input_ids=tokens,
                        attention_mask=attn,
                        position_ids=pos,
                        use_cache=True,
                        logits_to_keep=1,
                        **{self._cache_name: cache},
                    ).logits[:, -1]
                pos += 1
            noise = self._noise(calls, vocab)
            ids_t, logp = _choose_rows(logits, temperature, noise, top_k if truncate else None, top_p)
            ids_t = torch.where(done, pad, ids_t)
            out_ids[:, t] = ids_t
            out_logp[:, t] = logp
            count += ~done
            if stops is not None:
                hit = (ids_t.unsqueeze(1) == stops).any(1) & ~done
                stopped |= hit
                done |= hit
            done |= count >= max_new
            tokens.copy_(ids_t.unsqueeze(1))
            if (t + 1) % sync_every == 0 and t + 1 < steps and bool(done.all()):
                break

        counts, id_rows, lp_rows = count.tolist(), out_ids.tolist(), out_logp.tolist()
        ended = stopped.tolist()
        result: list[list[SampledSequence]] = []
        row = 0
        for c in calls:
            seqs = []
            for r in range(row, row + c.n):
                ids_r, lps_r, finished = id_rows[r][: counts[r]], lp_rows[r][: counts[r]], ended[r]
                cut = self._stop_string_end(ids_r, c.stop_strings)
                if cut is not None:
                    ids_r, lps_r, finished = ids_r[:cut], lps_r[:cut], True
                seqs.append(SampledSequence(ids_r, lps_r, "stop" if finished else "length"))
            result.append(seqs)
            row += c.n
        return result

    def _noise(self, calls: list[_Call], vocab: int) -> Tensor | None:
        """This step's Exp(1) draws: each sampled call's block from its own generator, ones for greedy rows
        (-log 1 = 0: a plain argmax); None when every call is greedy."""
        if all(c.generator is None for c in calls):
            return None
        dev = self.host.device
        blocks = [
            torch.empty((c.n, vocab), device=dev).exponential_(generator=c.generator)
            if c.generator is not None
            else torch.ones((c.n, vocab), device=dev)
            for c in calls
        ]
        return torch.cat(blocks) if len(blocks) > 1 else blocks[0]

    def _stop_string_end(self, ids: list[int], stops: list[str]) -> int | None:
        """How many tokens reach the end of the first stop string in the decoded text (None: none occurs)."""
        if not stops or not any(s in self.tokenizer.decode(ids) for s in stops):
            return None
        # the shortest prefix whose text holds a stop string, by bisection (a prefix's text is a prefix of a
        # longer one's): a scan decoded every prefix, O(n^2) tokens for a stop near the end of a long sample
        lo, hi = 1, len(ids)
        while lo < hi:
            mid = (lo + hi) // 2
            text = self.tokenizer.decode(ids[:mid])
            if any(s in text for s in stops):
                hi = mid
            else:
                lo = mid + 1
        return lo

    # ---- prompt log-probs ----

    def _check_prompt(self, prompt: list[int]) -> None:
        if not prompt:
            raise ModelServerError("prompt is empty")
        if any(t < 0 or t >= self.vocab for t in prompt):
            raise ModelServerError(f"prompt token ids must be in [0, {self.vocab})")

    @torch.no_grad()
    def compute_logprobs(self, adapter: LoraAdapter | None, prompt: list[int]) -> list[float]:
        """log p(prompt[t] | prompt[:t]) for each token; the first has no context: NaN."""
        self._check_prompt(prompt)
        return self.prompt_logprobs([adapter], [prompt])[0]

    @torch.no_grad()
    def prompt_logprobs(
        self, adapters: Sequence[LoraAdapter | None], prompts: Sequence[list[int]]
    ) -> list[list[float]]:
        """`compute_logprobs` of several (checked) prompts, each under its adapter, in one forward."""
        out: list[list[float]] = [[math.nan] for _ in prompts]
        rows = [i for i, p in enumerate(prompts) if len(p) > 1]
        if rows:
            targets = [torch.as_tensor(prompts[i][1:], dtype=torch.long) for i in rows]
            inputs = [prompts[i][:-1] for i in rows]
            lps = token_logprobs(self.host, inputs, targets, [adapters[i] for i in rows])
            for i, lp in zip(rows, lps, strict=True):
                out[i] = [math.nan, *lp.tolist()]
        return out


def _choose_rows(
    logits: Tensor, temperature: Tensor, noise: Tensor | None, top_k: Tensor | None, top_p: Tensor
) -> tuple[Tensor, Tensor]:
    """Per row: (the next id, its log-prob under softmax(logits / T)). `noise` None = every row greedy;
    `top_k` None = no row truncates (top_k = V and top_p = 1 leave a row untruncated)."""
    z = logits.float() / temperature
    race = z if noise is None else z - noise.log()
    if top_k is not None:
        sz, order = z.sort(-1, descending=True)
        drop_sorted = torch.arange(z.shape[-1], device=z.device).unsqueeze(0) >= top_k.unsqueeze(1)
        p = torch.softmax(sz.masked_fill(drop_sorted, float("-inf")), -1)
        # dropped: the mass of the ids before it already reaches top_p (so the top id always stays); rows
        # at top_p = 1 skip this (a float cumsum can reach 1 before the tail)
        nucleus = ((p.cumsum(-1) - p) >= top_p.unsqueeze(1)) & (top_p < 1).unsqueeze(1)
        drop = torch.zeros_like(drop_sorted).scatter_(-1, order, drop_sorted | nucleus)
        race = race.masked_fill(drop, float("-inf"))
    ids = race.argmax(-1)
    logp = z.gather(-1, ids.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(z, -1)
    return ids, logp
