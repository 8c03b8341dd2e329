"""Interaction protocols: the finite-state machine that drives one episode.

`PENDING -> GENERATING -> INTERACTING -> GENERATING -> ... -> TERMINATED`. The runtime supplies a generate
function and a chat codec; the protocol asks the environment for observations, appends their tokens (mask 0)
and the policy's generated tokens (mask 1) to one growing token list. Generated ids are kept exactly as
sampled: the codec only *encodes* environment messages and *decodes* generated text for the environment, so a
turn is never decoded and re-encoded (the multi-turn re-tokenization bug of several RL frameworks).

Training, evaluation and inference all call `Protocol.run`, so an environment behaves the same in each.
Everything is plain Python lists: no torch here.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any
from typing import Protocol as TypingProtocol

from opentinker.env.base import Environment, Observation

Message = dict[str, str]


class State(enum.StrEnum):
    PENDING = "pending"
    GENERATING = "generating"
    INTERACTING = "interacting"
    TERMINATED = "terminated"


_TRANSITIONS = {
    State.PENDING: {State.GENERATING, State.TERMINATED},
    State.GENERATING: {State.INTERACTING, State.TERMINATED},
    State.INTERACTING: {State.GENERATING, State.TERMINATED},
    State.TERMINATED: set(),
}


class StopReason(enum.StrEnum):
    DONE = "done"  # the environment ended the episode
    MAX_TURNS = "max_turns"
    MAX_TOKENS = "max_tokens"  # the episode's budget of generated tokens is spent
    CONTEXT = "context"  # the context window is full
    WALL_TIME = "wall_time"
    ENV_ERROR = "env_error"  # the environment raised, crashed or hung: the episode failed


class Machine:
    """The state of one episode (or one multi-agent game); an illegal transition is a bug, so it raises."""

    def __init__(self) -> None:
        self.state = State.PENDING
        self.history: list[State] = [State.PENDING]

    def to(self, state: State) -> None:
        if state not in _TRANSITIONS[self.state]:
            raise RuntimeError(f"illegal protocol transition {self.state} -> {state}")
        self.state = state
        self.history.append(state)


@dataclass(frozen=True)
class Budget:
    max_turns: int = 1
    max_new_tokens: int = 256  # per generation
    max_tokens: int | None = None  # generated tokens over the whole episode
    max_context: int = 4096  # prompt + all turns
    max_wall_s: float | None = None

    def __post_init__(self) -> None:
        if self.max_turns < 1 or self.max_new_tokens < 1 or self.max_context < 1:
            raise ValueError("budgets must be positive")


@dataclass(frozen=True)
class Generation:
    token_ids: list[int]
    logprobs: list[float] | None = None
    # False when the generation was cut at max_new_tokens instead of ending on a stop token.
    finished: bool = True


# generate(prompt_ids, max_new_tokens) -> Generation (or a plain list of ids, or (ids, logprobs)).
GenerateFn = Callable[[list[int], int], "Generation | list[int] | tuple[list[int], list[float]]"]


class ChatCodec(TypingProtocol):
    """What the protocol needs from a tokenizer and chat template (see `opentinker.env.codec`)."""

    stop_ids: frozenset[int]

    def encode_prompt(self, messages: list[Message], tools: list[dict[str, Any]] | None = None) -> list[int]:
        """The first prompt (system + first observation), ending with the assistant's generation header."""

    def encode_followup(self, message: Message, *, closed: bool) -> list[int]:
        """Tokens after a generated turn: the turn's end (its stop token too when `closed` is False), the
        environment's message, and the next assistant header."""

    def decode(self, token_ids: list[int]) -> str:
        """Generated text for the environment, without special tokens."""


