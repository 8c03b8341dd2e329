"""The registry's implementation of the domain's environment-reference interface (portal.services.env_refs),
registered by EnvRegistryConfig.ready."""

from __future__ import annotations

from typing import Any

from env_registry.models import EnvironmentVersion
from env_registry.selectors import environment_resolve, version_roles
from env_registry.services import package_usage_record
from env_registry.visibility import Viewer
from opentinker.spec import EnvironmentRef
from portal.models import Organization
from portal.services.env_refs import ResolvedEnvironment


class RegistryResolver:
    def resolve(self, organization: Organization, user: Any, ref: EnvironmentRef) -> ResolvedEnvironment:
        version = environment_resolve(Viewer.for_user(organization, user), ref)
        roles, rule_player = version_roles(version)
        return ResolvedEnvironment(
            owner=ref.owner,
            name=ref.name,
            version=version.version,
            sha256=version.sha256 or None,
            roles=tuple(roles),
            rule_based_player=rule_player,
            handle=version,
        )

    def usage_record(self, resolved: ResolvedEnvironment) -> None:
        version = resolved.handle
        if isinstance(version, EnvironmentVersion):
            package_usage_record(version)
