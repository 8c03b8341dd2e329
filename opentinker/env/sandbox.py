"""Run registry environments in a separate, limited process.

Package code is not trusted. It runs in a child interpreter with CPU time, address space, file size, open
file and process limits; a wall-clock timeout on every call; a private working directory; a clean
environment (no platform secrets in `os.environ`); the platform's packages blocked from import; and, where
the OS allows (root, or CAP_SYS_ADMIN), its own network namespace with no interfaces up and its own mount
namespace with every file system read-only but its working directory. It runs in its own process group, and
where a `pids` cgroup (v1) is writable in its own cgroup too: the cgroup caps the process count even for root
(RLIMIT_NPROC does not), and everything in either is killed when the sandbox closes. Without root neither
the network nor the file system is isolated: `info["network_isolated"]` and `info["filesystem_read_only"]`
say which applies, and deployments run workers as root inside a container or add a seccomp/network policy.

A crash, hang, limit hit or exception raises `SandboxError` with a clear reason; the protocol turns that into
a failed episode (`StopReason.ENV_ERROR`), and the caller keeps running.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from opentinker.env.base import Environment, Observation, StepResult
from opentinker.env.multiagent import MultiAgentEnvironment, MultiStepResult, RewardMode

PROJECT_ROOT = str(Path(__file__).resolve().parents[2])
PIDS_CGROUP = Path("/sys/fs/cgroup/pids")
_STDERR_TAIL = 2000


class SandboxError(RuntimeError):
    """The sandboxed environment failed; the message says how (timeout, limit, crash, exception)."""


@dataclass(frozen=True)
class SandboxLimits:
    cpu_s: int = 60  # CPU seconds over the sandbox's life (SIGXCPU, then SIGKILL)
    memory_mb: int = 1024  # address space
    file_mb: int = 16  # largest file it may write
    open_files: int = 64
    max_processes: int = 16
    call_timeout_s: float = 10.0  # wall clock per call, loading the package included
    # Added to `call_timeout_s` for the start: the interpreter's start-up and the platform's imports, whose
    # wall time depends on the machine and its load, not on the package.
    start_allowance_s: float = 10.0
    isolate_network: bool = True


def _signal_name(code: int) -> str:
    try:
        return signal.Signals(-code).name
    except ValueError:
        return f"signal {-code}"


class Sandbox:
    """One environment instance in its own process; `call(method, *args)` runs one method with a timeout."""

    METHODS = (
        "reset",
        "step",
        "parse_action",
        "close",
        "active_roles",
        "system_prompt_for",
        "rule_based_action",
        "assign_rewards",
    )

    def __init__(
        self,
        entrypoint: str,
        config: dict[str, Any] | None = None,
        *,
        package_dir: str | os.PathLike[str] | None = None,
        limits: SandboxLimits | None = None,
        reusable: bool = False,
    ) -> None:
        self.limits = limits or SandboxLimits()
        self.dead: str | None = None
        self.workdir = Path(tempfile.mkdtemp(prefix="opentinker-sandbox-"))
        self.stderr_path = self.workdir / ".stderr"
        self.cgroup: Path | None = None
        self._stderr: Any = None
        try:
            self._start(entrypoint, config, package_dir, reusable)
        except BaseException:
            # A failed start leaves nothing behind: the process (if it began), its cgroup, its directory.
            self.dead = self.dead or "failed to start"
            if getattr(self, "proc", None) is not None:
                self.kill()
            self._release()
            raise

    def _start(
        self,
        entrypoint: str,
        config: dict[str, Any] | None,
        package_dir: str | os.PathLike[str] | None,
        reusable: bool,
    ) -> None:
        self.cgroup = self._make_cgroup()
        argv = [sys.executable, "-u", "-m", "opentinker.env.sandbox_worker"]
        env = {
            "PATH": "/usr/bin:/bin",
            "HOME": str(self.workdir),
            "TMPDIR": str(self.workdir),
            "LANG": "C.UTF-8",
        }
        self._stderr = self.stderr_path.open("ab")  # appends, so `renew` can truncate it under the child
        self.proc = subprocess.Popen(
            argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            cwd=self.workdir,
            env=env,
            start_new_session=True,  # its own process group, killed as one
            preexec_fn=self._join_cgroup if self.cgroup else None,
        )
        spec = {
            "entrypoint": entrypoint,
            "config": config or {},
            "package_dir": str(package_dir or self.workdir),
            "project_root": PROJECT_ROOT,
            "limits": asdict(self.limits),
            "methods": list(self.METHODS),
            # Reusable: twice the per-instance CPU over the process's life. Each instance may use `cpu_s` from
            # its start (the worker moves its soft limit on at `renew`), and the pool retires a process once
            # it used one instance's worth, so the next instance's `cpu_s` still fits.
            "process_cpu_s": self.limits.cpu_s * (2 if reusable else 1),
        }
        start_timeout = self.limits.call_timeout_s + self.limits.start_allowance_s
        self.info: dict[str, Any] = self._request(spec, "start", start_timeout)

    def renew(self) -> None:
        """Close this instance and make a fresh one in the same process (its own state, its next `reset`);
        the working directory and the stderr log start empty again."""
        for path in self.workdir.iterdir():
            if path != self.stderr_path:
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    path.unlink(missing_ok=True)
        self._stderr.truncate(0)
        self.info = {**self.info, **self._request({"method": "renew", "args": []}, "renew")}

    @property
    def worn(self) -> bool:
        """Too much of the process's CPU budget is spent to guarantee another instance its full `cpu_s`."""
        return float(self.info.get("cpu_used_s") or 0.0) >= self.limits.cpu_s

    def _make_cgroup(self) -> Path | None:
        if not (PIDS_CGROUP / "cgroup.procs").exists():
            return None
        path = PIDS_CGROUP / f"opentinker-{uuid.uuid4().hex[:12]}"
        try:
            path.mkdir()
        except OSError:
            return None
        try:
            (path / "pids.max").write_text(str(self.limits.max_processes + 1))  # + the worker
        except OSError:
            with contextlib.suppress(OSError):
                path.rmdir()
            return None
        return path

    def _join_cgroup(self) -> None:
        assert self.cgroup is not None
        (self.cgroup / "cgroup.procs").write_text(str(os.getpid()))

    def call(self, method: str, *args: Any) -> Any:
        if method not in self.METHODS:
            raise ValueError(f"unknown sandbox method {method}")
        return self._request({"method": method, "args": list(args)}, method)

    def _request(self, payload: dict[str, Any], what: str, timeout: float | None = None) -> Any:
        if self.dead:
            raise SandboxError(f"environment is no longer running ({self.dead})")
        assert self.proc.stdin is not None and self.proc.stdout is not None
        try:
            self.proc.stdin.write((json.dumps(payload) + "\n").encode())
            self.proc.stdin.flush()
        except (BrokenPipeError, TypeError, ValueError) as e:
            raise self._fail(f"{what}: could not send the request ({type(e).__name__}: {e})") from None
        timeout = self.limits.call_timeout_s if timeout is None else timeout
        line = self._readline(timeout)
        if line is None:
            raise self._fail(f"{what} timed out after {timeout:g}s")
        if not line:
            raise self._fail(f"{what}: the environment process died ({self._exit_reason()})")
        reply = json.loads(line)
        if "error" in reply:
            if what in ("start", "renew"):
                raise self._fail(reply["error"])
            raise SandboxError(f"{what} raised {reply['error']}")
        return reply["ok"]

    def _readline(self, timeout: float) -> bytes | None:
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        buf = b""
        fd = self.proc.stdout.fileno()
        while not buf.endswith(b"\n"):
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            ready, _, _ = select.select([fd], [], [], left)
            if not ready:
                return None
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                return buf if buf.endswith(b"\n") else b""
            buf += chunk
        return buf

    def _exit_reason(self) -> str:
        try:
            code = self.proc.wait(timeout=2)
        except subprocess.TimeoutExpired:
            return "unresponsive"
        if code < 0:
            name = _signal_name(code)
            hint = {"SIGXCPU": "CPU time limit", "SIGKILL": "killed", "SIGXFSZ": "file size limit"}.get(
                name, ""
            )
            return f"{name}{f', {hint}' if hint else ''}"
        tail = self.stderr_tail()
        if "MemoryError" in tail:
            return f"exit code {code}, out of memory (limit {self.limits.memory_mb} MB)"
        return f"exit code {code}" + (f": {tail.strip().splitlines()[-1]}" if tail.strip() else "")

    def stderr_tail(self) -> str:
        try:
            data = self.stderr_path.read_bytes()[-_STDERR_TAIL:]
        except OSError:
            return ""
        return data.decode(errors="replace")

    def _fail(self, reason: str) -> SandboxError:
        self.kill()
        self.dead = reason
        return SandboxError(reason)

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=5)
        if self.cgroup:
            # Anything still in the cgroup (escaped the process group) is killed too.
            for pid in (self.cgroup / "cgroup.procs").read_text().split():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(pid), signal.SIGKILL)

    def close(self) -> None:
        if not self.dead and self.proc.poll() is None:
            with contextlib.suppress(SandboxError):
                self._request({"method": "close", "args": []}, "close")
        self.dead = self.dead or "closed"
        self.kill()
        self._release()

    def _release(self) -> None:
        """Close the pipes and the stderr log, remove the cgroup and the working directory."""
        proc = getattr(self, "proc", None)
        for stream in (proc and proc.stdin, proc and proc.stdout, self._stderr):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()
        if self.cgroup:
            for _ in range(50):
                try:
                    self.cgroup.rmdir()
                    break
                except OSError:
                    time.sleep(0.05)
        shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> Sandbox:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class SandboxPool:
    """Sandbox processes kept alive across the episodes of one job, so an episode does not pay a process
    start (0.1-0.3 s).

    `acquire` hands out an idle process (its instance fresh: `renew` made it when the last episode ended) or
    starts one; `release` renews the instance and keeps the process, unless it died (crash, timeout, limit),
    failed to renew, spent its CPU budget or `size` processes are idle already: then it is closed, and the
    next episode gets a fresh process. Never blocks: more concurrent episodes than `size` get processes of
    their own, closed when they end.

    Reuse is safe because a pool belongs to one job (the runtime process of one job, one tenant) and one
    package at one config: every episode it serves runs the same code for the same owner, each with its own
    instance and an emptied working directory. Module-level state of the package does persist across its
    instances, which is why a process is never shared across jobs."""

    def __init__(
        self,
        entrypoint: str,
        config: dict[str, Any] | None = None,
        *,
        package_dir: str | os.PathLike[str] | None = None,
        limits: SandboxLimits | None = None,
        size: int = 8,
    ) -> None:
        if size < 0:
            raise ValueError("a sandbox pool's size must be 0 or more")
        self.entrypoint, self.config, self.package_dir = entrypoint, dict(config or {}), package_dir
        self.limits = limits or SandboxLimits()
        self.size = size
        self.spawned = 0  # processes started over the pool's life
        self._idle: list[Sandbox] = []
        self._lock = threading.Lock()
        self._closed = False

    def acquire(self) -> Sandbox:
        with self._lock:
            if self._closed:
                raise SandboxError("the sandbox pool is closed")
            if self._idle:
                return self._idle.pop()
            self.spawned += 1
        return Sandbox(
            self.entrypoint,
            self.config,
            package_dir=self.package_dir,
            limits=self.limits,
            reusable=self.size > 0,
        )

    def release(self, sandbox: Sandbox) -> None:
        with self._lock:
            if any(s is sandbox for s in self._idle):  # released twice: it must never serve two episodes
                return
            room = not self._closed and len(self._idle) < self.size
        keep = room and not sandbox.dead and sandbox.proc.poll() is None
        if keep:  # renewed only when it may be kept: a process about to close needs no fresh instance
            try:
                sandbox.renew()
            except Exception:  # any trouble renewing (a reply it cannot parse, its directory): start afresh
                keep = False
        with self._lock:
            if keep and not sandbox.worn and not self._closed and len(self._idle) < self.size:
                self._idle.append(sandbox)
                return
        sandbox.close()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for sandbox in idle:
            sandbox.close()


