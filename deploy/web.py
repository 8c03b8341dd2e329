"""The production web server: `python deploy/web.py [--port 8000] [--workers N]`.

A small supervisor and N uvicorn worker processes (default: `WEB_CONCURRENCY`, else one per core: a worker's
threads overlap its requests' waits on PostgreSQL and Valkey, and more processes than cores cost CPU per
request: measured on 2 cores, 4 workers 3.3 ms against 2 workers' 2.6), each serving
`portal.asgi_split:application`: a plain request (every sync view: the API, the pages, the admin) runs
through Django's WSGI handler on one of the worker's threads, as many as its pool of database connections
holds (`DB_POOL_MAX_SIZE`, default 8 here), each borrowing a connection while its request runs. The async
routes (the live stream, an async generator; Tinker's long-polled `retrieve_future`) run on the event loop
through Django's ASGI handler, so an open stream or a held poll holds no thread and no connection while it
waits.

Each worker accepts from a listening socket of its own, all bound to the same port with `SO_REUSEPORT`, so
the kernel spreads new connections evenly over the workers. With one socket shared by every worker (uvicorn's
`--workers`), the worker that last woke accepts nearly every connection (measured: 97 of 100 keep-alive
clients on one of 2 workers, 97 of 100 on one of 4): clients that keep their connections (programs, the
ingress' upstream pool) all landed on one process and its one core, and its garbage collections stalled them
all at once. The supervisor opens the sockets before any worker starts, so a connection that arrives while its
worker (re)starts waits in that socket's queue instead of being refused. A worker that dies is restarted on
its socket, and one whose event loop stops beating (hung) is killed and restarted; workers that keep dying
at start stop the server (a broken release fails visibly, not in a loop).
SIGTERM or SIGINT stops the workers gracefully (30 s to finish their requests; a new connection is refused
from then on) and then the supervisor. SIGHUP replaces the workers one at a time, each new one serving before
its old one is stopped. With LOG_FORMAT=json the supervisor's lines are JSON objects too.

With `PROMETHEUS_MULTIPROC_DIR` set, the directory is emptied before the workers start (prometheus_client's
multiprocess mode needs a clean directory per start), and a dead worker's files are marked dead, so its
live-stream gauge does not linger (README "Observability").

Imports no Django: the settings are read by each worker, from the same environment as every other process.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import ctypes
import logging
import logging.config
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

BASE_DIR = Path(__file__).resolve().parent.parent
# Sync views on a thread pool, async views on the loop (portal/asgi_split.py).
APPLICATION = "portal.asgi_split:application"
DEFAULT_POOL = "8"
# A process trusts a token it authenticated for this long: revocations reach every worker within it.
DEFAULT_AUTH_CACHE = "2"
BACKLOG = 2048
GRACEFUL_SECONDS = 30
# A worker that exits sooner than this after its start counts as failing at start; this many in a row (of
# any workers) and the server stops instead of restarting them for ever.
QUICK_EXIT_SECONDS = 10.0
QUICK_EXITS_TO_GIVE_UP = 5
# A serving worker's event loop writes a heartbeat every second; one silent for this long (WEB_WORKER_TIMEOUT)
# is hung and is killed, then restarted: its socket's connections would otherwise wait on it for ever. A
# starting worker (Django's imports) gets STARTUP_GRACE_SECONDS more before its first beat.
DEFAULT_WORKER_TIMEOUT = 30.0
STARTUP_GRACE_SECONDS = 60.0

log = logging.getLogger("uvicorn.error")  # uvicorn's own supervisor logged its lines here


def default_workers() -> int:
    return int(os.environ.get("WEB_CONCURRENCY") or os.cpu_count() or 1)


def command(host: str, port: int, workers: int, log_level: str = "warning") -> list[str]:
    """The command line that starts the production server (the supervisor and its workers)."""
    return [
        sys.executable,
        str(BASE_DIR / "deploy" / "web.py"),
        *("--host", host, "--port", str(port), "--workers", str(workers), "--log-level", log_level),
    ]


def environment(base: dict[str, str]) -> dict[str, str]:
    env = dict(base)
    env.setdefault("DB_POOL_MAX_SIZE", DEFAULT_POOL)
    env.setdefault("DB_CONN_MAX_AGE", "0")  # the pool replaces persistent connections
    env.setdefault("API_AUTH_CACHE_SECONDS", DEFAULT_AUTH_CACHE)
    multiproc = env.get("PROMETHEUS_MULTIPROC_DIR")
    if multiproc:
        shutil.rmtree(multiproc, ignore_errors=True)
        Path(multiproc).mkdir(parents=True, exist_ok=True)
    return env


def listening_sockets(host: str, port: int, count: int) -> list[socket.socket]:
    """`count` sockets listening on (host, port) side by side (SO_REUSEPORT); OSError if the port is taken.

    SO_REUSEPORT would also let these join another server's sockets on the port (a second start, an old
    release still running) and silently split the traffic with it: a plain bind first makes that an error,
    as a port in use is for any server."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind((host, port))
        port = probe.getsockname()[1]  # --port 0: a free port, then the same one for every socket
    sockets: list[socket.socket] = []
    try:
        for _ in range(count):
            sock = socket.socket(family, socket.SOCK_STREAM)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind((host, port))
            sock.listen(BACKLOG)
            sock.set_inheritable(True)
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    return sockets


