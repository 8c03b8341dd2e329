"""Recorded episodes as plain text for a terminal (`opentinker jobs rollouts ID --step N`).

A multi-agent game is shown as one transcript per role, under a header with every role's reward.

Every text here comes from a model or an environment, so it is sanitised as ``jobs watch`` does
(``watch_view.CONTROL``): an escape sequence could otherwise move the cursor, clear the screen or set the
terminal's title. A multi-line text keeps its newlines as lines of the transcript, each under its prefix;
single-line fields (role, action, tool call, info) show a newline or a tab as a space.
"""

from __future__ import annotations

from collections.abc import Iterable

from opentinker.types import RolloutEpisode, Rollouts
from opentinker.watch_view import CONTROL

PREVIEW = 400  # characters of each text shown unless --full


def _safe(value: object) -> str:
    """One line of text with every control character (newline and tab included) shown as a space."""
    return CONTROL.sub(" ", str(value))


def _clip(text: str, full: bool) -> str:
    text = text.rstrip("\r\n")
    if full or len(text) <= PREVIEW:
        return text
    return "…" + text[-PREVIEW:]  # the end of a prompt is its question; of a generation, its answer


def _indent(text: str, prefix: str) -> str:
    # Split on newlines only: str.splitlines() would also split on a lone \r, \v, \f or \x1c-\x1e.
    lines = text.replace("\r\n", "\n").split("\n")
    return "\n".join(prefix + _safe(line.expandtabs(4)) for line in lines)


def episode_lines(ep: RolloutEpisode, *, full: bool = False, indent: str = "") -> Iterable[str]:
    tok = ep.tokens
    stop = _safe(ep.stop_reason or "-")
    yield (
        f"{indent}#{ep.index}  role {_safe(ep.role)}  reward {ep.reward:.3g}  stop {stop}  "
        f"tokens: {tok.get('prompt', 0)} prompt, {tok.get('generated', 0)} generated (trained), "
        f"{tok.get('untrained', 0)} untrained"
    )
    yield f"{indent}  prompt:"
    yield _indent(_clip(ep.prompt, full), f"{indent}    | ")
    for i, t in enumerate(ep.turns, 1):
        flags = " (cut at the token budget)" if t.truncated else ""
        yield f"{indent}  turn {i}: reward {t.reward:.3g}, {t.tokens.get('generated', 0)} tokens{flags}"
        yield _indent(_clip(t.text, full), f"{indent}    > ")
        if t.action and t.action != t.text:
            yield f"{indent}    action: {_safe(_clip(t.action, full))}"
        for call in t.tool_calls:
            yield f"{indent}    tool call: {_safe(call)}"
        if t.info:
            yield f"{indent}    info: {_safe(', '.join(f'{k}={v}' for k, v in t.info.items()))}"
        if t.observation:
            yield _indent(_clip(t.observation, full), f"{indent}    < ")
    if ep.final_reward:
        yield f"{indent}  final reward {ep.final_reward:.3g}"


def rollouts_text(r: Rollouts, *, role: str | None = None, full: bool = False) -> str:
    eps = [e for e in r.episodes if role is None or e.role == role]
    steps = f"{r.steps[0]}-{r.steps[-1]} ({len(r.steps)} kept)" if r.steps else "-"
    lines = [f"Step {r.step}: {len(eps)} episodes, best and worst first. Steps recorded: {steps}", ""]
    games: dict[int, list[RolloutEpisode]] = {}
    for e in eps:
        if e.game is not None:
            games.setdefault(e.game, []).append(e)
    shown: set[int] = set()
    for e in eps:
        if e.game is None:
            lines += [*episode_lines(e, full=full), ""]
        elif e.game not in shown:
            shown.add(e.game)
            players = games[e.game]
            lines.append(f"game {e.game}: " + ", ".join(f"{_safe(p.role)} {p.reward:.3g}" for p in players))
            for p in players:
                lines += [*episode_lines(p, full=full, indent="  "), ""]
    return "\n".join(lines).rstrip() + "\n"
