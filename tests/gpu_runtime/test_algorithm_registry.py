"""The algorithm registry (gpu_runtime/algorithms/registry.py): one entry per name the spec accepts, what
each step needs, and its advantage estimator on samples."""

from __future__ import annotations

import math

import pytest
from pydantic import ValidationError

from gpu_runtime.algorithms.registry import ALGORITHMS, algorithm
from gpu_runtime.batch import Sample
from opentinker.spec import KIND_ALGORITHMS, AlgorithmSpec
from tests.gpu_runtime.conftest import small_spec


def test_every_name_the_spec_accepts_has_an_entry_and_no_other():
    accepted = {name for names in KIND_ALGORITHMS.values() for name in names}
    assert set(ALGORITHMS) == accepted


def test_what_each_step_needs():
    assert [n for n, a in ALGORITHMS.items() if a.critic] == ["ppo"]
    assert [n for n, a in ALGORITHMS.items() if a.dynamic_sampling] == ["dapo"]
    kl, no_kl = AlgorithmSpec(kl_coef=0.1), AlgorithmSpec()
    for name, a in ALGORITHMS.items():
        rl = name not in ("sft", "eval")
        assert a.old_logprobs is rl and (a.advantages is not None) is rl, name
        assert a.reference(kl) is rl and not a.reference(no_kl), name
    assert ALGORITHMS["sft"].loss == "sft" and ALGORITHMS["eval"].loss is None


def test_an_unknown_algorithm_is_refused_by_the_spec_and_by_the_registry():
    with pytest.raises(ValidationError, match="'gpro' is not valid for a rl job; use one of grpo, dr_grpo"):
        small_spec(name="gpro")
    with pytest.raises(ValueError, match="unknown algorithm 'gpro'"):
        algorithm("gpro")


def _samples(rewards: list[float]) -> list[Sample]:
    # One group; two generated tokens after a one-token prompt, the reward on the last one.
    return [Sample([1, 2, 3], [0, 1, 1], [0.0] * 3, [0.0, 0.0, r], r, 7) for r in rewards]


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("grpo", 0.5 / math.sqrt(1 / 3)),  # (r - mean) / unbiased std; the std's eps is negligible here
        ("dapo", 0.5 / math.sqrt(1 / 3)),
        ("dr_grpo", 0.5),  # no std normalization, even with norm_adv_by_std on
        ("rloo", 4 / 3 * 0.5),  # k/(k-1) (r - mean)
    ],
)
def test_outcome_estimators_fill_every_generated_token(name, expected):
    samples = _samples([1.0, 0.0, 0.0, 1.0])
    estimator = ALGORITHMS[name].advantages
    assert estimator is not None
    estimator(samples, AlgorithmSpec(name=name, norm_adv_by_std=True))
    for s, sign in zip(samples, [1, -1, -1, 1], strict=True):
        assert s.advantages == pytest.approx([0.0, sign * expected, sign * expected], rel=1e-5)


def test_token_level_estimators_fill_returns_too():
    samples = _samples([1.0, 0.0])
    for s in samples:
        s.values = [0.0, 0.0, 0.0]
    for name in ("reinforce_pp", "ppo"):
        estimator = ALGORITHMS[name].advantages
        assert estimator is not None
        estimator(samples, AlgorithmSpec(name=name))
        assert all(len(s.advantages) == len(s.returns) == 3 for s in samples)
        assert samples[0].advantages[2] > 0 > samples[1].advantages[2]
        assert samples[0].returns[2] == pytest.approx(1.0 if name == "ppo" else samples[0].advantages[2])


def test_dr_grpo_aggregates_with_a_constant_length_sum_unless_the_spec_says_otherwise():
    assert AlgorithmSpec(name="dr_grpo").loss_agg == "seq-mean-token-sum-norm"
    assert AlgorithmSpec(name="dr_grpo", loss_agg="token-mean").loss_agg == "token-mean"
    assert AlgorithmSpec(name="grpo").loss_agg == "token-mean"
    # A stored spec read back keeps what it was submitted with.
    again = AlgorithmSpec.model_validate(AlgorithmSpec(name="dr_grpo").model_dump())
    assert again.loss_agg == "seq-mean-token-sum-norm"
