"""`opentinker jobs rollouts ID --step N`: a step's episodes as text, a game as a transcript per role."""

# ruff: noqa: F811 (the CLI fixtures are imported from test_cli_unit and named as test parameters)

from __future__ import annotations

import json
from pathlib import Path

import pytest

from .test_cli_unit import Run, api, cli, config_file, factory_calls, logged_in  # noqa: F401 (fixtures)
from .test_client_unit import FakeApi, api_error, ok


def turn(text: str, reward: float, observation: str = "", **extra) -> dict:
    return {
        "text": text, "action": text, "tool_calls": [], "reward": reward, "truncated": False,
        "observation": observation, "info": {}, "tokens": {"generated": len(text), "observation": 3},
        **extra,
    }  # fmt: skip


def episode(
    index: int, reward: float, turns: list[dict], role: str = "agent", game: int | None = None
) -> dict:
    return {
        "index": index, "group": 7, "game": game, "role": role, "reward": reward, "final_reward": 0.0,
        "stop_reason": "done", "prompt": "What is 2+2?", "turns": turns,
        "tokens": {"prompt": 12, "generated": 1, "untrained": 12, "total": 13},
    }  # fmt: skip


SINGLE = {
    "step": 3,
    "steps": [1, 2, 3],
    "episodes": [
        episode(0, 1.0, [turn("4", 1.0)]),
        episode(
            1, 0.0, [turn('<tool_call>{"name": "add"}</tool_call>', 0.0, "5", tool_calls=[{"name": "add"}])]
        ),
    ],
}
GAME = {
    "step": 1,
    "steps": [1],
    "episodes": [
        episode(0, 1.0, [turn("move 4", 0.0, "board: ....X....")], role="x", game=0),
        episode(1, -1.0, [turn("move 0", 0.0)], role="o", game=0),
    ],
}


def test_rollouts_prints_each_episode_with_its_turns(
    cli: Run, api: FakeApi, logged_in: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    api.on("GET", "/jobs/j1/rollouts", ok(SINGLE))
    assert cli("jobs", "rollouts", "j1", "--step", "3") == 0
    assert api.requests[-1].url.params["step"] == "3"
    assert capsys.readouterr().out == (
        "Step 3: 2 episodes, best and worst first. Steps recorded: 1-3 (3 kept)\n"
        "\n"
        "#0  role agent  reward 1  stop done  tokens: 12 prompt, 1 generated (trained), 12 untrained\n"
        "  prompt:\n"
        "    | What is 2+2?\n"
        "  turn 1: reward 1, 1 tokens\n"
        "    > 4\n"
        "\n"
        "#1  role agent  reward 0  stop done  tokens: 12 prompt, 1 generated (trained), 12 untrained\n"
        "  prompt:\n"
        "    | What is 2+2?\n"
        "  turn 1: reward 0, 38 tokens\n"
        '    > <tool_call>{"name": "add"}</tool_call>\n'
        "    tool call: {'name': 'add'}\n"
        "    < 5\n"
    )


def test_rollouts_shows_a_game_as_one_transcript_per_role(
    cli: Run, api: FakeApi, logged_in: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    api.on("GET", "/jobs/j1/rollouts", ok(GAME))
    assert cli("jobs", "rollouts", "j1") == 0
    assert "step" not in api.requests[-1].url.params  # the latest step
    out = capsys.readouterr().out
    assert "game 0: x 1, o -1\n  #0  role x  reward 1" in out
    assert "    > move 4\n      < board: ....X....\n" in out and "  #1  role o  reward -1" in out
    assert cli("jobs", "rollouts", "j1", "--role", "o") == 0
    only_o = capsys.readouterr().out
    assert "role o" in only_o and "role x" not in only_o
    assert cli("--json", "jobs", "rollouts", "j1") == 0
    assert json.loads(capsys.readouterr().out)["episodes"][1]["role"] == "o"


def test_rollouts_of_an_unrecorded_step_is_an_error(
    cli: Run, api: FakeApi, logged_in: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    api.on("GET", "/jobs/j1/rollouts", api_error(404, "not_found", "no rollouts recorded at step 9"))
    assert cli("jobs", "rollouts", "j1", "--step", "9") != 0
    assert "no rollouts recorded at step 9" in capsys.readouterr().err


def test_rollouts_strips_terminal_escapes_from_model_and_environment_text(
    cli: Run, api: FakeApi, logged_in: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A model's text could clear the screen or set the title (ESC ]0;...BEL): shown as spaces, not sent."""
    esc = "\x1b]0;pwned\x07\x1b[2J"
    hostile = turn(
        f"line one\tx{esc}\r\nline two", 0.5, f"obs{esc}\nnext",
        action=f"act\n{esc}", tool_calls=[{"name": f"t{esc}"}], info={f"k{esc}": f"v\n{esc}"},
    )  # fmt: skip
    ep = episode(0, 0.5, [hostile], role=f"x{esc}", game=0)
    ep["prompt"] = f"p{esc}\x9b31m"
    api.on("GET", "/jobs/j1/rollouts", ok({"step": 1, "steps": [1], "episodes": [ep]}))
    assert cli("jobs", "rollouts", "j1", "--full") == 0
    out = capsys.readouterr().out
    assert not any(c in out for c in "\x1b\x07\x9b\r\t")
    assert "game 0: x" in out and "  #0  role x" in out
    # the layout holds: every line of a multi-line text keeps its prefix, single-line fields stay one line
    assert "      > line one    x" in out and "\n      > line two\n" in out
    assert "\n      < next\n" in out and "\n      | p" in out
    assert "\n      action: act " in out and "\n      tool call: {'name': 't" in out
    assert "\n      info: k" in out and "=v " in out
