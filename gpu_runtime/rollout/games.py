"""Multi-agent games, batched across games and routed per policy.

Each game runs in its own thread through `MultiAgentProtocol` (turn order, per-role observations, barriers,
reward assignment), exactly as in evaluation and inference. A role's generate call parks in the shared
`_Batcher` tagged with the policy that plays the role; once every live game waits, one batch per policy goes
to that policy's engine. Rule-played roles act in their game's thread without tokens.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

from gpu_runtime.rollout.base import GenerateResult, RolloutEngine, SamplingParams
from gpu_runtime.rollout.collector import _Batcher
from opentinker.env.multiagent import MultiAgentEnvironment, MultiAgentEpisode, MultiAgentProtocol, RulePolicy
from opentinker.env.protocol import ChatCodec, StopReason


class WithStops(RolloutEngine):
    """An engine that always stops on its own tokenizer's end-of-turn ids: policies with different
    tokenizers share one batcher (and its one `SamplingParams`)."""

    def __init__(self, engine: RolloutEngine, stop_ids: frozenset[int]) -> None:
        self.engine = engine
        self.stop_ids = tuple(sorted(stop_ids))

    def generate(
        self, prompts: list[list[int]], sampling: SamplingParams, seeds: Sequence[int] | None = None
    ) -> GenerateResult:
        return self.engine.generate(prompts, replace(sampling, stop_ids=self.stop_ids), seeds)

    def load_weights(self, state_dict) -> None:
        self.engine.load_weights(state_dict)


def run_games(
    make_env: Callable[[], MultiAgentEnvironment],
    protocol: MultiAgentProtocol,
    codecs: Mapping[str, ChatCodec] | Sequence[Mapping[str, ChatCodec]],
    engines: Mapping[str, RolloutEngine],
    role_policy: Mapping[str, str | None] | Sequence[Mapping[str, str | None]],
    sampling: SamplingParams,
    seeds: list[int],
    first: int = 0,
) -> list[MultiAgentEpisode]:
    """One game per seed; `role_policy` maps each role to the engine name playing it (None: the environment's
    rule-based player); `codecs` is per role. Either may be one mapping for every game or a list with one per
    game (games with different seatings, batched together). Results in the order of `seeds`. `first`: the
    step-wide index of the first game (a rollout worker's part of a step; per-request sampling seeds)."""
    per_game = [role_policy] * len(seeds) if isinstance(role_policy, Mapping) else list(role_policy)
    game_codecs = [codecs] * len(seeds) if isinstance(codecs, Mapping) else list(codecs)
    if not len(per_game) == len(game_codecs) == len(seeds):
        raise ValueError("role_policy and codecs lists need one entry per seed")
    batcher = _Batcher(engines, sampling, len(seeds), first)

    def one(index: int) -> MultiAgentEpisode:
        try:
            env = make_env()
        except Exception as e:  # fails this game; the batcher must not wait for it (it would hang)
            batcher.episode_done()
            return MultiAgentEpisode({}, StopReason.ENV_ERROR, f"environment failed to start: {e!r}")
        players = {
            role: RulePolicy() if p is None else functools.partial(batcher.generate, index, policy=p)
            for role, p in per_game[index].items()
        }
        try:  # environment errors fail the game inside the protocol; an engine error fails the step
            return protocol.run(env, players, game_codecs[index], seeds[index])
        finally:
            batcher.episode_done()
            env.close()

    with ThreadPoolExecutor(max_workers=max(1, len(seeds))) as pool:
        futures = [pool.submit(one, i) for i in range(len(seeds))]
        batcher.serve()
        return [f.result() for f in futures]
