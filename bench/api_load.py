"""The API under load: the demo's single server process against the production configuration, in one run.

    .venv/bin/python bench/api_load.py [--clients 100] [--think 0.5] [--duration 20] [--workers N[,M...]]

Starts its own embedded PostgreSQL + Valkey (devstack.embedded.EmbeddedServices, in a temporary directory),
migrates, and seeds one organization with --jobs jobs and one member (and token, jobs:read) per client, so
the per-user rate limit applies as it would to that many programs. Then, for each server in turn, on loopback:

- demo: the command `make demo` runs (one uvicorn process, settings' defaults: no connection reuse);
- production: `deploy/web.py`, exactly as production starts it (--workers uvicorn processes, a socket each,
  serving portal.asgi_split: sync views through Django's WSGI handler on a thread pool, a psycopg pool per
  process);

it drives the API with --clients concurrent clients (asyncio + aiohttp, one keep-alive connection each), every
client looping: `GET /api/v1/jobs?limit=20` three times out of four, `GET /api/v1/jobs/<id>` otherwise, then
a think time uniform in [0.5, 1.5] x --think. Two phases per server: with think time (latency at that load),
then without (saturation throughput). Requests/s and latency percentiles count the --duration seconds after a
--warmup; errors are non-200 answers and failed requests. The load generator shares the machine's cores with
the servers and the databases, as it would in a single-host test: its own CPU per request is a column, and
the last says how the clients' connections sat on the server's processes in the middle of the think phase.
Each request is a full HTTP/1.1 request on the client's connection, its whole body read and its status
checked, whichever client runs it; aiohttp (the default since 2026-12-07; `--client httpx` was the only one
before) spends less of the shared cores on the generator than httpx, so more is left to the server measured.

Goal (issue 17): the production configuration serves the mix with think time at p99 under 100 ms, and
saturates at 5x the demo's 64 requests/s (issue 17's locust run) or more.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import random
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Phase:
    latencies: list[float] = field(default_factory=list)
    errors: int = 0
    seconds: float = 0.0
    client_cpu: float = 0.0  # the load generator's own CPU seconds over the whole phase (warmup included)
    warmup: float = 0.0
    spread: list[int] = field(default_factory=list)  # the clients' connections on each server process

    def row(self) -> tuple[str, ...]:
        lat = sorted(self.latencies)

        def pct(q: float) -> str:
            return f"{lat[min(len(lat) - 1, int(q * len(lat)))] * 1000:.0f}" if lat else "-"

        rate = (len(lat) + self.errors) / self.seconds if self.seconds else 0.0
        spread = " / ".join(map(str, self.spread)) or "-"
        return (f"{rate:.0f}", pct(0.50), pct(0.95), pct(0.99), str(self.errors), self.client_ms(), spread)

    def client_ms(self) -> str:
        # Requests of the warmup are not counted: estimate them at the measured rate.
        n = (len(self.latencies) + self.errors) * (1 + self.warmup / self.seconds) if self.seconds else 0
        return f"{self.client_cpu / n * 1000:.2f}" if n else "-"


async def _client(
    base: str, token: str, job_ids: list[str], think: float, stop: float, t0: float, out: Phase, kind: str
):
    rng = random.Random()  # noqa: S311 (the request mix, not a secret)
    headers = {"Authorization": f"Bearer {token}"}
    async with _session(kind, base, headers) as get:
        await asyncio.sleep(rng.uniform(0, max(think, 0.05)))  # spread the first requests
        while True:
            path = "/api/v1/jobs?limit=20" if rng.random() < 0.75 else f"/api/v1/jobs/{rng.choice(job_ids)}"
            start = time.monotonic()
            if start >= stop:
                return
            try:
                ok = await get(path)
            except Exception:  # any failed request (refused, reset, timed out) is an error of the run
                ok = False
            end = time.monotonic()
            if start >= t0:  # requests started after the warmup
                if ok:
                    out.latencies.append(end - start)
                else:
                    out.errors += 1
            if think:
                await asyncio.sleep(think * rng.uniform(0.5, 1.5))


@contextlib.asynccontextmanager
async def _session(kind: str, base: str, headers: dict[str, str]):
    """`get(path) -> ok`: a full request on one keep-alive connection, the whole body read, status 200."""
    if kind == "httpx":
        import httpx

        async with httpx.AsyncClient(base_url=base, headers=headers, timeout=30) as http:

            async def get(path: str) -> bool:
                return (await http.get(path)).status_code == 200

            yield get
        return
    import aiohttp

    connector = aiohttp.TCPConnector(limit=1)  # one connection per client, kept alive
    timeout = aiohttp.ClientTimeout(total=30)
    async with aiohttp.ClientSession(base, headers=headers, connector=connector, timeout=timeout) as http:

        async def get(path: str) -> bool:
            async with http.get(path) as r:
                await r.read()
                return r.status == 200

        yield get


async def _drive(
    base: str,
    tokens: list[str],
    job_ids: list[str],
    think: float,
    warmup: float,
    duration: float,
    kind: str,
):
    out = Phase()
    t0 = time.monotonic() + warmup
    stop = t0 + duration
    cpu = time.process_time()
    await asyncio.gather(*(_client(base, t, job_ids, think, stop, t0, out, kind) for t in tokens))
    out.seconds = duration
    out.warmup = warmup
    out.client_cpu = time.process_time() - cpu
    return out


def _seed(clients: int, jobs: int) -> tuple[list[str], list[str]]:
    from django.contrib.auth import get_user_model

    from opentinker.spec import example_rl_spec
    from portal.actors import Actor
    from portal.models import Membership, Role
    from portal.services.jobs import job_submit
    from portal.services.orgs import organization_create
    from portal.services.tokens import token_create

    users = get_user_model().objects
    owner = users.create_user("bench-owner", "owner@example.com")  # no password: none to hash
    org = organization_create(slug="bench", name="Bench", owner=owner)
    job_ids = []
    for i in range(jobs):
        job, _ = job_submit(
            organization=org,
            actor=Actor.for_request(owner),
            spec=example_rl_spec().model_copy(update={"name": f"j{i}"}),
        )
        job_ids.append(str(job.id))
    tokens = []
    for i in range(clients):
        user = users.create_user(f"bench-{i}", f"bench-{i}@example.com")
        membership = Membership.objects.create(organization=org, user=user, role=Role.MEMBER)
        tokens.append(token_create(membership=membership, name="bench", scopes=["jobs:read"])[1])
    return tokens, job_ids


def _wait_up(base: str, proc: subprocess.Popen[bytes]) -> None:
    import httpx

    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with code {proc.returncode}")
        try:
            if httpx.get(f"{base}/healthz", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise RuntimeError(f"{base} did not answer")


def connections_per_process(pid: int, port: int) -> list[int]:
    """Clients' connections held by each process of the server (the process itself, or its workers)."""
    import psutil

    top = psutil.Process(pid)
    procs = top.children() or [top]
    return sorted(
        sum(c.status == psutil.CONN_ESTABLISHED and c.laddr.port == port for c in p.net_connections("tcp"))
        for p in procs
    )


