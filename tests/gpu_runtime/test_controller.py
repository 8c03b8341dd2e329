"""The loop end to end (world size 1, in process): algorithms, resume, cancel, CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from gpu_runtime.controller import EXIT_CANCELLED, EXIT_OK, Controller, LocalGroup
from gpu_runtime.sink import JsonlSink
from opentinker.env.base import Environment, Observation, StepResult
from tests.gpu_runtime.conftest import small_spec

REQUIRED = [
    "reward/mean", "reward/std", "reward/max", "kl", "entropy", "clip_frac", "grad_norm", "lr",
    "response_length/mean", "logprob_gap", "time/rollout", "time/logprob", "time/update", "tokens_per_s",
    # what a practitioner reads to tell a healthy run from a collapsing one (issue 11)
    "ratio/max", "ratio/min", "groups/zero_std_frac", "response_length/max", "response/truncated_frac",
]  # fmt: skip


class ListSink(JsonlSink):
    def __init__(self, cancel_after: int | None = None) -> None:
        super().__init__(out=open("/dev/null", "w"))  # noqa: SIM115
        self.records: list[dict] = []
        self.cancel_after = cancel_after

    def _write(self, obj):
        self.records.append(obj)

    def should_cancel(self) -> bool:
        steps = [r for r in self.records if r["type"] == "metrics"]
        return self.cancel_after is not None and len(steps) >= self.cancel_after

    def metric_steps(self) -> dict[int, dict]:
        return {r["step"]: r for r in self.records if r["type"] == "metrics"}


class CoinEnv(Environment):
    """Reward = parity of the answer's bytes: a random policy gets varied rewards, hence real gradients."""

    name = "coin"

    def reset(self, seed: int) -> Observation:
        return Observation(f"Flip {seed}")

    def step(self, action: str) -> StepResult:
        return StepResult(None, float(sum(action.encode()) % 2), True)


@pytest.fixture
def coin_env(monkeypatch):
    import gpu_runtime.envs

    monkeypatch.setattr(gpu_runtime.envs, "builtin_class", lambda name: CoinEnv)


def run(spec, prefix, resume=None, sink=None):
    sink = sink or ListSink()
    result = Controller(spec, sink, LocalGroup(spec), prefix).run(resume=resume)
    return result, sink


@pytest.mark.parametrize(
    "algo",
    [
        dict(name="grpo"),
        dict(name="dr_grpo"),
        dict(name="dapo", clip_ratio_high=0.28),
        dict(name="rloo", kl_coef=0.05, kl_placement="reward", kl_estimator="k1"),
        dict(name="reinforce_pp", kl_coef=0.05, kl_placement="reward"),
        dict(name="ppo", epochs=2, minibatches=2, tis_cap=2.0),
        dict(name="grpo", kl_coef=0.1, kl_estimator="k3", epochs=2),
    ],
    ids=lambda a: "-".join(f"{v}" for v in a.values()),
)
def test_algorithms_run_and_report_every_metric(algo, tmp_path, coin_env):
    spec = small_spec(steps=2, **algo)
    result, sink = run(spec, f"file://{tmp_path}")
    assert result.exit_code == EXIT_OK
    steps = sink.metric_steps()
    assert sorted(steps) == [1, 2]
    for m in steps.values():
        if algo["name"] == "dapo" and "kl" not in m:  # every group flat: the update was skipped
            continue
        missing = [k for k in REQUIRED if k not in m]
        assert not missing, missing
        if algo.get("epochs", 1) == 1 and algo.get("minibatches", 1) == 1:
            assert m["ratio/mean"] == m["ratio/max"] == m["ratio/min"] == 1.0 and m["clip_frac"] == 0.0
        assert 0.0 <= m["groups/zero_std_frac"] <= 1.0
    if algo["name"] == "ppo":
        assert "value_loss" in steps[1]


class RecordingGroup(LocalGroup):
    """Records what each frozen pass was asked for: (samples, old?, ref?)."""

    def __init__(self, spec):
        super().__init__(spec)
        self.frozen: list[tuple[int, bool, bool]] = []

    def logprobs(self, shards, n_micro, *, old, ref, values):
        self.frozen.append((len(shards[0]), old, ref))
        return super().logprobs(shards, n_micro, old=old, ref=ref, values=values)


