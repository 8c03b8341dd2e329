"""Multi-agent registry packages in the runtime: a package's game played sandboxed by two trained policies
(standalone, `python -m gpu_runtime run --env-package DIR`), a game that crashes mid-way failing only itself,
sandbox processes reused across the job's games, and the package's roles checked against its code."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from gpu_runtime import cli, env_packages
from gpu_runtime.controller import derive_seed
from gpu_runtime.env_packages import EnvPackageError
from gpu_runtime.multiagent import is_multi_agent, resolve
from opentinker.spec import JobSpec

# Two roles speak at once for two rounds; each round a role earns (byte sum of its words mod 3) / 2, so a
# byte-level tiny model's random words give varied rewards. `crash` lists game seeds whose process dies in
# round 2; the entrypoint's module is the package's only code.
DUEL_SOURCE = """
import os

from opentinker.env.base import Observation
from opentinker.env.multiagent import MultiAgentEnvironment, MultiStepResult, TurnOrder


class Duel(MultiAgentEnvironment):
    name = "duel"
    roles = ROLES
    turn_order = TurnOrder.SIMULTANEOUS
    system_prompt = "Say one word."

    def __init__(self, crash=(), **config):
        super().__init__(**config)
        self.crash = [int(s) for s in crash]
        self.seed, self.round = None, 0

    def reset(self, seed):
        self.seed, self.round = seed, 0
        return {r: Observation(f"{r}, game {seed}: speak") for r in self.roles}

    def step(self, actions):
        self.round += 1
        if self.seed in self.crash and self.round == 2:
            os._exit(3)  # the sandbox process dies mid-game
        rewards = {r: (sum(a.encode()) % 3) / 2 for r, a in actions.items()}
        done = self.round >= 2
        obs = {} if done else {r: Observation("round 2: speak") for r in self.roles}
        return MultiStepResult(obs, rewards, done)
