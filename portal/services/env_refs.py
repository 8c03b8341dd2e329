"""Environment references, as the domain sees them: an interface the domain owns, the registry implements.

A job's spec names a registry environment (``owner/name@version``); submitting it must check that the
submitter may see it, pin the exact version and its archive's sha256, and count one use. The registry
(``env_registry``) builds on the domain, so the domain cannot import it: it declares what it needs here and
the registry registers its implementation at start-up (``EnvRegistryConfig.ready``). Without one registered,
a job that names a registry environment is refused with a clear error.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

from django.core.exceptions import ImproperlyConfigured

from opentinker.spec import EnvironmentRef
from portal.models import Organization


@dataclass(frozen=True)
class ResolvedEnvironment:
    """One exact, valid environment version a job may use."""

    owner: str
    name: str
    version: str  # exact: `latest` already resolved
    sha256: str | None  # the archive's; None for a built-in (no archive)
    roles: tuple[str, ...] = ("agent",)
    rule_based_player: bool = True  # whether a rule-based player may exist (see version_roles)
    handle: Any = field(default=None, compare=False, repr=False)  # the resolver's own, for usage_record

    @property
    def pinned_ref(self) -> str:
        return f"{self.owner}/{self.name}@{self.version}"


class EnvironmentResolver(Protocol):
    def resolve(self, organization: Organization, user: Any, ref: EnvironmentRef) -> ResolvedEnvironment:
        """The valid version `ref` names, as `user` of `organization` sees it; raises NotFound."""
        ...

    def usage_record(self, resolved: ResolvedEnvironment) -> None:
        """Count one job submitted against this environment."""
        ...


_resolver: EnvironmentResolver | None = None


def register_resolver(resolver: EnvironmentResolver) -> None:
    """Install the implementation (the registry's AppConfig.ready calls this; the last one wins)."""
    global _resolver
    _resolver = resolver


def resolver() -> EnvironmentResolver:
    if _resolver is None:
        raise ImproperlyConfigured(
            "no environment resolver is registered: add 'env_registry' to INSTALLED_APPS "
            "(its AppConfig.ready registers one)"
        )
    return _resolver
