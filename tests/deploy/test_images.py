"""deploy/docker/*.Dockerfile, read instruction by instruction (no Docker daemon here): multi-stage, every
base image pinned to a release, a non-root USER in the final stage, a HEALTHCHECK, the CMD exactly the command
deploy/processes.py gives (the one the production smoke test runs), dependencies installed from the lock with
hashes checked, and the locks covering every dependency of pyproject.toml at versions it allows."""

from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

from deploy.processes import PROCESSES, RAY_PROCESSES

BASE = Path(__file__).resolve().parents[2]
DOCKER = BASE / "deploy" / "docker"
LOCKS = BASE / "deploy" / "requirements"


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, continuation lines joined, comments dropped."""
    out, pending = [], ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        pending += line[:-1] + " " if line.endswith("\\") else line
        if not line.endswith("\\"):
            keyword, _, args = pending.partition(" ")
            out.append((keyword.upper(), args.strip()))
            pending = ""
    return out


def final_stage(steps: list[tuple[str, str]]) -> list[tuple[str, str]]:
    last = max(i for i, (k, _) in enumerate(steps) if k == "FROM")
    return steps[last:]


def locked(name: str) -> dict[str, Version]:
    pins = re.findall(r"^([A-Za-z0-9_.-]+)==([^ \\\n;]+)", (LOCKS / name).read_text(), re.M)
    return {re.sub(r"[-_.]+", "-", n).lower(): Version(v) for n, v in pins}


IMAGES = {
    "platform.Dockerfile": (PROCESSES["web"], "platform.txt"),
    "gpu.Dockerfile": (RAY_PROCESSES["ray-head"], "gpu.txt"),
}


@pytest.mark.parametrize("dockerfile", sorted(IMAGES))
def test_dockerfile_is_multistage_pinned_non_root_healthchecked(dockerfile):
    steps = instructions(DOCKER / dockerfile)
    cmd, lock = IMAGES[dockerfile]
    args = {m[0]: m[1] for k, a in steps if k == "ARG" and (m := a.split("=", 1)) and len(m) == 2}
    stages = [a for k, a in steps if k == "FROM"]
    assert len(stages) >= 2, "multi-stage: dependencies built apart from the final image"
    names = set()
    for stage in stages:
        image, _, name = stage.partition(" AS ")
        image = re.sub(r"\$\{(\w+)\}", lambda m: args[m[1]], image)
        if image not in names:  # another stage of this file, or a pinned release
            assert re.fullmatch(r"[\w./-]+(:[\w.-]*\d[\w.-]*|@sha256:[0-9a-f]{64})", image), image
            assert not image.endswith(":latest")
        names.add(name.strip())
    final = final_stage(steps)
    users = [a for k, a in final if k == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0"), "the final stage runs as a non-root user"
    keywords = [k for k, _ in final]
    assert keywords.index("USER") < keywords.index("CMD")
    (health,) = [a for k, a in final if k == "HEALTHCHECK"]
    assert "CMD" in health
    (command,) = [a for k, a in final if k == "CMD"]
    assert json.loads(command) == cmd  # exec form, exactly the smoke test's / compose's command
    installs = [a for k, a in steps if k == "RUN" and "pip install" in a]
    assert installs and all("--require-hashes" in a and f"/tmp/{lock}" in a for a in installs)
    for k, a in steps:  # what is copied from the repository exists
        if k == "COPY" and "--from=" not in a:
            *sources, _ = a.split()
            for source in sources:
                assert (BASE / source).exists(), source


def test_what_each_image_holds():
    copied = {
        a.split()[0].rstrip("/") for k, a in instructions(DOCKER / "platform.Dockerfile") if k == "COPY"
    }
    assert {"opentinker", "portal", "api", "workers", "env_registry", "deploy", "manage.py"} <= copied
    assert not copied & {"devstack", "tests"}
    # The workers' model validation copies gpu_runtime/model_check.py into the sandbox (env_registry).
    assert "gpu_runtime" in copied and (BASE / "gpu_runtime" / "model_check.py").is_file()
    gpu = {a.split()[0].rstrip("/") for k, a in instructions(DOCKER / "gpu.Dockerfile") if k == "COPY"}
    assert {"opentinker", "gpu_runtime"} <= gpu


@pytest.mark.parametrize("lock", ["platform.txt", "gpu.txt"])
def test_the_locks_pin_every_dependency_at_an_allowed_version(lock):
    project = tomllib.loads((BASE / "pyproject.toml").read_text())["project"]
    pins = locked(lock)
    assert all(
        line.startswith("    --hash=sha256:")
        for line in (LOCKS / lock).read_text().splitlines()
        if "--hash" in line
    )
    missing, wrong = [], []
    for spec in project["dependencies"]:
        req = Requirement(spec)
        name = re.sub(r"[-_.]+", "-", req.name).lower()
        if name not in pins:
            missing.append(name)
        elif not req.specifier.contains(pins[name], prereleases=True):
            wrong.append(f"{name}=={pins[name]} (pyproject: {req.specifier})")
    assert not missing and not wrong, f"refresh with `sh deploy/requirements/lock.sh`: {missing} {wrong}"
    if lock == "gpu.txt":
        assert "vllm" in pins and "ray" in pins and "torch" in pins
        values = (BASE / "deploy" / "helm" / "opentinker" / "values.yaml").read_text()
        assert f'rayVersion: "{pins["ray"]}"' in values  # KubeRay is told the image's Ray
