"""Multi-agent environments and the coordinator that runs them.

An environment declares its roles and turn order. Each round the coordinator asks every active role's policy
for an action (one role in round-robin order, all roles at once when simultaneous), waits for all of them (the
barrier), and steps the environment once with the round's actions. Each role has its own token sequence built
from its own observations, so each role's episode is one training sample for that role's policy. Roles map to
policies by the caller: the same generate function for every role is self-play; distinct functions are
distinct policies trained in one job; a `RulePolicy` plays without tokens (a rule-based opponent).
"""

from __future__ import annotations

import enum
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

from opentinker.env.base import Environment, Observation, StepResult
from opentinker.env.protocol import (
    Budget,
    ChatCodec,
    Clock,
    Episode,
    GenerateFn,
    Machine,
    Message,
    State,
    StopReason,
    Turn,
    as_generation,
    describe_error,
)


class TurnOrder(enum.StrEnum):
    ROUND_ROBIN = "round-robin"
    SIMULTANEOUS = "simultaneous"


class RewardMode(enum.StrEnum):
    ZERO_SUM = "zero-sum"  # each role gets its reward minus the mean of all roles': rewards sum to zero
    COOPERATIVE = "cooperative"  # every role gets the team's total
    CUSTOM = "custom"  # the environment's `assign_rewards`, by default its rewards as returned


@dataclass(frozen=True)
class MultiStepResult:
    observations: dict[str, Observation]  # per role: what that role is shown next; absent = nothing new
    rewards: dict[str, float]
    done: bool
    info: dict[str, Any] = field(default_factory=dict)


class MultiAgentEnvironment(ABC):
    name: ClassVar[str] = ""
    roles: ClassVar[tuple[str, ...]] = ()
    system_prompt: ClassVar[str] = ""
    turn_order: ClassVar[TurnOrder] = TurnOrder.ROUND_ROBIN
    reward_mode: ClassVar[RewardMode] = RewardMode.CUSTOM

    def __init__(self, **config: Any) -> None:
        self.config = config
        self._next = 0
        if "reward_mode" in config:
            self.reward_mode = RewardMode(config["reward_mode"])  # type: ignore[misc]

    @abstractmethod
    def reset(self, seed: int) -> dict[str, Observation]:
        """Start a game; returns each role's first observation."""

    @abstractmethod
    def step(self, actions: dict[str, str]) -> MultiStepResult:
        """Apply one round's actions (one per active role)."""

    def active_roles(self) -> list[str]:
        """Who acts next. Round-robin by default; override for games where a role may move again."""
        if self.turn_order is TurnOrder.SIMULTANEOUS:
            return list(self.roles)
        return [self.roles[self._next % len(self.roles)]]

    def advance(self) -> None:
        """Called by round-robin environments after a legal move to pass the turn on."""
        self._next += 1

    def system_prompt_for(self, role: str) -> str:
        return self.system_prompt

    def parse_action(self, role: str, text: str) -> str:
        return text.strip()

    def rule_based_action(self, role: str) -> str:
        raise NotImplementedError(f"{self.name} has no rule-based player")

    def assign_rewards(self, rewards: dict[str, float]) -> dict[str, float]:
        """The custom reward assignment (RewardMode.CUSTOM); identity unless overridden."""
        return rewards

    def close(self) -> None:  # noqa: B027 (optional hook)
        """Release resources."""


def assign_rewards(env: MultiAgentEnvironment, raw: dict[str, float]) -> dict[str, float]:
    full = {r: float(raw.get(r, 0.0)) for r in env.roles}
    if env.reward_mode is RewardMode.ZERO_SUM:
        mean = sum(full.values()) / len(full)
        return {r: v - mean for r, v in full.items()}
    if env.reward_mode is RewardMode.COOPERATIVE:
        total = sum(full.values())
        return dict.fromkeys(full, total)
    return {r: float(v) for r, v in env.assign_rewards(full).items()}


@dataclass(frozen=True)
class RulePolicy:
    """A role played by code, not a model: `fn(env, role) -> action text`. `RulePolicy()` uses the
    environment's own `rule_based_action`."""

    fn: Callable[[MultiAgentEnvironment, str], str] | None = None

    def act(self, env: MultiAgentEnvironment, role: str) -> str:
        return self.fn(env, role) if self.fn else env.rule_based_action(role)


