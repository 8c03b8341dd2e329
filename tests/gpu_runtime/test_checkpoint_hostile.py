"""A checkpoint's trainer_state.pt is never unpickled (a tenant can write a checkpoint; a resume reads it):
it is loaded with weights_only=True, so a file that would run code on load is refused with the reason, and
what the runtime writes there is plain data (tensors, numbers, strings, lists, dicts), async batches
included (gpu_runtime.async_state)."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from gpu_runtime import async_state, checkpoint
from gpu_runtime.async_rollout import Batch
from gpu_runtime.batch import EpisodeTrace, Sample, TurnTrace


def _touch(path: str) -> None:
    Path(path).write_text("ran")


class WritesAMarker:
    """Unpickling it calls _touch(marker): code chosen by whoever wrote the file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (_touch, (str(self.marker),))


def _checkpoint_with_state(root: Path, write) -> str:
    d = root / "step_000002"
    d.mkdir(parents=True)
    save_file({"w": torch.zeros(2)}, d / "model.safetensors")
    write(d / "trainer_state.pt")
    (d / "meta.json").write_text(json.dumps({"step": 2}))
    return f"file://{root}"


@pytest.mark.parametrize(
    ("how", "what"),
    [
        (
            "torch.save",
            f"holds an object of {__name__}._touch, which only unpickling (running code) could rebuild",
        ),
        # protocol 4's STACK_GLOBAL: torch names no global, only the opcode it refuses
        ("pickle.dump", "is not plain data that a weights-only load reads (Unsupported operand 149)"),
    ],
)
@pytest.mark.filterwarnings("ignore:Detected pickle protocol 4")
def test_a_trainer_state_that_runs_code_when_unpickled_is_refused(tmp_path, how, what):
    marker = tmp_path / "marker"
    state = {"optimizer": {}, "rng": WritesAMarker(marker)}
    pickle.loads(pickle.dumps(state))  # noqa: S301 (the attack is real: plain unpickling runs it)
    assert marker.read_text() == "ran"
    marker.unlink()

    def write(path: Path) -> None:
        if how == "torch.save":
            torch.save(state, path)
        else:  # a bare pickle, not torch's zip format
            path.write_bytes(pickle.dumps(state))

    uri = _checkpoint_with_state(tmp_path / "ck", write)
    with pytest.raises(checkpoint.CheckpointError) as caught:
        checkpoint.load(uri)
    assert not marker.exists()
    assert str(caught.value).startswith(
        f"trainer_state.pt {what}; trainer state is loaded as plain data only"
    )


def test_an_old_checkpoint_with_numpy_state_still_loads(tmp_path):
    # Written before the trainer stored numpy's RNG keys as a tensor: they are an array, which rebuilds
    # without running code, so a job preempted before an upgrade resumes after it.
    rng = np.random.get_state()
    uri = _checkpoint_with_state(tmp_path, lambda p: torch.save({"rng": {"numpy": rng}}, p))
    name, keys, *rest = checkpoint.load(uri).state["rng"]["numpy"]
    assert name == "MT19937" and keys.dtype == np.uint32 and (keys == rng[1]).all() and rest == list(rng[2:])


def test_garbage_and_a_non_dict_are_refused(tmp_path):
    bad = tmp_path / "trainer_state.pt"
    bad.write_bytes(b"not a torch file")
    with pytest.raises(checkpoint.CheckpointError, match=r"is not plain data .* \(Unsupported operand 110\)"):
        checkpoint.read_state(bad)
    bad.write_bytes(b"")
    with pytest.raises(
        checkpoint.CheckpointError,
        match=r"^trainer_state\.pt is not a readable trainer state: empty or truncated$",
    ):
        checkpoint.read_state(bad)
    torch.save([1, 2], bad)
    with pytest.raises(checkpoint.CheckpointError, match=r"holds a list, not a trainer state \(a dict\)"):
        checkpoint.read_state(bad)


def test_a_state_that_a_resume_would_refuse_is_not_written(tmp_path):
    with pytest.raises(checkpoint.CheckpointError) as caught:
        checkpoint.write_model(tmp_path / "m", {"w": torch.zeros(2)}, False, {"x": Batch(1, 0, 0.0)})
    assert str(caught.value) == (
        "the trainer state holds objects that are not plain data (gpu_runtime.async_rollout.Batch): a resume "
        "loads it with weights_only=True (tensors, numbers, strings, lists, dicts) and would refuse it"
    )


def _sample(i: int, reward) -> Sample:
    turn = TurnTrace(1, 3, float(reward), "move", False, {"board": "x.o", "n": np.int64(i)})
    return Sample(
        [5, 6, 7],
        [0, 1, 1],
        [0.0, -0.25, -1.5],
        [0.0, 0.0, float(reward)],
        reward,  # an environment's reward may be numpy's float64: stored as a float
        group_id=10 + i,
        trace=EpisodeTrace(1, "eos", [turn], float(reward), game=None),
    )


def test_async_batches_round_trip_as_plain_data_through_a_weights_only_load(tmp_path):
    generated = [_sample(i, np.float64(i / 4)) for i in range(4)]
    trained = [generated[1], generated[3]]  # dynamic sampling: some of the generated samples
    ahead = {3: Batch(((generated, trained, {"reward/mean": 0.375}), ["episode 2: timed out"]), 1, 0.5)}
    checkpoint.write_model(
        tmp_path, {"w": torch.zeros(2)}, False, {"async_rollouts": async_state.to_plain(ahead)}
    )
    back = async_state.from_plain(checkpoint.read_state(tmp_path / "trainer_state.pt")["async_rollouts"])
    assert list(back) == [3]
    (gen, tr, metrics), errors = back[3].value
    assert (back[3].version, back[3].rollout_s, metrics, errors) == (1, 0.5, {"reward/mean": 0.375}, errors)
    assert errors == ["episode 2: timed out"]
    assert gen == generated
    assert [type(s.reward) for s in gen] == [float] * 4
    assert gen[2].trace.turns[0].info == {"board": "x.o", "n": 2}
    assert tr[0] is gen[1] and tr[1] is gen[3]  # the same objects, as the rollout returned them
