"""Collect episodes: the environment's interaction protocol drives each episode, the engine batches them.

`opentinker.env.protocol` runs one episode at a time through a `generate(prompt_ids, max_new)` callback. To
batch across episodes, each episode runs in its own thread and its generate call parks in `_Batcher`; when
every live episode is waiting, one batched `engine.generate` serves them all. Multi-turn episodes that finish
early simply leave the batch. Environments thus keep the exact same code path as in evaluation and inference.

Sampling noise is per request: request j of the episode with step-wide index i is sampled with the seed
`request_seed(base, i, j)`, `base` drawn from torch's global RNG when the collection starts (the rollout
worker seeds it from the job's seed and the step). A step's tokens thus depend neither on how its episodes
are split across rollout workers (`first`: the step-wide index of this call's first episode) nor on which
other requests share a batch, with the engines that seed per request (our decode loop, vLLM; not HFEngine).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import threading
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

import torch

from gpu_runtime.batch import Sample
from gpu_runtime.rollout.base import RolloutEngine, SamplingParams
from gpu_runtime.rollout_log import trace_of
from opentinker.env.base import Environment
from opentinker.env.protocol import Episode, Generation, StopReason, TurnProtocol
from opentinker.env.remote import WAITING


def request_seed(base: int, index: int, request: int) -> int:
    """The sampling seed of an episode's `request`-th generation (0, 1, ... per episode or game), a stable
    63-bit function of (base, step-wide episode index, request number)."""
    digest = hashlib.blake2b(repr(("rollout-request", base, index, request)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


class _Batcher:
    """Episode threads park their generate requests here; the calling thread serves them in batches.

    All torch work stays on the calling thread: torch ops issued from many short-lived threads each start an
    OpenMP team, and their spinning workers slowed the trainer's next update several-fold on 2 cores.
    Only the serving thread waits on the condition, and each episode waits on its own event: a shared
    `notify_all` woke every parked episode for every request, O(episodes^2) wake-ups that cost ~0.3 s per
    128-episode step on 2 cores (more than the batched decode itself).
    """

    def __init__(
        self,
        engine: RolloutEngine | Mapping[str, RolloutEngine],
        sampling: SamplingParams,
        n_episodes: int,
        first: int = 0,
    ) -> None:
        # One engine, or one per policy name (multi-agent: a role's request goes to its policy's engine).
        self.engines = dict(engine) if isinstance(engine, Mapping) else {"": engine}
        self.sampling = sampling
        self.cv = threading.Condition()  # the serving thread waits on it; episodes only notify
        self.active = n_episodes
        self.idle = 0  # live episodes waiting for something other than generation (a remote session slot)
        self.pending: dict[int, tuple[list[int], int, str]] = {}
        self.results: dict[int, Generation | BaseException] = {}
        self.ready: dict[int, threading.Event] = {}
        self.calls = 0
        # per-request sampling seeds (module docstring); drawn on the calling thread, before any episode
        self.base = int(torch.randint(0, 2**62, (1,)).item())
        self.first = first
        self.requests: dict[int, int] = {}  # episode index -> its generations so far

    def generate(self, key: int, prompt: list[int], max_new: int, policy: str = "") -> Generation:
        # `key` is the episode's index: an episode has at most one request in flight, and batches are ordered
        # by it (not by thread arrival), so sampling is reproducible for a given torch seed.
        done = threading.Event()
        with self.cv:
            self.pending[key] = (prompt, max_new, policy)
            self.ready[key] = done
            self.cv.notify()
        done.wait()
        with self.cv:
            out = self.results.pop(key)
        if isinstance(out, BaseException):  # one engine error, re-raised in every waiting episode's thread
            raise RuntimeError(f"rollout engine failed: {out!r}") from out
        return out

    @contextlib.contextmanager
    def waiting(self) -> Iterator[None]:
        """An episode's thread waits outside generation (for a remote environment's session slot): batches
        are served without it meanwhile."""
        with self.cv:
            self.idle += 1
            self.cv.notify()
        try:
            yield
        finally:
            with self.cv:
                self.idle -= 1

    def episode_done(self) -> None:
        with self.cv:
            self.active -= 1
            self.cv.notify()

    def serve(self) -> None:
        """Until every episode has ended: wait for all live episodes to be waiting, generate for them."""
        while True:
            with self.cv:
                self.cv.wait_for(
                    lambda: (
                        self.active == 0 or (self.pending and len(self.pending) >= self.active - self.idle)
                    )
                )
                if self.active == 0:
                    return
                batch, self.pending = self.pending, {}
            results = self._run(batch)
            with self.cv:
                self.results.update(results)
                events = [self.ready.pop(k) for k in results]
            for e in events:
                e.set()

    def _run(self, batch: dict[int, tuple[list[int], int, str]]) -> dict[int, Generation | BaseException]:
        self.calls += 1
        by_budget: dict[tuple[str, int], list[int]] = {}
        for key, (_, max_new, policy) in sorted(batch.items()):
            by_budget.setdefault((policy, max_new), []).append(key)
        results: dict[int, Generation | BaseException] = {}
        seeds = {}
        for key in batch:  # an episode has one request in flight: its count is this request's number
            n = self.requests.get(key, 0)
            seeds[key] = request_seed(self.base, self.first + key, n)
            self.requests[key] = n + 1
        for (policy, max_new), keys in by_budget.items():
            try:
                res = self.engines[policy].generate(
                    [batch[k][0] for k in keys],
                    replace(self.sampling, max_new_tokens=max_new),
                    [seeds[k] for k in keys],
                )
                for i, k in enumerate(keys):
                    results[k] = Generation(res.token_ids[i], res.logprobs[i], res.finished[i])
            except Exception as e:  # every waiting episode gets the error, none hangs
                for k in keys:
                    results[k] = e
        return results


def run_episodes(
    make_env: Callable[[], Environment],
    protocol: TurnProtocol,
    codec: object,
    engine: RolloutEngine,
    sampling: SamplingParams,
    seeds: list[int],
    first: int = 0,
) -> list[Episode]:
    """Run one episode per seed (repeat a seed for a group), batched; results in the order of `seeds`.
    `first`: the step-wide index of the first episode (a rollout worker's part of a step; sampling seeds)."""
    batcher = _Batcher(engine, sampling, len(seeds), first)

    def one(index: int) -> Episode:
        WAITING.set(batcher.waiting)
        try:
            env = make_env()
        except Exception as e:  # fails this episode; the batcher must not wait for it (it would hang)
            batcher.episode_done()
            return Episode(stop_reason=StopReason.ENV_ERROR, error=f"environment failed to start: {e!r}")
        try:
            gen = functools.partial(batcher.generate, index)
            return protocol.run(env, gen, codec, seeds[index])
        finally:
            batcher.episode_done()
            env.close()

    with ThreadPoolExecutor(max_workers=max(1, len(seeds))) as pool:
        futures = [pool.submit(one, i) for i in range(len(seeds))]
        batcher.serve()
        return [f.result() for f in futures]


def episode_to_sample(ep: Episode, group_id: int, game: int | None = None) -> Sample:
    """Token-level rewards: each turn's reward on the turn's last generated token (per-turn credit for
    token-level estimators); rewards without a turn go on the last generated token."""
    n = len(ep.token_ids)
    token_rewards = [0.0] * n
    gen_positions = [i for i, m in enumerate(ep.mask) if m]
    for t in ep.turns:
        if t.end > t.start:
            token_rewards[t.end - 1] += t.reward
        elif gen_positions:
            token_rewards[gen_positions[-1]] += t.reward
    if gen_positions:
        token_rewards[gen_positions[-1]] += ep.final_reward
    return Sample(
        token_ids=list(ep.token_ids),
        mask=list(ep.mask),
        rollout_logprobs=[float(x) for x in ep.logprobs],
        token_rewards=token_rewards,
        reward=float(ep.reward),
        group_id=group_id,
        role=ep.role,
        truncated=any(t.truncated for t in ep.turns),
        trace=trace_of(ep, game),
    )
