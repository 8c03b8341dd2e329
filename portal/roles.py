"""What each organization role may do, expressed as the API scopes it can hold."""

from __future__ import annotations

from portal.models.orgs import ROLE_RANK, Role
from portal.models.tokens import Scope

READ_SCOPES = frozenset({Scope.JOBS_READ, Scope.ENVS_READ})
WRITE_SCOPES = READ_SCOPES | {Scope.JOBS_WRITE, Scope.ENVS_WRITE, Scope.TINKER}

ROLE_SCOPES: dict[str, frozenset[str]] = {
    Role.VIEWER: frozenset(READ_SCOPES),
    Role.MEMBER: frozenset(WRITE_SCOPES),
    Role.ADMIN: frozenset(WRITE_SCOPES | {Scope.ORG_ADMIN}),
    Role.OWNER: frozenset(WRITE_SCOPES | {Scope.ORG_ADMIN}),
}


def scopes_for(role: str, *, is_staff: bool) -> frozenset[str]:
    scopes = ROLE_SCOPES[role]
    return scopes | {Scope.PLATFORM_ADMIN} if is_staff else scopes


def role_at_least(role: str, minimum: str) -> bool:
    return ROLE_RANK[Role(role)] >= ROLE_RANK[Role(minimum)]
