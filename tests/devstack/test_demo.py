"""`make demo`'s runner: everything up, the login and a working token printed, all stopped on SIGTERM."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from devstack.embedded import EmbeddedServices

BASE = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_demo_runs_in_the_foreground_and_stops_everything(tmp_path):
    var = tmp_path / "var"
    env = {**os.environ, "OPENTINKER_VAR_DIR": str(var)}
    env.pop("DATABASE_URL")
    env.pop("REDIS_URL")
    proc = subprocess.Popen(
        # Two steps per example stage: the chain (SFT warm start -> GRPO from its checkpoint) in seconds.
        [sys.executable, "-m", "devstack.demo", "--port", "0", "--example-steps", "2"],
        cwd=BASE,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines: list[str] = []
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            if "Ctrl-C stops everything" in line:
                break
        out = "".join(lines)
        up = re.search(r"OpenTinker is up:\s+(\S+)", out)
        assert up, f"the demo did not come up:\n{out}{_rest(proc)}"
        url = up.group(1)
        user, password = re.search(r"Sign in:\s+(\S+) / (\S+)", out).groups()
        token = re.search(r"API token:\s+(otk_\S+)", out).group(1)
        assert user == "demo" and len(password) >= 12

        me = httpx.get(f"{url}/api/v1/me", headers={"Authorization": f"Bearer {token}"}).json()
        assert me["organization"]["slug"] == "demo" and me["role"] == "owner"
        login_page = httpx.get(f"{url}/accounts/login/")
        assert login_page.status_code == 200 and 'name="password"' in login_page.text
        assert (var / "services.env").exists()
        # The Celery worker is up and connected to the broker.
        assert _wait_for(lambda: "celery" in _children(proc.pid))
        # The example's warm start was submitted and runs on the local pool; when it has succeeded, the GRPO
        # job is submitted from its last checkpoint, runs and reports rewards.
        sft_id = re.search(r"Example, stage 1:\s+\S+ \((\S+)\)", out).group(1)
        auth = {"Authorization": f"Bearer {token}"}

        def api(path: str):
            return httpx.get(f"{url}/api/v1/{path}", headers=auth).json()

        def grpo_reporting() -> bool:
            sft = api(f"jobs/{sft_id}")
            assert sft["state"] in ("queued", "admitted", "running", "succeeded"), sft
            rl = [j for j in api("jobs?kind=rl")["results"]]
            if not rl:
                return False
            assert len(rl) == 1 and sft["state"] == "succeeded", (rl, sft)
            job = rl[0]
            assert job["state"] in ("queued", "admitted", "running", "succeeded"), job
            series = api(f"jobs/{job['id']}/metrics?name=reward/mean")
            return job["state"] in ("running", "succeeded") and bool(series["series"])

        assert _wait_for(grpo_reporting, timeout=240), "the example's GRPO stage never reported a reward"
        (ckpt,) = api(f"jobs/{sft_id}/checkpoints")["results"]
        assert ckpt["step"] == 2 and ckpt["uri"].endswith(f"/orgs/demo/jobs/{sft_id}/step_000002")
        rl_job = api("jobs?kind=rl")["results"][0]
        assert rl_job["spec"]["model"]["base"] == ckpt["uri"]
        assert rl_job["spec"]["environment"]["config"] == {"max_operand": 9, "prompt_style": "compact"}
    finally:
        proc.send_signal(signal.SIGTERM)
        rest, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, rest
    assert "Stopped." in rest
    status = EmbeddedServices(var).status()
    assert not status["postgres"]["running"] and not status["valkey"]["running"]
    assert not (var / "services.env").exists()
    assert _children(proc.pid) == ""
    # Nothing the demo started survives it: no job runner or runtime left behind.
    leftovers = subprocess.run(["pgrep", "-f", str(var)], capture_output=True, text=True).stdout.split()
    assert leftovers == [], subprocess.run(
        ["ps", "-o", "pid,args", "-p", ",".join(leftovers)], capture_output=True, text=True
    ).stdout


def _rest(proc: subprocess.Popen) -> str:
    if proc.poll() is None:
        return ""
    return proc.stdout.read()


def _children(pid: int) -> str:
    return subprocess.run(["ps", "--ppid", str(pid), "-o", "args="], capture_output=True, text=True).stdout


def _wait_for(predicate, timeout: float = 30) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.5)
    return False
