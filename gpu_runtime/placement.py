"""Where a Ray job's actors go: one placement-group bundle per trainer rank, then one per rollout worker.

- **Bundles**: on GPUs each actor gets a GPU of its own; a single rollout worker shares rank 0's bundle when
  the job has no GPU to spare (`colocate`), so a one-GPU job fits on one GPU. Several rollout workers each
  need their own GPU. On CPUs the actors share the job's `resources.cpus` (what the scheduler admitted, not
  what the shared cluster has free) evenly.
- **Strategy**: spec `resources.placement`: `pack` (as few nodes as fit) or `spread` (across nodes, best
  effort: Ray's SPREAD places bundles round-robin over the nodes that have room).
- **Rendezvous**: the trainer ranks meet at rank 0's node address and a port its rendezvous store already
  listens on (`gpu_runtime.groups.RayRank`): the driver may be on another machine, so it can neither know
  that address nor probe a port there.
"""

from __future__ import annotations

from dataclasses import dataclass

STRATEGIES = {"pack": "PACK", "spread": "SPREAD"}


@dataclass(frozen=True)
class Plan:
    bundles: list[dict[str, float]]
    colocate: bool  # the (single) rollout worker shares rank 0's bundle, half each

    def worker_bundle(self, world_size: int, i: int) -> int:
        return 0 if self.colocate else world_size + i


def plan(*, gpus: int, world_size: int, rollout_workers: int, cpus: float) -> Plan:
    """The bundles of `world_size` trainer ranks and `rollout_workers` rollout workers (0: none)."""
    if gpus > 0:
        colocate = rollout_workers == 1 and gpus <= world_size
        if rollout_workers > 1 and gpus < world_size + rollout_workers:
            raise ValueError(
                f"{rollout_workers} rollout workers and {world_size} trainer ranks need a GPU each: "
                f"resources.gpus must be at least {world_size + rollout_workers}, not {gpus}"
            )
        n = world_size + (0 if colocate else rollout_workers)
        bundles: list[dict[str, float]] = [{"CPU": 1, "GPU": 1} for _ in range(n)]
        if colocate:
            bundles[0]["CPU"] += 1
        return Plan(bundles, colocate)
    n = world_size + rollout_workers
    # A bundle needs some CPU to be placed: never an empty one, however many actors share the job's CPUs.
    cpu = max(cpus / n, 0.01)
    return Plan([{"CPU": cpu} for _ in range(n)], False)
