"""Asynchronous (off-policy) RL: later steps' rollouts run while the trainer updates (spec
`algorithm.async_rollout: {max_staleness: s}`).

One background thread owns the rollout worker and runs its jobs in order; a job is "load these weights (if
any), then collect step j's batch". At the start of step k the controller `take`s step k's batch: the job for
step k+s is queued first, with the trainer's weights as they are then (version k-1 = k-1 updates applied),
then the call waits for step k's batch. Step k therefore trains on episodes sampled by version
max(first, k-s) - 1 while the trainer is at k-1: staleness min(k - first, s) <= s. The schedule, not timing,
fixes which weights sample which step, so an async run is reproducible and resumes exactly: a checkpoint
after step k waits for the batches already queued and stores them (`export` / `restore`), the resumed run
trains on those instead of sampling them again from weights it no longer has.

The loss corrects for the lag with the truncated importance weight min(pi_old / pi_behaviour, tis_cap) of
`policy_loss`: pi_behaviour is the rollout engine's own log-prob of each sampled token (recorded at sampling
time, by the old weights), pi_old the trainer's before this step's update (the proximal policy of decoupled
PPO, Hilton et al. 2021), so the clip still bounds each update around the current weights.

With an in-process rollout worker (`LocalGroup`) the thread shares the process with the trainer: torch ops
release the GIL, so rollout and update overlap on two cores; each thread's ops run their own team of the
job's torch thread count (`configure_threads`: the job's CPUs minus one), so a 2-CPU job keeps two cores busy.
They share torch's global RNG, which the rollout reseeds per step and samples from (HF generate's
multinomial, the static decode loop's seed draw): the trainer must not draw from it, or runs would depend
on timing and resume inexactly. It draws from it for dropout only (in train mode), so an in-process async
job refuses a model with any dropout (`dropout_sources`: LoRA's, a registry model's resid/attn/hidden
dropout). Giving the rollout its own torch.Generator instead is not possible for HF generate (takes none).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import torch

T = TypeVar("T")
Weights = dict[str, torch.Tensor]


def dropout_sources(model: torch.nn.Module) -> list[str]:
    """Where `model`, in train mode, draws from torch's global RNG: dropout modules with p > 0 (GPT-2's
    resid/embd/attn dropout, LoRA's) and dropout that HF attention applies as a function argument, read from
    the config (`attention_dropout`, `attn_pdrop`, ...). Empty: training draws nothing from it."""
    found = [
        f"{name} (p={m.p})"
        for name, m in model.named_modules()
        if isinstance(m, torch.nn.modules.dropout._DropoutNd) and m.p > 0
    ]
    to_dict = getattr(getattr(model, "config", None), "to_dict", None)  # an HF config
    items: dict[str, Any] = to_dict() if callable(to_dict) else {}
    for key, value in sorted(items.items()):
        if ("dropout" in key or "pdrop" in key) and type(value) in (int, float) and value > 0:
            found.append(f"config.{key}={value}")
    return found


@dataclass
class Batch(Generic[T]):
    value: T  # what `produce` returned for the step
    version: int  # updates the weights that sampled it had seen
    rollout_s: float  # how long producing it took, in the background


class RolloutPipeline(Generic[T]):
    """Step batches produced ahead of the trainer by one background thread, at most `max_staleness` ahead.

    `produce(step)` collects a step's batch on the rollout worker; `snapshot()` copies the trainer's current
    weights (main thread, between updates); `push(weights)` loads them into the rollout worker (background
    thread, between collections). `last_step`: nothing is produced beyond it."""

    def __init__(
        self,
        *,
        produce: Callable[[int], T],
        snapshot: Callable[[], Weights],
        push: Callable[[Weights], None],
        max_staleness: int,
        last_step: int,
    ) -> None:
        if max_staleness < 1:
            raise ValueError(f"max_staleness must be at least 1, not {max_staleness}")
        self.produce, self.snapshot, self.push = produce, snapshot, push
        self.max_staleness, self.last_step = max_staleness, last_step
        threads = torch.get_num_threads()
        self._pool = ThreadPoolExecutor(
            1, thread_name_prefix="otk-rollout", initializer=torch.set_num_threads, initargs=(threads,)
        )
        self._pending: dict[int, Future[Batch[T]]] = {}

    def _job(self, step: int, version: int, weights: Weights | None) -> Batch[T]:
        t0 = time.perf_counter()
        if weights is not None:
            self.push(weights)
        value = self.produce(step)
        return Batch(value, version, time.perf_counter() - t0)

    def _launch(self, step: int, version: int, weights: Weights | None) -> None:
        self._pending[step] = self._pool.submit(self._job, step, version, weights)

    def take(self, step: int) -> tuple[T, dict[str, float]]:
        """Step `step`'s batch (the trainer has applied `step - 1` updates), and the async metrics; first
        queues every batch up to `step + max_staleness` not queued yet, with the current weights."""
        version = step - 1
        weights: Weights | None = None
        for j in range(step, max(step, min(step + self.max_staleness, self.last_step)) + 1):
            if j not in self._pending:
                # Copied once per call (the trainer changes its weights in place from the next update on),
                # pushed once: the jobs after the first one sample with the weights it loaded.
                first = weights is None
                if first:
                    weights = self.snapshot()
                self._launch(j, version, weights if first else None)
        t0 = time.perf_counter()
        batch = self._pending.pop(step).result()
        wait = time.perf_counter() - t0
        staleness = version - batch.version
        assert 0 <= staleness <= self.max_staleness, (step, batch.version)  # the schedule guarantees it
        return batch.value, {
            "async/staleness": float(staleness),
            "async/behaviour_version": float(batch.version),
            "async/rollout_s": batch.rollout_s,  # the batch's own rollout time, mostly behind updates
            "async/wait_s": wait,  # what the step waited for it: the part not hidden
            "async/hidden_frac": max(0.0, 1.0 - wait / batch.rollout_s) if batch.rollout_s > 0 else 0.0,
        }

    def export(self) -> dict[int, Batch[T]]:
        """The batches queued for later steps, waited for (a checkpoint stores them: resume is exact)."""
        return {j: f.result() for j, f in sorted(self._pending.items())}

    def restore(self, batches: dict[int, Batch[T]]) -> None:
        """Queue batches produced before a checkpoint, as if their jobs had run in this process (but none
        staler than this job's bound: resumed with a smaller max_staleness, those are sampled again)."""
        for j, b in batches.items():
            if j > self.last_step or j - 1 - b.version > self.max_staleness:
                continue
            f: Future[Batch[T]] = Future()
            f.set_result(b)
            self._pending[j] = f

    def close(self) -> None:
        """Drop jobs not started; wait for the running one (it holds the rollout worker)."""
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._pending.clear()
