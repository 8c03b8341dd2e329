"""Learning-rate schedules: a linear warm-up, then constant, cosine or linear decay to a floor.

Why a schedule at all (issue 11): with Adam, every parameter moves by about the learning rate on each step
whatever the gradient's size, so a constant rate keeps taking full-size steps late in training, when most
GRPO groups are solved and the few informative ones make the gradient noisy. A warm-up keeps Adam's first,
sign-like steps (its moment estimates still empty) from undoing a warm start; the decay lets the policy
settle.
"""

from __future__ import annotations

import math
from typing import Literal

LRSchedule = Literal["constant", "cosine", "linear"]


def lr_factor(
    i: int, *, total: int, warmup: int = 0, schedule: LRSchedule = "constant", min_ratio: float = 0.0
) -> float:
    """The multiplier of the peak learning rate for optimizer step `i` (0-based) of `total`.

    Warm-up: (i + 1) / warmup for the first `warmup` steps, so step 0 already moves (rate peak/warmup).
    Decay over the remaining steps from 1 to `min_ratio` at the last step (cosine: half a cosine period).
    """
    if warmup > 0 and i < warmup:
        return (i + 1) / warmup
    if schedule == "constant":
        return 1.0
    span = max(total - warmup - 1, 1)
    progress = min(max((i - warmup) / span, 0.0), 1.0)
    if schedule == "cosine":
        shape = 0.5 * (1.0 + math.cos(math.pi * progress))
    elif schedule == "linear":
        shape = 1.0 - progress
    else:
        raise ValueError(f"unknown learning-rate schedule {schedule!r}")
    return min_ratio + (1.0 - min_ratio) * shape
