"""Sandbox processes reused across one job's episodes: a fresh instance per episode, a fresh process after a
crash or timeout, a bounded pool, closed at the end; and multi-agent packages played in the sandbox."""

from __future__ import annotations

import math
import os
import re
import textwrap
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from opentinker.env.codec import ByteCodec
from opentinker.env.multiagent import MultiAgentProtocol, RulePolicy
from opentinker.env.protocol import Budget, SingleTurnProtocol, StopReason
from opentinker.env.sandbox import (
    Sandbox,
    SandboxedEnvironment,
    SandboxedMultiAgentEnvironment,
    SandboxError,
    SandboxLimits,
    SandboxPool,
)
from tests.opentinker.env.scripted import Scripted

FAST = SandboxLimits(call_timeout_s=3, cpu_s=20, memory_mb=512, max_processes=8)

# Reports its process, how many instances this process made (module state) and whether the previous
# episode's scratch file is still in its working directory or its /tmp. `fail` maps a seed to how step
# breaks, `spin` a seed to the CPU seconds the process must have used when its reset returns.
COUNTER = """
import os, time
from opentinker.env import Environment, Observation, StepResult

MADE = 0


class E(Environment):
    name = "counter"

    def __init__(self, fail=None, spin=None):
        global MADE
        MADE += 1
        self.n, self.fail, self.spin, self.seed = MADE, fail or {}, spin or {}, None

    def reset(self, seed):
        self.seed = seed
        leftover = os.path.exists("scratch") or os.path.exists("/tmp/scratch")
        open("scratch", "w").write("x")
        open("/tmp/scratch", "w").write("x")  # the sandbox's own /tmp, emptied between episodes too
        # Burn CPU until this process has used `spin[seed]` CPU seconds in all: its own clock, the one
        # RLIMIT_CPU counts, so the total does not depend on how fast the machine started the process.
        while time.process_time() < self.spin.get(str(seed), 0):
            pass
        return Observation(f"{os.getpid()} {self.n} {leftover}")

    def step(self, action):
        how = self.fail.get(str(self.seed))
        if how == "crash":
            os._exit(3)
        if how == "hang":
            time.sleep(3600)
        if how == "raise":
            raise RuntimeError("broke")
        return StepResult(None, 1.0, True)
"""


def counter_pool(tmp_path, config=None, *, size=2, limits=FAST) -> SandboxPool:
    (tmp_path / "counter_env.py").write_text(COUNTER)
    return SandboxPool("counter_env:E", config or {}, package_dir=tmp_path, limits=limits, size=size)


def episode(pool: SandboxPool, seed: int):
    """One episode; its process id, the instance's number in that process and whether it found a file."""
    env = SandboxedEnvironment(pool=pool)
    pid = env.sandbox.worker_pid  # on the host; the package sees its own PID namespace's number
    try:
        ep = SingleTurnProtocol().run(env, Scripted(["7"]), ByteCodec(), seed=seed)
    finally:
        env.close()
    seen = re.search(r"(\d+) (\d+) (True|False)", ByteCodec().decode(ep.token_ids[: ep.prompt_len]))
    assert seen
    return ep, pid, int(seen[2]), seen[3] == "True"


def test_episodes_share_one_process_each_with_a_fresh_instance_and_an_empty_directory(tmp_path):
    pool = counter_pool(tmp_path)
    try:
        runs = [episode(pool, seed) for seed in range(6)]
    finally:
        pool.close()
    assert all(ep.stop_reason is StopReason.DONE and ep.reward == 1.0 for ep, *_ in runs)
    assert pool.spawned == 1
    assert len({pid for _, pid, _, _ in runs}) == 1
    assert [n for _, _, n, _ in runs] == [1, 2, 3, 4, 5, 6]  # a new instance per episode, in that process
    assert not any(leftover for *_, leftover in runs)  # the last episode's files are gone


def test_closing_an_environment_twice_gives_its_process_back_once(tmp_path):
    pool = counter_pool(tmp_path)
    try:
        first = SandboxedEnvironment(pool=pool)
        first.close()
        first.close()  # must not put the same process in the pool twice
        assert len(pool._idle) == 1
        a, b = SandboxedEnvironment(pool=pool), SandboxedEnvironment(pool=pool)
        assert a.sandbox is not b.sandbox  # two episodes never share one process
        assert pool.spawned == 2
        a.close()
        b.close()
    finally:
        pool.close()


