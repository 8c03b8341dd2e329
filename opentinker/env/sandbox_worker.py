"""The process a sandboxed environment runs in (started by `opentinker.env.sandbox`, never imported by it).

Reads one JSON request per line on stdin and answers one JSON line on the original stdout; the environment's
own prints go to stderr so they cannot corrupt the protocol. Limits are applied before any package code runs.
The isolation itself (namespaces, capabilities, seccomp, the file system's view) is set up by bubblewrap
before this process starts; this process reports what it sees of it (`_isolation`).
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.abc
import json
import math
import os
import re
import resource
import select
import shutil
import sys
import threading
import traceback
from dataclasses import asdict, is_dataclass
from typing import Any

from opentinker.env.multiagent import MultiAgentEnvironment, RewardMode

# The platform's own packages: environment code must not import its settings or models.
BLOCKED = ("portal", "api", "env_registry", "workers", "gpu_runtime", "django")


class _Blocker(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        if fullname.split(".")[0] in BLOCKED:
            raise ImportError(f"{fullname} is not available inside the environment sandbox")
        return None


def _limit(name: str, value: int) -> None:
    res = getattr(resource, name)
    resource.setrlimit(res, (value, value))


def _status(field: str) -> str:
    with contextlib.suppress(OSError), open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return line.split(":", 1)[1].strip()
    return ""


def _isolation(mode: str) -> dict[str, Any]:
    """What this process can see of its own confinement, checked rather than assumed: the runtime reports
    `network_isolated` only when there is no interface but `lo`, in a sandbox started by bwrap."""
    try:
        with open("/proc/net/dev") as f:
            interfaces = sorted(line.split(":")[0].strip() for line in f.readlines()[2:])
    except OSError:
        interfaces = []
    caps = int(_status("CapEff") or "0", 16)
    root_ro = False
    with contextlib.suppress(OSError):
        root_ro = bool(os.statvfs("/").f_flag & os.ST_RDONLY)
    bwrap = mode == "bwrap"
    return {
        "isolation": mode,
        "network_isolated": bwrap and interfaces == ["lo"],
        "filesystem_read_only": bwrap and root_ro,
        "interfaces": interfaces,
        "uid": os.getuid(),
        "capabilities": caps,
        "no_new_privs": _status("NoNewPrivs") == "1",
        "seccomp": _status("Seccomp") == "2",
    }


def _empty(directory: str, mounts: frozenset[str] = frozenset()) -> None:
    """The next instance finds the working directory (and under bubblewrap /tmp) as the first one did:
    empty, but for `mounts` (the read-only binds of a project that lives under /tmp) and the directories
    that lead to them."""
    for entry in os.scandir(directory):
        with contextlib.suppress(OSError):
            if any(m == entry.path or m.startswith(entry.path + "/") for m in mounts):
                if entry.path not in mounts and entry.is_dir(follow_symlinks=False):
                    _empty(entry.path, mounts)
            elif entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path, ignore_errors=True)
            else:
                os.unlink(entry.path)


def _mount_points() -> frozenset[str]:
    """Where something is mounted in this process's view (mountinfo's fifth field, octal escapes undone)."""
    with open("/proc/self/mountinfo", encoding="utf-8") as f:
        fields = [line.split() for line in f]
    return frozenset(
        re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), x[4]) for x in fields if len(x) > 4
    )


def _plain(value: Any) -> Any:
    if is_dataclass(value) and not isinstance(value, type):
        return {k: _plain(v) for k, v in asdict(value).items()}
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if value is None or isinstance(value, str | int | float | bool):
        return value
    return repr(value)


def _exit_when_the_runtime_is_gone(fd: int) -> None:
    """The runtime holds the only writer of this process's stdin: when it closes it or dies (even by
    SIGKILL), poll reports a hang-up, and this process ends even if package code is stuck in a call."""
    poller = select.poll()
    poller.register(fd, 0)  # no events asked for: only POLLHUP / POLLERR / POLLNVAL wake it
    while True:
        for _, event in poller.poll():
            if event & (select.POLLHUP | select.POLLERR | select.POLLNVAL):
                os._exit(0)


def main() -> None:
    threading.Thread(target=_exit_when_the_runtime_is_gone, args=(0,), daemon=True).start()
    out = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr

    def send(obj: dict[str, Any]) -> None:
        out.write(json.dumps(obj) + "\n")

    spec = json.loads(sys.stdin.readline())
    limits = spec["limits"]
    workdir = os.getcwd()
    _limit("RLIMIT_CORE", 0)
    # `cpu_s` per instance (the soft limit, moved on by `renew`) within the process's whole budget (the hard
    # one): a reusable process lives longer than one instance (opentinker.env.sandbox.SandboxPool).
    process_cpu_s = int(spec.get("process_cpu_s") or limits["cpu_s"])
    resource.setrlimit(resource.RLIMIT_CPU, (min(limits["cpu_s"], process_cpu_s), process_cpu_s))
    _limit("RLIMIT_AS", limits["memory_mb"] * 1024 * 1024)
    _limit("RLIMIT_FSIZE", limits["file_mb"] * 1024 * 1024)
    _limit("RLIMIT_NOFILE", limits["open_files"])
    _limit("RLIMIT_NPROC", limits["max_processes"])
    sys.meta_path.insert(0, _Blocker())
    sys.path = [spec["package_dir"], *(p for p in sys.path if p)]
    try:
        module_name, _, attr = spec["entrypoint"].partition(":")
        cls = getattr(importlib.import_module(module_name), attr)
        env = cls(**spec["config"])
    except BaseException as e:  # report any load failure, including SystemExit from the package
        send(
            {
                "error": f"loading {spec['entrypoint']} failed: {type(e).__name__}: {e}",
                "tb": traceback.format_exc(),
            }
        )
        return
    isolation = _isolation(spec.get("isolation") or "none")
    send({"ok": {**_describe(env), **isolation}})
    for line in sys.stdin:
        req = json.loads(line)
        method = req["method"]
        if method == "renew":
            # The next episode of the same job: close this instance, make a fresh one in this process.
            try:
                with contextlib.suppress(Exception):
                    env.close()
                os.chdir(workdir)
                _empty(workdir)
                if isolation["isolation"] == "bwrap":  # its own /tmp (without bubblewrap: the host's)
                    _empty("/tmp", _mount_points())  # noqa: S108
                own = resource.getrusage(resource.RUSAGE_SELF)
                soft = math.ceil(own.ru_utime + own.ru_stime) + limits["cpu_s"]
                resource.setrlimit(resource.RLIMIT_CPU, (min(soft, process_cpu_s), process_cpu_s))
                env = cls(**spec["config"])
            except BaseException as e:
                send({"error": f"{type(e).__name__}: {e}", "tb": traceback.format_exc(limit=5)})
                return  # no usable instance: the caller starts a fresh process
            send({"ok": {**_describe(env), **isolation}})
            continue
        if method not in spec["methods"]:
            send({"error": f"method {method!r} is not callable"})
            continue
        try:
            send({"ok": _plain(getattr(env, method)(*req["args"]))})
        except BaseException as e:  # an exception fails this call, reported to the caller
            send({"error": f"{type(e).__name__}: {e}", "tb": traceback.format_exc(limit=5)})
        if method == "close":
            return


def _cpu_used() -> float:
    """CPU seconds this process (and its reaped children) used so far: the caller retires a process whose
    budget would not cover another instance."""
    usage = [resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
    return sum(u.ru_utime + u.ru_stime for u in usage)


def _describe(env: Any) -> dict[str, Any]:
    multi = hasattr(env, "active_roles")
    info: dict[str, Any] = {
        "name": getattr(env, "name", ""),
        "system_prompt": env.system_prompt if not multi else "",
        "roles": list(getattr(env, "roles", ())),
        "multi_agent": multi,
        "tool_schemas": _plain(getattr(env, "tool_schemas", None)),
        "cpu_used_s": _cpu_used(),
    }
    if multi:
        cls = type(env)
        base = MultiAgentEnvironment
        info["reward_mode"] = str(getattr(env, "reward_mode", RewardMode.CUSTOM))
        info["rule_player"] = getattr(cls, "rule_based_action", base.rule_based_action) is not (
            base.rule_based_action
        )
        info["custom_rewards"] = (
            getattr(cls, "assign_rewards", base.assign_rewards) is not base.assign_rewards
        )
    return info


if __name__ == "__main__":
    main()
