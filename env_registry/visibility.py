"""Who sees a registry package: the viewer (a user acting in one organization, with their role there) and
the rule every read of the registry applies.

- `public`: everyone;
- `organization`: every member of the owning organization;
- `private`: its publishers (the users who uploaded or forked one of its versions) and the owning
  organization's admins and owners. Any other member gets a 404 exactly as an outsider does.

A token acts as its owner with the owner's current role (api/tenancy.py), so a demoted admin's token stops
seeing private packages at once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from django.db.models import Q

from env_registry.models import EnvironmentPackage, EnvironmentVersion, Visibility
from portal.models import Membership, Organization, Role
from portal.roles import role_at_least


@dataclass(frozen=True)
class Viewer:
    organization: Organization
    user: Any = None  # None: the platform itself (scheduler, seeding), which sees what an admin sees
    role: str = Role.OWNER

    @property
    def is_admin(self) -> bool:
        return self.user is None or role_at_least(self.role, Role.ADMIN)

    @classmethod
    def of(cls, membership: Membership) -> Viewer:
        return cls(membership.organization, membership.user, membership.role)

    @classmethod
    def for_user(cls, organization: Organization, user: Any) -> Viewer:
        """The user's current role in the organization; a user who is not a member sees as a viewer would
        (callers already refuse non-members, this only keeps the rule safe if one slips through)."""
        if user is None:
            return cls(organization)
        role = (
            Membership.objects.filter(organization=organization, user=user)
            .values_list("role", flat=True)
            .first()
        )
        return cls(organization, user, role or Role.VIEWER)


def visible_q(viewer: Viewer) -> Q:
    """The filter on EnvironmentPackage rows the viewer may see."""
    mine = Q(organization=viewer.organization)
    if viewer.is_admin:
        return mine | Q(visibility=Visibility.PUBLIC)
    published = EnvironmentVersion.objects.filter(uploaded_by=viewer.user).values("package_id")
    return (
        Q(visibility=Visibility.PUBLIC)
        | (mine & Q(visibility=Visibility.ORGANIZATION))
        | (mine & Q(visibility=Visibility.PRIVATE, pk__in=published))
    )


def package_is_visible(package: EnvironmentPackage, viewer: Viewer) -> bool:
    if package.visibility == Visibility.PUBLIC:
        return True
    if package.organization_id != viewer.organization.pk:
        return False
    if package.visibility == Visibility.ORGANIZATION or viewer.is_admin:
        return True
    return package.versions.filter(uploaded_by=viewer.user).exists()


def package_may_change(package: EnvironmentPackage, viewer: Viewer) -> bool:
    """Settings (description, visibility, tags) are the owning organization's admins' to change."""
    return package.organization_id == viewer.organization.pk and viewer.is_admin
