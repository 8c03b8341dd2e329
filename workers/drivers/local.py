"""The ``local`` driver: the runtime as a subprocess of ``workers.runner`` on this machine.

The runner is started in a session of its own, so it outlives the Celery task (and the Celery worker) that
launched it; it starts the runtime in another process group (so a stop signal reaches the runtime and all its
children, never the runner), gives it the GPUs it was allocated, captures its output, heartbeats the
allocation and reports the exit code. Capacity is read from the machine: its GPUs (nvidia-smi), or CPU slots.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
from django.conf import settings

from portal.models import Allocation
from portal.services.pools import PoolCapacity
from workers.drivers.base import Driver, Launched, runtime_command

HOST = socket.gethostname()


def probe_capacity() -> PoolCapacity:
    """GPUs by type from nvidia-smi; without GPUs, CPU slots (OPENTINKER_LOCAL_CPU_SLOTS, default cores)."""
    gpus: dict[str, int] = {}
    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            out = subprocess.run(
                [smi, "--query-gpu=name", "--format=csv,noheader"], capture_output=True, text=True, timeout=10
            )
            for name in out.stdout.splitlines():
                if name.strip():
                    gpus[name.strip()] = gpus.get(name.strip(), 0) + 1
        except (OSError, subprocess.SubprocessError):
            gpus = {}
    cpus = os.cpu_count() or 1
    memory = psutil.virtual_memory().total
    slots = 0 if gpus else settings.OPENTINKER_LOCAL_CPU_SLOTS or cpus
    return PoolCapacity.measured(gpus, cpus, memory, slots)


def pid_alive(pid: int) -> bool:
    try:
        proc = psutil.Process(pid)
        return proc.status() != psutil.STATUS_ZOMBIE
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return False


def signal_group(pgid: int, sig: int) -> bool:
    try:
        os.killpg(pgid, sig)
        return True
    except (ProcessLookupError, PermissionError):
        return False


class LocalDriver(Driver):
    # The runner heartbeats the allocation and reports the exit itself (``follow`` has nothing to do).
    lost_detail = "runner heartbeat lost"

    def capacity(self) -> PoolCapacity:
        return probe_capacity()

    def launch(self, alloc: Allocation, work_dir: Path, spec_path: Path, env: dict[str, str]) -> Launched:
        """Start the runner; returns once the runtime process exists (its process group is the handle)."""
        cmd = [sys.executable, "-m", "workers.runner", str(alloc.pk), str(work_dir), str(spec_path)]
        proc = subprocess.Popen(
            cmd,
            stdout=subprocess.PIPE,
            stderr=open(work_dir / "runner.log", "ab"),  # noqa: SIM115 -- the child owns it
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            cwd=settings.BASE_DIR,
            env={
                **os.environ,
                "OPENTINKER_RUNNER_JOB_ENV": json.dumps(env),
                "OPENTINKER_RUNNER_COMMAND": json.dumps(runtime_command()),
            },
        )
        line = proc.stdout.readline().decode().strip()  # "<runtime pid>" once started
        proc.stdout.close()
        if not line.isdigit():
            proc.wait(timeout=30)
            raise RuntimeError(
                f"the runner did not start the runtime (exit {proc.returncode}); see {work_dir}"
            )
        return Launched(handle=line, host=HOST)

    def stop(self, alloc: Allocation, *, grace_s: float = 0) -> bool:
        """SIGTERM the runtime's process group (it should checkpoint and exit), SIGKILL after grace_s."""
        if alloc.runtime_host != HOST or not alloc.runtime_handle.isdigit():
            return False
        pgid = int(alloc.runtime_handle)
        signal_group(pgid, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        while grace_s and time.monotonic() < deadline:
            if not pid_alive(pgid):
                return True
            time.sleep(0.2)
        if grace_s:
            signal_group(pgid, signal.SIGKILL)
        return True

    def kill(self, alloc: Allocation) -> bool:
        if alloc.runtime_host != HOST or not alloc.runtime_handle.isdigit():
            return False
        return signal_group(int(alloc.runtime_handle), signal.SIGKILL)

    def alive(self, alloc: Allocation) -> bool | None:
        """Whether the runtime still runs; None when it cannot be told from here (another host)."""
        if alloc.runtime_host != HOST or not alloc.runtime_handle.isdigit():
            return None
        return pid_alive(int(alloc.runtime_handle))
