"""Ingest throughput and live-stream (SSE) delivery latency, end to end through HTTP.

    .venv/bin/python bench/ingest.py [--points 200000] [--batch 2000] [--subscribers 100] [--workers 1]

Starts its own embedded PostgreSQL + Valkey (devstack.embedded.EmbeddedServices) in a temporary directory,
migrates, creates an organization and jobs, and serves portal.asgi with uvicorn. Then:

1. ingest: metric points per second POSTed to /api/v1/ingest/jobs/<id>/metrics (job token, batches of --batch
   points, --clients concurrent senders), no viewers attached;
2. live: --subscribers SSE viewers (a separate process, asyncio) follow a second job while a runtime reports
   a training step of --step-points points every 1/--steps-per-second s; latency = time from the POST being
   sent to each viewer receiving the frame (one clock: same machine). Reported as p50/p95/max over all
   (viewer, step) pairs;
3. live at full speed: the same viewers follow a third job while points are ingested as fast as in (1).

Goal (issue 3): 20,000 points/s, and p95 under 0.5 s with 100 viewers, on a 2-core machine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- the viewers (run as: bench/ingest.py --viewers URL TOKEN N OUT) ---


async def _viewer(host: str, port: int, path: str, token: str, ready: asyncio.Event, counter: list[int], out):
    reader, writer = await asyncio.open_connection(host, port, limit=16 * 1024 * 1024)
    writer.write(
        f"GET {path} HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {token}\r\n"
        f"Accept: text/event-stream\r\n\r\n".encode()
    )
    await writer.drain()
    step_re = re.compile(rb'"step":(\d+)')
    event = b""
    chunked = False
    while True:  # headers
        line = await reader.readline()
        if line.lower().startswith(b"transfer-encoding: chunked"):
            chunked = True
        if line in (b"\r\n", b""):
            break
    synced = False
    while True:
        if chunked:
            size_line = await reader.readline()
            if not size_line:
                break
            size = int(size_line.strip() or b"0", 16)
            if size == 0:
                break
            data = await reader.readexactly(size + 2)
            chunk = data[:-2]
        else:
            chunk = await reader.read(65536)
            if not chunk:
                break
        now = time.time()
        event += chunk
        while b"\n\n" in event:
            frame, event = event.split(b"\n\n", 1)
            if b"event: sync" in frame and not synced:
                synced = True
                counter[0] += 1
                if counter[0] == counter[1]:
                    ready.set()
            elif b"event: metrics" in frame and synced:
                m = step_re.search(frame)
                if m:
                    out.append((int(m.group(1)), now))
            elif b"event: end" in frame:
                writer.close()
                return


async def _viewers_main(url: str, token: str, n: int, out_path: str) -> None:
    host, port = url.split("//")[1].split("/")[0].split(":")
    path = "/" + url.split("//")[1].split("/", 1)[1]
    ready = asyncio.Event()
    counter = [0, n]
    results: list[list] = [[] for _ in range(n)]
    tasks = []
    for i in range(n):
        # Browsers do not all connect in the same millisecond; nor must 100 requests open 100 connections
        # to PostgreSQL at once (each request's view runs in a thread of its own under ASGI).
        tasks.append(asyncio.create_task(_viewer(host, int(port), path, token, ready, counter, results[i])))
        await asyncio.sleep(0.02)
    await ready.wait()
    print("ready", flush=True)
    await asyncio.gather(*tasks)
    Path(out_path).write_text(json.dumps(results))


# --- the bench ---


def _percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))] if values else float("nan")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--points", type=int, default=200_000)
    p.add_argument("--batch", type=int, default=2000)
    p.add_argument("--clients", type=int, default=2)
    p.add_argument("--subscribers", type=int, default=100)
    p.add_argument("--workers", type=int, default=1, help="uvicorn worker processes")
    p.add_argument("--steps", type=int, default=100, help="training steps in the latency run")
    p.add_argument("--step-points", type=int, default=20)
    p.add_argument("--steps-per-second", type=float, default=10)
    p.add_argument("--viewers", nargs=4, metavar=("URL", "TOKEN", "N", "OUT"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.viewers:
        url, token, n, out = args.viewers
        asyncio.run(_viewers_main(url, token, int(n), out))
        return 0

    from devstack.embedded import EmbeddedServices

    root = Path(tempfile.mkdtemp(prefix="otk-bench-"))
    root.chmod(0o755)
    services = EmbeddedServices(root / "services", fast=True)
    server = None
    try:
        urls = services.start()
        env = {
            **os.environ,
            **urls.as_env(),
            "OPENTINKER_VAR_DIR": str(root / "var"),
            "SECRET_KEY": secrets.token_urlsafe(50),
            "TOKEN_PEPPER": secrets.token_urlsafe(32),
            "LOG_LEVEL": "WARNING",
        }
        os.environ.update(env)
        subprocess.run([sys.executable, "manage.py", "migrate", "-v", "0"], cwd=ROOT, env=env, check=True)
        import django

        os.environ.setdefault("DJANGO_SETTINGS_MODULE", "portal.settings")
        django.setup()
        jobs, user_token = _setup()
        port = _free_port()
        server = subprocess.Popen(
            [
                *(sys.executable, "-m", "uvicorn", "portal.asgi:application", "--host", "127.0.0.1"),
                *("--port", str(port), "--workers", str(args.workers), "--lifespan", "off"),
                *("--log-level", "warning", "--no-access-log"),
            ],
            cwd=ROOT,
            env=env,
        )
        base = f"http://127.0.0.1:{port}"
        _wait_up(base)
        rows = []
        rate = _ingest(base, jobs[0], args.points, args.batch, args.clients)
        rows.append(
            ("ingest, no viewers", f"{args.points:,} pts, batch {args.batch}", f"{rate:,.0f}", "-", "-", "-")
        )
        lat = _live(base, jobs[1], user_token, args, paced=True)
        rows.append(
            (
                f"live, {args.subscribers} viewers",
                f"{args.steps} steps x {args.step_points} pts @ {args.steps_per_second:g}/s",
                f"{lat['rate']:,.0f}",
                *lat["pct"],
            )
        )
        lat = _live(base, jobs[2], user_token, args, paced=False)
        rows.append(
            (
                f"live, {args.subscribers} viewers",
                f"{args.points // 2:,} pts, batch {args.batch}, full speed",
                f"{lat['rate']:,.0f}",
                *lat["pct"],
            )
        )
        _table(rows, args)
    finally:
        if server is not None:
            server.terminate()
            server.wait(10)
        services.stop()
        shutil.rmtree(root, ignore_errors=True)
    return 0


def _setup():
    from django.contrib.auth import get_user_model

    from opentinker.spec import JobState, example_rl_spec
    from portal.actors import Actor
    from portal.models import Membership
    from portal.services.job_tokens import job_token_issue
    from portal.services.jobs import job_submit, job_transition
    from portal.services.orgs import organization_create
    from portal.services.tokens import token_create

    user = get_user_model().objects.create_user("bench", "bench@example.com", "bench-password-123")
    org = organization_create(slug="bench", name="Bench", owner=user)
    membership = Membership.objects.get(organization=org, user=user)
    _, secret = token_create(membership=membership, name="bench", scopes=["jobs:read"])
    jobs = []
    for _ in range(3):
        job, _ = job_submit(organization=org, actor=Actor.for_request(user), spec=example_rl_spec())
        job = job_transition(job=job, to=JobState.ADMITTED, actor=Actor.system("scheduler"))
        job = job_transition(job=job, to=JobState.RUNNING, actor=Actor.system("runtime"))
        jobs.append((str(job.id), job_token_issue(job)))
    return jobs, secret


def _wait_up(base: str) -> None:
    import httpx

    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{base}/healthz", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            time.sleep(0.1)
    raise RuntimeError("uvicorn did not start")


def _bodies(total: int, batch: int, start: int = 0) -> list[bytes]:
    names = ("reward/mean", "loss/policy", "kl", "entropy")
    bodies, step = [], start
    for _ in range(total // batch):
        pts = []
        while len(pts) < batch:
            pts += [
                {"step": step, "name": n, "value": round(step * 0.001 + i, 6)} for i, n in enumerate(names)
            ]
            step += 1
        bodies.append(json.dumps({"points": pts[:batch]}, separators=(",", ":")).encode())
    return bodies


def _ingest(base: str, job, total: int, batch: int, clients: int, on_sent=None) -> float:
    import httpx

    job_id, token = job
    bodies = _bodies(total, batch)
    url = f"{base}/api/v1/ingest/jobs/{job_id}/metrics"
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    lock = threading.Lock()
    it = iter(bodies)
    errors = []

    def sender():
        with httpx.Client(timeout=60, headers=headers) as c:
            while True:
                with lock:
                    body = next(it, None)
                if body is None:
                    return
                r = c.post(url, content=body)
                if r.status_code != 200:
                    errors.append(r.text)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=sender) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - t0
    if errors:
        raise RuntimeError(f"{len(errors)} failed batches: {errors[0][:300]}")
    return len(bodies) * batch / elapsed


def _live(base: str, job, user_token: str, args, *, paced: bool) -> dict:
    import httpx

    job_id, token = job
    out = Path(tempfile.mkstemp(suffix=".json")[1])
    viewers = subprocess.Popen(
        [
            *(sys.executable, __file__, "--viewers", f"{base}/api/v1/jobs/{job_id}/stream", user_token),
            *(str(args.subscribers), str(out)),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert viewers.stdout.readline().strip() == "ready"
    runtime = httpx.Client(
        base_url=f"{base}/api/v1/ingest/jobs/{job_id}",
        headers={"Authorization": f"Bearer {token}"},
        timeout=60,
    )
    sent: dict[int, float] = {}
    t0 = time.perf_counter()
    if paced:
        names = [f"metric/{i}" for i in range(args.step_points)]
        interval = 1 / args.steps_per_second
        for step in range(args.steps):
            target = t0 + step * interval
            time.sleep(max(0.0, target - time.perf_counter()))
            body = {"points": [{"step": step, "name": n, "value": step / 10} for n in names]}
            sent[step] = time.time()
            runtime.post("/metrics", json=body).raise_for_status()
        points = args.steps * args.step_points
    else:
        total = args.points // 2
        bodies = _bodies(total, args.batch)
        for body in bodies:
            first = int(re.search(rb'"step":(\d+)', body).group(1))
            sent[first] = time.time()
            r = runtime.post("/metrics", content=body, headers={"Content-Type": "application/json"})
            r.raise_for_status()
        points = len(bodies) * args.batch
    elapsed = time.perf_counter() - t0
    runtime.post("/state", json={"state": "succeeded"}).raise_for_status()
    viewers.wait(300)
    received = json.loads(out.read_text())
    out.unlink()
    latencies = [t - sent[step] for per_viewer in received for step, t in per_viewer if step in sent]
    expected = len(sent) * args.subscribers
    missing = expected - len(latencies)
    pct = (
        f"{_percentile(latencies, 0.5) * 1000:.0f} ms",
        f"{_percentile(latencies, 0.95) * 1000:.0f} ms",
        f"{max(latencies) * 1000:.0f} ms" + (f" ({missing} missing!)" if missing else ""),
    )
    return {"rate": points / elapsed, "pct": pct}


def _table(rows, args) -> None:
    headers = ("run", "load", "points/s", "SSE p50", "SSE p95", "SSE max")
    widths = [max(len(str(r[i])) for r in [headers, *rows]) for i in range(len(headers))]
    print()
    print(f"bench/ingest.py  ({os.cpu_count()} CPUs, uvicorn workers: {args.workers})")
    for r in [headers, tuple("-" * w for w in widths), *rows]:
        print("  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
    print("\ngoal: 20,000 points/s ingested; SSE p95 < 500 ms with 100 viewers")


if __name__ == "__main__":
    sys.exit(main())
