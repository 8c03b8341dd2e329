"""Worker groups: the controller's typed way to its trainer ranks and its rollout worker(s).

`WorkerGroup` has one method per thing a step asks of the trainer ranks; each runs `RankWorker`'s method of
that name on every rank at once, rank r with its own arguments (FSDP's collectives need every rank in the
same call). Implementations differ only in how a call reaches the ranks (`_on_ranks`): in this process
(`LocalGroup`, world size 1: fast tests and small jobs) or as Ray actors placed with a placement group
(`RayGroup`). `rollout` is the rollout worker (or a data-parallel pool of them) as the `Rollout` interface,
or None (SFT: nothing to roll out).
"""

from __future__ import annotations

import os
import socket
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import Any, Protocol, TypeVar, cast

import torch

from gpu_runtime import placement
from gpu_runtime.algorithms import LossNorm
from gpu_runtime.batch import Sample
from gpu_runtime.envs import REMOTE_SECRET_VAR, egress_env
from gpu_runtime.rollout_pool import RolloutPool
from gpu_runtime.workers import RankWorker, RolloutWorker, open_store
from opentinker.spec import JobSpec

T = TypeVar("T")
# After a rank's error, how long the other ranks' calls are watched for a rank's death: a peer killed inside a
# collective shows at the survivors at once as a gloo error ("Connection closed by peer"), before Ray reports
# the dead actor; the job is then lost (re-queued), not failed. A rank's own error costs this much delay.
LOSS_GRACE_S = 15.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Rollout(Protocol):
    """What the controller asks of a rollout worker (`RolloutWorker` has these methods)."""

    def collect(
        self, seeds: list[int], group_ids: list[int], torch_seed: int, greedy: bool = False
    ) -> tuple[list[Sample], dict[str, float]]: ...

    def load_weights(self, state_dict: dict[str, torch.Tensor]) -> None: ...

    def episode_errors(self) -> list[str]: ...


class _Blocking:
    """A Ray actor called like the object it wraps: each call waits for its result."""

    def __init__(self, ray: Any, actor: Any) -> None:
        self._ray, self._actor = ray, actor

    def __getattr__(self, name: str) -> Callable[..., Any]:
        method = getattr(self._actor, name)
        return lambda *args: self._ray.get(method.remote(*args))


def blocking(ray: Any, actor: Any, cls: type[T]) -> T:
    """A Ray actor of class `cls`, typed as `cls`: its methods are called as the class's, and wait."""
    return cast(T, _Blocking(ray, actor))


class WorkerGroup(ABC):
    world_size: int
    rollout: Rollout | None

    @abstractmethod
    def _on_ranks(self, method: Callable[..., T], per_rank: Sequence[tuple[Any, ...]]) -> list[T]:
        """`method` (of `RankWorker`) on every rank at once, rank r with `per_rank[r]`: their results."""

    def _on_every_rank(self, method: Callable[..., T], *args: Any) -> list[T]:
        return self._on_ranks(method, [args for _ in range(self.world_size)])

    def logprobs(
        self, shards: list[list[Sample]], n_micro: int, *, old: bool, ref: bool, values: bool
    ) -> list[list[dict[str, Any]]]:
        """Frozen old / reference log-probs and critic values of each rank's shard, before any update."""
        return self._on_ranks(RankWorker.logprobs, [(sh, n_micro, old, ref, values) for sh in shards])

    def train_minibatch(
        self, shards: list[list[Sample]], norm: LossNorm, n_micro: int
    ) -> list[dict[str, float]]:
        """One optimizer step of the policy over the mini-batch; each rank's training sums."""
        return self._on_ranks(RankWorker.train_minibatch, [(sh, norm, n_micro) for sh in shards])

    def train_critic(
        self, shards: list[list[Sample]], norm: LossNorm, n_micro: int
    ) -> list[dict[str, float]]:
        return self._on_ranks(RankWorker.train_critic, [(sh, norm, n_micro) for sh in shards])

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """The full policy weights, gathered to rank 0 (collective)."""
        sd = self._on_every_rank(RankWorker.full_state_dict)[0]
        assert sd is not None  # rank 0 holds them
        return sd

    def rollout_state_dict(self) -> dict[str, torch.Tensor]:
        """What the rollout engines load (`RankWorker.rollout_state_dict`), on rank 0 (collective)."""
        sd = self._on_every_rank(RankWorker.rollout_state_dict)[0]
        assert sd is not None  # rank 0 holds them
        return sd

    def checkpoint_payload(self) -> dict[str, Any]:
        payload = self._on_every_rank(RankWorker.checkpoint_payload)[0]
        assert payload is not None  # rank 0 holds it
        return payload

    def load(self, weights: dict[str, torch.Tensor], state: dict[str, Any], adapter: bool) -> None:
        self._on_every_rank(RankWorker.load, weights, state, adapter)

    def runtime_info(self) -> list[dict[str, Any]]:
        return self._on_every_rank(RankWorker.runtime_info)

    def leave_process_group(self) -> None:
        self._on_every_rank(RankWorker.shutdown)

    def shutdown(self) -> None:  # noqa: B027 (optional hook: an in-process group has nothing to release)
        pass


