"""A hostile environment package against the sandbox: each attack is contained and the runtime is unharmed.

Every attack runs as package code on the sandbox paths the runtime uses: a fresh sandbox per episode
(`single`) and a process reused from a job's pool after a first instance (`pooled`); the multi-agent path and
the platform's upload validation go through the same launcher (one test each at the end). Network attacks
only ever target this test's own listeners on loopback; the DNS attack runs only once the package has seen
that it has no interface but `lo`, so a broken sandbox could not send a query anywhere either.
"""

from __future__ import annotations

import json
import os
import select
import socket
import subprocess
import textwrap
import uuid
from pathlib import Path

import pytest

from opentinker.env.sandbox import (
    DEV_NODES,
    MAX_REPLY_BYTES,
    Sandbox,
    SandboxedEnvironment,
    SandboxedMultiAgentEnvironment,
    SandboxError,
    SandboxLimits,
    SandboxPool,
)

PROJECT_ROOT = Path(__file__).resolve().parents[3]
LIMITS = SandboxLimits(call_timeout_s=20, cpu_s=10, memory_mb=512, max_processes=8, file_mb=1, workdir_mb=4)
PATHS = ("single", "pooled")

# Helpers every attack may use: `attempt(fn)` is "ok" or the errno's name (or the exception's class).
PRELUDE = """
import ctypes, errno, json, os, signal, socket, stat, sys
from opentinker.env import Environment, Observation, StepResult
from opentinker.env.multiagent import MultiAgentEnvironment, MultiStepResult

CTX = json.loads({ctx!r})
libc = ctypes.CDLL(None, use_errno=True)


def attempt(fn):
    try:
        fn()
        return "ok"
    except OSError as e:
        return errno.errorcode.get(e.errno, type(e).__name__)
    except Exception as e:
        return type(e).__name__


def call(fn, *args):
    ctypes.set_errno(0)
    r = fn(*args)
    return "ok" if r != -1 else errno.errorcode.get(ctypes.get_errno(), str(ctypes.get_errno()))


def read(path):
    with open(path, "rb") as f:
        return f.read()


def interfaces():
    with open("/proc/net/dev") as f:
        return sorted(line.split(":")[0].strip() for line in f.readlines()[2:])


def attack():
{body}


class E(Environment):
    name = "hostile"

    def reset(self, seed):
        return Observation(json.dumps(attack()))

    def step(self, action):
        return StepResult(None, 0.0, True)


class Multi(MultiAgentEnvironment):
    name = "hostile-duel"
    roles = ("a", "b")

    def reset(self, seed):
        return {{"a": Observation(json.dumps(attack())), "b": Observation("b")}}

    def step(self, actions):
        return MultiStepResult({{}}, {{"a": 0.0, "b": 0.0}}, True)
"""


