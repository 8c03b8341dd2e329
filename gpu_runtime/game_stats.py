"""Statistics of multi-agent games, kept as sums and counts so that several rollout workers' add up.

A rate (win rate, illegal-move rate, mean reward...) is a sum over games (or moves) and their count. Each
rollout worker tallies its own games (`game_tally`, `policy_game_tally`, the rule-player evaluation's per
(policy, role) tallies); the pool adds the tallies (`Tally.merge`) and divides once (`Tally.values`): a
pooled rate weighs every game or move alike, whichever worker played it. (A mean of the workers' means would
weigh a game by 1 / its worker's game count: wrong as soon as the split is uneven.) A tally also carries why
its failed games failed (`errors`): the job's process logs them and the failure policy names them, where a
worker's own stderr (a Ray actor's) never reaches the job's log.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from opentinker.env.multiagent import MultiAgentEpisode
from opentinker.env.protocol import StopReason

MAX_ERRORS = 5  # distinct failure reasons kept per tally (merged ones included)


@dataclass
class Tally:
    """Rates as (sum, count) pairs and totals as sums; a key absent from `counts` is a total."""

    sums: dict[str, float] = field(default_factory=dict)
    counts: dict[str, float] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)  # why failed games failed: a few distinct reasons

    def rate(self, key: str, hits: float, n: int) -> None:
        """`hits` over `n` games or moves; nothing when n is 0 (the rate is then left out, not 0)."""
        if n:
            self.sums[key] = self.sums.get(key, 0.0) + float(hits)
            self.counts[key] = self.counts.get(key, 0.0) + n

    def total(self, key: str, value: float) -> None:
        self.sums[key] = self.sums.get(key, 0.0) + float(value)

    def merge(self, other: Tally) -> Tally:
        for k, v in other.sums.items():
            if k in other.counts:
                self.rate(k, v, int(other.counts[k]))
            else:
                self.total(k, v)
        self.errors = sorted({*self.errors, *other.errors})[:MAX_ERRORS]
        return self

    def values(self) -> dict[str, float]:
        return {k: s / self.counts[k] if k in self.counts else s for k, s in self.sums.items()}


def merged(tallies: list[Tally]) -> Tally:
    out = Tally()
    for t in tallies:
        out.merge(t)
    return out


def game_tally(games: list[MultiAgentEpisode], roles: list[str]) -> Tally:
    """Per-role statistics of finished games: mean reward, win rate, illegal-move rate (moves the environment
    answered with an `illegal` entry in its info, over the role's moves; roles with generated moves only),
    the share of forced blocks made, and the draw rate (a finished game whose info says `winner: None`)."""
    ok = [game for game in games if not game.failed]
    t = Tally()
    t.total("episodes/failed", len(games) - len(ok))
    t.total("episodes/total", len(games))
    t.errors = sorted({game.error or "" for game in games if game.failed})[:MAX_ERRORS]
    n = len(ok)
    t.rate("game/rounds/mean", sum(game.rounds for game in ok), n)
    drawn = sum(
        game.stop_reason is StopReason.DONE and "winner" in game.info and game.info["winner"] is None
        for game in ok
    )
    t.rate("game/draw_rate", drawn, n)
    for role in roles:
        t.rate(f"reward/{role}/mean", sum(game.per_role[role].reward for game in ok), n)
        t.rate(f"game/{role}/win_rate", sum(game.info.get("winner") == role for game in ok), n)
        turns = [turn for game in ok for turn in game.per_role[role].turns]
        t.rate(f"game/{role}/illegal_rate", sum(bool(x.info.get("illegal")) for x in turns), len(turns))
        # Board games mark the moves that had to block (`must_block`): the share that did is the skill that
        # separates a random legal player from the rule player.
        must = [x for x in turns if x.info.get("must_block")]
        t.rate(f"game/{role}/block_rate", sum(bool(x.info.get("blocked")) for x in must), len(must))
    return t


def policy_game_tally(
    games: list[MultiAgentEpisode], seatings: list[dict[str, str | None]], policies: list[str]
) -> Tally:
    """Per trained policy, over the roles it played: `policy/<name>/win_rate` (of its games) and
    `policy/<name>/illegal_rate` (of its moves)."""
    t = Tally()
    for policy in policies:
        played = [
            (game, role)
            for game, seating in zip(games, seatings, strict=True)
            if not game.failed
            for role, p in seating.items()
            if p == policy
        ]
        t.rate(f"policy/{policy}/win_rate", sum(g.info.get("winner") == r for g, r in played), len(played))
        turns = [x for g, r in played for x in g.per_role[r].turns]
        t.rate(f"policy/{policy}/illegal_rate", sum(bool(x.info.get("illegal")) for x in turns), len(turns))
    return t


def versus_rule_metrics(tallies: dict[tuple[str, str], Tally]) -> dict[str, float]:
    """The rule-player evaluation's metrics from its (policy, role) tallies (every worker's games added):
    `vs_rule/<policy>/<role>/...`, and per policy their mean over its roles (every role played on the
    same seeds, so an unweighted mean)."""
    per_policy: dict[str, dict[str, dict[str, float]]] = {}
    for (policy, role), tally in tallies.items():
        stats = tally.values()
        win = stats.get(f"game/{role}/win_rate", 0.0)
        values = {
            "win_rate": win,
            "win_or_draw": win + stats.get("game/draw_rate", 0.0),
            "illegal_rate": stats.get(f"game/{role}/illegal_rate", 0.0),
            "reward": stats.get(f"reward/{role}/mean", 0.0),
            "failed": stats["episodes/failed"] / stats["episodes/total"],
        }
        if f"game/{role}/block_rate" in stats:
            values["block_rate"] = stats[f"game/{role}/block_rate"]
        per_policy.setdefault(policy, {})[role] = values
    out: dict[str, float] = {}
    for policy, per_role in per_policy.items():
        for role, values in per_role.items():
            for k, v in values.items():
                out[f"vs_rule/{policy}/{role}/{k}"] = v
        for k in ("win_rate", "win_or_draw", "illegal_rate", "reward"):
            out[f"vs_rule/{policy}/{k}"] = sum(v[k] for v in per_role.values()) / len(per_role)
    return out
