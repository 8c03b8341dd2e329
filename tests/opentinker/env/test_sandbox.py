"""Hostile packages run in the sandbox: each is contained with a clear reason, and the caller lives."""

from __future__ import annotations

import os
import socket
import tempfile
import textwrap
import time

import pytest

from opentinker.env.codec import ByteCodec
from opentinker.env.protocol import SingleTurnProtocol, StopReason
from opentinker.env.sandbox import Sandbox, SandboxedEnvironment, SandboxError, SandboxLimits
from tests.opentinker.env.scripted import Scripted

FAST = SandboxLimits(call_timeout_s=5, cpu_s=5, memory_mb=512, max_processes=8)
ROOT = os.geteuid() == 0

HEADER = "from opentinker.env import Environment, Observation, StepResult\n"


def package(tmp_path, body: str) -> str:
    (tmp_path / "pkg.py").write_text(HEADER + textwrap.dedent(body))
    return str(tmp_path)


def reset_body(code: str) -> str:
    return f"""
class E(Environment):
    name = "hostile"
    def reset(self, seed):
{textwrap.indent(textwrap.dedent(code), " " * 8)}
        return Observation("survived")
    def step(self, action):
        return StepResult(None, 1.0, True)
"""


def run_episode(pkg_dir: str, limits: SandboxLimits = FAST):
    env = SandboxedEnvironment("pkg:E", package_dir=pkg_dir, limits=limits)
    try:
        return SingleTurnProtocol().run(env, Scripted(["7"]), ByteCodec(), seed=0)
    finally:
        env.close()


def test_well_behaved_package_runs_an_episode(tmp_path):
    ep = run_episode(package(tmp_path, reset_body("pass")))
    assert ep.stop_reason is StopReason.DONE and ep.reward == 1.0


def test_exception_fails_the_episode(tmp_path):
    ep = run_episode(package(tmp_path, reset_body("raise ValueError('bad seed')")))
    assert ep.failed and ep.error == "reset failed: SandboxError: reset raised ValueError: bad seed"


def test_crash_fails_the_episode(tmp_path):
    ep = run_episode(package(tmp_path, reset_body("import os; os._exit(3)")))
    assert ep.failed and "the environment process died (exit code 3" in ep.error


def test_infinite_loop_times_out(tmp_path):
    # The process's start-up is not part of the call's 1.5 s (it has its own allowance), so a loaded
    # machine that starts Python slowly still sees the reset time out, not the start.
    started = time.monotonic()
    ep = run_episode(package(tmp_path, reset_body("while True: pass")), SandboxLimits(call_timeout_s=1.5))
    assert ep.failed and "reset timed out after 1.5s" in ep.error
    assert time.monotonic() - started < 60  # only catches a hang


def test_a_package_whose_import_hangs_times_out_at_start(tmp_path):
    (tmp_path / "pkg.py").write_text("import time\ntime.sleep(3600)\n")
    limits = SandboxLimits(call_timeout_s=1, start_allowance_s=1.5)
    with pytest.raises(SandboxError, match=r"^start timed out after 2.5s$"):
        SandboxedEnvironment("pkg:E", package_dir=str(tmp_path), limits=limits)


def test_cpu_limit_kills_a_spinning_process(tmp_path):
    limits = SandboxLimits(call_timeout_s=60, cpu_s=1)  # the wall clock only catches a hang
    ep = run_episode(package(tmp_path, reset_body("while True: pass")), limits)
    assert ep.failed and ("SIGXCPU, CPU time limit" in ep.error or "SIGKILL" in ep.error)


def test_memory_bomb_is_refused(tmp_path):
    ep = run_episode(package(tmp_path, reset_body("x = bytearray(2 * 1024**3)")))
    assert ep.failed and "MemoryError" in ep.error


def test_file_size_limit(tmp_path):
    body = reset_body("open('big.bin', 'wb').write(b'x' * (32 * 1024 * 1024))")
    ep = run_episode(package(tmp_path, body), SandboxLimits(call_timeout_s=10, file_mb=1))
    assert ep.failed and ("SIGXFSZ" in ep.error or "File too large" in ep.error)


