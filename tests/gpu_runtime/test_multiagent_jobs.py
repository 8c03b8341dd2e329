"""Multi-agent jobs end to end on CPU: tic-tac-toe with two trained policies, self-play, a rule opponent.

A randomly initialized tiny-qwen2 almost never writes a legal `row col` (a byte-level model: ~3% of its
samples are digits), so X forfeits after three illegal moves and O never moves. Like a real user, the tests
first give the model the answer format with a short SFT warm start on legal moves (module fixture, ~10 s),
and every job starts from that checkpoint (`model.base: file://...`).
"""

from __future__ import annotations

import io
import json
import random
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from gpu_runtime.controller import EXIT_OK, Controller, LocalGroup
from gpu_runtime.multiagent import MultiAgentController, MultiAgentGroup
from gpu_runtime.sink import JsonlSink
from opentinker.env.builtin.tictactoe import TicTacToeEnv
from opentinker.spec import JobSpec

TTT = "opentinker/tic-tac-toe@1.0.0"
ALGO = dict(
    name="grpo", batch_size=2, group_size=4, max_new_tokens=4, micro_batch_size=16, learning_rate=1e-3
)
NOT_COMPARED = ("time/", "tokens_per_s", "rollout/tokens_per_s")


def write_moves(path: Path, n: int, seed: int = 0) -> Path:
    """SFT chats: a tic-tac-toe position after 0-4 random moves, answered with a random legal move."""
    rng = random.Random(seed)
    env = TicTacToeEnv()
    with path.open("w") as f:
        for i in range(n):
            text = env.reset(i)["x"].text
            for _ in range(rng.randrange(5)):  # nobody can have won yet
                r, c = rng.choice([(r, c) for r in range(3) for c in range(3) if env.board[r][c] == "."])
                ((_, obs),) = env.step({env.active_roles()[0]: f"{r + 1} {c + 1}"}).observations.items()
                text = obs.text
            r, c = rng.choice([(r, c) for r in range(3) for c in range(3) if env.board[r][c] == "."])
            chat = [
                {"role": "system", "content": env.system_prompt},
                {"role": "user", "content": text},
                {"role": "assistant", "content": f"{r + 1} {c + 1}"},
            ]
            f.write(json.dumps({"messages": chat}) + "\n")
    return path


