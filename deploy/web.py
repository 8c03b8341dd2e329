"""The production web server: `python deploy/web.py [--port 8000] [--workers N]`.

uvicorn with several worker processes (default: `WEB_CONCURRENCY`, else two per core: a request spends much
of its time waiting on PostgreSQL and Valkey, so one process per core leaves the CPU idle), each with its own
pool of database connections (`DB_POOL_MAX_SIZE`, default 8 here: under ASGI every request runs in a thread of
its own, so without a pool each request opens and closes a PostgreSQL connection). The live stream (SSE) is an
async generator on the event loop, so open streams hold no thread and no connection between events.

With `PROMETHEUS_MULTIPROC_DIR` set, the directory is emptied before the workers start (prometheus_client's
multiprocess mode needs a clean directory per start). uvicorn's supervisor restarts a worker that dies but has
no hook to call `multiprocess.mark_process_dead`, so a dead worker's live-stream gauge lingers until the next
restart of the server (README "Observability").

Imports no Django: the settings are read by each worker, from the same environment as every other process.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

BASE_DIR = Path(__file__).resolve().parent.parent
DEFAULT_POOL = "8"
# A process trusts a token it authenticated for this long: revocations reach every worker within it.
DEFAULT_AUTH_CACHE = "2"


def default_workers() -> int:
    return int(os.environ.get("WEB_CONCURRENCY") or 2 * (os.cpu_count() or 1))


def command(host: str, port: int, workers: int, log_level: str = "warning") -> list[str]:
    return [
        sys.executable,
        "-m",
        "uvicorn",
        "portal.asgi:application",
        "--host",
        host,
        "--port",
        str(port),
        "--workers",
        str(workers),
        "--log-level",
        log_level,
        "--no-access-log",  # the platform's own access line (opentinker.access) carries the request id
        "--lifespan",
        "off",  # Django has no lifespan handlers
        # Named, not left to uvicorn's "auto": a missing package fails the start instead of silently costing
        # the pure-Python parser's and asyncio loop's CPU on every request (README "Performance").
        "--loop",
        "uvloop",
        "--http",
        "httptools",
        "--backlog",
        "2048",
        "--timeout-graceful-shutdown",
        "30",
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python deploy/web.py", description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="0.0.0.0")  # noqa: S104 (a server in a container listens on all)
    parser.add_argument("--port", type=int, default=int(os.environ.get("PORT", "8000")))
    parser.add_argument("--workers", type=int, default=default_workers())
    args = parser.parse_args(argv)
    env = environment(dict(os.environ))
    os.chdir(BASE_DIR)
    # The server replaces this process: signals from the container runtime reach uvicorn's supervisor.
    # uvicorn's own lines (a worker started or died) follow LOG_LEVEL when it is set; warnings otherwise.
    log_level = env.get("LOG_LEVEL", "warning").lower()
    os.execve(sys.executable, command(args.host, args.port, args.workers, log_level), env)  # noqa: S606
    return 0  # not reached


if __name__ == "__main__":
    sys.exit(main())
