"""A real two-node Ray cluster on this machine for the ``ray`` driver's tests: ``ray start --head`` plus a
second ``ray start --address=...`` joining it, every port picked free, everything under a temp dir of its own.

``ray stop`` would stop every Ray process of this user on the machine (other tests' or other people's), so
this stops exactly the processes it started: those whose command line names its temp dir or its GCS address,
with their children.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil


def free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


@dataclass
class RayCluster:
    temp_dir: Path
    gcs_port: int
    dashboard_port: int
    logs: list[str] = field(default_factory=list)

    @property
    def address(self) -> str:
        return f"127.0.0.2:{self.gcs_port}"

    @property
    def dashboard_url(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def processes(self) -> list[psutil.Process]:
        marks = (str(self.temp_dir), self.address)
        found: dict[int, psutil.Process] = {}
        for proc in psutil.process_iter(["cmdline"]):
            cmd = " ".join(proc.info["cmdline"] or ())
            if any(m in cmd for m in marks):
                found[proc.pid] = proc
                with contextlib.suppress(psutil.NoSuchProcess):
                    found.update({c.pid: c for c in proc.children(recursive=True)})
        found.pop(os.getpid(), None)
        return list(found.values())

    def stop(self, timeout: float = 15) -> None:
        procs = self.processes()
        for p in procs:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.send_signal(signal.SIGTERM)
        _, alive = psutil.wait_procs(procs, timeout=timeout / 2)
        for p in alive:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.kill()
        psutil.wait_procs(alive, timeout=timeout / 2)
        left = [p for p in self.processes() if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
        assert not left, f"ray processes left running: {[p.pid for p in left]}"
        shutil.rmtree(self.temp_dir, ignore_errors=True)


def _node_ports() -> list[str]:
    p = free_ports(18)
    return [
        f"--node-manager-port={p[0]}",
        f"--object-manager-port={p[1]}",
        f"--dashboard-agent-listen-port={p[2]}",
        f"--dashboard-agent-grpc-port={p[3]}",
        f"--runtime-env-agent-port={p[4]}",
        f"--metrics-export-port={p[5]}",
        f"--worker-port-list={','.join(str(x) for x in p[6:])}",
    ]


def start_cluster(cpus_per_node: int = 1, nodes: int = 2) -> RayCluster:
    temp = Path(tempfile.mkdtemp(prefix="otr-", dir="/tmp"))  # short: Ray's socket paths have a length limit
    gcs, dashboard, client = free_ports(3)
    cluster = RayCluster(temp, gcs, dashboard)
    ray = str(Path(sys.executable).with_name("ray"))
    env = {
        **os.environ,
        # The job entrypoints run in the raylet's environment: this interpreter first on PATH.
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "RAY_USAGE_STATS_ENABLED": "0",
        # A loopback-only test cluster. Explicit: with RAY_AUTH_MODE unset, a head node turns token auth on
        # when ~/.ray/auth_token exists (any local ray.init() writes one) and the second node is refused.
        "RAY_AUTH_MODE": "disabled",
    }
    common = [
        f"--num-cpus={cpus_per_node}",
        "--num-gpus=0",
        "--node-ip-address=127.0.0.2",  # Ray would turn 127.0.0.1 into the network address
        f"--temp-dir={temp}",
        "--object-store-memory=80000000",
        "--disable-usage-stats",
    ]
    head = [
        ray,
        "start",
        "--head",
        f"--port={gcs}",
        "--include-dashboard=true",
        "--dashboard-host=127.0.0.1",
        f"--dashboard-port={dashboard}",
        f"--ray-client-server-port={client}",
        *common,
        *_node_ports(),
    ]
    try:
        for cmd in [head] + [[ray, "start", f"--address={cluster.address}", *common, *_node_ports()]] * (
            nodes - 1
        ):
            out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
            cluster.logs.append(out.stdout[-2000:] + out.stderr[-2000:])
            if out.returncode:
                raise RuntimeError(f"{' '.join(cmd[:3])} failed:\n{cluster.logs[-1]}")
    except BaseException:
        cluster.stop()
        raise
    return cluster


def wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            value = predicate()
        except Exception:
            value = None
        if value:
            return value
        time.sleep(0.25)
    raise AssertionError(f"timed out waiting for {what}")
