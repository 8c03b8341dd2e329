"""Environment loading: what a job's `environment` names becomes a factory of `Environment` instances.

- `opentinker/<name>@<version>`: the SDK's built-ins, in process;
- any other `owner/name@version`: a registry package, fetched (pinned by sha256), unpacked and run in a
  sandboxed subprocess per instance (gpu_runtime.env_packages); a local package given with
  `--env-package` runs the same way;
- `https://...`: a remote OpenEnv-compatible server, one WebSocket session per instance. Its secret, if the
  job names one, comes in the runtime's environment (`OPENTINKER_ENV_SECRET`), never in the spec.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable

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


def env_factory(spec: EnvironmentSpec) -> Callable[[], Environment]:
    ref = spec.registry_ref
    if ref is None:
        from opentinker.env.remote import RemoteEnvironment

        return functools.partial(
            RemoteEnvironment, spec.ref, secret=os.environ.get(REMOTE_SECRET_VAR) or None, **spec.config
        )
    if ref.owner != "opentinker" or os.environ.get(ENV_PACKAGE_VAR):
        return package_factory(spec)
    cls = builtin_class(ref.name)
    return functools.partial(cls, **spec.config)


def protocol_kind(make_env: Callable[[], Environment]) -> str:
    cls = getattr(make_env, "func", make_env)
    return getattr(cls, "protocol", None) or getattr(cls, "protocol_kind", None) or "multi-turn"
