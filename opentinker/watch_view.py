"""What ``opentinker jobs watch`` shows: step n of N, an ETA, a few chosen metrics, then events and log lines.

Two renderings of the same state. On a terminal a block is redrawn in place (a progress bar line, one line
per chosen metric, the last few events and log lines below); elsewhere (a pipe, a log file, CI) each step is
one short line and each event or log line is printed as it comes, so the output greps and diffs cleanly.

The ETA is the mean ``time/step`` of the last steps (the runtime reports it) times the steps left: a
history replayed at connection time gives the same ETA as watching live.
"""

from __future__ import annotations

import re
from collections import deque
from collections.abc import Iterable
from typing import TextIO

from opentinker.types import JobEvent, StreamEvent

DEFAULT_METRICS = ("reward/mean", "loss", "kl", "entropy", "eval/accuracy")
ETA_WINDOW = 5
BAR_WIDTH = 20
TAIL_LINES = 8
# Control characters (C0, DEL, C1): a job's log line could otherwise move the cursor, clear the user's screen
# or set their terminal's title; a newline inside a line would also break the redraw's line count.
CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def fmt_value(value: float | None) -> str:
    return "nan" if value is None else f"{value:.4g}"


def fmt_duration(seconds: float) -> str:
    s = round(seconds)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def fmt_event_line(event: JobEvent) -> str:
    parts = [event.kind]
    if event.from_state or event.to_state:
        parts.append(f"{event.from_state or '-'} -> {event.to_state or '-'}")
    if event.message:
        parts.append(" ".join(event.message.split()))
    return "  ".join(parts)


class WatchView:
    def __init__(
        self,
        out: TextIO,
        *,
        total_steps: int | None,
        metrics: Iterable[str] = DEFAULT_METRICS,
        live: bool,
        width: int = 100,
        tail: int = TAIL_LINES,
    ) -> None:
        self.out = out
        self.total = total_steps
        self.metrics = list(metrics)
        self.live = live
        self.width = width
        self.step: int | None = None
        self.values: dict[str, float | None] = {}
        self.step_times: deque[float] = deque(maxlen=ETA_WINDOW)
        self.tail: deque[str] = deque(maxlen=tail)
        self.final: str | None = None
        self._drawn = 0  # lines of the block on screen, to move back over them

    # ---- input -------------------------------------------------------------------------------------------
    def feed(self, ev: StreamEvent) -> None:
        if ev.type == "metrics":
            by_step: dict[int, dict[str, float | None]] = {}
            for p in ev.points:
                by_step.setdefault(p.step, {})[p.name] = p.value
            for step, values in sorted(by_step.items()):
                self._on_step(step, values)
        elif ev.type in ("event", "state") and ev.event is not None:
            self._emit(fmt_event_line(ev.event))
        elif ev.type == "log":
            for x in ev.lines:
                self._emit(f"[{x.stream}] {x.line}")
        elif ev.type == "end":
            self.final = ev.state
            self._emit(f"Job finished: {ev.state}")
        if self.live:
            self._redraw()

    def _on_step(self, step: int, values: dict[str, float | None]) -> None:
        if (t := values.get("time/step")) is not None:
            self.step_times.append(t)
        if self.step is None or step >= self.step:
            self.step = step
        self.values.update({k: v for k, v in values.items() if k in self.metrics})
        if not self.live:
            chosen = [f"{k}={fmt_value(values[k])}" for k in self.metrics if k in values]
            self._print("  ".join([self.progress_text(), *chosen]))

    def _emit(self, line: str) -> None:
        line = CONTROL.sub(" ", line)
        if self.live:
            self.tail.append(line)
        else:
            self._print(line)

    # ---- what is shown -----------------------------------------------------------------------------------
    def eta_seconds(self) -> float | None:
        if self.total is None or self.step is None or not self.step_times:
            return None
        return sum(self.step_times) / len(self.step_times) * max(self.total - self.step, 0)

    def progress_text(self) -> str:
        step = "-" if self.step is None else str(self.step)
        text = f"step {step}/{self.total}" if self.total else f"step {step}"
        eta = self.eta_seconds()
        if eta is not None and self.final is None:
            text += f"  eta {fmt_duration(eta)}"
        return text

    def block(self) -> list[str]:
        """The terminal view: bar line, a line per chosen metric seen so far, then the last lines."""
        step = self.step or 0
        if self.total:
            filled = round(BAR_WIDTH * min(step / self.total, 1.0))
            bar = f"[{'#' * filled}{'.' * (BAR_WIDTH - filled)}] "
            head = f"{bar}step {'-' if self.step is None else step} of {self.total}"
        else:
            head = f"step {'-' if self.step is None else step}"
        eta = self.eta_seconds()
        if self.final is None and eta is not None:
            head += f"  eta {fmt_duration(eta)}"
        lines = [head]
        shown = [k for k in self.metrics if k in self.values]
        pad = max((len(k) for k in shown), default=0)
        lines += [f"  {k.ljust(pad)}  {fmt_value(self.values[k])}" for k in shown]
        if self.tail:
            lines.append("")
            lines += list(self.tail)
        return [line[: self.width].rstrip() for line in lines]  # a wrapped line would break the redraw

    # ---- output ------------------------------------------------------------------------------------------
    def _redraw(self) -> None:
        lines = self.block()
        # Back to the block's first line, clear to the end of the screen, draw again.
        prefix = f"\x1b[{self._drawn}F\x1b[J" if self._drawn else ""
        self.out.write(prefix + "".join(line + "\n" for line in lines))
        self.out.flush()
        self._drawn = len(lines)

    def _print(self, line: str) -> None:
        self.out.write(line + "\n")
        self.out.flush()
