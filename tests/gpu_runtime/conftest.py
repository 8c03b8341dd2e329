from __future__ import annotations

import pytest
import torch

from opentinker.spec import JobSpec, example_rl_spec


@pytest.fixture(autouse=True)
def _one_thread():
    # 2-core CI: one torch thread per process avoids OpenMP teams spinning against each other.
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(prev)


def small_spec(*, lora: dict | None = None, **algorithm) -> JobSpec:
    """The example job, shrunk: 2 prompts x 2 samples, 4 new tokens."""
    base = example_rl_spec().model_dump()
    base["model"]["lora"] = lora
    base["algorithm"].update(dict(steps=3, batch_size=2, group_size=2, max_new_tokens=4, micro_batch_size=2))
    base["algorithm"].update(algorithm)
    base["checkpoint"].update(every_steps=2, keep_last=5)
    return JobSpec.model_validate(base)


# `ray_session` (the session's one Ray cluster) is in tests/ray_session.py, shared with the Ray pool tests.