@pytest.mark.skipif(not ROOT, reason="process caps for root need a pids cgroup or PID namespace (root)")
def test_fork_bomb_is_capped_and_killed(tmp_path):
    body = reset_body(
        """
        import os, time
        children = 0
        for _ in range(10_000):
            try:
                if os.fork() == 0:
                    time.sleep(600)
                    os._exit(0)
                children += 1
            except OSError:
                break
        raise RuntimeError(f"forked {children}")
        """
    )
    ep = run_episode(package(tmp_path, body))
    assert ep.failed
    forked = int(ep.error.rsplit(" ", 1)[1])
    assert forked <= FAST.max_processes


def test_no_network_and_no_writes_outside_its_directory(tmp_path):
    # Only loopback traffic: a listener of this test on 127.0.0.1 is out of the sandbox's reach (its own lo).
    outside = tmp_path / "outside.txt"
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]
        body = reset_body(
            f"""
            import socket
            try:
                socket.create_connection(("127.0.0.1", {port}), timeout=2)
                net = "connected"
            except OSError as e:
                net = "refused"
            open("inside.txt", "w").write("ok")
            try:
                open({str(outside)!r}, "w").write("escaped")
                disk = "escaped"
            except OSError as e:
                disk = "refused"
            raise RuntimeError(net + " " + disk)
            """
        )
        ep = run_episode(package(tmp_path, body))
    assert ep.error.endswith("RuntimeError: refused refused")
    assert not outside.exists()


def test_platform_settings_and_secrets_are_out_of_reach(tmp_path, monkeypatch):
    monkeypatch.setenv("SECRET_KEY", "do-not-leak")
    body = reset_body(
        """
        import os
        assert "SECRET_KEY" not in os.environ, "secret leaked"
        import portal.settings
        """
    )
    ep = run_episode(package(tmp_path, body))
    assert ep.failed and "ImportError: portal is not available inside the environment sandbox" in ep.error


def test_lying_entrypoint_is_a_clear_error(tmp_path):
    package(tmp_path, reset_body("pass"))
    with pytest.raises(SandboxError, match="loading pkg:Nope failed: AttributeError"):
        Sandbox("pkg:Nope", package_dir=tmp_path, limits=FAST)
    with pytest.raises(SandboxError, match="loading missing:E failed: ModuleNotFoundError"):
        Sandbox("missing:E", package_dir=tmp_path, limits=FAST)


@pytest.mark.parametrize(
    ("code", "entrypoint", "reason"),
    [
        ("", "pkg:Nope", "loading pkg:Nope failed: AttributeError"),  # the worker answers with an error
        ("import os\nos._exit(3)\n", "pkg:E", "died"),  # the worker dies while loading the package
        ("import time\ntime.sleep(3600)\n", "pkg:E", "start timed out"),  # the worker never answers
    ],
)
def test_a_sandbox_that_fails_to_start_leaves_nothing_behind(tmp_path, monkeypatch, code, entrypoint, reason):
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "pkg.py").write_text(code)
    temp = tmp_path / "temp"
    temp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temp))  # where the sandbox makes its working directory
    cgroups = []  # the pids cgroup it made, where the OS lets it make one (None otherwise)
    make_cgroup = Sandbox._make_cgroup

    def recorded(self):
        cgroups.append(make_cgroup(self))
        return cgroups[-1]

    monkeypatch.setattr(Sandbox, "_make_cgroup", recorded)
    limits = SandboxLimits(call_timeout_s=1, start_allowance_s=1.5, cpu_s=5, memory_mb=512, max_processes=8)
    with pytest.raises(SandboxError, match=reason):
        Sandbox(entrypoint, package_dir=tmp_path / "pkg", limits=limits)
    assert list(temp.iterdir()) == []  # its working directory is removed
    assert len(cgroups) == 1
    if cgroups[0] is not None:
        assert not cgroups[0].exists()  # and its cgroup


def test_a_dead_sandbox_stays_dead(tmp_path):
    sb = Sandbox("pkg:E", package_dir=package(tmp_path, reset_body("import os; os._exit(1)")), limits=FAST)
    with pytest.raises(SandboxError, match="died"):
        sb.call("reset", 0)
    with pytest.raises(SandboxError, match="no longer running"):
        sb.call("step", "x")
    sb.close()
