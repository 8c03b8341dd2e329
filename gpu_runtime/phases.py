"""Timing a step's named phases, all the same way: `time/<phase>` metrics, and `time/step` for the whole.

    timer = PhaseTimer()
    with timer.phase("rollout"):
        ...
    metrics.update(timer.metrics())  # {"time/rollout": ..., "time/step": ...}

Wall-clock seconds (`perf_counter`) from the driver: a phase that runs on the workers is timed with its
waiting, which is what the step costs.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager


class PhaseTimer:
    def __init__(self) -> None:
        self.started = time.perf_counter()
        self.times: dict[str, float] = {}  # "time/<phase>" -> seconds, in the order the phases ran

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.times[f"time/{name}"] = self.times.get(f"time/{name}", 0.0) + time.perf_counter() - t0

    def seconds(self, name: str) -> float:
        return self.times.get(f"time/{name}", 0.0)

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def metrics(self) -> dict[str, float]:
        """Every phase's time and `time/step`, the time since the timer started."""
        return {**self.times, "time/step": self.elapsed()}