def test_a_crash_or_timeout_gets_a_fresh_process_and_the_next_episode_succeeds(tmp_path):
    pool = counter_pool(tmp_path, {"fail": {"1": "raise", "2": "crash", "4": "hang"}})
    try:
        runs = [episode(pool, seed) for seed in range(6)]
    finally:
        pool.close()
    errors = [ep.error for ep, *_ in runs]
    assert errors == [
        None,
        "step failed: SandboxError: step raised RuntimeError: broke",
        "step failed: SandboxError: step: the environment process died (exit code 3)",
        None,
        "step failed: SandboxError: step timed out after 3s",
        None,
    ]
    pids = [pid for _, pid, _, _ in runs]
    # An exception leaves the process usable (a fresh instance follows); a crash or a hang does not.
    assert pids[0] == pids[1] == pids[2] != pids[3] == pids[4] != pids[5]
    assert pool.spawned == 3
    assert [n for _, _, n, _ in runs] == [1, 2, 3, 1, 2, 1]


def test_concurrent_episodes_beyond_the_pool_size_get_their_own_processes_which_are_closed(tmp_path):
    pool = counter_pool(tmp_path, size=2)
    with ThreadPoolExecutor(4) as ex:
        envs = list(ex.map(lambda _: SandboxedEnvironment(pool=pool), range(4)))
    assert pool.spawned == 4  # never blocks: 4 live episodes, 4 processes
    procs = [env.sandbox.proc for env in envs]
    for env in envs:
        env.close()
    assert sum(p.poll() is None for p in procs) == 2  # 2 kept, 2 closed
    try:
        for seed in range(5):
            ep, *_ = episode(pool, seed)
            assert ep.stop_reason is StopReason.DONE
        assert pool.spawned == 4
    finally:
        pool.close()
    assert all(p.poll() is not None for p in procs)  # closed with the pool
    with pytest.raises(SandboxError, match="pool is closed"):
        pool.acquire()


TICK = 1 / os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """The CPU time (user + system) a process has used, as the kernel counts it (in clock ticks)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) * TICK


def start_up_cpu_seconds(tmp_path) -> float:
    """What starting a sandbox process for the counter package costs in CPU on this machine, measured."""
    (tmp_path / "counter_env.py").write_text(COUNTER)
    with Sandbox("counter_env:E", package_dir=tmp_path, limits=FAST) as sandbox:
        return cpu_seconds(sandbox.worker_pid)


def cpu_limits(cpu_s: int) -> SandboxLimits:
    return SandboxLimits(call_timeout_s=60, cpu_s=cpu_s, memory_mb=512, max_processes=8)


def test_a_process_that_spent_its_cpu_budget_is_retired(tmp_path):
    # The budget is set from the measured start-up cost, and the episodes burn CPU up to totals of the
    # process's own clock, so the outcome does not depend on the machine's speed. `cpu_s` per instance (2x for
    # the process): episode 0 brings the process to half of `cpu_s`, so it is reused; episode 1 takes it past
    # `cpu_s` (within its instance's own limit, which starts at least `cpu_s / 2` in): the process could not
    # give another instance its full `cpu_s`, so episode 2 starts a fresh one.
    cpu_s = max(2, math.ceil(4 * start_up_cpu_seconds(tmp_path)))
    spin = {"0": cpu_s / 2, "1": cpu_s + 0.25}
    pool = counter_pool(tmp_path, {"spin": spin}, limits=cpu_limits(cpu_s))
    try:
        first = episode(pool, 0)
        assert [s.worker_pid for s in pool._idle] == [first[1]]  # kept, so its CPU time can be read
        used = cpu_seconds(first[1])  # /proc counts whole clock ticks
        assert cpu_s / 2 - TICK <= used < cpu_s, (used, cpu_s)
        runs = [first, episode(pool, 1), episode(pool, 2)]
    finally:
        pool.close()
    assert [ep.stop_reason for ep, *_ in runs] == [StopReason.DONE] * 3, [ep.error for ep, *_ in runs]
    pids = [pid for _, pid, _, _ in runs]
    assert pids[0] == pids[1] != pids[2] and pool.spawned == 2


def test_an_instance_on_a_reused_process_still_gets_its_own_cpu_limit(tmp_path):
    # `cpu_s` per instance, 2x for the process. The second instance starts with `used` CPU seconds spent
    # (start-up and the first instance), so its own limit ends by ceil(used) + cpu_s. It spins to half a
    # second short of the process's budget: past its own limit, killed by SIGXCPU; had it been allowed the
    # process's rest, it would have finished. `cpu_s` is set from the measured start-up cost so that
    # ceil(used) + cpu_s stays a second under 2 * cpu_s on any machine.
    cpu_s = max(2, math.ceil(2 * start_up_cpu_seconds(tmp_path)) + 1)
    target = 2 * cpu_s - 0.5
    pool = counter_pool(tmp_path, {"spin": {"1": target}}, limits=cpu_limits(cpu_s))
    try:
        first = SandboxedEnvironment(pool=pool)
        first.reset(0)
        first.close()
        second = SandboxedEnvironment(pool=pool)
        assert second.sandbox is first.sandbox  # the same process, renewed
        used = cpu_seconds(second.sandbox.worker_pid) + TICK  # /proc counts whole clock ticks
        assert math.ceil(used) + cpu_s <= target - 0.5, (used, cpu_s)
        with pytest.raises(
            SandboxError, match=r"reset: the environment process died \(SIGXCPU, CPU time limit\)"
        ):
            second.reset(1)
        second.close()
    finally:
        pool.close()


def test_size_zero_starts_a_process_per_episode(tmp_path):
    pool = counter_pool(tmp_path, size=0)
    pids = [episode(pool, seed)[1] for seed in range(3)]
    assert len(set(pids)) == 3 and pool.spawned == 3
    with pytest.raises(ValueError, match="0 or more"):
        SandboxPool("counter_env:E", package_dir=tmp_path, size=-1)


DUEL = """
import os
from opentinker.env.base import Observation
from opentinker.env.multiagent import MultiAgentEnvironment, MultiStepResult, TurnOrder


