"""The Ray driver's entrypoint: what a job's driver process holds on the pool's cluster, and its command line
as Ray runs it (`/bin/sh -c`: the job supervisor's `subprocess.Popen(entrypoint, shell=True)`), here without a
cluster. The runtime is exec'd, so its exit code and its death by a signal reach Ray as they are; the
configured command's words arrive as written, and leading `NAME=value` words stay the environment assignments
they were before `exec`."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

from workers.drivers.ray import ENTRYPOINT_CPU_TOKEN, entrypoint, entrypoint_resources


def test_the_ray_entrypoint_holds_the_jobs_resources_only_when_it_runs_everything():
    gpu_pool = SimpleNamespace(pool=SimpleNamespace(cpu_slots=False), gpus=3)
    cpu_pool = SimpleNamespace(pool=SimpleNamespace(cpu_slots=True), gpus=0)
    in_process = {"resources": {"gpus": 3, "rollout_workers": 1}}
    assert entrypoint_resources(in_process, gpu_pool) == {"entrypoint_num_cpus": 0, "entrypoint_num_gpus": 3}
    assert entrypoint_resources(in_process, cpu_pool) == {"entrypoint_num_cpus": 1, "entrypoint_num_gpus": 0}
    # Several rollout workers: the runtime's placement group takes the admitted GPUs/CPUs, not both.
    token = {"entrypoint_num_cpus": ENTRYPOINT_CPU_TOKEN, "entrypoint_num_gpus": 0}
    placed = {"resources": {"gpus": 3, "rollout_workers": 2}}
    assert entrypoint_resources(placed, gpu_pool) == token
    assert entrypoint_resources(placed, cpu_pool) == token
    # Several trainer ranks: Ray actors in that placement group too.
    ranks = {"resources": {"gpus": 3, "trainer_ranks": 2}}
    assert entrypoint_resources(ranks, gpu_pool) == token
    assert entrypoint_resources(ranks, cpu_pool) == token
    assert 0 < ENTRYPOINT_CPU_TOKEN <= 0.05


# Exits with the code given as its last argument, or kills itself with SIGKILL for "kill"; prints its
# arguments and FOO first.
PROBE = (
    "import os, signal, sys; print(sys.argv[1:], os.environ.get('FOO')); "
    "sys.stdout.flush(); a = sys.argv[-1]; "
    "os.kill(os.getpid(), signal.SIGKILL) if a == 'kill' else sys.exit(int(a))"
)


def run(settings, command: list[str], arg: str) -> subprocess.CompletedProcess[str]:
    settings.OPENTINKER_RAY_RUNTIME_COMMAND = command
    line = entrypoint(Path("/work") / arg)  # the spec file's name is the last argument
    # What `shell=True` runs, as Ray's job supervisor does.
    return subprocess.run(["/bin/sh", "-c", line], capture_output=True, text=True, timeout=120)


def test_exit_codes_and_signals_reach_ray_as_the_runtime_gave_them(settings):
    assert run(settings, [sys.executable, "-c", PROBE], "0").returncode == 0
    failed = run(settings, [sys.executable, "-c", PROBE], "3")
    assert failed.returncode == 3  # a failure stays a failure with its own code
    # A killed runtime: a negative code (re-queued as lost), not the shell's 137 (a failure).
    assert run(settings, [sys.executable, "-c", PROBE], "kill").returncode == -9


def test_the_configured_words_arrive_as_written(settings):
    # Shell syntax inside a word is no syntax: quoted, as before `exec`.
    done = run(settings, [sys.executable, "-c", PROBE, "a b", "$HOME", "x && y", "> f", "'q'"], "0")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "['a b', '$HOME', 'x && y', '> f', \"'q'\", '0'] None"


def test_leading_assignments_stay_environment_assignments(settings):
    # `FOO=1 python ...` ran python with FOO=1 through the shell; after `exec` it would be a program named
    # "FOO=1" (exit 127, "exec: FOO=1: not found").
    done = run(settings, ["FOO=a b $HOME", sys.executable, "-c", PROBE], "0")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "['0'] a b $HOME"
    # Only leading ones: later, such a word is an argument like any other.
    done = run(settings, [sys.executable, "-c", PROBE, "FOO=2"], "0")
    assert done.stdout.strip() == "['FOO=2', '0'] None", done.stderr