class LocalGroup(WorkerGroup):
    """World size 1, in this process: no Ray, no process group."""

    def __init__(self, spec: JobSpec, *, rollout: bool = True) -> None:
        # rollout=False: the trainer only (a multi-agent job's policies share one rollout worker).
        if spec.resources.rollout_workers > 1 and rollout:
            raise ValueError("resources.rollout_workers > 1 needs Ray: run the job with --ray")
        js = spec.model_dump_json()
        self.ranks = [RankWorker(js)]
        # SFT without an environment has nothing to roll out.
        self.rollout = RolloutWorker(js) if spec.environment is not None and rollout else None
        self.world_size = 1

    def _on_ranks(self, method: Callable[..., T], per_rank: Sequence[tuple[Any, ...]]) -> list[T]:
        return [method(w, *args) for w, args in zip(self.ranks, per_rank, strict=True)]


class RankLost(RuntimeError):
    """A trainer rank's process is gone (killed, or its node lost): the job is lost like a killed runtime,
    and the platform re-queues it (`gpu_runtime.cli.run_job`), as for a dead spawned rank (`ranks.py`)."""


class RayRank(RankWorker):
    """A trainer rank as a Ray actor, started in two calls: rank 0 first `listen`s (opens the rendezvous store
    on its node, on a port the OS gives it as it binds, and answers `host:port`), then every rank `join`s
    the process group there. A rendezvous port found free first and bound later could be taken between."""

    def __init__(self, spec_json: str, rank: int, world_size: int) -> None:
        self._args = (spec_json, rank, world_size)
        self._store: Any = None

    def listen(self) -> str:
        import ray

        host = ray.util.get_node_ip_address()  # this node's address as the cluster knows it
        self._store = open_store(host, self._args[2])
        return f"{host}:{self._store.port}"

    def join(self, master: str | None) -> dict[str, Any]:
        """Join the process group at `master` and build the trainer; where this rank runs."""
        import ray

        self._start(*self._args, master, self._store)
        ctx = ray.get_runtime_context()
        return {"node_id": ctx.get_node_id(), "address": ray.util.get_node_ip_address(), "pid": os.getpid()}


def _rank_failure(ray: Any, rank: int, error: Exception) -> Exception:
    """What a rank's failed call means for the job: its process gone (an actor error: killed, out of memory,
    node lost) is `RankLost`; an exception it raised fails the job with that exception."""
    if isinstance(error, ray.exceptions.RayActorError):
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        return RankLost(f"trainer rank {rank} was lost: {first[:300]}")
    return error


