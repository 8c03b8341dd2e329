"""DAPO dynamic sampling (Yu et al. 2025, "DAPO", section 3.2): keep informative groups, refill the batch.

A group whose rewards are all equal (all right or all wrong) has zero advantage under a group baseline: it
adds no gradient, only dilutes the token-mean. DAPO drops such groups and keeps generating further batches of
prompts until `target` informative groups are collected, then trains on exactly that many. Generation is
bounded here by `max_rounds` (the paper's `max_num_gen_batches`); when the rounds run out the step trains on
the informative groups it has (possibly fewer than `target`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from gpu_runtime.batch import Sample


def informative_groups(samples: list[Sample]) -> list[int]:
    """Group ids, in order of first appearance, with at least two samples and unequal rewards."""
    rewards: dict[int, list[float]] = {}
    for s in samples:
        rewards.setdefault(s.group_id, []).append(s.reward)
    return [g for g, r in rewards.items() if len(r) > 1 and max(r) > min(r)]


@dataclass
class Refill:
    samples: list[Sample]  # the kept groups' samples (at most `target` groups)
    generated: list[Sample]  # every sample generated, all rounds (for reward metrics)
    rounds: int  # generation rounds used (1 = no refill was needed)
    groups_generated: int
    groups_kept: int

    def metrics(self) -> dict[str, float]:
        return {
            "dynamic_sampling/rounds": float(self.rounds),
            "dynamic_sampling/groups_generated": float(self.groups_generated),
            "dynamic_sampling/groups_kept": float(self.groups_kept),
            "batch/kept_samples": float(len(self.samples)),
        }


def collect_informative(
    collect_round: Callable[[int], list[Sample]], *, target: int, max_rounds: int
) -> Refill:
    """Call `collect_round(0)`, `collect_round(1)`, ... (each returns a fresh batch of groups, group ids
    unique across rounds) until `target` informative groups are kept or `max_rounds` rounds have run."""
    if target < 1 or max_rounds < 1:
        raise ValueError("target and max_rounds must be at least 1")
    generated: list[Sample] = []
    kept: list[int] = []
    n_groups = 0
    rounds = 0
    while rounds < max_rounds and len(kept) < target:
        batch = collect_round(rounds)
        rounds += 1
        generated += batch
        n_groups += len({s.group_id for s in batch})
        kept += [g for g in informative_groups(batch) if g not in kept][: target - len(kept)]
    keep = set(kept)
    samples = [s for s in generated if s.group_id in keep]
    return Refill(samples, generated, rounds, n_groups, len(kept))