def _close_environment(env: SandboxedEnvironment | SandboxedMultiAgentEnvironment) -> None:
    """Give the process back to its pool (or end it), once: a second close must not hand a process that
    another episode may already hold back to the pool."""
    if getattr(env, "_released", False):
        return
    env._released = True
    if env.pool is not None:
        env.pool.release(env.sandbox)
    else:
        env.sandbox.close()


def _observation(d: dict[str, Any] | None) -> Observation | None:
    return None if d is None else Observation(d["text"], d.get("role", "user"), d.get("info") or {})


def _open(
    entrypoint: str,
    config: dict[str, Any] | None,
    package_dir: str | os.PathLike[str] | None,
    limits: SandboxLimits | None,
    pool: SandboxPool | None,
    multi_agent: bool,
) -> Sandbox:
    """A sandbox for one instance, from the pool when there is one; refused unless it is of the right kind."""
    if pool is not None:
        sandbox = pool.acquire()
    else:
        sandbox = Sandbox(entrypoint, config, package_dir=package_dir, limits=limits)
    if sandbox.info["multi_agent"] != multi_agent:
        sandbox.close()
        kind = "a single-agent" if multi_agent else "a multi-agent"
        raise SandboxError(f"{pool.entrypoint if pool else entrypoint} is {kind} environment")
    return sandbox