class Runtime:
    """What the runtime holds that a package must not reach, and the checks that it was left unharmed."""

    def __init__(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        self.token = f"otk-job-{uuid.uuid4().hex}"
        monkeypatch.setenv("OPENTINKER_JOB_TOKEN", self.token)
        self.pkg = tmp_path / "pkg"
        self.pkg.mkdir()
        self.checkpoint = tmp_path / "var" / "checkpoints" / "job-1" / "step-5" / "trainer.pt"
        self.checkpoint.parent.mkdir(parents=True)
        self.checkpoint.write_text(self.token)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.setblocking(False)
        self.port = self.listener.getsockname()[1]
        self.tmp_path = tmp_path

    def ctx(self) -> dict:
        return {
            "host_pid": os.getpid(),
            "token": self.token,
            "checkpoint": str(self.checkpoint),
            "tmp": str(self.tmp_path),
            "project": str(PROJECT_ROOT),
            "port": self.port,
        }

    def package(self, body: str, ctx: dict | None = None) -> Path:
        body = textwrap.indent(textwrap.dedent(body), " " * 4)
        self.code = PRELUDE.format(ctx=json.dumps(ctx or self.ctx()), body=body)
        (self.pkg / "pkg.py").write_text(self.code)
        return self.pkg

    def check_unharmed(self) -> None:
        assert os.environ["OPENTINKER_JOB_TOKEN"] == self.token
        assert self.checkpoint.read_text() == self.token
        with pytest.raises(BlockingIOError):  # nothing ever connected to the runtime's listener
            self.listener.accept()
        self.listener.close()


@pytest.fixture
def runtime(tmp_path, monkeypatch):
    rt = Runtime(tmp_path, monkeypatch)
    yield rt
    rt.check_unharmed()


def run(runtime: Runtime, path: str, body: str, limits: SandboxLimits = LIMITS, ctx: dict | None = None):
    """Run the attack in `reset` on the given path; its verdict (a dict), or the SandboxError it ended in."""
    pkg = runtime.package(body, ctx)
    if path == "single":
        env = SandboxedEnvironment("pkg:E", package_dir=pkg, limits=limits)
        try:
            return _verdict(env)
        finally:
            env.close()
    pool = SandboxPool("pkg:E", package_dir=pkg, limits=limits, size=1)
    try:
        first = SandboxedEnvironment(pool=pool)
        first.close()  # renewed and kept: the attack runs in the second instance of the same process
        env = SandboxedEnvironment(pool=pool)
        assert env.sandbox is first.sandbox and pool.spawned == 1
        try:
            return _verdict(env)
        finally:
            env.close()
    finally:
        pool.close()


def _verdict(env):
    assert env.sandbox.info["network_isolated"] is True
    try:
        return json.loads(env.reset(0).text)
    except SandboxError as e:
        return e


@pytest.mark.parametrize("path", PATHS)
def test_the_sandbox_reports_its_confinement(runtime, path):
    got = run(runtime, path, 'return {"uid_map": read("/proc/self/uid_map").decode().split()}')
    assert got == {"uid_map": ["65534", "65534", "1"]}  # one uid inside, mapped to one uid outside
    env = SandboxedEnvironment("pkg:E", package_dir=runtime.pkg, limits=LIMITS)
    try:
        info = env.sandbox.info
        host_uid = int(Path(f"/proc/{env.sandbox.worker_pid}/status").read_text().split("Uid:")[1].split()[0])
    finally:
        env.close()
    assert {k: info[k] for k in ("isolation", "network_isolated", "filesystem_read_only", "interfaces")} == {
        "isolation": "bwrap",
        "network_isolated": True,
        "filesystem_read_only": True,
        "interfaces": ["lo"],
    }
    confinement = (info["uid"], info["capabilities"], info["no_new_privs"], info["seccomp"])
    assert confinement == (65534, 0, True, True)
    assert host_uid == (65534 if os.geteuid() == 0 else os.geteuid())  # root's launcher drops to 65534 too


@pytest.mark.parametrize("path", PATHS)
def test_reading_the_runtimes_environment(runtime, path):
    got = run(
        runtime,
        path,
        """
        token = CTX["token"].encode()
        found = []
        for pid in (p for p in os.listdir("/proc") if p.isdigit()):
            for what in ("environ", "cmdline"):
                try:
                    if token in read(f"/proc/{pid}/{what}"):
                        found.append(f"{pid}/{what}")
                except OSError:
                    pass
        return {
            "env": sorted(os.environ),
            "found": found,
            "host": attempt(lambda: read(f"/proc/{CTX['host_pid']}/environ")),
            "ppid": os.getppid(),
            "pids": sorted(int(p) for p in os.listdir("/proc") if p.isdigit()),
        }
        """,
    )
    assert set(got["env"]) <= {"PATH", "HOME", "TMPDIR", "LANG", "PWD"}
    assert got["found"] == [] and got["host"] == "ENOENT"
    assert got["ppid"] == 1 and got["pids"] == [1, 2]  # its own PID namespace: bwrap's init and itself


@pytest.mark.parametrize("path", PATHS)
def test_reading_the_runtimes_memory(runtime, path):
    got = run(
        runtime,
        path,
        """
        class IOVec(ctypes.Structure):
            _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]
        buf = ctypes.create_string_buffer(64)
        local, remote = IOVec(ctypes.addressof(buf), 64), IOVec(0x400000, 64)
        vm = libc.process_vm_readv
        P, N = ctypes.c_void_p, ctypes.c_ulong
        vm.argtypes = [ctypes.c_int, P, N, P, N, N]
        host = CTX["host_pid"]
        return {
            "mem": attempt(lambda: read(f"/proc/{host}/mem")),
            "maps": attempt(lambda: read(f"/proc/{host}/maps")),
            "vm_readv": call(vm, host, ctypes.addressof(local), 1, ctypes.addressof(remote), 1, 0),
            "vm_readv_init": call(vm, 1, ctypes.addressof(local), 1, ctypes.addressof(remote), 1, 0),
        }
        """,
    )
    assert got == {"mem": "ENOENT", "maps": "ENOENT", "vm_readv": "EPERM", "vm_readv_init": "EPERM"}


@pytest.mark.parametrize("path", PATHS)
def test_inherited_file_descriptors(runtime, path):
    secret = runtime.tmp_path / "secret.key"
    secret.write_text(runtime.token)
    fd = os.open(secret, os.O_RDONLY)
    os.set_inheritable(fd, True)  # a careless runtime leaves a secret's descriptor open across exec
    try:
        got = run(
            runtime,
            path,
            """
            fds = {}
            for fd in sorted(int(f) for f in os.listdir("/proc/self/fd")):
                try:
                    fds[fd] = os.readlink(f"/proc/self/fd/{fd}")
                    data = os.pread(fd, 4096, 0)
                except OSError:
                    continue
                if CTX["token"].encode() in data:
                    return {"leaked": fd}
            return {"fds": fds}
            """,
        )
    finally:
        os.close(fd)
    assert "leaked" not in got
    assert not any(str(secret) in target for target in got["fds"].values())
    assert len(got["fds"]) <= 5  # stdin, stdout, stderr, the reply pipe, the listing itself


@pytest.mark.parametrize("path", PATHS)
def test_setns_into_the_runtimes_namespaces(runtime, path):
    got = run(
        runtime,
        path,
        """
        out = {}
        for ns in ("net", "mnt", "pid", "user", "ipc", "uts"):
            out["host_" + ns] = attempt(lambda: os.open(f"/proc/{CTX['host_pid']}/ns/{ns}", os.O_RDONLY))
            fd = os.open(f"/proc/1/ns/{ns}", os.O_RDONLY)
            out[ns] = call(libc.setns, fd, 0)
        out["unshare_user"] = call(libc.unshare, 0x10000000)
        out["unshare_net"] = call(libc.unshare, 0x40000000)
        return out
        """,
    )
    for ns in ("net", "mnt", "pid", "user", "ipc", "uts"):
        assert got["host_" + ns] == "ENOENT" and got[ns] == "EPERM", (ns, got)
    assert got["unshare_user"] == got["unshare_net"] == "EPERM"


@pytest.mark.parametrize("path", PATHS)
def test_ptrace(runtime, path):
    got = run(
        runtime,
        path,
        """
        pt = libc.ptrace
        pt.argtypes = [ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p]
        return {
            "attach_init": call(pt, 16, 1, None, None),
            "attach_host": call(pt, 16, CTX["host_pid"], None, None),
            "traceme": call(pt, 0, 0, None, None),
        }
        """,
    )
    assert got == {"attach_init": "EPERM", "attach_host": "EPERM", "traceme": "EPERM"}


@pytest.mark.parametrize("path", PATHS)
def test_signals_to_the_runtime(runtime, path):
    # A bystander with the sandbox's host uid when the runtime is root (65534): same uid, still unreachable.
    bystander = subprocess.Popen(["sleep", "120"], user=65534 if os.geteuid() == 0 else None)
    try:
        ctx = {**runtime.ctx(), "bystander": bystander.pid}
        got = run(
            runtime,
            path,
            """
            return {
                "runtime": attempt(lambda: os.kill(CTX["host_pid"], signal.SIGKILL)),
                "bystander": attempt(lambda: os.kill(CTX["bystander"], signal.SIGKILL)),
                "group": attempt(lambda: os.killpg(CTX["host_pid"], signal.SIGKILL)),
                "everyone": attempt(lambda: os.kill(-1, signal.SIGKILL)),
            }
            """,
            ctx=ctx,
        )
        assert bystander.poll() is None
    finally:
        bystander.kill()
        bystander.wait()
    assert got["runtime"] == got["bystander"] == got["group"] == "ESRCH"
    assert got["everyone"] in ("ok", "ESRCH")  # -1 reaches only its own namespace (nothing but itself)


@pytest.mark.parametrize("path", PATHS)
def test_writing_outside_the_work_directory(runtime, path):
    before = sorted(p.name for p in runtime.tmp_path.iterdir())
    got = run(
        runtime,
        path,
        """
        def write(p):
            with open(p, "w") as f:
                f.write("x")
        targets = ["/package/pkg.py", "/package/new.py", "/usr/lib/evil", "/evil"]
        targets += ["/proc/sys/kernel/hostname"]
        targets += [CTX["tmp"] + "/evil", CTX["project"] + "/opentinker/__init__.py", sys.prefix + "/evil"]
        out = {t: attempt(lambda: write(t)) for t in targets}
        out["chmod"] = attempt(lambda: os.chmod("/package/pkg.py", 0o777))
        out["mkdir_root"] = attempt(lambda: os.mkdir("/evil"))
        out["work"] = attempt(lambda: write("/sandbox/ok"))
        out["tmp"] = attempt(lambda: write("/tmp/ok2"))
        out["work_dir"] = sorted(os.listdir("/sandbox"))
        out["tmp_dir"] = "ok2" in os.listdir("/tmp")
        return out
        """,
    )
    # /sandbox and /tmp: each the sandbox's own bounded tmpfs (a project under /tmp is bound inside /tmp)
    assert got.pop("work") == got.pop("tmp") == "ok" and got.pop("work_dir") == ["ok"] and got.pop("tmp_dir")
    assert all(v in ("EROFS", "ENOENT", "EACCES", "EPERM") for v in got.values()), got
    assert sorted(p.name for p in runtime.tmp_path.iterdir()) == before
    assert (runtime.pkg / "pkg.py").read_text() == runtime.code  # the package itself is unchanged
    assert (PROJECT_ROOT / "opentinker" / "__init__.py").read_text() != "x"


@pytest.mark.parametrize("path", PATHS)
def test_reading_checkpoints_var_and_the_projects_files(runtime, path):
    got = run(
        runtime,
        path,
        """
        p = CTX["project"]
        paths = [CTX["checkpoint"], p + "/var", p + "/portal/settings.py", p + "/manage.py"]
        paths += [p + "/.git/config", p + "/gpu_runtime", "/etc/passwd", "/etc/shadow", "/root/.ssh"]
        paths += ["/home", "/run", "/sys/kernel"]
        def look(x):
            return read(x) if "." in os.path.basename(x) else os.listdir(x)
        return {
            "paths": {x: attempt(lambda: look(x)) for x in paths},
            "project": sorted(os.listdir(p)),
        }
        """,
    )
    assert set(got["paths"].values()) == {"ENOENT"}, got["paths"]
    assert set(got["project"]) <= {"opentinker", ".venv"}  # the SDK (and the venv) only, read-only


@pytest.mark.parametrize("path", PATHS)
def test_symlinks_out_of_the_package(runtime, path):
    secret = runtime.tmp_path / "host-secret.txt"
    secret.write_text(runtime.token)
    (runtime.pkg / "abs_link").symlink_to(secret)
    (runtime.pkg / "rel_link").symlink_to(os.path.relpath(secret, "/package"))
    got = run(
        runtime,
        path,
        f"""
        os.symlink("/proc/{{CTX['host_pid']}}/root{secret}", "/sandbox/via_proc")
        os.symlink("/proc/1/root/package/pkg.py", "/sandbox/via_init")
        return {{
            "abs": attempt(lambda: read("/package/abs_link")),
            "rel": attempt(lambda: read("/package/rel_link")),
            "via_proc": attempt(lambda: read("/sandbox/via_proc")),
            "via_init_is_its_own": read("/sandbox/via_init") == read("/package/pkg.py"),
        }}
        """,
    )
    assert got == {"abs": "ENOENT", "rel": "ENOENT", "via_proc": "ENOENT", "via_init_is_its_own": True}


@pytest.mark.parametrize("path", PATHS)
def test_hard_links_out_of_the_package(runtime, path):
    got = run(
        runtime,
        path,
        """
        return {
            "package": attempt(lambda: os.link("/package/pkg.py", "/sandbox/h1")),
            "python": attempt(lambda: os.link(sys.executable, "/sandbox/h2")),
            "proc": attempt(lambda: os.link("/proc/self/environ", "/sandbox/h3")),
        }
        """,
    )
    assert got == {"package": "EXDEV", "python": "EXDEV", "proc": "EXDEV"}
    # A package directory holding a hard link to a file of the host is refused before anything runs.
    secret = runtime.tmp_path / "host-secret.txt"
    secret.write_text(runtime.token)
    os.link(secret, runtime.pkg / "linked.txt")
    with pytest.raises(SandboxError, match=r"linked\.txt has other hard links; refusing to run it"):
        run(runtime, path, "return {}")


def wait_gone(pid: int) -> bool:
    """The process `pid` has ended: its pidfd becomes readable when it exits (the deadline catches a leak)."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    try:
        return bool(select.select([fd], [], [], 30)[0])
    finally:
        os.close(fd)


@pytest.mark.parametrize("path", PATHS)
def test_fork_bomb_is_bounded_and_killed(runtime, path):
    pkg = runtime.package(
        """
        children = 0
        for _ in range(10_000):
            try:
                if os.fork() == 0:
                    signal.pause()  # each child stays until the sandbox is torn down
                    os._exit(0)
                children += 1
            except OSError as e:
                return {"children": children, "error": errno.errorcode[e.errno]}
        return {"children": children}
        """
    )
    if path == "single":
        env = SandboxedEnvironment("pkg:E", package_dir=pkg, limits=LIMITS)
    else:
        pool = SandboxPool("pkg:E", package_dir=pkg, limits=LIMITS, size=1)
        first = SandboxedEnvironment(pool=pool)
        first.close()
        env = SandboxedEnvironment(pool=pool)
    init = env.sandbox.ns_init_pid
    try:
        got = json.loads(env.reset(0).text)
    finally:
        env.close()
        if path == "pooled":
            pool.close()
    assert got["error"] == "EAGAIN" and got["children"] <= LIMITS.max_processes
    assert init is not None and wait_gone(init)  # its PID namespace, with every child, ended with it


@pytest.mark.parametrize("path", PATHS)
def test_memory_bomb_is_bounded(runtime, path):
    got = run(
        runtime,
        path,
        """
        out = {"heap": attempt(lambda: bytearray(2 * 1024**3))}
        written = 0
        try:  # fill the tmpfs: files of 512 KiB until it is full
            for i in range(1000):
                with open(f"/sandbox/fill{i}", "wb") as f:
                    f.write(b"x" * 512 * 1024)
                written += 512 * 1024
        except OSError as e:
            out["disk"] = errno.errorcode[e.errno]
        out["written"] = written
        return out
        """,
    )
    assert got["heap"] == "MemoryError"  # RLIMIT_AS (512 MB here)
    assert got["disk"] == "ENOSPC" and got["written"] <= LIMITS.workdir_mb * 1024 * 1024


@pytest.mark.parametrize("path", PATHS)
def test_cpu_spin_is_bounded(runtime, path):
    # The CPU limit stops it; the wall clock (120 s) would only catch a hang.
    limits = SandboxLimits(call_timeout_s=120, cpu_s=1, memory_mb=512, max_processes=8)
    got = run(runtime, path, "while True:\n    pass", limits)
    assert isinstance(got, SandboxError)
    assert "SIGXCPU, CPU time limit" in str(got) or "SIGKILL" in str(got)


@pytest.mark.parametrize("path", PATHS)
def test_loopback_listener_of_the_host_is_out_of_reach_and_lo_is_the_only_interface(runtime, path):
    try:  # the same port on ::1 too, where the host has IPv6
        listener6 = socket.create_server(("::1", runtime.port), family=socket.AF_INET6)
        listener6.setblocking(False)
    except OSError:
        listener6 = None
    try:
        got = run(
            runtime,
            path,
            """
            def connect(family, address):
                with socket.socket(family, socket.SOCK_STREAM) as s:
                    s.settimeout(5)
                    s.connect(address)
            with open("/proc/net/route") as f:
                routes = f.readlines()[1:]
            return {
                "v4": attempt(lambda: connect(socket.AF_INET, ("127.0.0.1", CTX["port"]))),
                "v6": attempt(lambda: connect(socket.AF_INET6, ("::1", CTX["port"]))),
                "interfaces": interfaces(),
                "routes": routes,
            }
            """,
        )
        if listener6 is not None:
            with pytest.raises(BlockingIOError):
                listener6.accept()
    finally:
        if listener6 is not None:
            listener6.close()
    assert got.pop("v6") in ("ECONNREFUSED", "EADDRNOTAVAIL", "ENETUNREACH", "EAFNOSUPPORT")
    assert got == {"v4": "ECONNREFUSED", "interfaces": ["lo"], "routes": []}


@pytest.mark.parametrize("path", PATHS)
def test_dns_resolution_fails(runtime, path):
    got = run(
        runtime,
        path,
        """
        if interfaces() != ["lo"]:  # never query through a real network, even if the sandbox were broken
            return {"interfaces": interfaces()}
        return {
            "resolv.conf": attempt(lambda: read("/etc/resolv.conf")),
            "hosts": attempt(lambda: read("/etc/hosts")),
            "lookup": attempt(lambda: socket.getaddrinfo("opentinker-sandbox-test.invalid", 443)),
        }
        """,
    )
    assert got == {"resolv.conf": "ENOENT", "hosts": "ENOENT", "lookup": "gaierror"}


@pytest.mark.parametrize("path", PATHS)
def test_dev_and_shared_memory(runtime, path):
    host_shm = Path("/dev/shm") / f"opentinker-test-{uuid.uuid4().hex}"
    host_shm.write_text(runtime.token)
    try:
        got = run(
            runtime,
            path,
            f"""
            from multiprocessing import shared_memory
            out = {{x: attempt(lambda: read(x)) for x in ("{host_shm}", "/dev/mem", "/dev/kmsg", "/dev/sda")}}
            out["dev"] = sorted(os.listdir("/dev"))
            out["create"] = attempt(lambda: open("/dev/evil", "w"))
            out["mknod"] = attempt(lambda: os.mknod("/sandbox/mem", stat.S_IFCHR | 0o600, os.makedev(1, 1)))
            out["shm"] = attempt(lambda: shared_memory.SharedMemory(create=True, size=4096))
            return out
            """,
        )
    finally:
        host_shm.unlink()
    assert got.pop("dev") == sorted([*DEV_NODES, "fd"])
    assert got == {
        str(host_shm): "ENOENT",
        "/dev/mem": "ENOENT",
        "/dev/kmsg": "ENOENT",
        "/dev/sda": "ENOENT",
        "create": "EROFS",
        "mknod": "EPERM",
        "shm": "ENOENT",
    }


@pytest.mark.parametrize("path", PATHS)
def test_flooding_stdout_is_bounded(runtime, path):
    got = run(
        runtime,
        path,
        """
        chunk = "x" * (1 << 20)
        for _ in range(64):  # 64 MiB of prints, over the 1 MiB log
            print(chunk)
        return {"flooded": True}
        """,
    )
    assert isinstance(got, SandboxError) and "File too large" in str(got)


@pytest.mark.parametrize("path", PATHS)
def test_flooding_the_reply_pipe_is_bounded(runtime, path):
    got = run(
        runtime,
        path,
        f"""
        for fd in sorted(int(f) for f in os.listdir("/proc/self/fd")):  # find the runtime's reply pipe
            if fd > 2 and os.readlink(f"/proc/self/fd/{{fd}}").startswith("pipe:"):
                data = b"x" * (1 << 20)
                for _ in range({MAX_REPLY_BYTES // (1 << 20) + 1}):
                    os.write(fd, data)
        return {{"flooded": True}}
        """,
    )
    assert isinstance(got, SandboxError)
    assert str(got) == f"reset: the environment's reply is over {MAX_REPLY_BYTES} bytes"


@pytest.mark.parametrize("path", PATHS)
def test_syscalls_the_filter_refuses(runtime, path):
    got = run(
        runtime,
        path,
        """
        import platform
        from opentinker.env.sandbox_seccomp import SYSCALLS
        nr = SYSCALLS[platform.machine()]
        sc = libc.syscall
        sc.restype = ctypes.c_long

        def fork_and_wait():
            pid = os.fork()
            if pid == 0:
                os._exit(7)
            return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])

        L = ctypes.c_long
        return {
            "mount": call(libc.mount, b"none", b"/sandbox", b"tmpfs", 0, None),
            "remount_rw": call(libc.mount, None, b"/", None, 32, None),
            "keyctl": call(sc, L(nr["keyctl"]), L(0), L(0), L(0)),
            "bpf": call(sc, L(nr["bpf"]), L(0), L(0), L(0)),
            "perf_event_open": call(sc, L(nr["perf_event_open"]), L(0), L(0), L(-1), L(-1), L(0)),
            "userfaultfd": call(sc, L(nr["userfaultfd"]), L(0)),
            "io_uring_setup": call(sc, L(nr["io_uring_setup"]), L(1), L(0)),
            "clone_newuser": call(sc, L(nr["clone"]), L(0x10000000 | 17), L(0), L(0), L(0), L(0)),
            "clone3": call(sc, L(nr["clone3"]), L(0), L(0)),
            "fork_still_works": fork_and_wait(),
        }
        """,
    )
    assert got.pop("clone3") == "ENOSYS"
    assert got.pop("fork_still_works") == 7  # a plain fork (clone without namespace flags) still works
    assert set(got.values()) == {"EPERM"}, got


# --- the other launchers' paths: the multi-agent environment and the upload validation ---------------------


def test_multi_agent_path_is_the_same_sandbox(runtime):
    pkg = runtime.package(
        """
        return {"found": [p for p in os.listdir("/proc") if p.isdigit()], "host": attempt(
            lambda: read(f"/proc/{CTX['host_pid']}/environ")), "setns": call(libc.setns, os.open(
            "/proc/1/ns/net", os.O_RDONLY), 0), "interfaces": interfaces()}
        """
    )
    env = SandboxedMultiAgentEnvironment("pkg:Multi", package_dir=pkg, limits=LIMITS)
    try:
        got = json.loads(env.reset(0)["a"].text)
        assert env.sandbox.info["network_isolated"] is True
    finally:
        env.close()
    assert got == {"found": ["1", "2"], "host": "ENOENT", "setns": "EPERM", "interfaces": ["lo"]}


def test_upload_validation_runs_in_the_same_sandbox(runtime):
    from env_registry.services import smoke_test
    from tests.env_registry.test_archive import MANIFEST, make_tar

    source = PRELUDE.format(
        ctx=json.dumps(runtime.ctx()),
        body=textwrap.indent(
            textwrap.dedent(
                """
                def connect():
                    socket.create_connection(("127.0.0.1", CTX["port"]), timeout=5).close()
                raise RuntimeError(json.dumps({
                    "host": attempt(lambda: read(f"/proc/{CTX['host_pid']}/environ")),
                    "connect": attempt(connect),
                    "uid": os.getuid(),
                    "env": sorted(os.environ),
                }))
                """
            ),
            " " * 4,
        ),
    )
    manifest = {**MANIFEST, "entrypoint": "pkg:E"}
    files = {"opentinker.json": json.dumps(manifest).encode(), "pkg.py": source.encode(), "README.md": b"# x"}
    data = make_tar(files)
    with pytest.raises(SandboxError) as e:
        smoke_test(data)
    verdict = json.loads(str(e.value).split("RuntimeError: ", 1)[1])
    assert verdict["host"] == "ENOENT" and verdict["connect"] == "ECONNREFUSED" and verdict["uid"] == 65534
    assert set(verdict["env"]) <= {"PATH", "HOME", "TMPDIR", "LANG", "PWD"}


def test_without_bubblewrap_nothing_runs(runtime, monkeypatch):
    monkeypatch.setenv("OPENTINKER_BWRAP", str(runtime.tmp_path / "no-such-bwrap"))
    with pytest.raises(SandboxError, match=r"OPENTINKER_BWRAP=.* is not an executable"):
        Sandbox("pkg:E", package_dir=runtime.package("return {}"), limits=LIMITS)
    monkeypatch.setenv("OPENTINKER_BWRAP", "/bin/false")  # a bwrap that cannot start a sandbox
    with pytest.raises(SandboxError, match="the environment process died"):
        Sandbox("pkg:E", package_dir=runtime.pkg, limits=LIMITS)


def test_the_development_opt_out_says_it_is_not_isolated(runtime, monkeypatch):
    monkeypatch.setenv("OPENTINKER_SANDBOX_ISOLATION", "none")
    with Sandbox("pkg:E", package_dir=runtime.package("return {}"), limits=LIMITS) as sandbox:
        assert sandbox.info["isolation"] == "none"
        assert sandbox.info["network_isolated"] is False and sandbox.info["filesystem_read_only"] is False
    monkeypatch.setenv("OPENTINKER_SANDBOX_ISOLATION", "off")
    message = "OPENTINKER_SANDBOX_ISOLATION must be 'bwrap' or 'none', not 'off'"
    with pytest.raises(SandboxError, match=message):
        Sandbox("pkg:E", package_dir=runtime.pkg, limits=LIMITS)


def test_a_sandbox_stuck_in_a_call_ends_when_the_runtime_is_gone(runtime):
    # The runtime dies (here: closes its end of the pipe) while package code sleeps in a call: nothing stays.
    pkg = runtime.package("import time\ntime.sleep(3600)")
    sandbox = Sandbox("pkg:E", package_dir=pkg, limits=LIMITS)
    init = sandbox.ns_init_pid
    try:
        sandbox.proc.stdin.write(b'{"method": "reset", "args": [0]}\n')
        sandbox.proc.stdin.flush()
        sandbox.proc.stdin.close()
        assert sandbox.proc.wait(timeout=30) == 0  # bwrap ends with its worker (a hang fails here)
        assert init is not None and wait_gone(init)
    finally:
        sandbox.close()


def test_a_delegated_cgroup_v2_gets_pids_memory_and_cpu_limits(tmp_path, monkeypatch):
    # This host delegates no cgroup-v2 controller (the rlimits and a v1 pids cgroup hold here), so the
    # limits are checked as written into a stand-in directory; a real delegated hierarchy enforces them.
    parent = tmp_path / "delegated"
    parent.mkdir()
    (parent / "cgroup.subtree_control").write_text("cpu memory pids\n")
    monkeypatch.setenv("OPENTINKER_SANDBOX_CGROUP", str(parent))
    sandbox = Sandbox.__new__(Sandbox)
    sandbox.limits = LIMITS
    path = sandbox._make_cgroup()
    assert path is not None and path.parent == parent and sandbox.cgroup_kind == "v2"
    written = {f.name: f.read_text() for f in path.iterdir()}
    memory = (LIMITS.memory_mb + LIMITS.workdir_mb + 64) * 1024 * 1024
    assert written == {"pids.max": "11", "memory.max": str(memory), "cpu.max": "100000 100000"}
    (parent / "cgroup.subtree_control").write_text("cpu\n")  # named but not delegating: refused, not ignored
    with pytest.raises(SandboxError, match="does not delegate the pids and memory controllers"):
        sandbox._make_cgroup()