def logging_config(log_format: str) -> dict[str, Any]:
    """The supervisor's logging: uvicorn's (it logged these lines before), one JSON object per line like every
    other process with LOG_FORMAT=json (portal.observability.logs imports no Django)."""
    from uvicorn.config import LOGGING_CONFIG

    config = copy.deepcopy(LOGGING_CONFIG)
    if log_format == "json":
        sys.path.insert(0, str(BASE_DIR))
        config["formatters"]["default"] = {"()": "portal.observability.logs.JsonFormatter"}
    return config


def serve(fd: int, log_level: str, supervisor: int | None = None, heartbeat: int | None = None) -> None:
    """A worker: uvicorn serving the application on the inherited listening socket `fd`, beating on the pipe
    `heartbeat` once a second from its event loop."""
    _die_with_parent(supervisor)
    sys.path.insert(0, str(BASE_DIR))  # the application's packages (run as a script, sys.path has deploy/)
    import uvicorn

    class Server(uvicorn.Server):
        async def on_tick(self, counter: int) -> bool:  # uvicorn calls it every 0.1 s from the loop
            if heartbeat is not None and counter % 10 == 0:
                with contextlib.suppress(BlockingIOError, BrokenPipeError):  # full: the supervisor is behind
                    os.write(heartbeat, b".")
            return await super().on_tick(counter)

    if heartbeat is not None:
        os.set_blocking(heartbeat, False)

    config = uvicorn.Config(
        APPLICATION,
        log_level=log_level,
        access_log=False,  # the platform's own access line (opentinker.access) carries the request id
        lifespan="off",  # Django has no lifespan handlers
        # Named, not left to uvicorn's "auto": a missing package fails the start instead of silently costing
        # the pure-Python parser's and asyncio loop's CPU on every request (README "Performance").
        loop="uvloop",
        http="httptools",
        backlog=BACKLOG,
        timeout_graceful_shutdown=GRACEFUL_SECONDS,
    )
    Server(config).run(sockets=[socket.socket(fileno=fd)])


def _die_with_parent(supervisor: int | None) -> None:
    """A worker gets SIGTERM when its supervisor dies, however it died (Linux; elsewhere a no-op)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    # The request only covers a death after it: a supervisor that died while this Python started would leave
    # the worker serving on its own (holding the port, so that no new server could start).
    if supervisor is not None and os.getppid() != supervisor:
        sys.exit(f"The supervisor [{supervisor}] exited before this worker started: exiting.")


@dataclass
class Worker:
    sock: socket.socket
    proc: subprocess.Popen[bytes] | None = None
    started: float = 0.0
    heartbeat: int | None = None  # the read end of the worker's heartbeat pipe
    last_beat: float | None = None
    # During a reload (SIGHUP): the old process, serving until `proc` beats.
    replacing: subprocess.Popen[bytes] | None = None

    def beating(self, now: float, timeout: float) -> bool:
        """Reads the worker's beats; False once it has been silent too long (hung, or never started)."""
        got = b""
        with contextlib.suppress(BlockingIOError):
            while chunk := os.read(self.heartbeat, 4096) if self.heartbeat is not None else b"":
                got += chunk
        if got:
            self.last_beat = now
        if self.last_beat is None:
            return now - self.started < timeout + STARTUP_GRACE_SECONDS
        return now - self.last_beat < timeout

    def close_heartbeat(self) -> None:
        if self.heartbeat is not None:
            os.close(self.heartbeat)
            self.heartbeat = None