@dataclass
class MultiAgentEpisode:
    per_role: dict[str, Episode]  # rule-played roles have an episode without tokens (rewards only)
    stop_reason: StopReason | None = None
    error: str | None = None
    rounds: int = 0
    states: list[State] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def rewards(self) -> dict[str, float]:
        return {r: e.reward for r, e in self.per_role.items()}

    @property
    def failed(self) -> bool:
        return self.stop_reason is StopReason.ENV_ERROR


class MultiAgentProtocol:
    """Run one game. `budget` applies per role (tokens, context, per-generation length) except `max_turns`,
    which counts rounds, and `max_wall_s`, which counts the whole game."""

    kind = "multi-agent"

    def __init__(self, budget: Budget | None = None, *, now: Callable[[], float] = time.monotonic) -> None:
        self.budget = budget or Budget(max_turns=64)
        self.now = now

    def run(
        self,
        env: MultiAgentEnvironment,
        policies: Mapping[str, GenerateFn | RulePolicy],
        codec: ChatCodec | Mapping[str, ChatCodec],
        seed: int,
    ) -> MultiAgentEpisode:
        missing = set(env.roles) - set(policies)
        if missing:
            raise ValueError(f"no policy for role(s) {', '.join(sorted(missing))}")
        codecs = dict(codec) if isinstance(codec, Mapping) else dict.fromkeys(env.roles, codec)
        m = Machine()
        game = MultiAgentEpisode({r: Episode(role=r, states=[]) for r in env.roles}, states=m.history)
        pending: dict[str, list[Message]] = {r: [] for r in env.roles}
        closed = dict.fromkeys(env.roles, True)
        clock = Clock(self.budget.max_wall_s, self.now)
        try:
            first = env.reset(seed)
        except Exception as e:
            return self._stop(game, m, StopReason.ENV_ERROR, f"reset failed: {describe_error(e)}")
        for role in env.roles:
            if env.system_prompt_for(role):
                pending[role].append({"role": "system", "content": env.system_prompt_for(role)})
            if role in first:
                pending[role].append({"role": first[role].role, "content": first[role].text})
        while True:
            if clock.expired():
                return self._stop(game, m, StopReason.WALL_TIME)
            try:
                active = env.active_roles()
            except Exception as e:
                return self._stop(game, m, StopReason.ENV_ERROR, f"active_roles failed: {describe_error(e)}")
            m.to(State.GENERATING)
            actions: dict[str, str] = {}
            # The barrier: every active role acts on the same state before the environment steps once.
            for role in active:
                policy = policies[role]
                if isinstance(policy, RulePolicy):
                    try:
                        actions[role] = policy.act(env, role)
                    except Exception as e:
                        return self._stop(
                            game, m, StopReason.ENV_ERROR, f"rule policy failed: {describe_error(e)}"
                        )
                    continue
                ep = game.per_role[role]
                stop = self._render(ep, pending[role], codecs[role], closed[role])
                if stop:
                    return self._stop(game, m, stop)
                max_new = self._max_new(ep)
                gen = as_generation(policy(list(ep.token_ids), max_new), max_new, codecs[role].stop_ids)
                start = len(ep.token_ids)
                ep.append(gen.token_ids, generated=True, logprobs=gen.logprobs)
                closed[role] = gen.finished
                text = codecs[role].decode(gen.token_ids)
                try:
                    action = env.parse_action(role, text)
                except Exception as e:
                    return self._stop(
                        game, m, StopReason.ENV_ERROR, f"parse_action failed: {describe_error(e)}"
                    )
                ep.turns.append(
                    Turn(role, start, len(ep.token_ids), truncated=not gen.finished, action=action)
                )
                actions[role] = action
            m.to(State.INTERACTING)
            try:
                result = env.step(actions)
                rewards = assign_rewards(env, result.rewards)
            except Exception as e:
                return self._stop(game, m, StopReason.ENV_ERROR, f"step failed: {describe_error(e)}")
            game.rounds += 1
            for role, r in rewards.items():
                game.per_role[role].add_reward(r)
            for role in actions:
                turns = game.per_role[role].turns
                if turns:
                    turns[-1].info = dict(result.info)
            for role, obs in result.observations.items():
                pending[role].append({"role": obs.role, "content": obs.text})
            if result.done:
                game.info.update(result.info)
                return self._stop(game, m, StopReason.DONE)
            if game.rounds >= self.budget.max_turns:
                return self._stop(game, m, StopReason.MAX_TURNS)

    def _render(
        self, ep: Episode, pending: list[Message], codec: ChatCodec, closed: bool
    ) -> StopReason | None:
        """Append the role's unseen observations (merged into one message) before it generates."""
        b = self.budget
        if not ep.token_ids:
            ids = codec.encode_prompt(pending)
            ep.append(ids, generated=False)
            ep.prompt_len = len(ids)
        elif pending:
            merged = {"role": pending[-1]["role"], "content": "\n".join(p["content"] for p in pending)}
            ids = codec.encode_followup(merged, closed=closed)
            if len(ep.token_ids) + len(ids) >= b.max_context:
                return StopReason.CONTEXT
            ep.append(ids, generated=False)
        pending.clear()
        if len(ep.token_ids) >= b.max_context:
            return StopReason.CONTEXT
        if b.max_tokens is not None and ep.generated_tokens >= b.max_tokens:
            return StopReason.MAX_TOKENS
        return None

    def _max_new(self, ep: Episode) -> int:
        b = self.budget
        limits = [b.max_new_tokens, b.max_context - len(ep.token_ids)]
        if b.max_tokens is not None:
            limits.append(b.max_tokens - ep.generated_tokens)
        return min(limits)

    @staticmethod
    def _stop(
        game: MultiAgentEpisode, m: Machine, reason: StopReason, error: str | None = None
    ) -> MultiAgentEpisode:
        m.to(State.TERMINATED)
        game.stop_reason = reason
        game.error = error
        for ep in game.per_role.values():
            ep.stop_reason, ep.error, ep.states = reason, error, list(m.history)
        return game


