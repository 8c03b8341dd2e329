"""The production web server: `python deploy/web.py [--port 8000] [--workers N]`.

uvicorn with several worker processes (default: `WEB_CONCURRENCY`, else one per core: a worker's threads
overlap its requests' waits on PostgreSQL and Valkey, and more processes than cores cost CPU per request:
measured on 2 cores, 4 workers 3.3 ms against 2 workers' 2.6), each serving
`portal.asgi_split:application`: a plain request (every sync view: the API, the pages, the admin) runs
through Django's WSGI handler on one of the worker's threads, as many as its pool of database connections
holds (`DB_POOL_MAX_SIZE`, default 8 here), each borrowing a connection while its request runs. The async
routes (the live stream, an async generator; Tinker's long-polled `retrieve_future`, an async view) run on
the event loop through Django's ASGI handler, so an open stream or a held poll holds no thread and no
connection while it waits. Django's ASGI handler would run every sync request on a new thread of its own,
hopping between the loop and it at every sync/async boundary of the middleware chain: about as much of the
worker's CPU as the view itself (README "Performance").

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
# Sync views on a thread pool, async views on the loop (portal/asgi_split.py).
APPLICATION = "portal.asgi_split:application"
DEFAULT_POOL = "8"
# A process trusts a token it authenticated for this long: revocations reach every worker within it.
DEFAULT_AUTH_CACHE = "2"


def default_workers() -> int:
    return int(os.environ.get("WEB_CONCURRENCY") or os.cpu_count() or 1)


def command(host: str, port: int, workers: int, log_level: str = "warning") -> list[str]:
    return [
        sys.executable,
        "-m",
        "uvicorn",
        APPLICATION,
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
