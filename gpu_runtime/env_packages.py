"""Registry environment packages in a job: fetch the pinned archive, verify it, unpack it, run it sandboxed.

The platform pins a job's package at submission (`environment.ref` at an exact version and
`environment.sha256`). The runtime fetches the archive over the ingest API with its job token
(`GET {OPENTINKER_INGEST_URL}/environment`, api/views/ingest_env.py), refuses it unless its sha256 is the
one in the spec, unpacks it with the registry's own checks (`opentinker.env.archive`: no `../`, no links,
size caps) and runs every environment instance in `SandboxedEnvironment`, so a crash, hang or exception
fails that episode, never the job. Standalone (`--env-package DIR_OR_ARCHIVE`, `OPENTINKER_ENV_PACKAGE`), a
local package runs the same sandboxed way so an author can try it before publishing.

Sandbox limits per call and per instance come from `OPENTINKER_SANDBOX_CALL_TIMEOUT_S` (default 10),
`OPENTINKER_SANDBOX_CPU_S` (60) and `OPENTINKER_SANDBOX_MEMORY_MB` (1024): the pool's settings, not the job's.
"""

from __future__ import annotations

import atexit
import hashlib
import os
import shutil
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from opentinker.env.archive import (
    MANIFEST_NAME,
    MAX_ARCHIVE_BYTES,
    ArchiveError,
    Manifest,
    extract_archive,
    inspect_archive,
    manifest_parse,
)
from opentinker.env.sandbox import SandboxedEnvironment, SandboxLimits
from opentinker.spec import EnvironmentSpec

ENV_PACKAGE_VAR = "OPENTINKER_ENV_PACKAGE"


class EnvPackageError(RuntimeError):
    """The job's environment package cannot be used; the message says why (the job fails with it)."""


@dataclass(frozen=True)
class LocalPackage:
    manifest: Manifest
    directory: Path


# Per process: a package is fetched and unpacked once, however many environment instances run from it.
_unpacked: dict[str, LocalPackage] = {}


def sandbox_limits() -> SandboxLimits:
    env = os.environ
    return SandboxLimits(
        call_timeout_s=float(env.get("OPENTINKER_SANDBOX_CALL_TIMEOUT_S") or 10.0),
        cpu_s=int(env.get("OPENTINKER_SANDBOX_CPU_S") or 60),
        memory_mb=int(env.get("OPENTINKER_SANDBOX_MEMORY_MB") or 1024),
    )


def fetch_archive(ingest_url: str, token: str, *, retries: int = 4, timeout_s: float = 30.0) -> bytes:
    """The job's pinned archive from the ingest API; retries connection errors, 429 and 5xx like the sink."""
    url = f"{ingest_url.rstrip('/')}/environment"
    delay, err = 0.5, None
    for attempt in range(retries + 1):
        req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"})  # noqa: S310
        try:
            with urllib.request.urlopen(req, timeout=timeout_s) as resp:  # noqa: S310 (our ingest URL)
                data = resp.read(MAX_ARCHIVE_BYTES + 1)
                if len(data) > MAX_ARCHIVE_BYTES:
                    raise EnvPackageError(f"environment archive is over {MAX_ARCHIVE_BYTES} bytes")
                return data
        except urllib.error.HTTPError as e:
            if e.code != 429 and e.code < 500:
                raise EnvPackageError(f"fetching the environment package: HTTP {e.code}") from None
            err = e
        except (urllib.error.URLError, TimeoutError, ConnectionError) as e:
            err = e
        if attempt < retries:
            time.sleep(delay)
            delay *= 2
    raise EnvPackageError(f"fetching the environment package failed after {retries + 1} attempts: {err}")


def verify_sha256(data: bytes, expected: str) -> None:
    got = hashlib.sha256(data).hexdigest()
    if got != expected:
        raise EnvPackageError(
            f"environment archive sha256 mismatch: the job is pinned to {expected}, the archive is {got}; "
            "refusing to run it"
        )


def _scratch(prefix: str) -> Path:
    path = Path(tempfile.mkdtemp(prefix=prefix))
    atexit.register(shutil.rmtree, path, True)
    return path


