"""Registry environment packages in a job: fetch the pinned archive, verify it, unpack it, run it sandboxed.

The platform pins a job's package at submission (`environment.ref` at an exact version and
`environment.sha256`). The runtime fetches the archive over the ingest API with its job token
(`GET {OPENTINKER_INGEST_URL}/environment`, api/views/ingest_env.py), refuses it unless its sha256 is the
one in the spec, unpacks it with the registry's own checks (`opentinker.env.archive`: no `../`, no links,
size caps) and runs every environment instance sandboxed (`SandboxedEnvironment`, or for a multi-agent
package `SandboxedMultiAgentEnvironment`, one game per instance), so a crash, hang or exception fails that
episode or game, never the job. Sandbox processes are reused across the job's episodes
(`opentinker.env.sandbox.SandboxPool`: a fresh instance per episode, a fresh process after a failure).
Standalone (`--env-package DIR_OR_ARCHIVE`, `OPENTINKER_ENV_PACKAGE`), a local package runs the same
sandboxed way so an author can try it before publishing.

Sandbox limits per call and per instance come from `OPENTINKER_SANDBOX_CALL_TIMEOUT_S` (default 10),
`OPENTINKER_SANDBOX_CPU_S` (60) and `OPENTINKER_SANDBOX_MEMORY_MB` (1024): the pool's settings, not the job's;
`OPENTINKER_SANDBOX_POOL_SIZE` (16) caps the idle sandbox processes a job keeps (0: a process per episode).
"""

from __future__ import annotations

import atexit
import hashlib
import json
import os
import shutil
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass
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
from opentinker.env.sandbox import (
    SandboxedEnvironment,
    SandboxedMultiAgentEnvironment,
    SandboxError,
    SandboxLimits,
    SandboxPool,
)
from opentinker.spec import EnvironmentSpec

ENV_PACKAGE_VAR = "OPENTINKER_ENV_PACKAGE"
DEFAULT_POOL_SIZE = 16  # the example job's concurrent episodes (4 prompts x 4 samples)
MAX_POOL_SIZE = 64  # idle sandbox processes one job keeps


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
    delay = 0.5
    err: Exception | None = None
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
    """Makes one sandboxed instance of a package's environment per call (one per episode or game), on
    processes kept in a `SandboxPool` across this job's episodes (`OPENTINKER_SANDBOX_POOL_SIZE` idle
    processes at most; 0 starts a process per episode). A multi-agent package gives
    `SandboxedMultiAgentEnvironment`s, which `MultiAgentProtocol` runs like the built-in games."""

    def __init__(
        self,
        package: LocalPackage,
        config: dict[str, Any],
        limits: SandboxLimits,
        *,
        pool_size: int = DEFAULT_POOL_SIZE,
    ) -> None:
        self.package = package
        self.config = config
        self.limits = limits
        self.name = package.manifest.name
        self.protocol = package.manifest.protocol  # read by gpu_runtime.envs.protocol_kind
        self.multi_agent = self.protocol == "multi-agent"
        self.roles = tuple(package.manifest.roles)
        self.pool = SandboxPool(
            package.manifest.entrypoint, config, package_dir=package.directory, limits=limits, size=pool_size
        )
        self._described: dict[str, Any] | None = None
        atexit.register(self.close)

    def __call__(self) -> SandboxedEnvironment | SandboxedMultiAgentEnvironment:
        if self.multi_agent:
            return SandboxedMultiAgentEnvironment(pool=self.pool)
        return SandboxedEnvironment(pool=self.pool)

    def describe(self) -> dict[str, Any]:
        """What the package's code declares (roles, rule-based player), from one sandboxed instance, checked
        against its manifest; the process stays in the pool for the first episode."""
        if self._described is None:
            try:
                env = self()
            except SandboxError as e:
                raise EnvPackageError(f"environment package {self.name} failed to start: {e}") from None
            try:
                info = dict(env.sandbox.info)
            finally:
                env.close()
            declared = tuple(info["roles"]) or ("agent",)
            if self.multi_agent and declared != (self.roles or ("agent",)):
                raise EnvPackageError(
                    f"environment package {self.name}: its manifest's roles ({', '.join(self.roles)}) are "
                    f"not the roles its code declares ({', '.join(declared)})"
                )
            self._described = info
        return self._described

    @property
    def rule_player(self) -> bool:
        return bool(self.describe().get("rule_player"))

    def close(self) -> None:
        self.pool.close()


# Per process (one job): one factory, hence one pool of sandbox processes, per package and config, shared by
# every caller of `package_factory` (the multi-agent spec check and the rollout worker reuse its processes).
_factories: dict[str, PackageEnvFactory] = {}


def pool_size() -> int:
    raw = os.environ.get("OPENTINKER_SANDBOX_POOL_SIZE") or str(DEFAULT_POOL_SIZE)
    try:
        size = int(raw)
    except ValueError:
        raise EnvPackageError(f"OPENTINKER_SANDBOX_POOL_SIZE must be an integer, not {raw!r}") from None
    if not 0 <= size <= MAX_POOL_SIZE:
        raise EnvPackageError(
            f"OPENTINKER_SANDBOX_POOL_SIZE must be between 0 and {MAX_POOL_SIZE}, not {size}"
        )
    return size


def package_factory(spec: EnvironmentSpec) -> PackageEnvFactory:
    package, config, limits, size = job_package(spec), dict(spec.config), sandbox_limits(), pool_size()
    key = json.dumps([str(package.directory), config, asdict(limits), size], sort_keys=True, default=str)
    if key not in _factories:
        _factories[key] = PackageEnvFactory(package, config, limits, pool_size=size)
    return _factories[key]