class RayGroup(WorkerGroup):
    """Trainer ranks and the rollout workers as Ray actors in one placement group (`gpu_runtime.placement`:
    a bundle per rank, then one per rollout worker; `resources.placement` packs them on few nodes or spreads
    them across nodes). The ranks meet at rank 0's node address and the port its store listens on
    (`RayRank`). Several rollout workers (`resources.rollout_workers`) are one `Rollout` to the controller
    (`gpu_runtime.rollout_pool`). A rank that fails a call ends the job at once (`RankLost` when its process
    is gone), however long the others would wait in a collective for it."""

    def __init__(
        self, spec: JobSpec, world_size: int, *, rollout: bool = True, cpus: float | None = None
    ) -> None:
        # rollout=False: trainer ranks only (a multi-agent job's policies share one rollout worker).
        # cpus: this group's share of the job's admitted CPUs (a multi-agent job's policy: the job's CPUs
        # split between its trained policies), else all of `resources.cpus`.
        import ray
        from ray.util.placement_group import placement_group, remove_placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        self.ray = ray
        self.world_size = world_size
        res = spec.resources
        n_workers = res.rollout_workers if spec.environment is not None and rollout else 0
        self.plan = plan = placement.plan(
            gpus=res.gpus,
            world_size=world_size,
            rollout_workers=n_workers,
            # The job's admitted CPUs, not what the shared cluster has free (others' share). The Ray driver's
            # entrypoint (this process) holds only a token share then (workers/drivers/ray.py).
            cpus=res.cpus if cpus is None else cpus,
        )
        bundles = plan.bundles
        self.pg = placement_group(bundles, strategy=placement.STRATEGIES[res.placement])
        try:
            ray.get(self.pg.ready(), timeout=120)
        except ray.exceptions.GetTimeoutError:
            remove_placement_group(self.pg)
            raise RuntimeError(
                f"the cluster could not place {bundles} ({res.placement}) within 120 s; "
                f"free now: {ray.available_resources()}"
            ) from None

        def strategy(i: int) -> PlacementGroupSchedulingStrategy:
            return PlacementGroupSchedulingStrategy(self.pg, placement_group_bundle_index=i)

        def opts(i: int, share: float = 1.0) -> dict[str, Any]:
            b = bundles[i]
            return dict(
                num_cpus=b["CPU"] * share, num_gpus=b.get("GPU", 0) * share, scheduling_strategy=strategy(i)
            )

        js = spec.model_dump_json()
        rank_cls = ray.remote(RayRank)
        worker_cls = ray.remote(RolloutWorker)
        half = 0.5 if plan.colocate else 1.0
        self._failed = False  # a call failed: the ranks may be inside a collective, not to be left in order
        self.ranks = [
            rank_cls.options(**opts(r, half if r == 0 else 1.0)).remote(js, r, world_size)
            for r in range(world_size)
        ]
        self.rollout_actors = [
            worker_cls.options(**opts(plan.worker_bundle(world_size, i), half))
            # An argument, not the actor's runtime_env (readable through the cluster's API like the job's).
            .remote(js, os.environ.get(REMOTE_SECRET_VAR), egress_env())
            for i in range(n_workers)
        ]
        try:
            # A process group only when RankWorker makes one (several ranks, or NCCL on a GPU).
            needs_master = world_size > 1 or res.gpus > 0
            self.master: str | None = self._wait([self.ranks[0].listen.remote()])[0] if needs_master else None
        except BaseException:
            self._failed = True
            self.shutdown()
            raise
        # Awaited at the first call (or `placed`): meanwhile the ranks build their trainers while the caller
        # goes on (a multi-agent job starts the next policy's ranks).
        self._joining: list[Any] | None = [a.join.remote(self.master) for a in self.ranks]
        self._placed: list[dict[str, Any]] = []
        self.rollout = RolloutPool(ray, self.rollout_actors) if self.rollout_actors else None

    @property
    def placed(self) -> list[dict[str, Any]]:
        """Where each rank runs (node id, node address, pid), once they joined: the job's log says it."""
        if self._joining is not None:  # an actor runs its calls in order: this only raises a failed join
            joining, self._joining = self._joining, None
            self._placed = self._wait(joining)
        return self._placed

    def _on_ranks(self, method: Callable[..., T], per_rank: Sequence[tuple[Any, ...]]) -> list[T]:
        self.placed  # noqa: B018 (every rank joined; else the join's failure, not a later call's)
        # Every rank's call is sent before any result is awaited: the ranks meet in the same collectives.
        refs = [
            getattr(a, method.__name__).remote(*args) for a, args in zip(self.ranks, per_rank, strict=True)
        ]
        return cast(list[T], self._wait(refs))

    def _wait(self, refs: list[Any]) -> list[Any]:
        """The results of one call on ranks 0..len(refs)-1. The first to fail ends the wait at once: the
        others may be waiting for it in a collective (gloo's timeout: 30 minutes)."""
        ray = self.ray
        index = {ref: r for r, ref in enumerate(refs)}
        results: list[Any] = [None] * len(refs)
        pending = list(refs)
        while pending:
            (ready,), pending = ray.wait(pending, num_returns=1)
            try:
                results[index[ready]] = ray.get(ready)
            except Exception as e:
                self._failed = True
                failure = _rank_failure(ray, index[ready], e)
                if failure is e:  # caused by a peer that died under it? Then that death is the news.
                    failure = self._lost_meanwhile(pending, index) or e
                if failure is e:
                    raise
                raise failure from e
        return results

    def _lost_meanwhile(self, pending: list[Any], index: dict[Any, int]) -> RankLost | None:
        """A rank lost among the calls still `pending`, as Ray reports it within `LOSS_GRACE_S`."""
        ray = self.ray
        deadline = time.monotonic() + LOSS_GRACE_S
        while pending and (left := deadline - time.monotonic()) > 0:
            ready, pending = ray.wait(pending, num_returns=1, timeout=left)
            if not ready:
                break
            try:
                ray.get(ready[0])
            except Exception as e:
                lost = _rank_failure(ray, index[ready[0]], e)
                if isinstance(lost, RankLost):
                    return lost
        return None

    def shutdown(self) -> None:
        from ray.util.placement_group import remove_placement_group

        try:
            if not self._failed:  # after a failed call the others may be inside its collective: killed
                self.leave_process_group()
        finally:
            for a in [*self.ranks, *self.rollout_actors]:
                self.ray.kill(a)
            remove_placement_group(self.pg)