class SandboxedEnvironment(Environment):
    """A single-agent `Environment` whose code runs in a `Sandbox`; drop-in for the protocols. With a
    `pool`, its process comes from (and on `close` goes back to) the pool; `entrypoint`, `config`,
    `package_dir` and `limits` are then the pool's."""

    def __init__(
        self,
        entrypoint: str = "",
        config: dict[str, Any] | None = None,
        *,
        package_dir: str | os.PathLike[str] | None = None,
        limits: SandboxLimits | None = None,
        pool: SandboxPool | None = None,
    ) -> None:
        super().__init__(**((pool.config if pool else config) or {}))
        self.pool = pool
        self.sandbox = _open(entrypoint, config, package_dir, limits, pool, multi_agent=False)
        info = self.sandbox.info
        self.name = info["name"]  # type: ignore[misc]
        self.system_prompt = info["system_prompt"]  # type: ignore[misc]
        self.roles = tuple(info["roles"]) or ("agent",)  # type: ignore[misc]
        if info["tool_schemas"]:
            self.tool_schemas = info["tool_schemas"]

    def reset(self, seed: int) -> Observation:
        obs = _observation(self.sandbox.call("reset", seed))
        if obs is None:
            raise SandboxError("reset returned no observation")
        return obs

    def step(self, action: str) -> StepResult:
        r = self.sandbox.call("step", action)
        return StepResult(
            _observation(r["observation"]), float(r["reward"]), bool(r["done"]), r.get("info") or {}
        )

    def parse_action(self, text: str) -> str:
        return str(self.sandbox.call("parse_action", text))

    def close(self) -> None:
        _close_environment(self)


