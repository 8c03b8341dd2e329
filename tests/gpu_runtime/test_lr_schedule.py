"""Learning-rate schedules (gpu_runtime/algorithms/schedule.py) and their use by the trainer."""

from __future__ import annotations

import itertools
import math

import pytest
from pydantic import ValidationError

from gpu_runtime.algorithms.schedule import lr_factor
from opentinker.spec import AlgorithmSpec


def test_warmup_is_linear_from_one_step_to_the_peak():
    assert [lr_factor(i, total=10, warmup=4) for i in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]


def test_cosine_decays_from_the_peak_to_the_floor_at_the_last_step():
    f = [lr_factor(i, total=12, warmup=2, schedule="cosine", min_ratio=0.1) for i in range(12)]
    assert f[:3] == [0.5, 1.0, 1.0]  # warm-up, then the peak at the first decay step
    assert f[-1] == pytest.approx(0.1)
    # The decay runs over steps 2..11 (9 intervals): step 7 is 5/9 of the way.
    assert f[7] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 5 / 9)))
    assert all(a >= b for a, b in itertools.pairwise(f[1:]))  # never rises again


def test_linear_decay_and_steps_past_the_end_stay_at_the_floor():
    assert [lr_factor(i, total=5, schedule="linear") for i in range(5)] == [1.0, 0.75, 0.5, 0.25, 0.0]
    assert lr_factor(50, total=5, schedule="linear", min_ratio=0.2) == pytest.approx(0.2)


def test_constant_without_warmup_is_one():
    assert {lr_factor(i, total=3) for i in range(5)} == {1.0}


def test_a_warmup_as_long_as_the_job_is_refused_with_the_field_named():
    with pytest.raises(ValidationError, match="lr_warmup_steps \\(10\\) must be smaller than steps \\(10\\)"):
        AlgorithmSpec(steps=10, lr_warmup_steps=10)
    with pytest.raises(ValidationError, match="lr_schedule"):
        AlgorithmSpec(lr_schedule="exponential")
    with pytest.raises(ValidationError, match="lr_min_ratio"):
        AlgorithmSpec(lr_min_ratio=1.5)


def test_a_shortened_recipe_keeps_a_warmup_that_fits():
    a = AlgorithmSpec(steps=100, lr_warmup_steps=10, lr_schedule="cosine", lr_min_ratio=0.1)
    assert (a.with_steps(50).steps, a.with_steps(50).lr_warmup_steps) == (50, 5)
    assert a.with_steps(2).lr_warmup_steps == 0  # 10% of 2 steps rounds to none
    # Never as long as the job (the spec would refuse it): one step at least runs at the peak.
    assert AlgorithmSpec(steps=4, lr_warmup_steps=3).with_steps(2).lr_warmup_steps == 1
    assert a.with_steps(2).lr_schedule == "cosine" and a.with_steps(2).lr_min_ratio == 0.1
