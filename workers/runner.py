"""``python -m workers.runner <allocation id> <work dir> <spec.json>``: watch one runtime on this host.

Started by the local driver in a session of its own. It:

1. starts the runtime command (``OPENTINKER_RUNTIME_COMMAND`` + spec path) in its own process group, with a
   clean environment (never the platform's database or broker credentials: only the job's variables, the
   GPUs it was given and a few basics), and prints the runtime's pid on stdout for the launcher;
2. captures stdout/stderr into ``output.log`` and the job's log (JobLog);
3. heartbeats the allocation; when the job is cancelled, its allocation preempted or released elsewhere, it
   sends the runtime SIGTERM (checkpoint and exit at the next step boundary) and SIGKILL after a grace period;
4. reports the exit code (``job_process_exited``), which decides succeeded / failed / re-queued.

If the runner itself dies, its heartbeats stop and the reaper takes over (kills the runtime, re-queues).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

PASS_ENV = ("PATH", "HOME", "LANG", "LC_ALL", "TMPDIR", "PYTHONPATH", "VIRTUAL_ENV", "TZ", "HF_HOME")


def _child_env(job_env: dict[str, str], gpu_indices: list[int], cpu_slots: bool, extra: list[str]) -> dict:
    env = {k: os.environ[k] for k in (*PASS_ENV, *extra) if k in os.environ}
    env.update(job_env)
    env["CUDA_VISIBLE_DEVICES"] = "" if cpu_slots else ",".join(str(i) for i in gpu_indices)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def main(argv: list[str]) -> int:
    alloc_id, work_dir, spec_path = int(argv[0]), Path(argv[1]), argv[2]
    job_env = json.loads(os.environ.pop("OPENTINKER_RUNNER_JOB_ENV", "{}"))
    command = json.loads(os.environ.pop("OPENTINKER_RUNNER_COMMAND", "[]"))
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "portal.settings")
    import django

    django.setup()
    from django.conf import settings
    from django.db import close_old_connections

    from portal.models import Allocation, Job
    from portal.services.supervision import allocation_heartbeat, job_log_append, job_process_exited
    from workers.drivers import runtime_command

    alloc = Allocation.objects.select_related("pool").get(pk=alloc_id)
    heartbeat_s = settings.OPENTINKER_RUNNER_HEARTBEAT_S
    grace_s = settings.OPENTINKER_STOP_GRACE_S
    extra = list(settings.OPENTINKER_RUNTIME_PASS_ENV)
    env = _child_env(job_env, alloc.gpu_indices or [], alloc.pool.cpu_slots, extra)
    proc = subprocess.Popen(
        [*(command or runtime_command()), spec_path],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        cwd=work_dir,
        env=env,
        start_new_session=True,
    )
    sys.stdout.write(f"{proc.pid}\n")
    sys.stdout.flush()
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)  # the launcher stops reading: nothing more goes to its pipe

    pending: list[tuple[str, str]] = []
    tail: list[str] = []
    lock = threading.Lock()
    log_file = open(work_dir / "output.log", "a", encoding="utf-8", errors="replace")  # noqa: SIM115

    def pump(stream, name: str) -> None:
        for raw in iter(stream.readline, b""):
            text = raw.decode("utf-8", errors="replace").rstrip("\n")
            with lock:
                log_file.write(f"[{name}] {text}\n")
                log_file.flush()
                pending.append((name, text))
                if name == "stderr":
                    tail.append(text)
                    del tail[:-20]

    readers = [
        threading.Thread(target=pump, args=(proc.stdout, "stdout"), daemon=True),
        threading.Thread(target=pump, args=(proc.stderr, "stderr"), daemon=True),
    ]
    for t in readers:
        t.start()

    def flush_logs() -> None:
        with lock:
            batch = pending[:]
            pending.clear()
        try:
            job_log_append(job_id=alloc.job_id, lines=batch)
        except Exception:
            close_old_connections()

    # A SIGTERM to the runner (host shutdown) is passed on to the runtime so that it checkpoints.
    signal.signal(signal.SIGTERM, lambda *_: _signal(proc.pid, signal.SIGTERM))

    term_sent_at: float | None = None
    next_beat = 0.0
    while proc.poll() is None:
        now = time.monotonic()
        if now >= next_beat:
            next_beat = now + heartbeat_s
            try:
                allocation_heartbeat(alloc_id)
                row = (
                    Allocation.objects.filter(pk=alloc_id)
                    .values("released_at", "preempt_requested_at")
                    .first()
                )
                state = Job.objects.filter(pk=alloc.job_id).values_list("state", flat=True).first()
                stop = (
                    row is None
                    or row["released_at"] is not None
                    or row["preempt_requested_at"] is not None
                    or state in ("cancelling", "cancelled", "failed", "succeeded")
                )
            except Exception:  # the database is away for a moment: keep the job running
                close_old_connections()
                stop = False
            if stop and term_sent_at is None:
                term_sent_at = now
                _signal(proc.pid, signal.SIGTERM)
            flush_logs()
        if term_sent_at is not None and now - term_sent_at > grace_s:
            _signal(proc.pid, signal.SIGKILL)
        time.sleep(min(0.2, heartbeat_s))
    code = proc.returncode
    for t in readers:
        t.join(timeout=5)
    _signal(proc.pid, signal.SIGKILL)  # whatever the runtime left behind in its group
    flush_logs()
    log_file.close()
    for attempt in range(30):  # the database may be restarting: the exit code must not be lost
        try:
            job_process_exited(allocation_id=alloc_id, exit_code=code, detail="\n".join(tail))
            break
        except Exception:
            close_old_connections()
            time.sleep(min(10, 1 + attempt))
    return 0


def _signal(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
