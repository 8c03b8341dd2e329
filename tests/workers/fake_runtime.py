"""A stand-in for ``python -m gpu_runtime run <spec.json>`` in the scheduler/supervision tests.

Its behaviour comes from the job's name, ``fake_steps-N_sleep-S_exit-C_hold-K`` (any part optional): it runs
N steps of S seconds, printing one line per step to stdout (and a line to stderr), then exits with code C.
With ``hold-K`` it waits after printing step K until it is stopped or killed, so a test acts on a job that
is certainly mid-way, however slow the machine (a resumed attempt that starts past step K does not wait).
It writes its progress to ``<work dir>/../progress`` and, when resumed (OPENTINKER_RESUME_FROM set), starts
after the step recorded there, so a test can see that a re-queued job resumed. SIGTERM stops it at the next
step boundary with exit code 0, as the real runtime does when asked to checkpoint and stop.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import sys
import time


def main() -> int:
    spec = json.load(open(sys.argv[1]))  # noqa: SIM115
    opts = {"steps": 3, "sleep": 0.1, "exit": 0, "hold": 0}
    for part in (spec.get("name") or "").split("_")[1:]:
        key, _, value = part.partition("-")
        if key in opts:
            opts[key] = float(value)
    stop = {"now": False}
    signal.signal(signal.SIGTERM, lambda *_: stop.update(now=True))
    from gpu_runtime.bootstrap import redeem

    bootstrapped = redeem()  # a Ray job's secrets come from its single-use bootstrap token, as in the runtime
    secret = os.environ.get("OPENTINKER_ENV_SECRET", "")
    print(
        f"env CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r} "
        f"DATABASE_URL={'DATABASE_URL' in os.environ} job={os.environ.get('OPENTINKER_JOB_ID')} "
        f"resume={os.environ.get('OPENTINKER_RESUME_FROM', '')} "
        f"token={bool(os.environ.get('OPENTINKER_JOB_TOKEN'))} bootstrap={bootstrapped} "
        f"secret={hashlib.sha256(secret.encode()).hexdigest()[:12] if secret else ''}",
        flush=True,
    )
    start = 0
    if os.environ.get("OPENTINKER_RESUME_FROM") and os.path.exists("../progress"):
        start = int(open("../progress").read() or 0)  # noqa: SIM115
    print("starting", file=sys.stderr, flush=True)
    for step in range(start + 1, int(opts["steps"]) + 1):
        if stop["now"]:
            print(f"stopping before step {step}", flush=True)
            return 0
        time.sleep(opts["sleep"])
        with open("../progress", "w") as f:
            f.write(str(step))
        print(f"step {step}", flush=True)
        while step == opts["hold"] and not stop["now"]:
            time.sleep(0.05)
    return int(opts["exit"])


if __name__ == "__main__":
    sys.exit(main())
