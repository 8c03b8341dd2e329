"""Progress of a transfer: a bar redrawn on a terminal, a plain line per file otherwise (logs, pipes, CI)."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import TextIO

BAR_WIDTH = 24


def fmt_bytes(n: int | None) -> str:
    if n is None:
        return "-"
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")  # pragma: no cover


def is_terminal(stream: TextIO) -> bool:
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


class Progress:
    """Bytes done of ``total`` across several files.

    On a terminal one line is redrawn in place (at most every ``interval`` seconds, and at each file's end);
    elsewhere each finished file is one line, so a log holds no carriage returns.
    """

    def __init__(
        self,
        total: int,
        *,
        stream: TextIO | None = None,
        tty: bool | None = None,
        interval: float = 0.1,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.total = total
        self.done = 0
        self.stream = stream if stream is not None else sys.stderr
        self.tty = is_terminal(self.stream) if tty is None else tty
        self.interval = interval
        self.clock = clock
        self._drawn_at = -float("inf")
        self._name = ""

    def start_file(self, name: str) -> None:
        self._name = name
        self._draw(force=True)

    def advance(self, n: int) -> None:
        self.done += n
        self._draw(force=False)

    def skip_file(self, name: str, size: int) -> None:
        """A file already there from an interrupted download (its sha256 matched): counted, not fetched."""
        self.done += size
        if not self.tty:
            self._line(f"{name}  {fmt_bytes(size)}  already downloaded")

    def finish_file(self, name: str, size: int, verified: bool) -> None:
        if self.tty:
            self._draw(force=True)
        else:
            self._line(f"{name}  {fmt_bytes(size)}" + ("  sha256 ok" if verified else ""))

    def close(self) -> None:
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()

    def bar(self) -> str:
        frac = self.done / self.total if self.total else 1.0
        filled = round(BAR_WIDTH * frac)
        return (
            f"[{'#' * filled}{'.' * (BAR_WIDTH - filled)}] {frac * 100:3.0f}%  "
            f"{fmt_bytes(self.done)} / {fmt_bytes(self.total)}  {self._name}"
        )

    def _draw(self, *, force: bool) -> None:
        if not self.tty:
            return
        now = self.clock()
        if not force and now - self._drawn_at < self.interval:
            return
        self._drawn_at = now
        self.stream.write("\r\x1b[2K" + self.bar())
        self.stream.flush()

    def _line(self, text: str) -> None:
        self.stream.write(text + "\n")
        self.stream.flush()