def _observations(d: dict[str, Any]) -> dict[str, Observation]:
    return {str(role): o for role, obs in d.items() if (o := _observation(obs)) is not None}


class SandboxedMultiAgentEnvironment(MultiAgentEnvironment):
    """A `MultiAgentEnvironment` whose code runs in a `Sandbox`; drop-in for `MultiAgentProtocol`. Every
    method is a call into the sandbox, so a crash, hang or exception there fails the game (ENV_ERROR)."""

    def __init__(
        self,
        entrypoint: str = "",
        config: dict[str, Any] | None = None,
        *,
        package_dir: str | os.PathLike[str] | None = None,
        limits: SandboxLimits | None = None,
        pool: SandboxPool | None = None,
    ) -> None:
        config = (pool.config if pool else config) or {}
        self.pool = pool
        self.sandbox = _open(entrypoint, config, package_dir, limits, pool, multi_agent=True)
        info = self.sandbox.info
        super().__init__(**config)
        self.name = info["name"]  # type: ignore[misc]
        self.roles = tuple(info["roles"])  # type: ignore[misc]
        # The package applies its own reward mode; a custom assignment runs in the sandbox too.
        self.reward_mode = RewardMode(info.get("reward_mode") or RewardMode.CUSTOM)  # type: ignore[misc]
        self.has_rule_player = bool(info.get("rule_player"))
        self._custom_rewards = bool(info.get("custom_rewards"))

    def reset(self, seed: int) -> dict[str, Observation]:
        return _observations(self.sandbox.call("reset", seed))

    def step(self, actions: dict[str, str]) -> MultiStepResult:
        r = self.sandbox.call("step", actions)
        return MultiStepResult(
            _observations(r.get("observations") or {}),
            {str(k): float(v) for k, v in (r.get("rewards") or {}).items()},
            bool(r["done"]),
            r.get("info") or {},
        )

    def active_roles(self) -> list[str]:
        return [str(role) for role in self.sandbox.call("active_roles")]

    def system_prompt_for(self, role: str) -> str:
        return str(self.sandbox.call("system_prompt_for", role) or "")

    def parse_action(self, role: str, text: str) -> str:
        return str(self.sandbox.call("parse_action", role, text))

    def rule_based_action(self, role: str) -> str:
        if not self.has_rule_player:
            raise NotImplementedError(f"{self.name} has no rule-based player")
        return str(self.sandbox.call("rule_based_action", role))

    def assign_rewards(self, rewards: dict[str, float]) -> dict[str, float]:
        if not self._custom_rewards:
            return rewards
        return {str(k): float(v) for k, v in self.sandbox.call("assign_rewards", rewards).items()}

    def close(self) -> None:
        _close_environment(self)
