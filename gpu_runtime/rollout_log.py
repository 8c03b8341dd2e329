"""Episodes kept for reading: each RL step, a few of its episodes as text (spec `rollouts`).

The rollout worker attaches an `EpisodeTrace` to every sample (spans, actions, rewards, stop reason: no text,
so it costs next to nothing); after the step's rollout the controller picks `per_step` samples (the best and
the worst first, then an even spread by reward) and only those are decoded into records for the sink.

A record (the ingest API's rollout episode, api/views/ingest.py):
    {"index", "group", "game", "role", "reward", "final_reward", "stop_reason", "prompt",
     "turns": [{"text", "action", "tool_calls", "reward", "truncated", "observation", "info",
                "tokens": {"generated", "observation"}}],
     "tokens": {"prompt", "generated", "untrained", "total"}}
Token masks are given as counts per turn (generated = trained, observation = untrained), not as arrays.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

from gpu_runtime.batch import EpisodeTrace, Sample, TurnTrace
from opentinker.env.tools import parse_tool_calls

if TYPE_CHECKING:
    from opentinker.env.protocol import Episode

__all__ = ["EpisodeTrace", "TurnTrace", "pick", "record", "step_records", "trace_of"]

Decoder = Callable[[list[int]], str]
MAX_BYTES = 200 * 1024  # one step's records, as JSON: under the ingest API's 256 KiB body limit
MAX_INFO_CHARS = 500  # a turn's info dict, as JSON
# A step's records: the ingest API refuses more (portal.services.rollouts.MAX_EPISODES) with a 400 that the
# sink only logs, so the whole step would be lost. per_step 64 with its games' other roles can exceed it.
MAX_EPISODES = 128


def trace_of(ep: Episode, game: int | None = None) -> EpisodeTrace:
    return EpisodeTrace(
        prompt_len=ep.prompt_len,
        stop_reason=str(ep.stop_reason or ""),
        turns=[TurnTrace(t.start, t.end, t.reward, t.action, t.truncated, _small(t.info)) for t in ep.turns],
        final_reward=ep.final_reward,
        game=game,
    )


def _small(info: dict[str, Any]) -> dict[str, Any]:
    """The JSON-safe scalar entries of a turn's info, if they are short (a board, a verdict, a winner)."""
    out = {
        k: v
        for k, v in info.items()
        if isinstance(v, str | int | bool) or v is None or (isinstance(v, float) and math.isfinite(v))
    }  # JSON has no NaN: the ingest API would refuse the whole step
    return out if len(json.dumps(out, default=str)) <= MAX_INFO_CHARS else {}


def pick(samples: list[Sample], count: int, limit: int = MAX_EPISODES) -> list[Sample]:
    """`count` samples with a trace: the best and the worst of the step first, then an even spread over the
    rest by reward. Multi-agent: the chosen samples' games come whole (every recorded role of each game).
    At most `limit` samples in all: a chosen sample whose whole game would not fit is left out."""
    traced = [s for s in samples if s.trace is not None]
    if count <= 0 or not traced:
        return []
    ranked = sorted(traced, key=lambda s: s.reward)  # stable: ties keep the collection order
    n = len(ranked)
    order = [n - 1, 0, *(round(i * (n - 1) / max(count - 1, 1)) for i in range(1, count - 1))]
    players: dict[int, list[Sample]] = {}
    for s in traced:
        if s.trace is not None and s.trace.game is not None:
            players.setdefault(s.trace.game, []).append(s)
    chosen: list[Sample] = []
    games: set[int] = set()
    total = 0
    for s in [ranked[i] for i in dict.fromkeys(order)][:count]:
        game = s.trace.game if s.trace is not None else None
        cost = 0 if game in games else len(players[game]) if game is not None else 1
        if total + cost > limit:
            continue
        chosen.append(s)
        total += cost
        if game is not None:
            games.add(game)
    if not chosen:  # the best player's game alone has more roles than the limit: as many of them as fit
        best = ranked[-1]
        mates = [s for g, ss in players.items() if best.trace and g == best.trace.game for s in ss]
        return [best, *(s for s in mates if s is not best)][:limit]
    if games:  # the other roles of a chosen game, so its transcript is complete
        ids = {id(s) for s in chosen}
        chosen += [s for s in traced if s.trace and s.trace.game in games and id(s) not in ids]
    return chosen


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[:limit] + f"… [{len(text) - limit} more characters]"


def _tool_calls(action: str) -> list[dict[str, Any]]:
    if "<tool_call>" not in action:
        return []
    calls = parse_tool_calls(action)
    return [asdict(c) for c in calls] if isinstance(calls, list) else [{"error": calls}]


def record(s: Sample, index: int, decode: Decoder, max_chars: int) -> dict[str, Any]:
    """One sample as a readable record (module docstring)."""
    tr = s.trace
    assert tr is not None
    ids = s.token_ids
    turns = []
    for k, t in enumerate(tr.turns):
        nxt = tr.turns[k + 1].start if k + 1 < len(tr.turns) else len(ids)
        turns.append(
            {
                "text": _cut(decode(ids[t.start : t.end]), max_chars),
                "action": _cut(t.action, max_chars),
                "tool_calls": _tool_calls(t.action),
                "reward": t.reward,
                "truncated": t.truncated,
                "observation": _cut(decode(ids[t.end : nxt]), max_chars) if nxt > t.end else "",
                "info": t.info,
                "tokens": {"generated": sum(s.mask[t.start : t.end]), "observation": nxt - t.end},
            }
        )
    generated = s.n_generated
    return {
        "index": index,
        "group": s.group_id,
        "game": tr.game,
        "role": s.role,
        "reward": s.reward,
        "final_reward": tr.final_reward,
        "stop_reason": tr.stop_reason,
        "prompt": _cut(decode(ids[: tr.prompt_len]), max_chars),
        "turns": turns,
        "tokens": {
            "prompt": tr.prompt_len,
            "generated": generated,
            "untrained": len(ids) - generated,
            "total": len(ids),
        },
    }


def step_records(
    samples: list[Sample], count: int, decoder: Callable[[Sample], Decoder], max_chars: int
) -> list[dict[str, Any]]:
    """The step's records, best and worst first, at most MAX_EPISODES of them (whole games) and within
    MAX_BYTES (records past it are left out, and texts are cut shorter until the best and the worst fit)."""
    chosen = pick(samples, count, limit=MAX_EPISODES)
    while True:
        records = [record(s, i, decoder(s), max_chars) for i, s in enumerate(chosen)]
        sizes = [len(json.dumps(r)) for r in records]
        kept, total = [], 0
        for r, size in zip(records, sizes, strict=True):
            if total + size > MAX_BYTES:
                break
            kept.append(r)
            total += size
        if len(kept) >= min(2, len(records)) or max_chars <= 100:
            return kept
        max_chars //= 2
