"""Scope checks. Each view names the scope each HTTP method needs."""

from __future__ import annotations

from rest_framework.permissions import BasePermission

from api.tenancy import tenant_of
from portal.models import Scope

READ_METHODS = ("GET", "HEAD", "OPTIONS")


class HasScope(BasePermission):
    """A view sets `read_scope` / `write_scope` (or `scopes = {method: scope}`).

    None means any authenticated member.
    """

    message = "your token or role lacks the scope this needs"

    def has_permission(self, request, view) -> bool:
        if not request.user or not request.user.is_authenticated:
            return False
        needed = required_scope(request, view)
        if needed is None:
            return True
        tenant = tenant_of(request)
        if needed not in tenant.scopes:
            self.message = f"this needs the {needed} scope"
            return False
        return True


def required_scope(request, view) -> str | None:
    explicit = getattr(view, "scopes", None)
    if explicit is not None and request.method in explicit:
        return explicit[request.method]
    if request.method in READ_METHODS:
        return getattr(view, "read_scope", None)
    return getattr(view, "write_scope", None)


class IsPlatformStaff(BasePermission):
    """Platform admin endpoints: staff users; through a token, also the platform:admin scope."""

    def has_permission(self, request, view) -> bool:
        user = request.user
        if not (user and user.is_authenticated and user.is_active and user.is_staff):
            return False
        return Scope.PLATFORM_ADMIN in tenant_of(request).scopes
