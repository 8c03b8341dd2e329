"""The model server's engine: one frozen base model, many clients' LoRA adapters, and their calls.

Built to sit behind a queue: `submit(model_id, seq_id, op)` accepts a call (plain dataclasses, `types`),
`step()` runs what may run now and returns the outcomes, `outcome(model_id, seq_id)` reads one back. Each
model's calls run in seq_id order and a retried (model_id, seq_id) is answered from its first outcome
(`ordering`). In a step, the `forward` / `forward_backward` calls waiting at the head of every model's queue
(and those queued right behind them) run together: ONE forward and ONE backward over all their rows, each
row routed to its model's adapter (`lora`). Likewise the `sample` calls at the heads of the queues (and those
right behind them), whatever adapter each names, decode together in ONE batched loop with per-row adapter
routing (`sampling`); with `sampler="vllm"` they go to one vLLM engine with multi-LoRA instead, each request
with its adapter's LoRA (`vllm_sampling`; `max_lora_rank`: the largest rank vLLM serves, 64 unless given).
Other calls run one by one.

Models come in two kinds: training clients (`create_model`, `create_model_from_state`: an adapter with AdamW
state and a gradient accumulator) and samplers (`create_sampler`: the base, or a saved adapter, frozen).
Idle adapters can be evicted to storage (`evict`, or automatically past `max_resident`) and are reloaded,
with their Adam state and pending gradients, when their next call runs.
"""

from __future__ import annotations

import copy
import itertools
import math
import time
import urllib.parse
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from gpu_runtime import storage
from gpu_runtime.model_server import adapter_io
from gpu_runtime.model_server.logprobs import token_logprobs
from gpu_runtime.model_server.lora import LoraAdapter, MultiLoraModel
from gpu_runtime.model_server.losses import elementwise_loss, loss_spec, resolve_config
from gpu_runtime.model_server.ordering import SeqQueue
from gpu_runtime.model_server.sampling import AdapterSampler
from gpu_runtime.model_server.types import (
    AdamParams,
    ComputeLogprobs,
    ComputeLogprobsResult,
    ForwardBackward,
    ForwardBackwardResult,
    LoadState,
    LoadStateResult,
    LoraConfig,
    ModelServerError,
    Operation,
    OptimStep,
    OptimStepResult,
    Outcome,
    Result,
    Sample,
    SampleResult,
    SaveState,
    SaveStateResult,
)
from gpu_runtime.models import load_model

if TYPE_CHECKING:
    from gpu_runtime.model_server.vllm_sampling import VLLMSampler

DEFAULT_BATCH_TOKENS = 65536
SAMPLERS = ("decode", "vllm")  # who serves sample / compute_logprobs: our decode loop, or vLLM's multi-LoRA


def _padded_sample_size(rows: int, width: int, steps: int, op: Sample) -> tuple[int, int, int]:
    """A batched decode pass's (rows, widest prompt, most steps) with `op` added: every row is left-padded
    to the widest prompt and decodes as many steps as the longest max_tokens (its static cache), so the
    pass holds rows x (width + steps) tokens, whatever the calls' own sizes sum to."""
    return (
        rows + max(op.num_samples, 1),
        max(width, len(op.prompt)),
        max(steps, op.sampling_params.max_tokens),
    )


@dataclass(frozen=True)
class ModelInfo:
    model_id: str
    base_model: str
    is_lora: bool
    lora_rank: int | None
    trainable: bool


@dataclass
class _Model:
    model_id: str
    queue: SeqQueue
    trainable: bool
    adapter: LoraAdapter | None  # None: the base alone, or evicted (then `spilled` says where it is)
    config: LoraConfig | None
    source_uri: str | None = None  # a sampler's saved adapter: where to reload it from
    spilled: str | None = None
    last_used: int = 0