class Duel(MultiAgentEnvironment):
    name = "duel"
    roles = ("left", "right")
    turn_order = TurnOrder.SIMULTANEOUS

    def __init__(self, crash=(), **config):
        super().__init__(**config)
        self.crash, self.seed, self.round = list(crash), None, 0

    def system_prompt_for(self, role):
        return f"You are {role}."

    def reset(self, seed):
        self.seed, self.round = seed, 0
        return {r: Observation(f"{r} {seed}") for r in self.roles}

    def step(self, actions):
        self.round += 1
        if self.seed in self.crash and self.round == 2:
            os._exit(3)
        rewards = {r: float(len(a)) for r, a in actions.items()}
        done = self.round == 2
        return MultiStepResult({} if done else {r: Observation("again") for r in self.roles}, rewards, done)

    def rule_based_action(self, role):
        return "rule"
"""


def test_a_multi_agent_package_plays_games_in_reused_sandboxes(tmp_path):
    (tmp_path / "duel_env.py").write_text(textwrap.dedent(DUEL))
    pool = SandboxPool("duel_env:Duel", {"crash": [2], "reward_mode": "zero-sum"}, package_dir=tmp_path)
    codec = ByteCodec()
    protocol = MultiAgentProtocol(Budget(max_turns=4, max_new_tokens=8))
    games = []
    try:
        for seed in range(4):
            env = SandboxedMultiAgentEnvironment(pool=pool)
            try:
                assert env.roles == ("left", "right") and env.system_prompt_for("right") == "You are right."
                players = {
                    "left": lambda _ids, _n: [*codec.encode_text("hello"), codec.END],
                    "right": RulePolicy(),
                }
                games.append(protocol.run(env, players, codec, seed))
            finally:
                env.close()
    finally:
        pool.close()
    # Zero-sum, applied by the package's reward mode: "hello" (5) vs "rule" (4) over 2 rounds.
    assert [g.rewards for g in games] == [{"left": 1.0, "right": -1.0}] * 2 + [
        {"left": 0.5, "right": -0.5},  # crashed in round 2: round 1's rewards only
        {"left": 1.0, "right": -1.0},
    ]
    assert [g.stop_reason for g in games] == [
        StopReason.DONE,
        StopReason.DONE,
        StopReason.ENV_ERROR,
        StopReason.DONE,
    ]
    assert games[2].error == "step failed: SandboxError: step: the environment process died (exit code 3)"
    assert pool.spawned == 2
    with pytest.raises(SandboxError, match="is a multi-agent environment"):
        SandboxedEnvironment("duel_env:Duel", package_dir=tmp_path, limits=FAST)
