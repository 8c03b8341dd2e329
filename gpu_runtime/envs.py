"""Environment loading: what a job's `environment` names becomes a factory of `Environment` instances.

- `opentinker/<name>@<version>`: the SDK's built-ins, in process;
- any other `owner/name@version`: a registry package, fetched (pinned by sha256), unpacked and run in a
  sandboxed subprocess per instance (gpu_runtime.env_packages); a local package given with
  `--env-package` runs the same way;
- `https://...`: a remote OpenEnv-compatible server, one WebSocket session per instance. Its secret, if the
  job names one, comes in the runtime's environment (`OPENTINKER_ENV_SECRET`), never in the spec. Every
  connection passes the egress policy (`opentinker.egress`; the allow-list the launcher computed for this job
  comes in `OPENTINKER_EGRESS_ALLOW`), and the instances share one `SessionGate`, so episodes queue for the
  server's session slots (`config.max_sessions` states the limit up front; otherwise it is learned).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from typing import Any

from gpu_runtime.env_packages import ENV_PACKAGE_VAR, package_factory
from opentinker.env.base import Environment
from opentinker.spec import EnvironmentSpec


def builtin_class(name: str) -> type[Environment]:
    try:
        from opentinker.env.builtin import BUILTINS
    except ImportError:  # an SDK without the registry dict: the one environment the example job needs
        from opentinker.env.builtin.arithmetic import ArithmeticEnv

        BUILTINS = {"arithmetic": ArithmeticEnv}
    try:
        return BUILTINS[name]
    except KeyError:
        raise ValueError(f"unknown built-in environment opentinker/{name}") from None


REMOTE_SECRET_VAR = "OPENTINKER_ENV_SECRET"  # noqa: S105 (a variable name, not a secret)


def env_factory(spec: EnvironmentSpec, rows: list[dict[str, Any]] | None = None) -> Callable[[], Environment]:
    """`rows`: the job's dataset rows (gpu_runtime.data.prompts), for a built-in that plays them."""
    ref = spec.registry_ref
    if ref is None:
        from opentinker.egress import Egress
        from opentinker.env.remote import RemoteEnvironment, SessionGate

        config = dict(spec.config)
        limit = config.pop("max_sessions", None)
        if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 1):
            raise ValueError(f"environment.config.max_sessions must be a positive integer, not {limit!r}")
        return functools.partial(
            RemoteEnvironment,
            spec.ref,
            secret=os.environ.get(REMOTE_SECRET_VAR) or None,
            egress=Egress(runtime_policy()),
            gate=SessionGate(limit),
            **config,
        )
    if ref.owner != "opentinker" or os.environ.get(ENV_PACKAGE_VAR):
        return package_factory(spec)
    cls = builtin_class(ref.name)
    if rows is not None:  # the job's dataset, instead of any the config names
        config = {k: v for k, v in spec.config.items() if k not in ("rows", "dataset")}
        return functools.partial(cls, **config, rows=rows)
    return functools.partial(cls, **spec.config)


def runtime_policy():
    """The egress policy the launcher handed over (OPENTINKER_EGRESS_ALLOW / _DENY), with this node's own
    interface addresses added to the platform's (a public address of a pool node is still the platform)."""
    import dataclasses
    import ipaddress

    import psutil

    from opentinker.egress import EgressPolicy

    policy = EgressPolicy.from_env()
    own = []
    for addrs in psutil.net_if_addrs().values():
        for a in addrs:
            try:
                own.append(ipaddress.ip_network(a.address.split("%", 1)[0]))
            except ValueError:
                continue  # link-layer addresses
    return dataclasses.replace(policy, platform=(*policy.platform, *own))


def egress_env() -> dict[str, str]:
    """This process's egress policy variables, handed to Ray actors (whose environment may not have them)."""
    from opentinker.egress import ALLOW_VAR, DENY_VAR

    return {k: os.environ.get(k, "") for k in (ALLOW_VAR, DENY_VAR)}


def protocol_kind(make_env: Callable[[], Environment]) -> str:
    cls = getattr(make_env, "func", make_env)
    return getattr(cls, "protocol", None) or getattr(cls, "protocol_kind", None) or "multi-turn"
