"""``opentinker jobs watch``'s two outputs, line for line: plain lines when stdout is not a terminal (or with
--plain), the redrawn block on a terminal (forced with --live here; a pseudo-terminal picks it by default)."""

from __future__ import annotations

import io
import json
import os
import pty
import sys
from pathlib import Path

import httpx
import pytest

from opentinker.cli import main
from opentinker.types import StreamEvent
from opentinker.watch_view import WatchView, fmt_duration

from .test_client_unit import BASE, TOKEN, FakeApi, job_json, ok

JOB = "j1"


def _frame(event_id: int, kind: str, data: str) -> str:
    return f"id: {event_id}\nevent: {kind}\ndata: {data}\n\n"


def _metrics(step: int, reward: float, loss: float, t: float) -> str:
    points = [
        {"step": step, "name": "reward/mean", "value": reward},
        {"step": step, "name": "loss", "value": loss},
        {"step": step, "name": "time/step", "value": t},
        {"step": step, "name": "grad_norm", "value": 1.5},
    ]
    return json.dumps({"points": points})


STREAM = "".join(
    [
        _frame(1, "state", '{"seq":1,"kind":"state","from_state":"admitted","to_state":"running"}'),
        _frame(2, "metrics", _metrics(1, 0.25, 0.5, 10.0)),
        _frame(3, "log", '{"lines":[{"seq":1,"stream":"stdout","line":"step 1 done"}]}'),
        _frame(4, "metrics", _metrics(2, 0.5, 0.25, 20.0)),
        _frame(5, "state", '{"seq":2,"kind":"state","from_state":"running","to_state":"succeeded"}'),
        _frame(6, "end", '{"state":"succeeded"}'),
    ]
).encode()

PLAIN = [
    "state  admitted -> running",
    "step 1/20  eta 0:03:10  reward/mean=0.25  loss=0.5",  # 19 steps left x 10 s
    "[stdout] step 1 done",
    "step 2/20  eta 0:04:30  reward/mean=0.5  loss=0.25",  # 18 x mean(10, 20) s
    "state  running -> succeeded",
    "Job finished: succeeded",
]


@pytest.fixture
def watch_cli(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    monkeypatch.setenv("OPENTINKER_CONFIG", str(tmp_path / "none.json"))
    monkeypatch.setenv("OPENTINKER_URL", BASE)
    monkeypatch.setenv("OPENTINKER_TOKEN", TOKEN)
    api = FakeApi()
    api.on("GET", f"/jobs/{JOB}", ok(job_json(id=JOB, state="running")))
    api.on(
        "GET",
        f"/jobs/{JOB}/stream",
        httpx.Response(200, headers={"content-type": "text/event-stream"}, content=STREAM),
    )

    def run(*argv: str) -> int:
        from opentinker.client import Client

        factory = lambda url, token: Client(url, token, transport=httpx.MockTransport(api), backoff=0)  # noqa: E731
        return main(["jobs", "watch", JOB, *argv], client_factory=factory)

    return run


def test_plain_lines_when_not_a_terminal(watch_cli, capsys: pytest.CaptureFixture[str]) -> None:
    assert watch_cli() == 0  # capsys' stdout is not a terminal
    assert capsys.readouterr().out.splitlines() == PLAIN


def test_chosen_metrics_only(watch_cli, capsys: pytest.CaptureFixture[str]) -> None:
    assert watch_cli("--metric", "grad_norm", "--metric", "loss", "--plain") == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1] == "step 1/20  eta 0:03:10  grad_norm=1.5  loss=0.5"
    assert max(len(line) for line in lines) < 60  # not 444 characters of every metric


def test_live_view_is_redrawn_in_place(watch_cli, capsys: pytest.CaptureFixture[str]) -> None:
    assert watch_cli("--live") == 0
    out = capsys.readouterr().out
    frames = out.split("\x1b[J")
    # One draw per stream event (6); each of the 5 redraws moves up over the previous block and clears.
    assert len(frames) == 6 and out.count("\x1b[") == 2 * 5
    assert (
        frames[0] == "[....................] step - of 20\n\nstate  admitted -> running\n\x1b[3F"
    )  # up 3 lines
    final = frames[-1].splitlines()
    assert final == [
        "[##..................] step 2 of 20",
        "  reward/mean  0.5",
        "  loss         0.25",
        "",
        "state  admitted -> running",
        "[stdout] step 1 done",
        "state  running -> succeeded",
        "Job finished: succeeded",
    ]
    # Mid-run the block carries the ETA: the draw after step 2's metrics.
    assert frames[3].splitlines()[0] == "[##..................] step 2 of 20  eta 0:04:30"


def test_a_pseudo_terminal_gets_the_live_view_by_default(watch_cli) -> None:
    leader, follower = pty.openpty()
    saved = sys.stdout
    sys.stdout = os.fdopen(follower, "w", closefd=False)
    try:
        assert watch_cli() == 0
        sys.stdout.flush()
    finally:
        sys.stdout.close()
        sys.stdout = saved
        os.close(follower)
    data = b""
    while True:
        try:
            chunk = os.read(leader, 65536)
        except OSError:  # the follower is closed: all read
            break
        if not chunk:
            break
        data += chunk
    os.close(leader)
    text = data.decode()
    assert "\x1b[J" in text and "[##..................] step 2 of 20" in text


def test_view_without_a_step_count_or_timings() -> None:
    out = io.StringIO()
    view = WatchView(out, total_steps=None, metrics=["reward"], live=False)
    view.feed(StreamEvent(type="metrics", data={}, points=[{"step": 3, "name": "reward", "value": None}]))
    assert out.getvalue() == "step 3  reward=nan\n"
    assert fmt_duration(3725.4) == "1:02:05"


def test_long_lines_are_cut_to_the_terminal_width() -> None:
    out = io.StringIO()
    view = WatchView(out, total_steps=4, live=True, width=30)
    view.feed(StreamEvent(type="log", lines=[{"seq": 1, "stream": "stderr", "line": "x" * 100}]))
    assert out.getvalue().splitlines() == ["[....................] step -", "", "[stderr] " + "x" * 21]


@pytest.mark.parametrize("live", [False, True])
def test_control_characters_in_log_lines_never_reach_the_terminal(live: bool) -> None:
    out = io.StringIO()
    view = WatchView(out, total_steps=None, live=live)
    hostile = "ok\x1b]0;pwned\x07\x1b[2J\rgone\nnext\x9b31m"
    view.feed(StreamEvent(type="log", lines=[{"seq": 1, "stream": "stdout", "line": hostile}]))
    expected = "[stdout] ok ]0;pwned  [2J gone next 31m"
    assert out.getvalue() == (f"step -\n\n{expected}\n" if live else f"{expected}\n")