@dataclass
class _PreparedFB:
    model_id: str
    seq_id: int
    op: ForwardBackward
    config: dict[str, float]
    adapter: LoraAdapter | None
    inputs: list[list[int]] = field(default_factory=list)
    targets: list[Tensor] = field(default_factory=list)
    loss_inputs: list[dict[str, Tensor]] = field(default_factory=list)

    @property
    def tokens(self) -> int:
        return sum(len(x) for x in self.inputs)


class ModelServer:
    def __init__(
        self,
        base_model: str,
        *,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        seed: int = 0,
        spill_uri: str | None = None,
        max_resident: int | None = None,
        max_batch_tokens: int = DEFAULT_BATCH_TOKENS,
        sampler: str = "decode",
        max_lora_rank: int | None = None,
    ) -> None:
        if max_resident is not None and spill_uri is None:
            raise ValueError("max_resident needs a spill_uri to evict adapters to")
        if sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {', '.join(SAMPLERS)}, not {sampler!r}")
        loaded = load_model(base_model, seed=seed, dtype=dtype)
        self.base_model, self.seed = base_model, seed
        self.tokenizer = loaded.tokenizer
        vllm_model = None
        if sampler == "vllm":  # vLLM starts from the plain base, before its linears are wrapped
            vllm_model = copy.deepcopy(loaded.model)
        self.host = MultiLoraModel(loaded.model.to(device))
        # the decode loop: the default sampler, and the vLLM one's checks and fallback
        self.decoder = AdapterSampler(self.host, self.tokenizer)  # puts the model in eval mode: no dropout
        self.sampler: AdapterSampler | VLLMSampler = self.decoder
        if vllm_model is not None:
            from gpu_runtime.model_server.vllm_sampling import (
                DEFAULT_MAX_LORA_RANK,
                DEFAULT_MAX_LORAS,
                VLLMSampler,
            )

            self.sampler = VLLMSampler(
                vllm_model,
                self.decoder,
                base_model=base_model,
                max_loras=min(max_resident or DEFAULT_MAX_LORAS, DEFAULT_MAX_LORAS * 8),
                max_lora_rank=max_lora_rank or DEFAULT_MAX_LORA_RANK,
            )
            del vllm_model
        self.vocab_size: int = self.host.model.config.vocab_size
        self.spill_uri = spill_uri
        self.max_resident = max_resident
        self.max_batch_tokens = max_batch_tokens
        self.models: dict[str, _Model] = {}
        self._clock = itertools.count(1)

    def close(self) -> None:
        """Hand the vLLM sampler's engine back (parked for the next server in this process); the decode
        loop holds nothing to release."""
        if not isinstance(self.sampler, AdapterSampler):
            self.sampler.close()
            self.sampler = self.decoder

    # ---- models (session-level calls in Tinker: not seq-ordered) ----

    def create_model(self, model_id: str, lora_config: LoraConfig, *, first_seq_id: int = 1) -> ModelInfo:
        """A training client: a fresh adapter (it starts as the base model) with its own AdamW state."""
        self._new_id(model_id)
        adapter = self.host.new_adapter(lora_config)
        self.models[model_id] = _Model(model_id, SeqQueue(first_seq_id), True, adapter, lora_config)
        self._touch(self.models[model_id])
        self._evict_past_limit(keep={model_id})
        return self.info(model_id)

    def create_model_from_state(
        self, model_id: str, uri: str, *, optimizer: bool, first_seq_id: int = 1
    ) -> ModelInfo:
        """A training client resumed from a `save_state` (with or without its Adam state)."""
        self._new_id(model_id)
        adapter = adapter_io.load_adapter(self.host, uri, optimizer=optimizer)
        self.models[model_id] = _Model(model_id, SeqQueue(first_seq_id), True, adapter, adapter.config)
        self._touch(self.models[model_id])
        self._evict_past_limit(keep={model_id})
        return self.info(model_id)

    def create_sampler(self, sampler_id: str, uri: str | None = None, *, first_seq_id: int = 1) -> ModelInfo:
        """A sampling client: the base model (uri None) or a saved adapter, frozen."""
        self._new_id(sampler_id)
        adapter = adapter_io.load_adapter(self.host, uri, optimizer=False) if uri else None
        config = adapter.config if adapter else None
        self.models[sampler_id] = _Model(sampler_id, SeqQueue(first_seq_id), False, adapter, config, uri)
        self._touch(self.models[sampler_id])
        return self.info(sampler_id)

    # ---- parking: a stopping server leaves its training clients in storage for the next one ----

    def _parked(self, model_id: str) -> tuple[str, str]:
        assert self.spill_uri is not None
        name = urllib.parse.quote(model_id, safe="")
        return storage.join(self.spill_uri, name), storage.join(self.spill_uri, "next-seq", name)

    def park(self) -> list[str]:
        """Save every training client with nothing queued (adapter, Adam state, pending gradients, the seq_id
        it runs next) to `spill_uri` for the next model server to `unpark`: a stopping server's last act."""
        if self.spill_uri is None:
            return []
        parked = []
        for model_id, m in list(self.models.items()):
            if not m.trainable or m.queue.pending:
                continue
            self.evict(model_id)
            assert m.spilled is not None
            storage.write_bytes(self._parked(model_id)[1], str(m.queue.next_seq_id).encode())  # written last
            del self.models[model_id]
            parked.append(model_id)
        return parked

    def unpark(self, model_id: str) -> bool:
        """Take back a training client an earlier model server parked; False when there is none."""
        if self.spill_uri is None or model_id in self.models:
            return False
        uri, marker = self._parked(model_id)
        try:
            next_seq = int(storage.read_bytes(marker))
        except Exception:  # not parked (file:// and s3:// say so differently)
            return False
        adapter = adapter_io.load_adapter(self.host, uri, optimizer=True, grads=True)
        self.models[model_id] = _Model(model_id, SeqQueue(next_seq), True, adapter, adapter.config)
        self._touch(self.models[model_id])
        # The marker first: a crash in between leaves orphaned bytes, never a marker pointing at nothing.
        storage.delete(marker)
        storage.remove_dir(uri)
        return True

    def remove(self, model_id: str) -> None:
        m = self._model(model_id)
        if m.spilled is not None:
            storage.remove_dir(m.spilled)
        del self.models[model_id]

    def info(self, model_id: str) -> ModelInfo:
        m = self._model(model_id)
        rank = m.config.rank if m.config else None
        return ModelInfo(model_id, self.base_model, m.config is not None, rank, m.trainable)

    def _new_id(self, model_id: str) -> None:
        if model_id in self.models:
            raise ModelServerError(f"model {model_id!r} already exists")

    def _model(self, model_id: str) -> _Model:
        m = self.models.get(model_id)
        if m is None:
            raise ModelServerError(f"unknown model {model_id!r}")
        return m

    # ---- ordered calls ----

    def submit(self, model_id: str, seq_id: int, op: Operation) -> Outcome | None:
        """Queue a call; returns its outcome at once when it is a retry of one already done."""
        return self._model(model_id).queue.submit(seq_id, op)

    def outcome(self, model_id: str, seq_id: int) -> Outcome | None:
        return self._model(model_id).queue.outcome(seq_id)

    def pending(self) -> int:
        return sum(len(m.queue.pending) for m in self.models.values())

    def call(self, model_id: str, seq_id: int, op: Operation) -> Result:
        """Submit, run until this call is done, and return its result (raise its error)."""
        done = self.submit(model_id, seq_id, op)
        while done is None:
            if not self.step():
                raise ModelServerError(
                    f"{model_id!r} seq_id {seq_id} cannot run: an earlier seq_id has not arrived"
                )
            done = self.outcome(model_id, seq_id)
        return done.unwrap()

    def run_until_idle(self) -> list[Outcome]:
        out: list[Outcome] = []
        while batch := self.step():
            out += batch
        return out

    def step(self) -> list[Outcome]:
        """Run what may run now: every model's head calls that are forward / forward_backward, batched in one
        pass, and each other head call on its own. Returns the outcomes, in each model's seq_id order."""
        batch: list[tuple[_Model, int, ForwardBackward]] = []
        samples: list[tuple[_Model, int, Sample]] = []
        singles: list[tuple[_Model, int, Operation]] = []
        budget = self.max_batch_tokens
        shape = (0, 0, 0)  # the sample pass's rows, widest prompt, most steps
        for m in list(self.models.values()):
            ready = m.queue.ready()
            if not ready:
                continue
            if isinstance(ready[0][1], Sample):
                for seq_id, op in ready:  # the run of samples at the head of this model's queue
                    if not isinstance(op, Sample):
                        break
                    # the pass's padded size (not the calls' sum) bounds its memory: one long prompt
                    # widens every row of the pass
                    rows, width, steps = _padded_sample_size(*shape, op)
                    if samples and rows * (width + steps) > self.max_batch_tokens:
                        break
                    samples.append((m, seq_id, op))
                    shape = (rows, width, steps)
                continue
            if not isinstance(ready[0][1], ForwardBackward):
                singles.append((m, *ready[0]))
                continue
            for seq_id, op in ready:  # the run of forward(_backward)s at the head of this model's queue
                if not isinstance(op, ForwardBackward):
                    break
                size = sum(len(d.model_input) for d in op.data)
                if batch and size > budget:
                    break
                batch.append((m, seq_id, op))
                budget -= size
        outcomes = [self._timed_single(m, seq_id, op) for m, seq_id, op in singles]
        if samples:
            outcomes += self._run_samples(samples)
        if batch:
            start = time.perf_counter()
            done = self._run_forward_backward(batch)
            elapsed = time.perf_counter() - start
            sizes = [sum(len(d.model_input) for d in op.data) for _, _, op in batch]
            for o, size in zip(done, sizes, strict=True):
                o.seconds = elapsed * size / max(sum(sizes), 1)
                o.tokens = size if o.error is None else 0
            outcomes += done
        for o in outcomes:
            self.models[o.model_id].queue.complete(o)
        self._evict_past_limit(keep=set())
        return outcomes

    def _timed_single(self, m: _Model, seq_id: int, op: Operation) -> Outcome:
        start = time.perf_counter()
        o = self._run_single(m, seq_id, op)
        o.seconds = time.perf_counter() - start
        if isinstance(o.result, ComputeLogprobsResult):
            o.tokens = len(o.result.logprobs)
        return o

    def _run_samples(self, calls: list[tuple[_Model, int, Sample]]) -> list[Outcome]:
        """Sample calls of any models (adapters) on this base: one batched decode loop for all of them."""
        start = time.perf_counter()
        outcomes: dict[tuple[str, int], Outcome] = {}
        ready: list[tuple[_Model, int, Sample, LoraAdapter | None]] = []
        for m, seq_id, op in calls:
            try:
                ready.append((m, seq_id, op, self._adapter(m)))
            except Exception as exc:  # the adapter could not be reloaded: this call fails, the rest run
                err = exc if isinstance(exc, ModelServerError) else None
                err = err or ModelServerError(repr(exc), category="server")
                outcomes[(m.model_id, seq_id)] = Outcome(m.model_id, seq_id, error=err)
        own: list[float] | None = None
        if ready:
            results, own = self._sample_pass([(adapter, op) for _, _, op, adapter in ready])
            for (m, seq_id, op, _), r in zip(ready, results, strict=True):
                if isinstance(r, ModelServerError):
                    outcomes[(m.model_id, seq_id)] = Outcome(m.model_id, seq_id, error=r)
                else:
                    tokens = len(op.prompt) + sum(len(q.tokens) for q in r.sequences)
                    outcomes[(m.model_id, seq_id)] = Outcome(m.model_id, seq_id, result=r, tokens=tokens)
        elapsed = time.perf_counter() - start
        done = [outcomes[(m.model_id, seq_id)] for m, seq_id, _ in calls]
        if own is not None:  # the batched pass failed: each call pays its own pass, none the failed one
            for (m, seq_id, _, _), seconds in zip(ready, own, strict=True):
                o = outcomes[(m.model_id, seq_id)]
                o.seconds = seconds if o.error is None else 0.0
            return done
        total = sum(o.tokens for o in done)
        for o in done:
            o.seconds = elapsed * o.tokens / total if total else elapsed / len(done)
        return done

    def _sample_pass(
        self, calls: list[tuple[LoraAdapter | None, Sample]]
    ) -> tuple[list[SampleResult | ModelServerError], list[float] | None]:
        """sample_many over `calls`; a pass that fails as a whole (out of memory, ...) is run again one call
        at a time, so only the calls that fail alone fail (a call never gets another's outcome). Also, after
        such a failure, the seconds of each call's own pass (None: one pass served them all)."""
        try:
            return self.sampler.sample_many(calls), None
        except Exception as exc:
            if len(calls) == 1:
                return [ModelServerError(f"sample failed: {exc!r}", category="server")], None
        if torch.cuda.is_available():
            torch.cuda.empty_cache()  # what the failed pass held
        results: list[SampleResult | ModelServerError] = []
        seconds: list[float] = []
        for call in calls:
            start = time.perf_counter()
            results += self._sample_pass([call])[0]
            seconds.append(time.perf_counter() - start)
        return results, seconds

    def _run_single(self, m: _Model, seq_id: int, op: Operation) -> Outcome:
        try:
            result: Result
            if isinstance(op, OptimStep):
                result = self._optim_step(m, op.adam_params)
            elif isinstance(op, ComputeLogprobs):
                prompt = [int(t) for t in op.prompt]
                result = ComputeLogprobsResult(self.sampler.compute_logprobs(self._adapter(m), prompt))
            elif isinstance(op, SaveState):
                result = self._save(m, op)
            elif isinstance(op, LoadState):
                result = self._load(m, op)
            else:
                raise ModelServerError(f"unknown operation {type(op).__name__}")
        except ModelServerError as exc:
            return Outcome(m.model_id, seq_id, error=exc)
        except Exception as exc:  # a bug or a device failure: the caller's call fails, the server goes on
            return Outcome(m.model_id, seq_id, error=ModelServerError(repr(exc), category="server"))
        return Outcome(m.model_id, seq_id, result=result)

    # ---- forward / forward_backward ----

    def _prepare(self, m: _Model, seq_id: int, op: ForwardBackward) -> _PreparedFB:
        spec = loss_spec(op.loss_fn)
        config = resolve_config(op.loss_fn, op.loss_fn_config)
        if not op.forward_only and not m.trainable:
            raise ModelServerError(f"{m.model_id!r} is a sampler: forward_backward needs a training client")
        if not op.data:
            raise ModelServerError("forward_backward needs at least one datum")
        adapter = self._adapter(m)
        p = _PreparedFB(m.model_id, seq_id, op, config, adapter)
        device = self.host.device
        for i, d in enumerate(op.data):
            ids = [int(t) for t in d.model_input]
            if not ids:
                raise ModelServerError(f"datum {i}: model_input is empty")
            if min(ids) < 0 or max(ids) >= self.vocab_size:
                raise ModelServerError(f"datum {i}: model_input token ids must be in [0, {self.vocab_size})")
            missing = [k for k in spec.inputs if k not in d.loss_fn_inputs]
            extra = sorted(set(d.loss_fn_inputs) - set(spec.inputs))
            if missing or extra:
                raise ModelServerError(
                    f"datum {i}: loss_fn {op.loss_fn!r} takes loss_fn_inputs {list(spec.inputs)}"
                    + (f"; missing {missing}" if missing else "")
                    + (f"; unexpected {extra}" if extra else "")
                )
            tensors: dict[str, Tensor] = {}
            for k in spec.inputs:
                t = torch.as_tensor(d.loss_fn_inputs[k])
                if t.shape != (len(ids),):
                    raise ModelServerError(
                        f"datum {i}: loss_fn_inputs[{k!r}] has shape {tuple(t.shape)}, "
                        f"expected ({len(ids)},) (one per model_input token)"
                    )
                tensors[k] = t
            target = tensors.pop("target_tokens")
            if target.is_floating_point() or target.dtype == torch.bool:
                raise ModelServerError(f"datum {i}: target_tokens must be integers")
            if target.numel() and (int(target.min()) < 0 or int(target.max()) >= self.vocab_size):
                raise ModelServerError(f"datum {i}: target_tokens must be in [0, {self.vocab_size})")
            p.inputs.append(ids)
            p.targets.append(target.long())
            p.loss_inputs.append({k: v.to(device, torch.float32) for k, v in tensors.items()})
        return p

    def _run_forward_backward(self, batch: list[tuple[_Model, int, ForwardBackward]]) -> list[Outcome]:
        outcomes: dict[tuple[str, int], Outcome] = {}
        prepared: list[_PreparedFB] = []
        for m, seq_id, op in batch:
            try:
                prepared.append(self._prepare(m, seq_id, op))
            except ModelServerError as exc:
                outcomes[(m.model_id, seq_id)] = Outcome(m.model_id, seq_id, error=exc)
        if prepared:
            try:
                for p, result in zip(prepared, self._forward_backward(prepared), strict=True):
                    outcomes[(p.model_id, p.seq_id)] = Outcome(p.model_id, p.seq_id, result=result)
            except Exception as exc:  # the pass failed as a whole (out of memory...): so did each call in it
                err = ModelServerError(f"forward_backward failed: {exc!r}", category="server")
                for p in prepared:
                    outcomes[(p.model_id, p.seq_id)] = Outcome(p.model_id, p.seq_id, error=err)
        return [outcomes[(m.model_id, seq_id)] for m, seq_id, _ in batch]

    def _forward_backward(self, prepared: list[_PreparedFB]) -> list[ForwardBackwardResult]:
        """One forward over every row of every call, each call's loss on its rows, one backward over the sum
        of the forward_backward calls' losses (forward-only calls contribute nothing)."""
        inputs = [x for p in prepared for x in p.inputs]
        targets = [t for p in prepared for t in p.targets]
        adapters = [p.adapter for p in prepared for _ in p.inputs]
        backward = any(not p.op.forward_only for p in prepared)
        with torch.set_grad_enabled(backward):
            lps = iter(token_logprobs(self.host, inputs, targets, adapters))
            results: list[ForwardBackwardResult] = []
            total: Tensor | None = None
            for p in prepared:
                outputs: list[dict[str, Tensor]] = []
                call_loss = torch.zeros((), device=self.host.device)
                for x in p.loss_inputs:
                    lp = next(lps)
                    el = elementwise_loss(p.op.loss_fn, lp, x, p.config)
                    call_loss = call_loss + el.sum()
                    outputs.append(
                        {"logprobs": lp.detach().float().cpu(), "elementwise_loss": el.detach().float().cpu()}
                    )
                if not p.op.forward_only:
                    total = call_loss if total is None else total + call_loss
                results.append(ForwardBackwardResult(outputs, {"loss:sum": float(call_loss.detach())}))
            if total is not None and total.requires_grad:
                total.backward()  # each adapter's .grad accumulates only its own rows' losses
        return results

    # ---- optimizer, state ----

    def _optim_step(self, m: _Model, adam: AdamParams) -> OptimStepResult:
        if not m.trainable:
            raise ModelServerError(f"{m.model_id!r} is a sampler: optim_step needs a training client")
        if not (adam.learning_rate >= 0 and 0 <= adam.beta1 < 1 and 0 <= adam.beta2 < 1 and adam.eps > 0):
            raise ModelServerError("adam_params: need learning_rate >= 0, 0 <= beta1, beta2 < 1, eps > 0")
        if adam.weight_decay < 0 or adam.grad_clip_norm < 0:
            raise ModelServerError("adam_params: weight_decay and grad_clip_norm must be >= 0 (0 = off)")
        adapter = self._adapter(m)
        assert adapter is not None
        params = adapter.parameters()
        max_norm = adam.grad_clip_norm if adam.grad_clip_norm > 0 else math.inf
        grads = [p for p in params if p.grad is not None]
        norm = float(torch.nn.utils.clip_grad_norm_(grads, max_norm)) if grads else 0.0
        for group in adapter.optimizer.param_groups:
            group.update(
                lr=adam.learning_rate,
                betas=(adam.beta1, adam.beta2),
                eps=adam.eps,
                weight_decay=adam.weight_decay,  # decoupled (AdamW): p -= lr * wd * p
            )
        adapter.optimizer.step()
        adapter.optimizer.zero_grad(set_to_none=True)
        adapter.steps += 1
        return OptimStepResult({"grad_norm:mean": norm, "learning_rate:mean": adam.learning_rate})

    def _save(self, m: _Model, op: SaveState) -> SaveStateResult:
        adapter = self._adapter(m)
        if adapter is None:
            raise ModelServerError(f"{m.model_id!r} is the base model: nothing to save")
        optimizer = m.trainable and not op.for_sampler
        adapter_io.save_adapter(
            adapter, op.uri, base_model=self.base_model, base_seed=self.seed, optimizer=optimizer
        )
        return SaveStateResult(op.uri)

    def _load(self, m: _Model, op: LoadState) -> LoadStateResult:
        if not m.trainable:
            raise ModelServerError(f"{m.model_id!r} is a sampler: load_state needs a training client")
        m.adapter = adapter_io.load_adapter(self.host, op.uri, optimizer=op.optimizer)
        m.config, m.spilled = m.adapter.config, None
        return LoadStateResult(op.uri)

    # ---- residency ----

    def _adapter(self, m: _Model) -> LoraAdapter | None:
        """The model's adapter, reloaded first if it was evicted."""
        self._touch(m)
        if m.adapter is None and m.spilled is not None:
            m.adapter = adapter_io.load_adapter(self.host, m.spilled, optimizer=True, grads=True)
            storage.remove_dir(m.spilled)
            m.spilled = None
        elif m.adapter is None and m.source_uri is not None:
            m.adapter = adapter_io.load_adapter(self.host, m.source_uri, optimizer=False)
        return m.adapter

    def _touch(self, m: _Model) -> None:
        m.last_used = next(self._clock)

    def resident(self) -> list[str]:
        return [mid for mid, m in self.models.items() if m.adapter is not None]

    def evict(self, model_id: str) -> None:
        """Move the adapter off the device: a training client's (with Adam state and pending gradients) to
        `spill_uri`; a sampler's is dropped and reloaded from where it was loaded."""
        m = self._model(model_id)
        if m.adapter is None:
            return
        if m.trainable:
            if self.spill_uri is None:
                raise ModelServerError("no spill_uri: training adapters cannot be evicted")
            uri = storage.join(self.spill_uri, urllib.parse.quote(model_id, safe=""))
            adapter_io.save_adapter(
                m.adapter, uri, base_model=self.base_model, base_seed=self.seed, optimizer=True, grads=True
            )
            m.spilled = uri
        m.adapter = None

    def _evict_past_limit(self, keep: set[str]) -> None:
        if self.max_resident is None:
            return
        idle = sorted(
            (m for m in self.models.values() if m.adapter is not None and m.model_id not in keep),
            key=lambda m: (bool(m.queue.pending), m.last_used),  # idle ones first, least recently used first
        )
        excess = len(self.resident()) - self.max_resident
        for m in idle[: max(excess, 0)]:
            self.evict(m.model_id)
