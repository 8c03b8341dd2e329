"""`make demo`: the whole platform on this machine, in the foreground, until Ctrl-C.

Starts the embedded PostgreSQL and Valkey, migrates, seeds a demo organization and user, runs the web server
(uvicorn, ASGI) and a Celery worker, prints the URL and the login, and on Ctrl-C stops everything it started.
This module imports no Django: the servers it starts are what the settings need.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from types import FrameType

import psutil

from devstack.embedded import EmbeddedServiceError, EmbeddedServices
from devstack.recipes import ExampleRecipe, MultiAgentRecipe
from opentinker.errors import OpenTinkerError

BASE_DIR = Path(__file__).resolve().parent.parent


def _free_port(preferred: int) -> int:
    for port in (preferred, 0):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return s.getsockname()[1]
    raise RuntimeError("no free port")


def _wait_http(url: str, proc: subprocess.Popen[bytes], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the web server exited with code {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:  # noqa: S310 (our own localhost URL)
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.3)
    raise RuntimeError(f"{url} did not answer within {timeout:.0f} s")


def _stop(procs: list[subprocess.Popen[bytes]]) -> None:
    # Job runners and runtimes are grandchildren (started by the worker, in sessions of their own): collect
    # them while the worker still holds them, so they stop with everything else.
    descendants = [
        c for c in psutil.Process().children(recursive=True) if c.pid not in {p.pid for p in procs}
    ]
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 15
    for p in procs:
        try:
            p.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
    for child in descendants:
        with contextlib.suppress(psutil.NoSuchProcess):
            child.terminate()
    _gone, alive = psutil.wait_procs(descendants, timeout=10)
    for child in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            child.kill()


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m devstack.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=int(os.environ.get("PORT", "8000")))
    parser.add_argument("--check", action="store_true", help="start, verify, print, then stop (for tests)")
    parser.add_argument(
        "--no-example", dest="example", action="store_false", help="do not submit the example jobs"
    )
    parser.add_argument(
        "--example-steps", type=int, default=None, help="steps of each example stage (default: the recipe's)"
    )
    parser.add_argument(
        "--multi-agent",
        action="store_true",
        help="the two-policy tic-tac-toe example (devstack/recipes.py) instead of arithmetic",
    )
    args = parser.parse_args(argv)
    # Ctrl-C, `kill` and a closing terminal all stop everything cleanly (SIGINT is ignored by default
    # in processes started in the background, so set it explicitly).
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _interrupt)

    var = Path(os.environ.get("OPENTINKER_VAR_DIR", BASE_DIR / "var"))
    var.mkdir(parents=True, exist_ok=True)
    services = EmbeddedServices(var)
    procs: list[subprocess.Popen[bytes]] = []
    py = sys.executable
    try:
        print("Starting PostgreSQL and Valkey under", var, flush=True)
        urls = services.start()
        env = {**os.environ, **urls.as_env(), "OPENTINKER_VAR_DIR": str(var)}
        manage = [py, str(BASE_DIR / "manage.py")]
        subprocess.run([*manage, "migrate", "--noinput", "-v", "0"], env=env, check=True, cwd=BASE_DIR)
        seed = subprocess.run(
            [*manage, "demo_seed"], env=env, check=True, cwd=BASE_DIR, capture_output=True, text=True
        )
        login = json.loads(seed.stdout.strip().splitlines()[-1])

        port = _free_port(args.port)
        url = f"http://127.0.0.1:{port}"
        # Jobs launched by the worker report to this server's ingest API.
        env["INGEST_BASE_URL"] = url
        procs.append(
            subprocess.Popen(
                [
                    py,
                    "-m",
                    "uvicorn",
                    "portal.asgi:application",
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(port),
                    "--log-level",
                    "warning",
                ],
                env=env,
                cwd=BASE_DIR,
            )
        )
        procs.append(
            subprocess.Popen(
                [
                    py,
                    "-m",
                    "celery",
                    "-A",
                    "portal.celery",
                    "worker",
                    "--loglevel",
                    "WARNING",
                    "--concurrency",
                    "1",
                    # Embedded beat: the scheduler, supervisor and pool-refresh passes every few seconds.
                    "--beat",
                    "--schedule",
                    str(var / "celerybeat-schedule"),
                ],
                env=env,
                cwd=BASE_DIR,
            )
        )
        _wait_http(f"{url}/healthz", procs[0])
        recipe = None
        job_line = ""
        if args.example:
            store = env.get("OBJECT_STORE_URL") or f"file://{var / 'objects'}"  # the settings' default
            recipe_cls = MultiAgentRecipe if args.multi_agent else ExampleRecipe
            recipe = recipe_cls(
                url,
                login["token"],
                store,
                login["organization"],
                steps=args.example_steps,
                s3_endpoint=env.get("S3_ENDPOINT_URL") or None,
            )
            job_line = recipe.start()
        print(
            "\n"
            f"  OpenTinker is up:  {url}\n"
            f"  Sign in:           {login['username']} / {login['password']}\n"
            f"  API docs:          {url}/api/docs/\n"
            f"  API token:         {login['token']}\n"
            f"  CLI:               opentinker login --url {url} --token <the token above>\n"
            f"{job_line}"
            "\n  Ctrl-C stops everything.\n",
            flush=True,
        )
        if args.check:
            return 0
        while all(p.poll() is None for p in procs):
            time.sleep(1.0)
            try:
                line = recipe.poll() if recipe is not None else None
            except OpenTinkerError as e:  # the demo keeps running; the example just stops here
                line, recipe = f"  Example: {e}", None
            if line:
                print(line, flush=True)
        failed = next(p for p in procs if p.poll() is not None)
        print(f"a demo process exited with code {failed.returncode}; stopping", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\nStopping...", flush=True)
        return 0
    except (EmbeddedServiceError, subprocess.CalledProcessError, RuntimeError) as e:
        detail = getattr(e, "stderr", None) or ""
        print(f"demo failed: {e}\n{detail}", file=sys.stderr)
        return 1
    finally:
        _stop(procs)
        services.stop()
        print("Stopped.", flush=True)


if __name__ == "__main__":
    sys.exit(main())
