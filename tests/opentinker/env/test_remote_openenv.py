"""Remote environments against a REAL OpenEnv server (`openenv-core`, its FastAPI app served by uvicorn).

The environment is written against OpenEnv's own `Environment` / `Action` / `Observation` classes, exactly as
an environment owner would, and served by `openenv.core.env_server.create_fastapi_app` on a free port. Our
client (`opentinker.env.remote.RemoteEnvironment`) runs stateful episodes over its WebSocket session; the
plain HTTP `reset`/`step` of an OpenEnv server build a fresh environment per request (shown below).
"""

from __future__ import annotations

import threading
from uuid import uuid4

import httpx
import pytest

# The dev extra installs openenv-core (the SDK itself never needs it): a missing install fails, never skips.
from openenv.core.env_server import Action, Environment, Observation, State, create_fastapi_app
from pydantic import Field

from opentinker.env.codec import ByteCodec
from opentinker.env.protocol import Budget, MultiTurnProtocol, StopReason
from opentinker.env.remote import RemoteEnvironment, RemoteEnvironmentError
from tests.loopback_asgi import serving
from tests.opentinker.env.scripted import Scripted


class CountAction(Action):
    message: str = Field(..., min_length=1, max_length=32)


class GuessAction(Action):
    """Another environment's action model: the text goes in `guess` (found from /schema by the client)."""

    guess: str = Field(..., min_length=1, max_length=32)
    hint: str = ""


class CountObservation(Observation):
    prompt: str = ""


class CountEnvironment(Environment):
    """Say the next number after the seed: reward 1 per right answer; the episode ends after 3 answers."""

    SUPPORTS_CONCURRENT_SESSIONS = True

    def __init__(self) -> None:
        super().__init__()
        self._state = State(episode_id=str(uuid4()), step_count=0)
        self.start = 0

    def reset(self, seed: int | None = None, episode_id: str | None = None, **kwargs) -> CountObservation:
        self.start = seed or 0
        self._state = State(episode_id=episode_id or str(uuid4()), step_count=0)
        return CountObservation(prompt=f"count from {self.start}", reward=0.0, done=False)

    def step(self, action: CountAction | GuessAction, timeout_s=None, **kwargs) -> CountObservation:
        said = action.guess if isinstance(action, GuessAction) else action.message
        if said == "boom":
            raise RuntimeError("kaboom")
        self._state.step_count += 1
        n = self._state.step_count
        right = said == str(self.start + n)
        return CountObservation(prompt=f"said {n}", reward=1.0 if right else 0.0, done=n >= 3)

    @property
    def state(self) -> State:
        return self._state


def serve(action_cls: type[Action], *, max_concurrent_envs: int = 2, wrap=lambda app: app):
    """Serve CountEnvironment on a free port; `wrap` puts an ASGI layer in front (tests/gpu_runtime)."""
    app = wrap(
        create_fastapi_app(
            CountEnvironment, action_cls, CountObservation, max_concurrent_envs=max_concurrent_envs
        )
    )
    with serving(app) as url:
        yield url


@pytest.fixture(scope="module")
def server():
    yield from serve(CountAction)


@pytest.fixture(scope="module")
def guess_server():
    yield from serve(GuessAction)


def test_a_stateful_episode_over_the_websocket_session(server):
    with RemoteEnvironment(server) as env:
        assert env.health()["status"] == "healthy"
        assert "message" in env.schema()["action"]["properties"]
        obs = env.reset(10)
        assert obs.text == "count from 10" and obs.info["remote"] == {"prompt": "count from 10"}
        r1 = env.step("11")
        assert (r1.reward, r1.done, r1.observation.text) == (1.0, False, "said 1")
        assert env.state()["step_count"] == 1  # the session's environment keeps its state ...
        r2, r3 = env.step("wrong"), env.step("13")
        assert (r2.reward, r2.observation.text) == (0.0, "said 2")
        assert (r3.reward, r3.done, r3.observation) == (1.0, True, None)
        assert env.state()["step_count"] == 3
    # ... while OpenEnv's plain HTTP calls build a fresh environment per request: no episode state there.
    assert httpx.get(f"{server}/state").json()["step_count"] == 0
    assert httpx.post(f"{server}/step", json={"action": {"message": "1"}}).json()["observation"] == {
        "prompt": "said 1"
    }


def test_the_protocol_machine_runs_remote_episodes_end_to_end(server):
    for seed, answers, rewards in [(0, ["1", "2", "9"], [1.0, 1.0, 0.0]), (5, ["6", "7", "8"], [1.0] * 3)]:
        env = RemoteEnvironment(server)
        try:
            ep = MultiTurnProtocol(Budget(max_turns=5)).run(env, Scripted(answers), ByteCodec(), seed=seed)
        finally:
            env.close()
        assert ep.stop_reason is StopReason.DONE and ep.error is None
        assert ep.turn_rewards == rewards and [t.action for t in ep.turns] == answers


def test_two_sessions_at_once_keep_separate_episodes(server):
    with RemoteEnvironment(server) as a, RemoteEnvironment(server) as b:
        a.reset(100)
        b.reset(200)
        assert a.step("101").reward == 1.0 and b.step("201").reward == 1.0
        assert a.step("102").reward == 1.0 and b.step("102").reward == 0.0
        assert (a.state()["step_count"], b.state()["step_count"]) == (2, 2)


def test_the_action_field_is_read_from_the_servers_schema(guess_server):
    with RemoteEnvironment(guess_server) as env:
        env.reset(1)
        assert env.action_field is None
        assert env.step("2").reward == 1.0
        assert env.action_field == "guess"  # the one required field of GuessAction
    with RemoteEnvironment(guess_server, action_field="message") as env:  # an explicit, wrong field
        env.reset(1)
        with pytest.raises(RemoteEnvironmentError, match="guess: Field required"):
            env.step("2")


def test_server_side_failures_are_clear_errors(server):
    with RemoteEnvironment(server) as env:
        env.reset(0)
        with pytest.raises(RemoteEnvironmentError) as e:
            env.step("boom")
        assert str(e.value) == "step failed on the server: kaboom (EXECUTION_ERROR)"
        # An action the server's Action model refuses (min_length=1) is a validation error, not a hang.
        with pytest.raises(RemoteEnvironmentError) as e:
            env.step("")
        assert str(e.value) == (
            "step failed on the server: Invalid message (VALIDATION_ERROR): "
            "message: String should have at least 1 character"
        )
        assert env.step("1").reward == 1.0  # errors leave the session usable


def test_a_server_at_its_session_limit_is_waited_for_then_refused_by_name(server):
    # The server allows 2 sessions. A third reset is retried with backoff: it gets the slot a finished
    # episode frees, and is refused with OpenEnv's reason once the retries are spent.
    with RemoteEnvironment(server) as a, RemoteEnvironment(server) as b:
        a.reset(0)
        b.reset(0)
        with RemoteEnvironment(server, retries=1, backoff_s=0.05) as c:
            with pytest.raises(RemoteEnvironmentError) as e:
                c.reset(0)
            assert "failed after 2 attempts" in str(e.value)
            assert "Server at capacity: 2/2 sessions active" in str(e.value) and "CAPACITY_REACHED" in str(
                e.value
            )
        finisher = threading.Timer(0.3, a.close)  # a's episode ends while d is backing off
        finisher.start()
        with RemoteEnvironment(server, retries=4, backoff_s=0.2) as d:
            assert d.reset(7).text == "count from 7"
            assert d.step("8").reward == 1.0
        finisher.join()
