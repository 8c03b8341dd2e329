"""Environment loading: `opentinker/<name>@<version>` resolves to the SDK's built-in environments.

Registry packages (sandboxed subprocess) and remote environments are not wired in yet: they raise clearly.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

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


def env_factory(spec: EnvironmentSpec) -> Callable[[], Environment]:
    ref = spec.registry_ref
    if ref is None:
        raise NotImplementedError("remote (URL) environments are not supported by this runtime yet")
    if ref.owner != "opentinker":
        raise NotImplementedError(f"registry package {ref} needs the sandbox runner, not wired in yet")
    cls = builtin_class(ref.name)
    return functools.partial(cls, **spec.config)


def protocol_kind(make_env: Callable[[], Environment]) -> str:
    cls = getattr(make_env, "func", make_env)
    return getattr(cls, "protocol", None) or getattr(cls, "protocol_kind", None) or "multi-turn"