@pytest.mark.parametrize(
    ("algo", "expected"),
    [
        # 2 groups x 2 samples in 2 mini-batches of one group: the first is on-policy (its own forward gives
        # its old log-probs), only the second needs frozen ones; the reference covers both.
        (dict(minibatches=2, kl_coef=0.1), [(2, True, True), (2, False, True)]),
        (dict(minibatches=2), [(2, True, False)]),
        (dict(epochs=2, minibatches=2), [(4, True, False)]),  # the 2nd epoch re-reads every sample
        (dict(kl_coef=0.1), [(4, False, True)]),  # on-policy: no frozen old log-probs at all
        (dict(), []),
    ],
    ids=["2mb-kl", "2mb", "2epochs", "kl", "plain"],
)
def test_the_frozen_pass_skips_the_on_policy_first_minibatch(algo, expected, coin_env):
    # seed 2: both groups' rewards vary (at seed 1 both are flat: no update, every ratio 1)
    spec = small_spec(steps=1, **algo).model_copy(update={"seed": 2})
    group = RecordingGroup(spec)
    sink = ListSink()
    assert Controller(spec, sink, group, None).run().exit_code == EXIT_OK
    assert group.frozen == expected
    m = sink.metric_steps()[1]
    assert m["groups/zero_std_frac"] == 0.0
    if algo.get("minibatches", 1) > 1:  # the first mini-batch's ratio is exactly 1, the second's is not
        assert m["ratio/min"] < 1.0 or m["ratio/max"] > 1.0


def _params(uri: str) -> dict[str, torch.Tensor]:
    return load_file(Path(uri.removeprefix("file://")) / "model.safetensors")


def test_resume_reproduces_the_next_step_exactly(tmp_path, coin_env):
    # A decaying schedule: the resumed job must continue the curve, not restart it at the peak.
    spec = small_spec(steps=3, learning_rate=1e-3, lr_schedule="linear", lr_min_ratio=0.1)
    _, sink_a = run(spec, f"file://{tmp_path}/a")
    assert [m["lr"] for m in sink_a.metric_steps().values()] == pytest.approx([1e-3, 5.5e-4, 1e-4])
    ckpts = {r["step"]: r["uri"] for r in sink_a.records if r["type"] == "checkpoint"}
    assert sorted(ckpts) == [2, 3]
    resumed, sink_b = run(spec, f"file://{tmp_path}/b", resume=ckpts[2])
    assert resumed.exit_code == EXIT_OK
    assert sorted(sink_b.metric_steps()) == [3]
    a, b = sink_a.metric_steps()[3], sink_b.metric_steps()[3]
    for k in a:
        if not k.startswith(("time/", "tokens_per_s", "rollout/tokens_per_s")):
            assert a[k] == b[k], k
    ck_b = {r["step"]: r["uri"] for r in sink_b.records if r["type"] == "checkpoint"}
    pa, pb = _params(ckpts[3]), _params(ck_b[3])
    assert all(torch.equal(pa[k], pb[k]) for k in pa)
    # ... and the step really trained: weights moved between step 2 and step 3
    p2 = _params(ckpts[2])
    assert any(not torch.equal(pa[k], p2[k]) for k in pa)


def test_checkpoint_is_hf_layout(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = small_spec(steps=1)
    _, sink = run(spec, f"file://{tmp_path}")
    (ck,) = [r for r in sink.records if r["type"] == "checkpoint"]
    names = {f["name"] for f in ck["files"]}
    assert {"model.safetensors", "config.json", "tokenizer.json", "trainer_state.pt", "meta.json"} <= names
    path = ck["uri"].removeprefix("file://")
    model = AutoModelForCausalLM.from_pretrained(path)
    tok = AutoTokenizer.from_pretrained(path)
    assert tok.decode(tok.encode("7 + 5")) == "7 + 5"
    assert sum(p.numel() for p in model.parameters()) > 1e6


def test_cancel_stops_at_a_step_boundary(tmp_path):
    spec = small_spec(steps=5)
    result, sink = run(spec, f"file://{tmp_path}", sink=ListSink(cancel_after=2))
    assert result.exit_code == EXIT_CANCELLED
    assert sorted(sink.metric_steps()) == [1, 2]
    assert sink.records[-1] == {**sink.records[-1], "type": "event", "event": "cancelled", "step": 2}


@pytest.mark.slow
def test_cli_runs_a_yaml_spec(tmp_path):
    spec = small_spec(steps=2).model_dump(mode="json")
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    proc = subprocess.run(
        [sys.executable, "-m", "gpu_runtime", "run", str(tmp_path / "spec.yaml"),
         "--checkpoint-prefix", f"file://{tmp_path}/ck"],
        capture_output=True, text=True, timeout=240,
        env={"OPENTINKER_TORCH_THREADS": "1", "PATH": "/usr/bin"},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = [json.loads(line) for line in proc.stdout.splitlines()]
    metrics = [r for r in lines if r["type"] == "metrics"]
    assert [m["step"] for m in metrics] == [1, 2]
    assert all(k in metrics[0] for k in REQUIRED)
    assert lines[-1]["event"] == "finished"