def unpack(data: bytes) -> LocalPackage:
    """Check and extract an archive (the registry's checks) into a private directory of this process."""
    try:
        manifest = inspect_archive(data).manifest
        directory = _scratch("opentinker-envpkg-") / "pkg"
        extract_archive(data, directory)
    except ArchiveError as e:
        raise EnvPackageError(f"environment archive refused: {e}") from None
    return LocalPackage(manifest, directory)


def local_package(path: str | os.PathLike[str]) -> LocalPackage:
    """A package directory (with its opentinker.json) or a .tar.gz archive on this machine."""
    p = Path(path).resolve()
    key = f"local:{p}"
    if key in _unpacked:
        return _unpacked[key]
    if p.is_dir():
        manifest_file = p / MANIFEST_NAME
        if not manifest_file.is_file():
            raise EnvPackageError(f"{p} has no {MANIFEST_NAME}")
        try:
            manifest = manifest_parse(manifest_file.read_bytes())
        except ArchiveError as e:
            raise EnvPackageError(f"{manifest_file}: {e}") from None
        module = manifest.entrypoint.split(":")[0].replace(".", "/")
        if not ((p / f"{module}.py").is_file() or (p / module / "__init__.py").is_file()):
            raise EnvPackageError(f"entrypoint module {module.replace('/', '.')} is not in {p}")
        package = LocalPackage(manifest, p)
    elif p.is_file():
        data = p.read_bytes()
        if len(data) > MAX_ARCHIVE_BYTES:
            raise EnvPackageError(f"{p} is over {MAX_ARCHIVE_BYTES} bytes")
        package = unpack(data)
    else:
        raise EnvPackageError(f"environment package {p} does not exist")
    _unpacked[key] = package
    return package


def job_package(spec: EnvironmentSpec) -> LocalPackage:
    """The package this job's environment runs: a local one if given, else the pinned archive from the
    platform, fetched once per process."""
    local = os.environ.get(ENV_PACKAGE_VAR)
    if local:
        return local_package(local)
    if not spec.sha256:
        raise EnvPackageError(
            f"registry package {spec.ref} is not pinned (no environment.sha256): submit the job through the "
            "platform, or run a local package with --env-package DIR"
        )
    if spec.sha256 in _unpacked:
        return _unpacked[spec.sha256]
    ingest_url, token = os.environ.get("OPENTINKER_INGEST_URL"), os.environ.get("OPENTINKER_JOB_TOKEN")
    if not (ingest_url and token):
        raise EnvPackageError(
            f"registry package {spec.ref} is fetched from the platform (OPENTINKER_INGEST_URL and "
            "OPENTINKER_JOB_TOKEN are not set); standalone, give it with --env-package DIR_OR_ARCHIVE"
        )
    data = fetch_archive(ingest_url, token)
    verify_sha256(data, spec.sha256)  # against the job's own spec, not what the server says
    package = unpack(data)
    _unpacked[spec.sha256] = package
    return package


class PackageEnvFactory:
    """Makes one sandboxed instance of a package's environment per call (one per episode)."""

    def __init__(self, package: LocalPackage, config: dict[str, Any], limits: SandboxLimits) -> None:
        if package.manifest.protocol == "multi-agent":
            raise EnvPackageError(
                f"{package.manifest.name} is a multi-agent package: jobs run multi-agent games from the "
                "built-ins only for now"
            )
        self.package = package
        self.config = config
        self.limits = limits
        self.name = package.manifest.name
        self.protocol = package.manifest.protocol  # read by gpu_runtime.envs.protocol_kind
        self.roles = tuple(package.manifest.roles)

    def __call__(self) -> SandboxedEnvironment:
        return SandboxedEnvironment(
            self.package.manifest.entrypoint,
            self.config,
            package_dir=self.package.directory,
            limits=self.limits,
        )


def package_factory(spec: EnvironmentSpec) -> PackageEnvFactory:
    return PackageEnvFactory(job_package(spec), dict(spec.config), sandbox_limits())
