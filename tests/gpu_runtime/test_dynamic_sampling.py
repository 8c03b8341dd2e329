"""DAPO dynamic sampling: flat groups are dropped and the batch is refilled with fresh prompts, bounded."""

from __future__ import annotations

import pytest

from gpu_runtime.batch import Sample
from gpu_runtime.controller import Controller, LocalGroup, derive_seed
from gpu_runtime.rollout.dynamic_sampling import collect_informative, informative_groups
from tests.gpu_runtime.conftest import small_spec
from tests.gpu_runtime.test_controller import ListSink


def _group(gid: int, rewards: list[float]) -> list[Sample]:
    return [
        Sample([1, 2, 3, 4 + i], [0, 0, 0, 1], [0.0] * 4, [0.0] * 4, r, gid) for i, r in enumerate(rewards)
    ]


def test_informative_groups_need_two_samples_and_unequal_rewards():
    samples = _group(7, [1, 1]) + _group(3, [0, 1]) + _group(5, [0.5]) + _group(9, [0, 0, 0.25])
    assert informative_groups(samples) == [3, 9]


def test_refill_keeps_exactly_the_target_number_of_informative_groups():
    # Round 0: groups 0-3, only 1 and 3 informative. Round 1: groups 4-7, 4, 6 and 7 informative: 4 and 6
    # fill the batch, 7 is left out (DAPO trains on exactly the batch size).
    rounds = {
        0: _group(0, [1, 1]) + _group(1, [0, 1]) + _group(2, [0, 0]) + _group(3, [1, 0]),
        1: _group(4, [0, 1]) + _group(5, [1, 1]) + _group(6, [1, 0]) + _group(7, [0, 1]),
        2: _group(8, [0, 1]),
    }
    calls = []

    def collect(r):
        calls.append(r)
        return rounds[r]

    out = collect_informative(collect, target=4, max_rounds=3)
    assert calls == [0, 1]  # stopped as soon as the batch was full
    assert sorted({s.group_id for s in out.samples}) == [1, 3, 4, 6]
    assert len(out.samples) == 8 and len(out.generated) == 16
    assert out.metrics() == {
        "dynamic_sampling/rounds": 2.0,
        "dynamic_sampling/groups_generated": 8.0,
        "dynamic_sampling/groups_kept": 4.0,
        "batch/kept_samples": 8.0,
    }


def test_refill_is_bounded_by_max_rounds():
    calls = []

    def collect(r):
        calls.append(r)
        return _group(2 * r, [1, 1]) + _group(2 * r + 1, [0, 1] if r == 1 else [0, 0])

    out = collect_informative(collect, target=2, max_rounds=3)
    assert calls == [0, 1, 2]
    assert out.rounds == 3 and out.groups_generated == 6 and out.groups_kept == 1
    assert {s.group_id for s in out.samples} == {3}
    with pytest.raises(ValueError):
        collect_informative(collect, target=2, max_rounds=0)


class ScriptedRollout:
    """Scripted: the n-th group served is informative iff n % 3 == 2; weights go to the real rollout."""

    def __init__(self, real):
        self.real = real
        self.served = 0
        self.rounds: list[list[int]] = []  # group ids of each collect call

    def collect(self, seeds, group_ids, torch_seed, greedy=False):
        ids = list(dict.fromkeys(group_ids))
        self.rounds.append(ids)
        samples = []
        for gid in ids:
            n = len([g for g in group_ids if g == gid])
            informative = self.served % 3 == 2
            self.served += 1
            samples += _group(gid, [float(informative and i == 0) for i in range(n)])
        return samples, {"episodes/failed": 0.0}

    def load_weights(self, state_dict):
        self.real.load_weights(state_dict)

    def episode_errors(self):
        return []


class ScriptedGroup(LocalGroup):
    """The real trainer and a `ScriptedRollout`."""

    def __init__(self, spec):
        super().__init__(spec)
        self.rollout = self.script = ScriptedRollout(self.rollout)


@pytest.mark.parametrize(
    ("max_rounds", "rounds", "kept"),
    [(3, 3, 4), (2, 2, 2)],  # informative groups served: #2 (round 0), #5 (round 1), #8 and #11 (round 2)
)
def test_the_controller_refills_a_dapo_batch_with_fresh_prompts(max_rounds, rounds, kept):
    spec = small_spec(
        name="dapo", steps=1, batch_size=4, group_size=2, dynamic_sampling_max_rounds=max_rounds
    )
    group = ScriptedGroup(spec)
    m = Controller(spec, ListSink(), group, None).rl_step(1)
    assert m["dynamic_sampling/rounds"] == rounds
    assert m["dynamic_sampling/groups_generated"] == 4 * rounds
    assert m["dynamic_sampling/groups_kept"] == kept
    assert m["batch/kept_samples"] == 2 * kept
    assert m["reward/mean"] == pytest.approx(kept / (8 * rounds))  # over everything generated
    # Round 0 is the step's usual batch; every refill round asks for new prompts.
    assert group.script.rounds[0] == [derive_seed(spec.seed, 1, g) for g in range(4)]
    all_ids = [g for r in group.script.rounds for g in r]
    assert len(all_ids) == len(set(all_ids)) == 4 * rounds
    assert "kl" in m  # the update ran on the kept groups


def test_without_dynamic_sampling_flat_groups_are_trained_as_generated():
    spec = small_spec(name="grpo", steps=1, batch_size=4, group_size=2)
    group = ScriptedGroup(spec)
    m = Controller(spec, ListSink(), group, None).rl_step(1)
    assert len(group.script.rounds) == 1
    assert "dynamic_sampling/rounds" not in m
