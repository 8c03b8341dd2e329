"""The two kinds of worker the controller drives, as plain classes (Ray wraps them as actors unchanged).

- `RankWorker`: one trainer rank (joins the gloo/NCCL process group when world_size > 1).
- `RolloutWorker`: a rollout engine plus the environment and its protocol; collects episodes.
"""

from __future__ import annotations

import gc
import os
import sys
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.constants import default_pg_timeout

from gpu_runtime.algorithms import LossNorm
from gpu_runtime.batch import Sample
from gpu_runtime.data.prompts import load_prompt_rows
from gpu_runtime.envs import REMOTE_SECRET_VAR, env_factory, protocol_kind
from gpu_runtime.models import load_model, torch_dtype
from gpu_runtime.rollout.base import RolloutEngine, SamplingParams
from gpu_runtime.rollout.collector import episode_to_sample, run_episodes
from gpu_runtime.rollout.decode import StaticDecodeEngine
from gpu_runtime.rollout.hf import HFEngine
from opentinker.egress import ALLOW_VAR, DENY_VAR
from opentinker.env.codec import HFChatCodec
from opentinker.env.protocol import Budget, protocol_for
from opentinker.spec import JobSpec


def configure_threads(spec: JobSpec) -> None:
    """CPU jobs: torch threads = the job's CPUs minus one (the driver, environment threads and Ray need a
    core). Oversubscribed OpenMP teams spin against each other: on 2 busy cores a tiny-qwen2 update measured
    0.4 s with 1 thread and 3-7 s with 2. Several trainer ranks split those threads.
    `OPENTINKER_TORCH_THREADS` overrides."""
    if torch.cuda.is_available() and spec.resources.gpus > 0:
        return
    res = spec.resources
    n = int(os.environ.get("OPENTINKER_TORCH_THREADS", max(1, (res.cpus - 1) // res.trainer_ranks)))
    torch.set_num_threads(n)


def job_device(spec: JobSpec) -> str:
    return "cuda" if spec.resources.gpus > 0 and torch.cuda.is_available() else "cpu"


ENGINE_ENV = "OPENTINKER_ROLLOUT_ENGINE"  # what `rollout.engine: auto` means: static (default), hf or vllm
ENGINES = ("static", "hf", "vllm")


def rollout_engine(
    model: torch.nn.Module,
    *,
    pad_id: int,
    device: str,
    choice: str = "auto",
    lora_adapter: dict[str, Any] | None = None,
) -> RolloutEngine:
    """The job spec's `rollout.engine`. auto: our decode loop (`StaticDecodeEngine`: static KV cache,
    CUDA-graph step on GPU), the fastest measured on the shapes we run (README, Performance), or what
    OPENTINKER_ROLLOUT_ENGINE names. Our loop needs full attention in every layer: other models get HFEngine,
    the reference implementation. vllm: `VLLMEngine`, vLLM's own copy of the weights, synced after every
    update (`lora_adapter`: the job's LoRA settings, to serve the adapter as a vLLM adapter instead of merged
    weights)."""
    if choice == "auto":
        choice = os.environ.get(ENGINE_ENV, "static")
        if choice not in ENGINES:
            raise ValueError(f"{ENGINE_ENV} must be one of {', '.join(ENGINES)}, not {choice!r}")
    if choice == "vllm":
        from gpu_runtime.rollout.vllm import VLLMEngine  # lazy: the optional `vllm` extra

        return VLLMEngine(model, lora=lora_adapter)
    if choice == "static" and StaticDecodeEngine.supports(model):
        return StaticDecodeEngine(model, pad_id=pad_id, device=device)
    return HFEngine(model, pad_id=pad_id, device=device)


def open_store(host: str, world_size: int) -> dist.TCPStore:
    """Rank 0's rendezvous store, listening on a port the OS gives it as it binds (port 0): the port the
    followers are told is already held here, so nothing can take it between its choice and the bind (a port
    picked free first and bound later, as torchrun's `MASTER_PORT` picking does, can be taken meanwhile).
    It listens on every interface of this node; `host` is the address the followers reach it at."""
    # As long as followers may take to join through it: the process group's default, not the store's 300 s.
    return dist.TCPStore(
        host, 0, world_size, is_master=True, timeout=default_pg_timeout, wait_for_workers=False
    )


class RankWorker:
    """One trainer rank. With a `master` address (Ray and multi-process launches) it joins a process group:
    gloo on CPU when there are several ranks; NCCL on GPU, even for one rank, so a single-GPU job runs the
    same FSDP2 code path as a multi-GPU one. In-process (`LocalGroup`, no master) it never does. Rank 0 passes
    the `store` it opened at `master` (`open_store`); the followers connect to it."""

    def __init__(
        self,
        spec_json: str,
        rank: int = 0,
        world_size: int = 1,
        master: str | None = None,
        store: dist.Store | None = None,
    ) -> None:
        self._start(spec_json, rank, world_size, master, store)

    def _start(
        self, spec_json: str, rank: int, world_size: int, master: str | None, store: dist.Store | None
    ) -> None:
        spec = JobSpec.model_validate_json(spec_json)
        device = job_device(spec)
        if master is not None and (world_size > 1 or device == "cuda") and not dist.is_initialized():
            backend = "nccl" if device == "cuda" else "gloo"
            addr, port = master.rsplit(":", 1)
            os.environ.update(MASTER_ADDR=addr, MASTER_PORT=port)
            if store is None:
                # A follower connects to rank 0's store. (Rank 0 without one binds `port` here, the old way:
                # tests that pick a port themselves.) Every rank passes a store, so all see the same keys:
                # `env://` would prefix them ("default_pg/"), a store passed in is used as it is.
                store = dist.TCPStore(
                    addr, int(port), world_size, is_master=rank == 0, timeout=default_pg_timeout
                )
            dist.init_process_group(backend, store=store, rank=rank, world_size=world_size)
        elif world_size > 1 and not dist.is_initialized():
            raise ValueError("several trainer ranks need a master address")
        from gpu_runtime.trainer import Trainer  # after the process group exists: Trainer shards on init

        configure_threads(spec)
        self.trainer = Trainer(spec, device=device)
        self.adapter_sync = spec.model.lora is not None and spec.rollout.vllm_lora == "adapter"

    def runtime_info(self) -> dict[str, Any]:
        """What this rank runs on (the GPU smoke test checks it)."""
        t = self.trainer
        return {
            "device": str(next(t.model.parameters()).device),
            "backend": dist.get_backend() if dist.is_initialized() else None,
            "sharded": t.sharded,
            "param_dtype": str(next(t.model.parameters()).dtype),
            "mixed_precision": t.amp,
        }

    def logprobs(
        self, samples: list[Sample], n_micro: int, old: bool, ref: bool, values: bool
    ) -> list[dict[str, Any]]:
        self.trainer.logprobs(samples, n_micro, old=old, ref=ref, values=values)
        return [
            {"old_logprobs": s.old_logprobs, "ref_logprobs": s.ref_logprobs, "values": s.values}
            for s in samples
        ]

    def train_minibatch(self, samples: list[Sample], norm: LossNorm, n_micro: int) -> dict[str, float]:
        return self.trainer.train_minibatch(samples, norm, n_micro)

    def train_critic(self, samples: list[Sample], norm: LossNorm, n_micro: int) -> dict[str, float]:
        return self.trainer.train_critic(samples, norm, n_micro)

    def full_state_dict(self) -> dict[str, torch.Tensor] | None:
        sd = self.trainer.full_state_dict()  # collective: every rank calls it
        return sd if self.trainer.rank == 0 else None

    def rollout_state_dict(self) -> dict[str, torch.Tensor] | None:
        """What the rollout engines load after an update: the full weights (LoRA merged), or the adapter's
        tensors when the engine serves it as an adapter (spec `rollout.vllm_lora: adapter`). Collective."""
        t = self.trainer
        if not self.adapter_sync:
            return self.full_state_dict()
        sd = t.adapter_state_dict()
        sd = {k: v.full_tensor() if hasattr(v, "full_tensor") else v for k, v in sd.items()}  # FSDP: gathered
        return {k: v.cpu() for k, v in sd.items()} if t.rank == 0 else None

    def checkpoint_payload(self) -> dict[str, Any] | None:
        """Everything a checkpoint needs, gathered to rank 0 (collective)."""
        t = self.trainer
        adapter = t.cfg.lora is not None
        weights = t.adapter_state_dict() if adapter else t.full_state_dict()
        state = t.train_state()
        if t.rank != 0:
            return None
        weights = {k: v.cpu() for k, v in weights.items()}  # safetensors writes host memory
        base = t.model.get_base_model() if adapter else t.model
        return {
            "weights": weights,
            "adapter": adapter,
            "state": state,
            "config": base.config,
            "tokenizer": t.tokenizer,
            "peft_config": t.model.peft_config["default"] if adapter else None,
        }

    def load(self, weights: dict[str, torch.Tensor], state: dict[str, Any], adapter: bool) -> None:
        self.trainer.load(weights, state, adapter=adapter)

    def param_checksum(self) -> float:
        sd = self.trainer.full_state_dict()
        return float(sum(v.double().sum() for v in sd.values())) if self.trainer.rank == 0 else 0.0

    def shutdown(self) -> None:
        if dist.is_initialized():
            dist.barrier()
            # The trainer's FSDP mesh holds the process group: dropped and collected here, the group's gloo
            # threads stop while the interpreter is whole. Left to interpreter teardown, they could abort the
            # process ("terminate called without an active exception", SIGABRT) after its work was done.
            del self.trainer
            gc.collect()
            dist.destroy_process_group()


class RolloutWorker:
    def __init__(
        self, spec_json: str, env_secret: str | None = None, egress_env: dict[str, str] | None = None
    ) -> None:
        if env_secret:  # a Ray actor: the driver's secret (from its bootstrap) is not in this process's env
            os.environ[REMOTE_SECRET_VAR] = env_secret
        for key in (ALLOW_VAR, DENY_VAR):  # a Ray actor: the driver's egress policy, never a looser one
            if egress_env is not None:
                os.environ.pop(key, None)
                if egress_env.get(key):
                    os.environ[key] = egress_env[key]
        spec = JobSpec.model_validate_json(spec_json)
        assert spec.environment is not None
        configure_threads(spec)
        self.spec = spec
        device = job_device(spec)
        # bf16 sampling on GPU (dtype "auto"); the trainer's mixed-precision log-probs are compared with these
        # by the log-prob gap metric, and truncated importance sampling (`tis_cap`) corrects for the mismatch.
        loaded = load_model(
            spec.model.base, seed=spec.seed, dtype=torch_dtype(spec.model.dtype, device=device)
        )
        self.tokenizer = loaded.tokenizer
        adapter = spec.rollout.vllm_lora == "adapter"  # the spec: only with engine vllm and model.lora
        self.engine = rollout_engine(
            loaded.model,
            pad_id=self.tokenizer.pad_token_id,
            device=device,
            choice=spec.rollout.engine,
            lora_adapter=spec.model.lora.model_dump() if adapter and spec.model.lora else None,
        )
        prompts = spec.dataset if spec.kind.value != "sft" else None  # rl/eval: the dataset's prompts
        rows = load_prompt_rows(prompts) if prompts is not None else None
        self.make_env = env_factory(spec.environment, rows)
        self.codec = HFChatCodec(self.tokenizer)
        kind = protocol_kind(self.make_env)
        a = spec.algorithm
        turns = 1 if kind == "single-turn" else 8
        self.protocol = protocol_for(kind, Budget(max_turns=turns, max_new_tokens=a.max_new_tokens))

    def sampling(self, *, greedy: bool = False) -> SamplingParams:
        a = self.spec.algorithm
        return SamplingParams(
            max_new_tokens=a.max_new_tokens,
            temperature=a.temperature,
            top_p=a.top_p,
            stop_ids=tuple(sorted(self.codec.stop_ids)),
            greedy=greedy,
        )

    def collect(
        self, seeds: list[int], group_ids: list[int], torch_seed: int, greedy: bool = False, first: int = 0
    ) -> tuple[list[Sample], dict[str, float]]:
        """`first`: the step-wide index of `seeds[0]` (this worker's part of the step): each request samples
        with a seed of (torch_seed, episode index, turn), so the tokens do not depend on the split."""
        torch.manual_seed(torch_seed)  # sampling depends only on (job seed, step): resume is exact
        episodes = run_episodes(
            self.make_env, self.protocol, self.codec, self.engine, self.sampling(greedy=greedy), seeds, first
        )
        samples = [
            episode_to_sample(ep, g) for ep, g in zip(episodes, group_ids, strict=True) if not ep.failed
        ]
        stats = {
            "episodes/failed": float(sum(ep.failed for ep in episodes)),
            "episodes/total": float(len(seeds)),
        }
        self.errors = sorted({ep.error or "" for ep in episodes if ep.failed})[:5]
        for reason in self.errors:
            print(f"episode failed: {reason}", file=sys.stderr, flush=True)  # the job's log keeps why
        return samples, stats

    def episode_errors(self) -> list[str]:
        """Why the last collection's failed episodes failed (a few distinct reasons)."""
        return list(getattr(self, "errors", []))

    def load_weights(self, state_dict: dict[str, torch.Tensor]) -> None:
        self.engine.load_weights(state_dict)