class Supervisor:
    def __init__(
        self,
        sockets: list[socket.socket],
        log_level: str,
        env: dict[str, str],
        timeout: float = DEFAULT_WORKER_TIMEOUT,
    ) -> None:
        self.workers = [Worker(sock) for sock in sockets]
        self.log_level = log_level
        self.env = env
        self.stopping = False
        self.quick_exits = 0
        self.timeout = timeout
        self.reloads: list[Worker] = []  # SIGHUP: the workers still to replace, one at a time
        self.draining: list[subprocess.Popen[bytes]] = []  # replaced processes finishing their requests

    def start(self, worker: Worker) -> None:
        fd = worker.sock.fileno()
        worker.close_heartbeat()
        beat_read, beat_write = os.pipe()
        os.set_blocking(beat_read, False)
        script = str(BASE_DIR / "deploy" / "web.py")
        args = ("--serve-fd", str(fd), "--log-level", self.log_level, "--supervisor", str(os.getpid()))
        try:
            worker.proc = subprocess.Popen(
                [sys.executable, script, *args, "--heartbeat-fd", str(beat_write)],
                cwd=BASE_DIR,
                env=self.env,
                pass_fds=(fd, beat_write),
                # Its own process group: a terminal's Ctrl+C reaches the supervisor alone, which stops each
                # worker with one SIGTERM (a second signal would make uvicorn drop its open requests).
                process_group=0,
            )
        finally:
            os.close(beat_write)
        worker.heartbeat, worker.last_beat = beat_read, None
        worker.started = time.monotonic()

    def stop(self, signum: int, _frame: object) -> None:
        if not self.stopping:
            log.info("Received %s, stopping the workers.", signal.Signals(signum).name)
        self.stopping = True

    def reload(self, _signum: int, _frame: object) -> None:
        """SIGHUP: replace every worker, one at a time, each new one serving before its old one stops (the
        code and settings on disk now, without a dropped connection)."""
        if not self.stopping:
            log.info("Received SIGHUP, replacing the workers one by one.")
            self.reloads = list(self.workers)

    def _reload_step(self) -> None:
        busy = next((w for w in self.workers if w.replacing is not None), None)
        if busy is not None:
            if busy.last_beat is None:
                return  # the new process is not serving yet: the old one goes on
            log.info("Worker [%s] replaced by [%s].", busy.replacing.pid, busy.proc.pid)
            busy.replacing.send_signal(signal.SIGTERM)  # it stops accepting, finishes its requests, exits
            self.draining.append(busy.replacing)
            busy.replacing = None
        if self.reloads:
            worker = self.reloads.pop(0)
            worker.replacing = worker.proc
            self.start(worker)  # both accept from the socket until the old one is told to stop

    def _reap_drained(self) -> None:
        for proc in [p for p in self.draining if p.poll() is not None]:
            self.draining.remove(proc)
            self._mark_dead(proc.pid)

    def run(self) -> int:
        for worker in self.workers:
            if not self.stopping:
                self.start(worker)
        while not self.stopping:
            time.sleep(0.5)
            for worker in self.workers:
                code = worker.proc.poll() if worker.proc is not None else None
                if code is None and not self.stopping and not worker.beating(time.monotonic(), self.timeout):
                    log.error(
                        "Worker [%s] has been silent for %g s: killing it.", worker.proc.pid, self.timeout
                    )
                    worker.proc.kill()
                    code = worker.proc.wait()
                if code is None or self.stopping:
                    continue
                self._mark_dead(worker.proc.pid)
                quick = time.monotonic() - worker.started < QUICK_EXIT_SECONDS
                self.quick_exits = self.quick_exits + 1 if quick else 0
                if self.quick_exits >= QUICK_EXITS_TO_GIVE_UP:
                    log.error("Workers keep exiting at start (the last with code %s): stopping.", code)
                    self.shutdown()
                    return 1
                log.warning("Worker [%s] exited with code %s: restarting it.", worker.proc.pid, code)
                self.start(worker)
            self._reload_step()
            self._reap_drained()
        self.shutdown()
        return 0

    def shutdown(self) -> None:
        procs = [w.proc for w in self.workers] + [w.replacing for w in self.workers] + self.draining
        running = [p for p in procs if p is not None and p.poll() is None]
        for proc in running:
            proc.send_signal(signal.SIGTERM)
        # Each worker closes its copy of its socket at once (uvicorn stops accepting); with these closed too,
        # a new connection is refused (a proxy tries another server) instead of waiting, never accepted, for
        # the workers' last requests (up to 30 s: an open live stream) and then being reset.
        for worker in self.workers:
            worker.sock.close()
            worker.close_heartbeat()
        deadline = time.monotonic() + GRACEFUL_SECONDS + 5
        for proc in running:
            try:
                proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def _mark_dead(self, pid: int) -> None:
        if self.env.get("PROMETHEUS_MULTIPROC_DIR"):
            from prometheus_client import multiprocess

            multiprocess.mark_process_dead(pid, self.env["PROMETHEUS_MULTIPROC_DIR"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python deploy/web.py", description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="0.0.0.0")  # noqa: S104 (a server in a container listens on all)
    parser.add_argument("--port", type=int, default=int(os.environ.get("PORT", "8000")))
    parser.add_argument("--workers", type=int, default=default_workers())
    # uvicorn's own lines (a worker started or died) follow LOG_LEVEL when it is set; warnings otherwise.
    parser.add_argument(
        "--log-level",
        default=os.environ.get("LOG_LEVEL", "warning").lower(),
        choices=("critical", "error", "warning", "info", "debug", "trace"),
    )
    parser.add_argument(
        "--worker-timeout",
        type=float,
        default=os.environ.get("WEB_WORKER_TIMEOUT") or str(DEFAULT_WORKER_TIMEOUT),
        help="seconds a worker's event loop may stay silent before it is killed and restarted",
    )
    parser.add_argument("--serve-fd", type=int, help=argparse.SUPPRESS)  # a worker, started by the supervisor
    parser.add_argument("--supervisor", type=int, help=argparse.SUPPRESS)  # the worker's supervisor's pid
    parser.add_argument("--heartbeat-fd", type=int, help=argparse.SUPPRESS)  # the worker's heartbeat pipe
    args = parser.parse_args(argv)
    if args.workers < 1:
        parser.error("--workers must be at least 1")
    if not args.worker_timeout > 0:
        parser.error("--worker-timeout (WEB_WORKER_TIMEOUT) must be a positive number of seconds")
    os.chdir(BASE_DIR)
    if args.serve_fd is not None:
        serve(args.serve_fd, args.log_level, args.supervisor, args.heartbeat_fd)
        return 0

    # First of all: as a container's PID 1 a signal without a handler is dropped, so a SIGTERM in the start-up
    # would be lost and `docker stop` or Kubernetes would wait out their grace period to kill.
    requested: list[int] = []
    supervisors: list[Supervisor] = []

    def on_signal(signum: int, frame: object) -> None:
        requested.append(signum)
        for supervisor in supervisors:
            supervisor.stop(signum, frame)

    def on_hangup(signum: int, frame: object) -> None:
        for supervisor in supervisors:  # none yet: the workers about to start load the code on disk anyway
            supervisor.reload(signum, frame)

    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, on_signal)
    signal.signal(signal.SIGHUP, on_hangup)
    logging.config.dictConfig(logging_config(os.environ.get("LOG_FORMAT", "text")))
    log.setLevel(args.log_level.upper())
    # Elsewhere than on Linux, SO_REUSEPORT does not spread connections (on macOS the last socket bound gets
    # them all): there the workers share one socket, as with uvicorn's --workers.
    own = args.workers if sys.platform == "linux" else 1
    try:
        sockets = listening_sockets(args.host, args.port, own)
    except OSError as exc:
        log.error("Cannot listen on %s:%s: %s", args.host, args.port, exc)
        return 1
    sockets += sockets[-1:] * (args.workers - own)
    # Only now that the port is this server's: refused, it must not empty the metrics directory of the server
    # that holds the port (another deploy/web.py on this host, or in this container).
    env = environment(dict(os.environ))
    supervisor = Supervisor(sockets, args.log_level, env, args.worker_timeout)
    supervisors.append(supervisor)
    if requested:  # before the supervisor was there to hear it
        supervisor.stop(requested[0], None)
    host = f"[{args.host}]" if ":" in args.host else args.host
    port = sockets[0].getsockname()[1]
    log.info(
        "Uvicorn running on http://%s:%d with %d workers, %d listening sockets (Press CTRL+C to quit)",
        *(host, port, args.workers, own),
    )
    return supervisor.run()


if __name__ == "__main__":
    sys.exit(main())