class VersusRule(Environment):
    """A multi-agent environment seen by one role, the other roles played by rule: a plain single-agent
    multi-turn `Environment`, so a runtime without multi-agent support can train against a fixed opponent."""

    def __init__(self, game: MultiAgentEnvironment, role: str, opponent: RulePolicy | None = None) -> None:
        super().__init__(**game.config)
        if role not in game.roles:
            raise ValueError(f"{game.name} has no role {role!r}")
        self.game, self.role, self.opponent = game, role, opponent or RulePolicy()
        self.name = game.name  # type: ignore[misc]
        self.system_prompt = game.system_prompt_for(role)  # type: ignore[misc]
        self.roles = (role,)  # type: ignore[misc]

    def _play_others(self, obs: list[str], reward: float) -> tuple[list[str], float, bool, dict[str, Any]]:
        info: dict[str, Any] = {}
        while self.role not in (active := self.game.active_roles()):
            result = self.game.step({r: self.opponent.act(self.game, r) for r in active})
            rewards = assign_rewards(self.game, result.rewards)
            reward += rewards.get(self.role, 0.0)
            if self.role in result.observations:
                obs.append(result.observations[self.role].text)
            info = result.info
            if result.done:
                return obs, reward, True, info
        return obs, reward, False, info

    def reset(self, seed: int) -> Observation:
        first = self.game.reset(seed)
        texts = [first[self.role].text] if self.role in first else []
        texts, _, _, _ = self._play_others(texts, 0.0)
        return Observation("\n".join(texts))

    def step(self, action: str) -> StepResult:
        result = self.game.step({self.role: self.game.parse_action(self.role, action)})
        reward = assign_rewards(self.game, result.rewards).get(self.role, 0.0)
        texts = [result.observations[self.role].text] if self.role in result.observations else []
        if result.done:
            return StepResult(None, reward, True, result.info)
        texts, reward, done, info = self._play_others(texts, reward)
        return StepResult(None if done else Observation("\n".join(texts)), reward, done, info or result.info)

    def close(self) -> None:
        self.game.close()