def _count_later(delay: float, pid: int, port: int) -> tuple[threading.Timer, list[int]]:
    spread: list[int] = []
    timer = threading.Timer(delay, lambda: spread.extend(connections_per_process(pid, port)))
    timer.start()
    return timer, spread


def _servers(port: int, workers: list[int]) -> dict[str, list[str]]:
    demo = [sys.executable, "-m", "uvicorn", "portal.asgi:application", "--host", "127.0.0.1"]
    demo += ["--port", str(port), "--log-level", "warning"]  # as devstack/demo.py starts it
    servers = {"demo (1 process)": demo}
    for n in workers:
        servers[f"production ({n} workers)"] = [
            sys.executable,
            str(ROOT / "deploy" / "web.py"),
            *("--host", "127.0.0.1", "--port", str(port), "--workers", str(n)),
        ]
    return servers


def main() -> int:
    from deploy.web import default_workers

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clients", type=int, default=100)
    p.add_argument("--think", type=float, default=0.5, help="mean think time between a client's requests (s)")
    p.add_argument("--duration", type=float, default=20.0, help="measured seconds per phase")
    p.add_argument("--warmup", type=float, default=4.0)
    p.add_argument("--jobs", type=int, default=100, help="jobs in the organization")
    p.add_argument(
        "--client",
        choices=("aiohttp", "httpx"),
        default="aiohttp",
        help="the load generator's HTTP client (httpx: the SDK's, more CPU per request on the shared cores)",
    )
    cores = os.cpu_count() or 1
    p.add_argument(
        "--workers",
        default=",".join(dict.fromkeys(map(str, (cores, default_workers())))),
        help="production server processes; several (2,4) compare them in the same run "
        "(default: one per core and deploy/web.py's default)",
    )
    args = p.parse_args()

    from devstack.embedded import EmbeddedServices

    root = Path(tempfile.mkdtemp(prefix="otk-api-load-"))
    root.chmod(0o755)
    services = EmbeddedServices(root / "services", fast=True)
    results: dict[str, tuple[Phase, Phase]] = {}
    try:
        urls = services.start()
        env = {
            **os.environ,
            **urls.as_env(),
            "OPENTINKER_VAR_DIR": str(root / "var"),
            "SECRET_KEY": secrets.token_urlsafe(50),
            "TOKEN_PEPPER": secrets.token_urlsafe(32),
            "DEFAULT_QUOTA_MAX_QUEUED": str(args.jobs),
        }
        os.environ.update(env)
        subprocess.run([sys.executable, "manage.py", "migrate", "-v", "0"], cwd=ROOT, env=env, check=True)
        import django

        os.environ.setdefault("DJANGO_SETTINGS_MODULE", "portal.settings")
        django.setup()
        logging.getLogger("httpx").setLevel(logging.WARNING)  # not a line per request from the load generator
        tokens, job_ids = _seed(args.clients, args.jobs)
        from django.db import connections

        connections.close_all()
        port = _free_port()
        base = f"http://127.0.0.1:{port}"
        workers = [int(n) for n in args.workers.split(",")]
        for i, (name, cmd) in enumerate(_servers(port, workers).items()):
            log = (root / f"server-{i}.log").open("wb")
            server = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
            try:
                _wait_up(base, server)
                print(f"{name}: {args.clients} clients, think {args.think:g} s ...", flush=True)
                # Mid-phase: how the clients' keep-alive connections sit on the server's processes.
                count, spread = _count_later(args.warmup + args.duration / 2, server.pid, port)
                paced = asyncio.run(
                    _drive(base, tokens, job_ids, args.think, args.warmup, args.duration, args.client)
                )
                count.cancel()
                paced.spread = spread
                print(f"{name}: {args.clients} clients, no think time ...", flush=True)
                flat = asyncio.run(
                    _drive(base, tokens, job_ids, 0.0, args.warmup, args.duration, args.client)
                )
                results[name] = (paced, flat)
            finally:
                server.terminate()
                server.wait(30)
                log.close()
    finally:
        services.stop()
        shutil.rmtree(root, ignore_errors=True)
    _table(results, args)
    return 0


def _table(results: dict[str, tuple[Phase, Phase]], args: argparse.Namespace) -> None:
    head = (
        *("server", "phase", "requests/s", "p50 ms", "p95 ms", "p99 ms", "errors", "client CPU ms/req"),
        "connections per process",
    )
    rows = []
    for name, (paced, flat) in results.items():
        rows.append((name, f"think {args.think:g} s", *paced.row()))
        rows.append((name, "no think (saturation)", *flat.row()))
    widths = [max(len(str(r[i])) for r in (head, *rows)) for i in range(len(head))]
    print(
        f"\n{args.clients} clients, 3:1 GET /api/v1/jobs?limit=20 : GET /api/v1/jobs/<id>, "
        f"{args.duration:g} s measured after {args.warmup:g} s warmup, {os.cpu_count()} CPUs\n"
    )
    for r in (head, tuple("-" * w for w in widths), *rows):
        print("| " + " | ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)) + " |")


if __name__ == "__main__":
    sys.exit(main())