"""
MANIFEST = {
    "name": "duel",
    "version": "1.0.0",
    "entrypoint": "duel_env:Duel",
    "protocol": "multi-agent",
    "roles": ["left", "right"],
}
TWO_POLICIES = {
    "policies": {"pl": {"learning_rate": 1e-3}, "pr": {"learning_rate": 3e-3}},
    "roles": {"left": "pl", "right": "pr"},
}


def write_duel(directory: Path, *, roles=("left", "right"), manifest: dict | None = None) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "opentinker.json").write_text(json.dumps(manifest or MANIFEST))
    (directory / "duel_env.py").write_text(DUEL_SOURCE.replace("ROLES", repr(tuple(roles))))
    return directory


def duel_job(*, steps: int = 2, config: dict | None = None, multi_agent: dict | bool = True) -> JobSpec:
    """`multi_agent`: True for the two policies, False to leave it out (self-play), else the mapping."""
    body = {
        "kind": "rl",
        "model": {"base": "tiny-qwen2"},
        "environment": {"ref": "acme/duel@1.0.0", "config": config or {}},
        "algorithm": {
            "name": "grpo", "steps": steps, "batch_size": 2, "group_size": 2, "max_new_tokens": 4,
            "micro_batch_size": 8, "learning_rate": 1e-3,
        },
        "checkpoint": {"every_steps": 100},
        "seed": 5,
    }  # fmt: skip
    if multi_agent:
        body["multi_agent"] = TWO_POLICIES if multi_agent is True else multi_agent
    return JobSpec.model_validate(body)


@pytest.fixture(autouse=True)
def _fresh(monkeypatch):
    monkeypatch.setattr(env_packages, "_unpacked", {})
    monkeypatch.setattr(env_packages, "_factories", {})
    for var in ("OPENTINKER_ENV_PACKAGE", "OPENTINKER_INGEST_URL", "OPENTINKER_JOB_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    yield
    for factory in env_packages._factories.values():
        factory.close()
    os.environ.pop("OPENTINKER_ENV_PACKAGE", None)  # `cli.main --env-package` sets it for the process


@pytest.mark.slow
def test_cli_runs_a_two_policy_job_on_a_local_package_and_a_crashing_game_fails_alone(tmp_path, capfd):
    """`python -m gpu_runtime run spec.json --env-package DIR`: 2 steps of 2 game seeds x 2 games. Seed group
    0 of step 1 crashes its sandbox in round 2: those 2 games fail (counted and logged), the job trains on the
    rest and succeeds; the 8 games and the spec check ran on 6 sandbox processes (a process each: 9)."""
    package = write_duel(tmp_path / "duel")
    crash = derive_seed(5, 1, 0)
    spec = duel_job(config={"crash": [crash]})
    (tmp_path / "spec.json").write_text(spec.model_dump_json())
    argv = ["run", str(tmp_path / "spec.json"), "--env-package", str(package), "--sink", "jsonl"]
    code = cli.main([*argv, "--checkpoint-prefix", f"file://{tmp_path}/ck"])
    out, err = capfd.readouterr()
    assert code == 0, err[-3000:]
    metrics = {r["step"]: r for r in map(json.loads, out.splitlines()) if r["type"] == "metrics"}
    assert sorted(metrics) == [1, 2]
    assert [metrics[s]["episodes/failed"] for s in (1, 2)] == [2.0, 0.0]
    for m in metrics.values():
        for role, policy in (("left", "pl"), ("right", "pr")):
            # Per-role rewards of 2 rounds of (0, 0.5 or 1) each, and the policy playing the role trained.
            assert 0.0 <= m[f"reward/{role}/mean"] <= 2.0
            assert m[f"policy/{policy}/reward/mean"] == m[f"reward/{role}/mean"]
            assert {f"policy/{policy}/{k}" for k in ("loss", "grad_norm", "lr")} <= m.keys()
        assert m["game/rounds/mean"] == 2.0
    assert (metrics[1]["policy/pl/lr"], metrics[1]["policy/pr/lr"]) == (1e-3, 3e-3)
    assert [line for line in err.splitlines() if line.startswith("game failed")] == [
        "game failed: step failed: SandboxError: step: the environment process died (exit code 3)"
    ]
    (factory,) = env_packages._factories.values()
    # 1 for the spec check (reused by a game); step 1: 4 live games, 2 crash; step 2: 2 reused + 2 new.
    assert factory.pool.spawned == 6


def test_a_multi_agent_package_is_recognized_and_its_roles_checked(tmp_path, monkeypatch):
    monkeypatch.setenv("OPENTINKER_ENV_PACKAGE", str(write_duel(tmp_path / "duel")))
    self_play = duel_job(multi_agent=False)
    assert is_multi_agent(self_play)  # from the manifest's protocol
    assert resolve(self_play).role_policy == {"left": "main", "right": "main"}
    assert resolve(duel_job()).role_policy == {"left": "pl", "right": "pr"}

    bot = {"policies": {"me": {}, "bot": {"kind": "rule"}}, "roles": {"left": "me", "right": "bot"}}
    with pytest.raises(ValueError, match="but duel has no rule-based player"):
        resolve(duel_job(multi_agent=bot))  # known only by running its code: the runtime checks it
    wrong = {"policies": {"p": {}}, "roles": {"left": "p", "up": "p"}}
    with pytest.raises(ValueError, match=r"duel has no role 'up' \(its roles: left, right\)"):
        resolve(duel_job(multi_agent=wrong))


def test_a_package_whose_code_disagrees_with_its_manifest_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("OPENTINKER_ENV_PACKAGE", str(write_duel(tmp_path / "liar", roles=("a", "b"))))
    with pytest.raises(
        EnvPackageError,
        match=r"manifest's roles \(left, right\) are not the roles its code declares \(a, b\)",
    ):
        resolve(duel_job())
    broken = write_duel(tmp_path / "broken")
    (broken / "duel_env.py").write_text("raise ImportError('no such thing')\n")
    monkeypatch.setenv("OPENTINKER_ENV_PACKAGE", str(broken))
    with pytest.raises(
        EnvPackageError, match="duel failed to start: loading duel_env:Duel failed: ImportError"
    ):
        resolve(duel_job())


def test_pool_size_setting_is_checked(monkeypatch):
    for bad, message in (("x", "must be an integer"), ("-1", "between 0 and 64"), ("65", "between 0 and 64")):
        monkeypatch.setenv("OPENTINKER_SANDBOX_POOL_SIZE", bad)
        with pytest.raises(EnvPackageError, match=message):
            env_packages.pool_size()
    monkeypatch.setenv("OPENTINKER_SANDBOX_POOL_SIZE", "0")
    assert env_packages.pool_size() == 0