def as_generation(out: Any, max_new_tokens: int, stop_ids: frozenset[int]) -> Generation:
    if isinstance(out, Generation):
        gen = out
    elif isinstance(out, tuple):
        gen = Generation(list(out[0]), list(out[1]))
    else:
        ids = list(out)
        gen = Generation(ids, None, not (len(ids) >= max_new_tokens and (not ids or ids[-1] not in stop_ids)))
    if len(gen.token_ids) > max_new_tokens:
        raise ValueError(f"generate returned {len(gen.token_ids)} tokens, more than {max_new_tokens}")
    if gen.logprobs is not None and len(gen.logprobs) != len(gen.token_ids):
        raise ValueError("generate returned logprobs of a different length than its tokens")
    return gen


@dataclass
class Turn:
    role: str
    start: int  # the generated span is token_ids[start:end]
    end: int
    reward: float = 0.0
    truncated: bool = False
    action: str = ""
    info: dict[str, Any] = field(default_factory=dict)


@dataclass
class Episode:
    """One policy's view of an episode: a single token sequence with its loss mask and per-turn rewards.

    `mask[i]` is 1 for tokens the policy generated (trained) and 0 for prompt and environment tokens.
    `logprobs[i]` is the sampler's log-prob for generated tokens when the generate function gave them, else 0.
    The reward of a turn is what the environment returned for that turn's action; `reward` is their sum plus
    `final_reward` (rewards a role receives without acting again, e.g. losing on the opponent's move).
    """

    role: str = "agent"
    token_ids: list[int] = field(default_factory=list)
    mask: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    prompt_len: int = 0
    turns: list[Turn] = field(default_factory=list)
    final_reward: float = 0.0
    stop_reason: StopReason | None = None
    error: str | None = None
    states: list[State] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def turn_rewards(self) -> list[float]:
        return [t.reward for t in self.turns]

    @property
    def reward(self) -> float:
        return sum(self.turn_rewards) + self.final_reward

    @property
    def failed(self) -> bool:
        """An environment failure: the runtime drops the episode instead of training on it."""
        return self.stop_reason is StopReason.ENV_ERROR

    @property
    def generated_tokens(self) -> int:
        return sum(self.mask)

    def add_reward(self, reward: float) -> None:
        if self.turns:
            self.turns[-1].reward += reward
        else:
            self.final_reward += reward

    def append(self, ids: Sequence[int], *, generated: bool, logprobs: Sequence[float] | None = None) -> None:
        self.token_ids.extend(ids)
        self.mask.extend([1 if generated else 0] * len(ids))
        self.logprobs.extend(logprobs if logprobs is not None else [0.0] * len(ids))


def describe_error(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}"


class Clock:
    def __init__(self, max_wall_s: float | None, now: Callable[[], float] = time.monotonic) -> None:
        self.now = now
        self.deadline = None if max_wall_s is None else now() + max_wall_s

    def expired(self) -> bool:
        return self.deadline is not None and self.now() >= self.deadline


def _messages(env: Environment, obs: Observation) -> list[Message]:
    """The first prompt: the environment's system prompt and the observation, or the whole chat an
    observation carries in `info["messages"]` (a dataset row's prompt: system, few-shot turns, the user's)."""
    chat = obs.info.get("messages")
    if isinstance(chat, list) and chat:
        return [{"role": str(m["role"]), "content": str(m["content"])} for m in chat]
    msgs = [{"role": "system", "content": env.system_prompt}] if env.system_prompt else []
    return [*msgs, {"role": obs.role, "content": obs.text}]


