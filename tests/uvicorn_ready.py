"""Waiting for a uvicorn subprocess to listen, without polling it.

A single uvicorn process logs "Uvicorn running on ..." (at INFO) once its socket listens. With
`--workers N` the parent only binds the socket, and each worker listens on it right after logging "Started
server process": then this waits for N such lines and connects once the listen (a few instructions later)
has happened. The caller starts uvicorn at `--log-level info` with stdout=PIPE and stderr=STDOUT; a thread
keeps draining the output afterwards (into `sink`, if given) so the pipe never fills.
"""

from __future__ import annotations

import socket
import subprocess
import threading
import time
from typing import IO

READY = b"Uvicorn running on"
WORKER = b"Started server process"


def wait_listening(
    proc: subprocess.Popen,
    sink: IO[bytes] | None = None,
    timeout: float = 120,
    workers: int = 1,
    port: int | None = None,
) -> None:
    """Return once `proc` (uvicorn) listens; RuntimeError if it ends first or says nothing for `timeout` s (a
    bound that only catches a hang). With workers > 1, `port` is where they listen."""
    assert proc.stdout is not None, "start uvicorn with stdout=PIPE, stderr=STDOUT"
    said, listening, tail, started = threading.Event(), threading.Event(), [], [0]

    def pump() -> None:
        for line in proc.stdout:
            if sink is not None:
                sink.write(line)
                sink.flush()
            tail[:] = [*tail[-19:], line]
            started[0] += WORKER in line
            if (workers == 1 and READY in line) or (workers > 1 and started[0] == workers):
                listening.set()
                said.set()
        said.set()  # the output ended: the process is going

    threading.Thread(target=pump, daemon=True).start()
    said.wait(timeout)
    if not listening.is_set():
        proc.kill()
        raise RuntimeError("uvicorn did not start:\n" + b"".join(tail).decode(errors="replace"))
    if workers > 1:  # a worker listens a few instructions after its line: connect until that has happened
        assert port is not None, "say where the workers listen"
        deadline = time.monotonic() + timeout
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=timeout).close()
                return
            except ConnectionRefusedError:
                assert time.monotonic() < deadline, "uvicorn's workers did not listen"
