"""The failure policy (gpu_runtime.failure_policy) and session queueing, on jobs against REAL OpenEnv servers
on loopback (admitted by the runtime's egress allow-list, as a platform admin would for a private server):

- a server with one session slot (openenv-core's default): the job's episodes queue for the slot and all run;
- a dead server: the job fails, and its reason names what the episodes died of;
- a server whose reward never varies: no learning signal, the job fails after `zero_signal_steps`;
- eval jobs: report failed episodes, fail when none completed.
"""

from __future__ import annotations

import socket
import threading
from uuid import uuid4

import pytest

from gpu_runtime.controller import EXIT_FAILED, EXIT_OK, Controller, LocalGroup
from gpu_runtime.failure_policy import FailureWatch
from opentinker.spec import EnvironmentSpec, FailurePolicySpec, JobSpec
from tests.gpu_runtime.conftest import small_spec
from tests.gpu_runtime.test_controller import ListSink

# The GPU image (bench/gpu_check.sh) collects this folder without the platform's test packages: skipped there.
pytest.importorskip("uvicorn")
_server = pytest.importorskip("openenv.core.env_server")
Action, Environment, Observation, State = (
    _server.Action,
    _server.Environment,
    _server.Observation,
    _server.State,
)
create_fastapi_app = _server.create_fastapi_app

from tests.loopback_asgi import serving  # noqa: E402 (needs uvicorn: after the skip)


class SayAction(Action):
    message: str = ""  # any generated text is a valid action: episodes fail only for the server's reasons


class SayObservation(Observation):
    prompt: str = ""


class OneShot(Environment):
    """One step per episode; the reward is 1 when the answer holds a digit, or always `CONSTANT` if set."""

    SUPPORTS_CONCURRENT_SESSIONS = True
    CONSTANT: float | None = None

    def __init__(self) -> None:
        super().__init__()
        self._state = State(episode_id=str(uuid4()), step_count=0)

    def reset(self, seed: int | None = None, episode_id: str | None = None, **kwargs) -> SayObservation:
        self._state = State(episode_id=episode_id or str(uuid4()), step_count=0)
        return SayObservation(prompt=f"say a number ({seed})", reward=0.0, done=False)

    def step(self, action: SayAction, timeout_s=None, **kwargs) -> SayObservation:
        self._state.step_count += 1
        reward = (
            self.CONSTANT if self.CONSTANT is not None else float(any(c.isdigit() for c in action.message))
        )
        return SayObservation(prompt="done", reward=reward, done=True)

    @property
    def state(self) -> State:
        return self._state


class Constant(OneShot):
    CONSTANT = 0.5


class Counting:
    """ASGI layer in front of the app: counts WebSocket sessions opened and the most open at once."""

    def __init__(self, app) -> None:
        self.app, self.open, self.most, self.sessions = app, 0, 0, 0
        self.lock = threading.Lock()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "websocket":
            return await self.app(scope, receive, send)
        with self.lock:
            self.open += 1
            self.sessions += 1
            self.most = max(self.most, self.open)
        try:
            return await self.app(scope, receive, send)
        finally:
            with self.lock:
                self.open -= 1


def serve(env_cls, *, max_concurrent_envs: int):
    app = Counting(
        create_fastapi_app(env_cls, SayAction, SayObservation, max_concurrent_envs=max_concurrent_envs)
    )
    with serving(app) as url:
        yield url, app


def allow(monkeypatch, url: str) -> None:
    monkeypatch.setenv("OPENTINKER_EGRESS_ALLOW", url.removeprefix("http://"))


def remote_spec(
    url: str, *, kind: str = "rl", steps: int = 3, policy: dict | None = None, **config
) -> JobSpec:
    spec = small_spec(steps=steps).model_dump(mode="json")
    spec["environment"] = EnvironmentSpec(ref=url, config={"backoff_s": 0.05, **config}).model_dump(
        mode="json"
    )
    spec["failure_policy"] = policy or {}
    if kind == "eval":
        spec.update(
            kind="eval", algorithm={"name": "eval", "batch_size": 2, "group_size": 2, "max_new_tokens": 4}
        )
    return JobSpec.model_validate(spec)