class TurnProtocol:
    """Single-agent protocols: `single-turn`, `multi-turn` and `tool-calling` differ only in their turn
    budget and in whether the environment's tool schemas go into the prompt."""

    kind = "multi-turn"

    def __init__(self, budget: Budget | None = None, *, now: Callable[[], float] = time.monotonic) -> None:
        self.budget = budget or Budget(max_turns=self.default_turns())
        self.now = now

    def default_turns(self) -> int:
        return 8

    def tools_for(self, env: Environment) -> list[dict[str, Any]] | None:
        return None

    def run(self, env: Environment, generate: GenerateFn, codec: ChatCodec, seed: int) -> Episode:
        b = self.budget
        clock = Clock(b.max_wall_s, self.now)
        m = Machine()
        ep = Episode(role=env.roles[0] if env.roles else "agent", states=m.history)
        try:
            obs = env.reset(seed)
        except Exception as e:
            return self._stop(ep, m, StopReason.ENV_ERROR, f"reset failed: {describe_error(e)}")
        ep.append(codec.encode_prompt(_messages(env, obs), self.tools_for(env)), generated=False)
        ep.prompt_len = len(ep.token_ids)
        while True:
            reason = self._budget_left(ep, clock)
            if reason:
                return self._stop(ep, m, reason)
            m.to(State.GENERATING)
            max_new = self._max_new(ep)
            gen = as_generation(generate(list(ep.token_ids), max_new), max_new, codec.stop_ids)
            start = len(ep.token_ids)
            ep.append(gen.token_ids, generated=True, logprobs=gen.logprobs)
            text = codec.decode(gen.token_ids)
            turn = Turn(ep.role, start, len(ep.token_ids), truncated=not gen.finished)
            ep.turns.append(turn)
            m.to(State.INTERACTING)
            try:
                turn.action = env.parse_action(text)
                result = env.step(turn.action)
            except Exception as e:
                return self._stop(ep, m, StopReason.ENV_ERROR, f"step failed: {describe_error(e)}")
            turn.reward = float(result.reward)
            turn.info = dict(result.info)
            ep.metrics.update(result.info.get("metrics", {}))
            if result.done:
                return self._stop(ep, m, StopReason.DONE)
            if len(ep.turns) >= b.max_turns:
                return self._stop(ep, m, StopReason.MAX_TURNS)
            if result.observation is None:
                return self._stop(ep, m, StopReason.ENV_ERROR, "step returned no observation and done=False")
            follow = codec.encode_followup(
                {"role": result.observation.role, "content": result.observation.text}, closed=gen.finished
            )
            if len(ep.token_ids) + len(follow) >= b.max_context:
                return self._stop(ep, m, StopReason.CONTEXT)
            ep.append(follow, generated=False)

    def _max_new(self, ep: Episode) -> int:
        b = self.budget
        limits = [b.max_new_tokens, b.max_context - len(ep.token_ids)]
        if b.max_tokens is not None:
            limits.append(b.max_tokens - ep.generated_tokens)
        return min(limits)

    def _budget_left(self, ep: Episode, clock: Clock) -> StopReason | None:
        b = self.budget
        if clock.expired():
            return StopReason.WALL_TIME
        if b.max_tokens is not None and ep.generated_tokens >= b.max_tokens:
            return StopReason.MAX_TOKENS
        if len(ep.token_ids) >= b.max_context:
            return StopReason.CONTEXT
        return None

    @staticmethod
    def _stop(ep: Episode, m: Machine, reason: StopReason, error: str | None = None) -> Episode:
        m.to(State.TERMINATED)
        ep.stop_reason = reason
        ep.error = error
        return ep


class SingleTurnProtocol(TurnProtocol):
    kind = "single-turn"

    def __init__(self, budget: Budget | None = None, **kw: Any) -> None:
        super().__init__(budget or Budget(max_turns=1), **kw)
        if self.budget.max_turns != 1:
            raise ValueError("a single-turn protocol has exactly one turn")

    def default_turns(self) -> int:
        return 1


class MultiTurnProtocol(TurnProtocol):
    kind = "multi-turn"


class ToolCallingProtocol(TurnProtocol):
    kind = "tool-calling"

    def tools_for(self, env: Environment) -> list[dict[str, Any]] | None:
        return list(getattr(env, "tool_schemas", None) or []) or None


PROTOCOLS: dict[str, type[TurnProtocol]] = {
    p.kind: p for p in (SingleTurnProtocol, MultiTurnProtocol, ToolCallingProtocol)
}


def protocol_for(kind: str, budget: Budget | None = None) -> TurnProtocol:
    """The single-agent protocol of a manifest's `protocol` kind (multi-agent: `MultiAgentProtocol`)."""
    try:
        return PROTOCOLS[kind](budget)
    except KeyError:
        raise ValueError(f"unknown protocol kind {kind!r}; one of {', '.join(PROTOCOLS)}") from None
