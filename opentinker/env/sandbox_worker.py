"""The process a sandboxed environment runs in (started by `opentinker.env.sandbox`, never imported by it).

Reads one JSON request per line on stdin and answers one JSON line on the original stdout; the environment's
own prints go to stderr so they cannot corrupt the protocol. Limits are applied before any package code runs.
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib
import importlib.abc
import json
import math
import os
import resource
import sys
import traceback
from dataclasses import asdict, is_dataclass
from typing import Any

from opentinker.env.multiagent import MultiAgentEnvironment, RewardMode

CLONE_NEWNET = 0x40000000
# The platform's own packages: environment code must not import its settings or models.
BLOCKED = ("portal", "api", "env_registry", "workers", "gpu_runtime", "django")


class _Blocker(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        if fullname.split(".")[0] in BLOCKED:
            raise ImportError(f"{fullname} is not available inside the environment sandbox")
        return None


CLONE_NEWNS = 0x00020000
MS_RDONLY, MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 1, 32, 4096, 16384, 1 << 18


def _read_only_except(workdir: str) -> bool:
    """In a private mount namespace, remount every file system read-only except `workdir` (a bind mount)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.unshare(CLONE_NEWNS) != 0:
            return False
        if libc.mount(None, b"/", None, MS_REC | MS_PRIVATE, None) != 0:
            return False
        wd = workdir.encode()
        if libc.mount(wd, wd, None, MS_BIND | MS_REC, None) != 0:
            return False
        with open("/proc/self/mounts") as f:
            points = [line.split()[1].encode().decode("unicode_escape").encode() for line in f]
        ok = True
        for mp in points:
            if mp == wd or mp.startswith(b"/proc"):
                continue
            if libc.mount(None, mp, None, MS_REMOUNT | MS_BIND | MS_RDONLY, None) != 0:
                ok = ok and mp != b"/"
        os.chdir(workdir)  # re-enter through the new bind mount; the old cwd is on the read-only one
        return ok
    except OSError:
        return False


def _limit(name: str, value: int) -> None:
    res = getattr(resource, name)
    resource.setrlimit(res, (value, value))


def _isolate_network() -> bool:
    """A fresh network namespace has only a down loopback: no connection leaves. Needs CAP_SYS_ADMIN."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.unshare(CLONE_NEWNET) == 0
    except OSError:
        return False


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


def main() -> None:
    out = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr

    def send(obj: dict[str, Any]) -> None:
        out.write(json.dumps(obj) + "\n")

    spec = json.loads(sys.stdin.readline())
    limits = spec["limits"]
    network_isolated = _isolate_network() if limits["isolate_network"] else False
    read_only = _read_only_except(os.getcwd()) if limits["isolate_network"] else False
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
    sys.path = [
        spec["package_dir"],
        *(p for p in sys.path if p and os.path.abspath(p) != spec["project_root"]),
    ]
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
    isolation = {"network_isolated": network_isolated, "filesystem_read_only": read_only}
    send({"ok": {**_describe(env), **isolation}})
    for line in sys.stdin:
        req = json.loads(line)
        method = req["method"]
        if method == "renew":
            # The next episode of the same job: close this instance, make a fresh one in this process.
            try:
                with contextlib.suppress(Exception):
                    env.close()
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
