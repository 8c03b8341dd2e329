"""bench/gpu_check.sh, the one command a GPU session runs, in its CPU dry mode; the image simulation it uses.

The whole dry run (all six stages, TRL included) takes about 80 s on the 2-core box, so these tests run a
part of it; the full one by hand: `GPU_CHECK_DRY=1 bench/gpu_check.sh` (logs in var/gpu-check/).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _check(
    tmp_path: Path, stages: str, python: str = sys.executable, limits: str = ""
) -> subprocess.CompletedProcess:
    env = {**os.environ, "GPU_CHECK_DRY": "1", "GPU_CHECK_STAGES": stages, "OUT": str(tmp_path)}
    env.update(PYTHON=python, GPU_CHECK_LIMITS=limits)
    return subprocess.run(
        ["bash", "bench/gpu_check.sh"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=400
    )


def _summary(tmp_path: Path) -> list[tuple[str, str]]:
    lines = (tmp_path / "summary.txt").read_text().splitlines()
    return [(ln.split()[0], ln.split()[1]) for ln in lines]


@pytest.mark.slow
def test_dry_run_collects_the_gpu_tests_under_the_image_and_sweeps_the_trainer(tmp_path):
    run = _check(tmp_path, "pytest mfu")
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]
    assert _summary(tmp_path) == [("pytest", "ok"), ("mfu", "ok")]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mfu.log", "pytest.log", "summary.txt"]
    tests = (tmp_path / "pytest.log").read_text()
    # Collected with only the image's packages and our wheels (no Ray, no Django), skipped for want of CUDA.
    for name in (
        "test_example_job_on_one_gpu_with_nccl_and_mixed_precision",
        "test_example_job_on_one_gpu_with_nccl_as_ray_actors",
        "test_example_job_on_one_gpu_in_process_uses_autocast_and_shared_prefixes",
    ):
        assert f"test_gpu.py::{name} SKIPPED" in tests, tests[-3000:]
    assert re.search(r"=+ \d+ skipped, \d+ deselected in [\d.]+s =+\s*$", tests), tests[-1000:]
    mfu = (tmp_path / "mfu.log").read_text()
    rows = re.findall(r"^(plain|fsdp)\s+(\d+)\s+([\d,]+)\s", mfu, re.M)
    # B sequences of 8 prompt + 8 completion tokens, both modes (FSDP2 over gloo at world size 1).
    assert rows == [("plain", "2", "32"), ("plain", "4", "64"), ("fsdp", "2", "32"), ("fsdp", "4", "64")]
    # Same seed, samples and step count: the sharded trainer computes what the plain one does.
    norms = dict(re.findall(r"^  (\w+ B=\d+): .*grad norm ([\d.]+)$", mfu, re.M))
    assert norms["plain B=2"] == norms["fsdp B=2"] and norms["plain B=4"] == norms["fsdp B=4"], norms
    assert run.stdout.rstrip().splitlines()[-1].startswith("mfu ")  # the reply's tail ends on the summary


def test_a_failing_stage_is_counted_and_the_next_one_still_runs(tmp_path):
    run = _check(tmp_path, "pytest mfu", python="/bin/false")
    assert run.returncode == 2
    assert _summary(tmp_path) == [("pytest", "FAILED"), ("mfu", "FAILED")]
    assert "--- summary (2 failed" in run.stdout


def test_a_stage_past_its_limit_is_interrupted_and_reported(tmp_path):
    run = _check(tmp_path, "pytest", limits="pytest=1")
    assert run.returncode == 1
    (line,) = (tmp_path / "summary.txt").read_text().splitlines()
    # SIGINT at the limit (rc 124), or SIGKILL 15 s later if the stage has not stopped by then (rc 137: on a
    # loaded box pytest may still be importing torch): both are the script's TIMEOUT.
    assert line.split()[:2] == ["pytest", "TIMEOUT"] and line.endswith("of 1s")
    assert line.split()[2] in ("rc=124", "rc=137")


@pytest.mark.slow
def test_dry_run_env_stage_imports_the_gpu_path_and_trl(tmp_path):
    pytest.importorskip("trl")  # the `bench` extra
    run = _check(tmp_path, "env")
    assert run.returncode == 0, run.stdout[-3000:]
    env = (tmp_path / "env.log").read_text()
    assert "imports ok: gpu_runtime, opentinker.spec, trl.GRPOTrainer" in env
    assert re.search(r"^  pydantic 2\.", env, re.M) and not re.search(r"^  \S+ MISSING$", env, re.M), env


def test_the_image_simulation_hides_ray_django_and_psycopg_but_not_the_gpu_path():
    code = """
import importlib.metadata as md, importlib.util
import gpu_runtime.controller, gpu_runtime.cli, tests.gpu_runtime.test_gpu
for name in ("ray", "django", "psycopg", "celery", "rest_framework"):
    assert importlib.util.find_spec(name) is None, name
    try:
        __import__(name)
        raise AssertionError(name)
    except ModuleNotFoundError:
        pass
try:
    md.version("ray")
    raise AssertionError("ray's metadata")
except md.PackageNotFoundError:
    pass
import pydantic, torch, transformers  # shipped as a wheel; on the image
print("hidden ok")
"""
    run = subprocess.run(
        [sys.executable, "bench/gpu_image_sim.py", "-c", code], cwd=ROOT, capture_output=True, text=True
    )
    assert run.returncode == 0 and run.stdout.strip() == "hidden ok", run.stderr[-3000:]


def test_the_device_stages_fit_one_call_with_time_to_spare():
    """The default stages' limits sum to at most 8.5 minutes: one 590 s call (of the 10 minutes a command
    may run) with the wheels' install, inside a session's 15 minutes of device time with the start."""
    script = (ROOT / "bench" / "gpu_check.sh").read_text()
    device = script.split("\nelse\n", 1)[1].split("\nfi\n", 1)[0]
    limits = dict(kv.split("=") for kv in re.search(r"LIMITS=\(([^)]*)\)", device).group(1).split())
    default = re.search(r"GPU_CHECK_STAGES:-([^}]*)\}", script).group(1).split()
    assert default == ["env", "pytest", "rollout", "rl_step", "mfu"]
    assert sum(int(limits[s]) for s in default) == 510
    assert "timeout_s: 590" in (ROOT / "README.md").read_text()
