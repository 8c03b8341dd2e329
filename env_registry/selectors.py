"""Reads of the registry, always from the point of view of one organization."""

from __future__ import annotations

from django.db.models import Q, QuerySet

from env_registry.models import EnvironmentPackage, EnvironmentVersion, Visibility
from opentinker.spec import EnvironmentRef
from portal.errors import NotFound
from portal.models import Organization


def _semver_key(version: str) -> tuple:
    core, _, pre = version.partition("-")
    parts = tuple(int(p) for p in core.split("."))
    # A release sorts after its pre-releases (1.0.0-rc1 < 1.0.0).
    return (*parts, pre == "", pre)


def package_visible_list(organization: Organization, *, q: str = "", tag: str = "") -> QuerySet:
    qs = (
        EnvironmentPackage.objects.filter(Q(organization=organization) | Q(visibility=Visibility.PUBLIC))
        .select_related("organization")
        .prefetch_related("versions")
    )
    if q:
        qs = qs.filter(Q(name__icontains=q) | Q(description__icontains=q))
    if tag:
        qs = qs.filter(tags__contains=[tag])
    return qs.order_by("organization__slug", "name")


def package_get(organization: Organization, *, owner: str, name: str) -> EnvironmentPackage:
    try:
        return package_visible_list(organization).get(organization__slug=owner, name=name)
    except EnvironmentPackage.DoesNotExist:
        raise NotFound(f"no environment {owner}/{name}") from None


def version_list(package: EnvironmentPackage) -> list[EnvironmentVersion]:
    return sorted(package.versions.all(), key=lambda v: _semver_key(v.version), reverse=True)


def environment_resolve(organization: Organization, ref: EnvironmentRef) -> EnvironmentVersion:
    """The valid version a job may use; `latest` means the newest valid release."""
    package = package_get(organization, owner=ref.owner, name=ref.name)
    valid = [v for v in version_list(package) if v.status == EnvironmentVersion.Status.VALID]
    if ref.version == "latest":
        if not valid:
            raise NotFound(f"{ref.owner}/{ref.name} has no valid version yet")
        return valid[0]
    for v in version_list(package):
        if v.version == ref.version:
            if v.status != EnvironmentVersion.Status.VALID:
                raise NotFound(f"{ref} is {v.get_status_display().lower()}; jobs may only use valid versions")
            return v
    raise NotFound(f"{ref.owner}/{ref.name} has no version {ref.version}")
