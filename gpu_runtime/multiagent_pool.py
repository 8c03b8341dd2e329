"""Data-parallel rollout for multi-agent jobs: N multi-agent rollout workers seen as one.

Each worker (`gpu_runtime.multiagent.MultiAgentRolloutWorker`, in this process or a Ray actor) holds an
engine per trained policy and plays its part of the step's games.

- `collect` splits the step's games into N contiguous parts of whole groups (`rollout_pool.split_groups`,
  as the single-policy pool does) and sends every part before waiting for any. A part knows the step-wide
  index of its first game and group: its requests sample with the seeds one worker would use, its games
  keep their step-wide index (rollout records) and its groups their seats (`rotate_roles`, `rule_mix`). Each
  policy's samples are concatenated in part order (the very list one worker returns); the statistics come
  back as tallies (`gpu_runtime.game_stats`), added up and divided once, so rates weigh each game or move
  alike however unevenly the games were split.
- `versus_rule` splits the evaluation's seeds likewise and adds up its per (policy, role) tallies.
- `collect_part` and `versus_rule_part` answer as a worker's do (tallies, failure reasons included): the
  controller calls those of a pool or of a lone worker alike, and logs why games failed in the job's process.
- `load_weights(policy, ...)`: the policy's new weights to every worker (into Ray's object store once),
  returning when every worker has them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from gpu_runtime.batch import Sample
from gpu_runtime.game_stats import Tally, merged, versus_rule_metrics
from gpu_runtime.rollout_pool import split_groups


def split_evenly(n: int, parts: int) -> list[range]:
    """`parts` contiguous ranges over n items, sizes as even as can be (empty ones when parts > n)."""
    q, r = divmod(n, parts)
    out, start = [], 0
    for k in range(parts):
        out.append(range(start, start + q + (k < r)))
        start = out[-1].stop
    return out


class MultiAgentRolloutPool:
    """Several multi-agent rollout workers; `ray` None: plain objects in this process, called in turn (tests
    and parity checks); else Ray actors, called all at once."""

    def __init__(self, workers: Sequence[Any], ray: Any = None) -> None:
        if not workers:
            raise ValueError("a rollout pool needs at least one worker")
        self.workers, self.ray = list(workers), ray

    def _each(self, calls: list[tuple[Any, str, tuple[Any, ...]]]) -> list[Any]:
        """Every (worker, method, args) call, their results in call order."""
        if self.ray is None:
            return [getattr(w, name)(*args) for w, name, args in calls]
        refs = [getattr(w, name).remote(*args) for w, name, args in calls]  # all sent before any awaited
        return self.ray.get(refs)

    def collect(
        self, seeds: list[int], group_ids: list[int], torch_seed: int, greedy: bool = False
    ) -> tuple[dict[str, list[Sample]], dict[str, float]]:
        per_policy, tally = self.collect_part(seeds, group_ids, torch_seed, greedy)
        return per_policy, tally.values()

    def collect_part(
        self,
        seeds: list[int],
        group_ids: list[int],
        torch_seed: int,
        greedy: bool = False,
        first: int = 0,
        first_group: int = 0,
    ) -> tuple[dict[str, list[Sample]], Tally]:
        """As the worker's `collect_part`: every worker's part, their tallies added (failure reasons too)."""
        if len(seeds) != len(group_ids):
            raise ValueError(f"{len(seeds)} seeds but {len(group_ids)} group ids")
        calls = []
        for w, p in zip(self.workers, split_groups(group_ids, len(self.workers)), strict=True):
            if len(p):
                before = len(dict.fromkeys(group_ids[: p.start]))  # as the worker indexes groups
                ids = [group_ids[i] for i in p]
                args = ([seeds[i] for i in p], ids, torch_seed, greedy, first + p.start, first_group + before)
                calls.append((w, "collect_part", args))
        per_policy: dict[str, list[Sample]] = {}
        tallies: list[Tally] = []
        for part, tally in self._each(calls):
            for policy, samples in part.items():
                per_policy.setdefault(policy, []).extend(samples)
            tallies.append(tally)
        return per_policy, merged(tallies)

    def versus_rule(self, seeds: list[int]) -> dict[str, float]:
        return versus_rule_metrics(self.versus_rule_part(seeds))

    def versus_rule_part(self, seeds: list[int], first: int = 0) -> dict[tuple[str, str], Tally]:
        calls = [
            (w, "versus_rule_part", ([seeds[i] for i in p], first + p.start))
            for w, p in zip(self.workers, split_evenly(len(seeds), len(self.workers)), strict=True)
            if len(p)
        ]
        total: dict[tuple[str, str], Tally] = {}
        for part in self._each(calls):
            for key, tally in part.items():
                total.setdefault(key, Tally()).merge(tally)
        return total

    def load_weights(self, policy: str, state_dict: dict[str, torch.Tensor]) -> None:
        ref = state_dict if self.ray is None else self.ray.put(state_dict)
        self._each([(w, "load_weights", (policy, ref)) for w in self.workers])
