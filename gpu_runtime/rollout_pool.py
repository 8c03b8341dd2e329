"""Data-parallel rollout: N rollout workers (Ray actors) seen by the controller as one `Rollout`.

- `collect` splits the call's episodes into N contiguous parts of whole groups (a group = one prompt's
  samples; runs of equal group ids), as even as the group count allows, sends every part before waiting for
  any, and concatenates the results in part order: the merged batch holds the same groups in the same order
  whatever N is. Every part gets the call's torch seed and the step-wide index of its first episode: each
  request samples with a seed of (torch seed, episode index, turn) (`collector.request_seed`), so N workers
  draw the very tokens one worker draws (with the engines that seed per request: our decode loop and vLLM;
  up to float differences of the forward between batch shapes).
- `load_weights` puts the state dict into Ray's object store once and every worker loads it from there
  (one copy per node), all at once; it returns when every worker has them.
"""

from __future__ import annotations

from typing import Any

import torch

from gpu_runtime.batch import Sample


def split_groups(group_ids: list[int], n: int) -> list[range]:
    """`n` contiguous index ranges over the episodes, each a run of whole groups (consecutive equal group
    ids), the group counts as even as can be; an empty range for a part with no group (n > groups)."""
    starts = [i for i, g in enumerate(group_ids) if i == 0 or g != group_ids[i - 1]]
    bounds = [*starts, len(group_ids)]
    q, r = divmod(len(starts), n)
    parts, first = [], 0
    for k in range(n):
        last = first + q + (k < r)
        parts.append(range(bounds[first], bounds[last]) if last > first else range(0))
        first = last
    return parts


class RolloutPool:
    """The `Rollout` interface over several rollout worker actors (`gpu_runtime.workers.RolloutWorker`)."""

    def __init__(self, ray: Any, actors: list[Any]) -> None:
        if not actors:
            raise ValueError("a rollout pool needs at least one worker")
        self.ray, self.actors = ray, actors
        self._errors: list[str] = []

    def collect(
        self, seeds: list[int], group_ids: list[int], torch_seed: int, greedy: bool = False
    ) -> tuple[list[Sample], dict[str, float]]:
        if len(seeds) != len(group_ids):
            raise ValueError(f"{len(seeds)} seeds but {len(group_ids)} group ids")
        parts = split_groups(group_ids, len(self.actors))
        calls = [
            (
                a,
                a.collect.remote(
                    [seeds[i] for i in p], [group_ids[i] for i in p], torch_seed, greedy, p.start
                ),
            )
            for a, p in zip(self.actors, parts, strict=True)
            if len(p)
        ]
        results = self.ray.get([ref for _, ref in calls])  # in part order, whatever finished first
        errors = self.ray.get([a.episode_errors.remote() for a, _ in calls])
        samples: list[Sample] = []
        stats: dict[str, float] = {}
        for part_samples, part_stats in results:
            samples.extend(part_samples)
            for k, v in part_stats.items():
                stats[k] = stats.get(k, 0.0) + v
        self._errors = sorted({e for errs in errors for e in errs})[:5]
        return samples, stats

    def load_weights(self, state_dict: dict[str, torch.Tensor]) -> None:
        ref = self.ray.put(state_dict)
        self.ray.get([a.load_weights.remote(ref) for a in self.actors])

    def episode_errors(self) -> list[str]:
        """Why the last collection's failed episodes failed (a few distinct reasons, from every worker)."""
        return list(self._errors)
