"""Follower trainer ranks started by rank 0 (gpu_runtime/ranks.py); the whole 2-rank job through the platform
is tests/workers/test_trainer_ranks.py."""

from __future__ import annotations

import os
import subprocess
import sys


def test_a_follower_whose_rank_0_is_gone_exits_at_once():
    # Its parent is not the rank 0 it was started for (that one died before it could set its parent-death
    # signal): it leaves with code 1 before joining anything, so it never waits on a group for ever.
    not_my_parent = os.getpid() + 1_000_000
    cmd = [sys.executable, "-m", "gpu_runtime", "rank", "1", "2", "127.0.0.1:9", str(not_my_parent)]
    done = subprocess.run(cmd, input=b"", capture_output=True, timeout=120)
    assert (done.returncode, done.stdout, done.stderr) == (1, b"", b"")


def test_a_follower_dies_with_its_parent():
    # The parent-death signal is set, read back with PR_GET_PDEATHSIG: SIGKILL (9) when rank 0 ends.
    code = (
        "import ctypes, os; from gpu_runtime.cli import die_with_parent; "
        "ok = die_with_parent(os.getppid()); sig = ctypes.c_int(0); "
        "ctypes.CDLL(None).prctl(2, ctypes.byref(sig)); print(ok, sig.value)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=120, check=True)
    assert done.stdout.split() == [b"True", b"9"]