@pytest.fixture(scope="module")
def warm_start(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("ttt-sft")
    data = write_moves(root / "moves.jsonl", 200)
    spec = JobSpec.model_validate(
        {
            "kind": "sft",
            "model": {"base": "tiny-qwen2"},
            "dataset": {"uri": f"file://{data}"},
            "algorithm": {"steps": 15, "batch_size": 8, "micro_batch_size": 8, "learning_rate": 1e-3},
            "checkpoint": {"every_steps": 1000},
            "seed": 1,
        }
    )
    out = Controller(spec, JsonlSink(io.StringIO()), LocalGroup(spec), f"file://{root}/ck").run()
    assert out.exit_code == EXIT_OK
    return f"file://{root}/ck/step_000015"


def job(base: str, multi_agent: dict | None, *, steps: int, env_config: dict | None = None) -> JobSpec:
    body = {
        "kind": "rl",
        "model": {"base": base},
        "environment": {"ref": TTT, "config": env_config or {}},
        "algorithm": {**ALGO, "steps": steps},
        "checkpoint": {"every_steps": 1, "keep_last": 10},
        "seed": 3,
    }
    if multi_agent is not None:
        body["multi_agent"] = multi_agent
    return JobSpec.model_validate(body)


def run(spec: JobSpec, prefix: str | None, resume: str | None = None) -> list[dict]:
    """Run the job like `python -m gpu_runtime run` does and return the JSON lines it printed."""
    out = io.StringIO()
    group = MultiAgentGroup(spec)
    try:
        result = MultiAgentController(spec, JsonlSink(out), group, prefix).run(resume=resume)
    finally:
        group.shutdown()
    assert result.exit_code == EXIT_OK, out.getvalue()[-3000:]
    return [json.loads(line) for line in out.getvalue().splitlines()]


def by_type(lines: list[dict], kind: str) -> dict[int, dict]:
    return {r["step"]: r for r in lines if r["type"] == kind}


def weights(uri: str, policy: str | None = None) -> dict[str, torch.Tensor]:
    d = Path(uri.removeprefix("file://")) / (policy or "")
    name = "adapter_model.safetensors" if (d / "adapter_model.safetensors").exists() else "model.safetensors"
    return load_file(d / name)


def changed(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> int:
    assert a.keys() == b.keys()
    return sum(not torch.equal(a[k], b[k]) for k in a)


TWO_POLICIES = {
    "policies": {
        "px": {"learning_rate": 1e-3},  # full fine-tuning
        "po": {"learning_rate": 3e-3, "model": {"base": "WARM", "lora": {"rank": 8, "alpha": 16}}},
    },
    "roles": {"x": "px", "o": "po"},
}


@pytest.mark.slow
def test_two_policies_both_train_report_per_role_curves_and_resume_exactly(warm_start, tmp_path):
    ma = json.loads(json.dumps(TWO_POLICIES).replace("WARM", warm_start))
    spec = job(warm_start, ma, steps=2)
    lines = run(spec, f"file://{tmp_path}/a")
    metrics, ckpts = by_type(lines, "metrics"), by_type(lines, "checkpoint")
    assert sorted(metrics) == [1, 2] and sorted(ckpts) == [1, 2]
    for m in metrics.values():
        # Per-role reward curves, and each policy's own training statistics.
        assert m["policy/px/reward/mean"] == m["reward/x/mean"]  # px plays x and only x
        assert m["policy/po/reward/mean"] == m["reward/o/mean"]
        for p in ("px", "po"):
            assert {f"policy/{p}/{k}" for k in ("loss", "kl", "grad_norm", "entropy", "lr")} <= m.keys()
            assert {f"policy/{p}/{k}" for k in ("ratio/max", "ratio/min", "groups/zero_std_frac")} <= m.keys()
        assert (m["policy/px/lr"], m["policy/po/lr"]) == (1e-3, 3e-3)
        # The job's ratio range spans both policies' (max of maxima, min of minima).
        assert m["ratio/max"] == max(m["policy/px/ratio/max"], m["policy/po/ratio/max"])
        assert m["ratio/min"] == min(m["policy/px/ratio/min"], m["policy/po/ratio/min"])
        assert m["episodes/failed"] == 0.0 and m["game/rounds/mean"] > 2  # O moved in these games
    # Both parameter sets moved: px's full weights away from the warm start, po's LoRA adapter away from
    # PEFT's initialization (B = 0), and both again from step 1 to step 2.
    warm = weights(warm_start)
    step1, step2 = ckpts[1]["uri"], ckpts[2]["uri"]
    assert changed(warm, weights(step1, "px")) > 0 and changed(weights(step1, "px"), weights(step2, "px")) > 0
    lora_b = [k for k in weights(step1, "po") if "lora_B" in k]
    assert lora_b and any(weights(step2, "po")[k].abs().sum() > 0 for k in lora_b)
    assert changed(weights(step1, "po"), weights(step2, "po")) > 0
    names = {f["name"] for f in ckpts[2]["files"]}
    assert {"px/model.safetensors", "po/adapter_model.safetensors", "po/adapter_config.json"} <= names
    assert {"px/trainer_state.pt", "po/trainer_state.pt", "meta.json"} <= names

    # Resume from step 1: step 2 is the same step, for both policies.
    resumed = run(spec, f"file://{tmp_path}/b", resume=step1)
    again, ck_b = by_type(resumed, "metrics"), by_type(resumed, "checkpoint")
    assert sorted(again) == [2]
    for k, v in metrics[2].items():
        if not k.startswith(NOT_COMPARED):
            assert again[2][k] == v, k
    for p in ("px", "po"):
        assert changed(weights(step2, p), weights(ck_b[2]["uri"], p)) == 0


@pytest.mark.slow
def test_self_play_trains_one_policy_with_per_role_baselines(warm_start, tmp_path, monkeypatch):
    seen: list = []
    original = Controller._advantages

    def spy(self, samples):
        original(self, samples)
        seen.extend(samples)

    monkeypatch.setattr(Controller, "_advantages", spy)
    # No multi_agent section: a multi-agent environment defaults to self-play with the job's model.
    spec = job(warm_start, None, steps=1, env_config={"reward_mode": "zero-sum"})
    lines = run(spec, None)
    (m,) = by_type(lines, "metrics").values()
    assert m["reward/x/mean"] == pytest.approx(-m["reward/o/mean"], abs=1e-12)  # zero-sum per game
    assert "policy/main/loss" in m and not any(k.startswith("policy/px") for k in m)
    assert {s.role for s in seen} == {"x", "o"}  # one policy trained on both roles' samples

    def expected(key) -> dict[int, float]:
        groups: dict = {}
        for i, s in enumerate(seen):
            groups.setdefault(key(s), []).append(i)
        out = {}
        for idx in groups.values():
            r = [seen[i].reward for i in idx]
            mean = sum(r) / len(r)
            std = (sum((x - mean) ** 2 for x in r) / (len(r) - 1)) ** 0.5 if len(r) > 1 else 0.0
            for i, x in zip(idx, r, strict=True):
                out[i] = (x - mean) / (std + 1e-6) if std > 0 else 0.0
        return out

    per_role = expected(lambda s: (s.group_id, s.role))
    shared = expected(lambda s: s.group_id)
    got = {i: next(a for a, mk in zip(s.advantages, s.mask, strict=True) if mk) for i, s in enumerate(seen)}
    assert got == pytest.approx(per_role, abs=1e-5)
    # ... and a single mean across the two roles would have trained on different numbers in this batch.
    assert any(abs(per_role[i] - shared[i]) > 0.1 for i in got)


@pytest.mark.slow
def test_a_rule_based_opponent_is_played_but_not_trained(warm_start):
    ma = {"policies": {"me": {}, "bot": {"kind": "rule"}}, "roles": {"x": "me", "o": "bot"}}
    lines = run(job(warm_start, ma, steps=1), None)
    (m,) = by_type(lines, "metrics").values()
    assert {"reward/x/mean", "reward/o/mean", "game/o/win_rate", "policy/me/loss"} <= m.keys()
    assert not any(k.startswith("policy/bot/") for k in m)
    assert m["policy/me/reward/mean"] == m["reward/x/mean"]
    # An eval job plays greedy games against the same opponent and reports per-role results.
    body = job(warm_start, ma, steps=1).model_dump(mode="json")
    body.update(
        kind="eval", algorithm={"name": "eval", "batch_size": 4, "group_size": 1, "max_new_tokens": 4}
    )
    (ev,) = by_type(run(JobSpec.model_validate(body), None), "metrics").values()
    assert ev["eval/episodes/failed"] == 0.0
    for role in ("x", "o"):
        assert -2.5 <= ev[f"eval/reward/{role}/mean"] <= 1.0 and 0 <= ev[f"eval/game/{role}/win_rate"] <= 1
    assert ev["eval/game/x/win_rate"] + ev["eval/game/o/win_rate"] <= 1.0


@pytest.mark.slow
def test_ray_actors_run_the_same_two_policy_step_as_in_process(warm_start, ray_session, tmp_path):
    # Both policies fully fine-tuned here: PEFT draws a LoRA adapter's initial A matrix from the global torch
    # RNG, which is in a different state in a Ray actor than in this process.
    ma = {"policies": {"px": {}, "po": {"learning_rate": 3e-3}}, "roles": {"x": "px", "o": "po"}}
    spec = job(warm_start, ma, steps=1)
    local = by_type(run(spec, None), "metrics")[1]
    out = io.StringIO()
    # Trainer actors per policy + two rollout actors, one game group each (issue 14 item 3): the Ray
    # path of the multi-agent pool (the weights through the object store, the parts' calls all at once).
    two = scaled(spec, 2)
    group = MultiAgentGroup(two, use_ray=True)
    try:
        assert len(group.rollout_actors) == 2
        result = MultiAgentController(two, JsonlSink(out), group, f"file://{tmp_path}").run()
    finally:
        group.shutdown()
    assert result.exit_code == EXIT_OK
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    remote = by_type(lines, "metrics")[1]
    assert remote.keys() == local.keys()
    for k, v in local.items():
        if k.endswith("logprob_gap"):  # float noise of the engines' forward, whose batches differ: ~4e-7
            assert remote[k] < 1e-5 and v < 1e-5, (k, remote[k], v)
        elif isinstance(v, float) and not k.startswith(NOT_COMPARED):
            assert remote[k] == pytest.approx(v, rel=1e-5, abs=1e-7), k
    (ck,) = by_type(lines, "checkpoint").values()
    assert {"px/model.safetensors", "po/model.safetensors"} <= {f["name"] for f in ck["files"]}


def scaled(spec: JobSpec, workers: int) -> JobSpec:
    body = spec.model_dump(mode="json")
    body["resources"]["rollout_workers"] = workers
    return JobSpec.model_validate(body)


@pytest.mark.slow
def test_two_rollout_workers_train_both_policies_as_one_worker_does(warm_start, tmp_path):
    """Issue 14 item 3 for multi-agent jobs: a step's games split over 2 in-process rollout workers (groups 2
    and 1: an uneven split), each with both policies' engines, sampled at T = 1, end with the parameters and
    metrics of 1 worker. Covers the per-request seeds (step-wide game index), the seats of a part's groups
    (rotate_roles and rule_mix: the third group is against the rule player), both policies' syncs to both
    workers (step 2 samples with step 1's weights everywhere), per-role rates pooled by game and move counts,
    and the rule-player evaluation split over the workers (3 games: 2 and 1)."""
    ma = json.loads(json.dumps(TWO_POLICIES).replace("WARM", warm_start))
    ma.update(rotate_roles=True, rule_mix=0.34, eval_vs_rule={"games": 3, "every_steps": 2})
    body = job(warm_start, ma, steps=2).model_dump(mode="json")
    body["algorithm"]["batch_size"] = 3
    spec = JobSpec.model_validate(body)
    assert spec.algorithm.temperature == 1.0 and spec.algorithm.top_p == 1.0  # sampled: the seeds matter
    one, two = run(spec, f"file://{tmp_path}/one"), run(scaled(spec, 2), f"file://{tmp_path}/two")

    m1, m2 = by_type(one, "metrics"), by_type(two, "metrics")
    assert sorted(m1) == sorted(m2) == [0, 1, 2]  # step 0: the evaluation before any update
    assert {"policy/px/win_rate", "eval/vs_rule/po/o/win_rate", "game/o/illegal_rate"} <= m1[2].keys()
    assert m1[2]["episodes/total"] == 12.0 and m1[2]["episodes/failed"] == 0.0
    for step, values in m1.items():
        assert m2[step].keys() == values.keys(), step
        for k, v in values.items():
            if isinstance(v, float) and not k.startswith(NOT_COMPARED):
                assert m2[step][k] == pytest.approx(v, rel=1e-4, abs=1e-6), (step, k)
    # The step-2 log-prob gap: each worker's engines sampled with the trainers' weights of step 1.
    assert m2[2]["policy/px/logprob_gap"] < 1e-4 and m2[2]["policy/po/logprob_gap"] < 1e-4
    # Rollout records: the same games (their step-wide indices, texts, rewards), picked alike.
    r1, r2 = by_type(one, "rollouts"), by_type(two, "rollouts")
    assert sorted(r1) == [1, 2] and r2 == r1

    last1, last2 = (by_type(x, "checkpoint")[2]["uri"] for x in (one, two))
    warm = weights(warm_start)
    for p in ("px", "po"):
        a, b = weights(last1, p), weights(last2, p)
        assert a.keys() == b.keys()
        if p == "px":
            assert changed(warm, a) > 0  # trained, so an unsynced or differently fed worker would show
        worst = max(float(((b[k] - a[k]).abs() / a[k].abs().clamp_min(1e-3)).max()) for k in a)
        print(f"{p}: {len(a)} tensors, 2 workers vs 1: largest relative difference {worst:.3g}")
        for k in a:
            torch.testing.assert_close(b[k], a[k], rtol=5e-5, atol=1e-7, msg=f"{p} {k}")
