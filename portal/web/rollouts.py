"""The job page's rollout viewer: a step's recorded episodes (gpu_runtime.rollout_log), sorted and filtered by
reward and role; a multi-agent game as one transcript per role, side by side.

Rendered into the job page and, through htmx, as the partial `/jobs/<id>/rollouts/` when the form changes;
the same query parameters (step, sort, role, min_reward, max_reward) drive both, so a link keeps the view.
"""

from __future__ import annotations

import math
from typing import Any

from django.http import QueryDict
from django.shortcuts import render

from portal.selectors.jobs import job_get, rollout_get, rollout_steps
from portal.web.tenancy import org_page

SORTS = {"best": "Best first", "worst": "Worst first", "recorded": "As recorded"}


def _float(value: str | None) -> float | None:
    try:
        f = float(value) if value not in (None, "") else None
    except ValueError:
        return None
    return f if f is not None and math.isfinite(f) else None


def _items(episodes: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Episodes, and games gathered from their roles' episodes: [{"game": g | None, "players": [...]}]."""
    items: list[dict[str, Any]] = []
    games: dict[int, dict[str, Any]] = {}
    for ep in episodes:
        g = ep.get("game")
        if g is None:
            items.append({"game": None, "players": [ep]})
        elif g in games:
            games[g]["players"].append(ep)
        else:
            games[g] = {"game": g, "players": [ep]}
            items.append(games[g])
    return items


def rollouts_context(job, params: QueryDict) -> dict[str, Any]:
    steps = rollout_steps(job)
    if not steps:
        return {"rollouts": None}
    try:
        asked = int(params.get("step", ""))
    except ValueError:
        asked = None
    step = asked if asked in steps else steps[-1]
    episodes = rollout_get(job, step).episodes
    roles = sorted({ep.get("role", "agent") for ep in episodes})
    role = params.get("role") if params.get("role") in roles else ""
    sort = params.get("sort") if params.get("sort") in SORTS else "best"
    lo, hi = _float(params.get("min_reward")), _float(params.get("max_reward"))

    def shown(ep: dict[str, Any]) -> bool:
        r = ep.get("reward", 0.0)
        return (not role or ep.get("role") == role) and (lo is None or r >= lo) and (hi is None or r <= hi)

    items = []
    for item in _items(episodes):
        players = [p for p in item["players"] if shown(p)]
        if players:  # a game stays whole unless a role is picked: its transcripts read together
            items.append(
                {
                    **item,
                    "players": players if role else item["players"],
                    "best": max(p.get("reward", 0.0) for p in players),
                }
            )
    if sort != "recorded":
        items.sort(key=lambda it: it["best"], reverse=sort == "best")
    i = steps.index(step)
    return {
        "rollouts": {
            "step": step,
            "steps": steps,
            "prev": steps[i - 1] if i > 0 else None,
            "next": steps[i + 1] if i + 1 < len(steps) else None,
            "items": items,
            "total": len(episodes),
            "shown": sum(len(it["players"]) for it in items),
            "roles": roles if len(roles) > 1 else [],
            "role": role,
            "sort": sort,
            "sorts": SORTS,
            "min_reward": "" if lo is None else params.get("min_reward"),
            "max_reward": "" if hi is None else params.get("max_reward"),
        }
    }


@org_page
def job_rollouts(request, job_id):
    """The viewer alone (htmx swaps it in when the step, the sort or a filter changes)."""
    job = job_get(request.organization, job_id)
    return render(request, "portal/jobs/_rollouts.html", {"job": job, **rollouts_context(job, request.GET)})