def events(sink: ListSink, kind: str) -> list[dict]:
    return [r for r in sink.records if r["type"] == "event" and r["event"] == kind]


def run(spec: JobSpec, tmp_path):
    sink = ListSink()
    result = Controller(spec, sink, LocalGroup(spec), f"file://{tmp_path}/ck").run()
    return result, sink


@pytest.fixture
def one_slot():
    yield from serve(OneShot, max_concurrent_envs=1)


@pytest.fixture
def dead_url():
    """A loopback port with nothing accepting (bound, never listening): every connection is refused."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        yield f"http://127.0.0.1:{s.getsockname()[1]}"


@pytest.mark.slow
def test_a_one_slot_server_runs_every_episode_within_its_slot(tmp_path, monkeypatch, one_slot):
    url, app = one_slot
    allow(monkeypatch, url)
    result, sink = run(remote_spec(url), tmp_path)
    assert (result.exit_code, result.status) == (EXIT_OK, "succeeded")
    steps = sink.metric_steps()
    assert [steps[s]["episodes/failed"] for s in (1, 2, 3)] == [0.0, 0.0, 0.0]
    assert [steps[s]["episodes/total"] for s in (1, 2, 3)] == [4.0, 4.0, 4.0]
    # 12 episodes, each in its own session, one at a time once the limit was learned (the first step's
    # extra sessions were refused at capacity by the server, then queued).
    assert app.most >= 1 and app.sessions >= 12


@pytest.mark.slow
def test_a_dead_server_fails_the_job_saying_why(tmp_path, monkeypatch, dead_url):
    allow(monkeypatch, dead_url)
    result, sink = run(remote_spec(dead_url, steps=5, retries=0), tmp_path)
    assert (result.exit_code, result.status, result.step) == (EXIT_FAILED, "failed", 3)
    (failed,) = events(sink, "failed")
    reason = failed["error"]
    assert "episode failure rate above 50% for 3 consecutive steps" in reason
    assert "4 of 4 episodes failed at step 3" in reason
    assert f"connecting to {dead_url}/ws" in reason or dead_url in reason
    assert not events(sink, "finished")  # never succeeded


@pytest.mark.slow
def test_a_job_without_learning_signal_fails_after_zero_signal_steps(tmp_path, monkeypatch):
    for url, _app in serve(Constant, max_concurrent_envs=4):
        allow(monkeypatch, url)
        result, sink = run(remote_spec(url, steps=6, policy={"zero_signal_steps": 2}), tmp_path)
    assert (result.exit_code, result.status, result.step) == (EXIT_FAILED, "failed", 2)
    (failed,) = events(sink, "failed")
    assert failed["error"].startswith("no learning signal for 2 consecutive steps")
    assert "mean reward 0.5" in failed["error"]
    assert sink.metric_steps()[2]["groups/zero_std_frac"] == 1.0


@pytest.mark.slow
def test_eval_jobs_count_failed_episodes_and_fail_when_none_completed(
    tmp_path, monkeypatch, one_slot, dead_url
):
    url, _ = one_slot
    allow(monkeypatch, url)
    result, sink = run(remote_spec(url, kind="eval"), tmp_path)
    assert result.exit_code == EXIT_OK
    m = sink.metric_steps()[0]
    assert (m["eval/episodes"], m["eval/episodes_failed"]) == (4.0, 0.0)

    allow(monkeypatch, dead_url)
    result, sink = run(remote_spec(dead_url, kind="eval", retries=0), tmp_path)
    assert (result.exit_code, result.status) == (EXIT_FAILED, "failed")
    m = sink.metric_steps()[0]
    assert (m["eval/episodes"], m["eval/episodes_failed"], m["eval/accuracy"]) == (4.0, 4.0, 0.0)
    (failed,) = events(sink, "failed")
    assert failed["error"].startswith("no evaluation episode completed: all 4 failed")
    assert dead_url in failed["error"]


# ---- the watch itself, over metrics (no model) -------------------------------------------------------------


def watch(**policy) -> FailureWatch:
    spec = small_spec().model_copy(update={"failure_policy": FailurePolicySpec(**policy)})
    return FailureWatch(spec, lambda: ["reset failed: connection refused"])


def test_failure_rate_must_stay_above_the_threshold_for_consecutive_steps():
    w = watch()  # defaults: > 50% for 3 steps
    ok, bad, half = (
        {"episodes/failed": 0.0, "episodes/total": 4.0, "groups/zero_std_frac": 0.5},
        {"episodes/failed": 3.0, "episodes/total": 4.0, "groups/zero_std_frac": 0.5},
        {"episodes/failed": 2.0, "episodes/total": 4.0, "groups/zero_std_frac": 0.5},
    )
    assert [w.after_step(i, m) for i, m in enumerate([bad, bad, ok, bad, half, bad, bad], 1)] == [None] * 7
    reason = w.after_step(8, bad)
    assert reason is not None and "3 of 4 episodes failed at step 8" in reason
    assert "connection refused" in reason


def test_zero_signal_counts_consecutive_steps_and_can_be_turned_off():
    w = watch(zero_signal_steps=3)
    flat = {"episodes/failed": 0.0, "episodes/total": 4.0, "groups/zero_std_frac": 1.0, "reward/mean": 0.0}
    some = {**flat, "groups/zero_std_frac": 0.5}
    assert [w.after_step(i, m) for i, m in enumerate([flat, flat, some, flat, flat], 1)] == [None] * 5
    assert "no learning signal for 3 consecutive steps" in w.after_step(6, flat)
    off = watch(zero_signal_steps=None)
    assert all(off.after_step(i, flat) is None for i in range(1, 100))


def test_defaults_are_generous():
    p = FailurePolicySpec()
    assert (p.max_episode_failure_rate, p.failure_rate_steps, p.zero_signal_steps) == (0.5, 3, 30)
    assert JobSpec.model_validate(small_spec().model_dump()).failure_policy == p
    with pytest.raises(ValueError, match="zero_signal_steps"):
        FailurePolicySpec(zero_signal_steps=0)


def test_the_eval_rule_reads_single_and_multi_agent_eval_metrics():
    w = watch()
    assert w.after_eval({"eval/episodes": 8.0, "eval/episodes_failed": 7.0}) is None
    assert w.after_eval({"eval/episodes": 8.0, "eval/episodes_failed": 8.0}) == (
        "no evaluation episode completed: all 8 failed; "
        "episodes failed with: reset failed: connection refused"
    )
    assert w.after_eval({"eval/episodes/total": 4.0, "eval/episodes/failed": 3.0}) is None  # games
    assert "all 4 failed" in w.after_eval({"eval/episodes/total": 4.0, "eval/episodes/failed": 4.0})
    assert w.after_eval({"eval/accuracy": 0.0}) is None  # nothing to judge by: never a guess


def test_a_job_shorter_than_the_streak_fails_when_every_step_was_failing():
    bad = {"episodes/failed": 4.0, "episodes/total": 4.0}
    ok = {"episodes/failed": 0.0, "episodes/total": 4.0, "groups/zero_std_frac": 0.5}
    w = watch()
    w.spec = w.spec.model_copy(update={"algorithm": w.spec.algorithm.model_copy(update={"steps": 2})})
    assert w.after_step(1, bad) is None
    assert "4 of 4 episodes failed at step 2" in w.after_step(2, bad)
    w = watch()
    w.spec = w.spec.model_copy(update={"algorithm": w.spec.algorithm.model_copy(update={"steps": 2})})
    assert [w.after_step(1, ok), w.after_step(2, bad)] == [None, None]  # one step ran its episodes
