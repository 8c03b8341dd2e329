"""An async RL job's batches rolled out ahead (gpu_runtime.async_rollout), in a checkpoint's trainer state
as plain data: the state is loaded with torch.load(weights_only=True), which rebuilds tensors, numbers,
strings, lists and dicts only, so nothing written into a checkpoint is ever unpickled (a tenant's
environment fills the samples' rewards and infos)."""

from __future__ import annotations

from typing import Any

from gpu_runtime.async_rollout import Batch
from gpu_runtime.batch import Sample, sample_from_plain, sample_to_plain

# (generated, to train on, metrics), episode errors: what the controller's `produce` returns for a step
Produced = tuple[tuple[list[Sample], list[Sample], dict[str, float]], list[str]]


def to_plain(batches: dict[int, Batch[Produced]]) -> dict[int, dict[str, Any]]:
    out: dict[int, dict[str, Any]] = {}
    for step, b in batches.items():
        (generated, trained, metrics), errors = b.value
        # The samples to train on are some of the generated ones (the same objects): stored once, by index.
        index = {id(s): i for i, s in enumerate(generated)}
        out[int(step)] = {
            "version": int(b.version),
            "rollout_s": float(b.rollout_s),
            "generated": [sample_to_plain(s) for s in generated],
            "trained": [index[id(s)] for s in trained],
            "metrics": {str(k): float(v) for k, v in metrics.items()},
            "errors": [str(e) for e in errors],
        }
    return out


def from_plain(plain: dict[int, dict[str, Any]]) -> dict[int, Batch[Produced]]:
    out: dict[int, Batch[Produced]] = {}
    for step, d in plain.items():
        generated = [sample_from_plain(s) for s in d["generated"]]
        trained = [generated[i] for i in d["trained"]]
        value: Produced = ((generated, trained, dict(d["metrics"])), list(d["errors"]))
        out[int(step)] = Batch(value, int(d["version"]), float(d["rollout_s"]))
    return out
