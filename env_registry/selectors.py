"""Reads of the registry, always from the point of view of one viewer (a user acting in one organization,
with their role there: env_registry/visibility.py says who sees what)."""

from __future__ import annotations

import re

from django.db.models import Count, Q, QuerySet

from env_registry.models import EnvironmentPackage, EnvironmentVersion
from env_registry.visibility import Viewer, package_is_visible, visible_q
from opentinker.env.builtin import BUILTINS
from opentinker.env.multiagent import MultiAgentEnvironment
from opentinker.spec import EnvironmentRef
from portal.errors import NotFound

NAME_RE = re.compile(r"^[a-z0-9](?:[a-z0-9_-]{0,62}[a-z0-9])?$")
SORTS = {
    "stars": ("-star_count", "organization__slug", "name"),
    "usage": ("-usage_count", "organization__slug", "name"),
    "recent": ("-updated_at", "organization__slug", "name"),
    "name": ("organization__slug", "name"),
}


def _semver_key(version: str) -> tuple:
    core, _, pre = version.partition("-")
    parts = tuple(int(p) for p in core.split("."))
    # A release sorts after its pre-releases (1.0.0-rc1 < 1.0.0).
    return (*parts, pre == "", pre)


def package_visible_list(viewer: Viewer, *, q: str = "", tag: str = "", sort: str = "name") -> QuerySet:
    """The packages the viewer may see (their organization's, private ones only for their publishers and
    admins, and everyone's public ones); `q` searches text."""
    qs = (
        EnvironmentPackage.objects.filter(visible_q(viewer))
        .select_related("organization", "forked_from__organization")
        .prefetch_related("versions")
        .annotate(star_count=Count("stars", distinct=True))
    )
    if q:
        qs = qs.filter(
            Q(name__icontains=q)
            | Q(description__icontains=q)
            | Q(organization__slug__iexact=q)
            | Q(tags__contains=[q.lower()])
        )
    if tag:
        qs = qs.filter(tags__contains=[tag])
    return qs.order_by(*SORTS[sort])


def package_get(viewer: Viewer, *, owner: str, name: str) -> EnvironmentPackage:
    try:
        return package_visible_list(viewer).get(organization__slug=owner, name=name)
    except EnvironmentPackage.DoesNotExist:
        raise NotFound(f"no environment {owner}/{name}") from None


def version_list(package: EnvironmentPackage) -> list[EnvironmentVersion]:
    return sorted(package.versions.all(), key=lambda v: _semver_key(v.version), reverse=True)


def environment_resolve(viewer: Viewer, ref: EnvironmentRef) -> EnvironmentVersion:
    """The valid version a job may use; `latest` means the newest valid release."""
    package = package_get(viewer, owner=ref.owner, name=ref.name)
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


def version_get(package: EnvironmentPackage, version: str) -> EnvironmentVersion:
    for v in package.versions.all():
        if v.version == version:
            return v
    raise NotFound(f"{package.organization.slug}/{package.name} has no version {version}")


def package_starred_by(package: EnvironmentPackage, user) -> bool:
    return package.stars.filter(user=user).exists()


def package_forked_from_ref(package: EnvironmentPackage, viewer: Viewer) -> str | None:
    """`owner/name` of the fork's source, only while the viewer can still see that source."""
    src = package.forked_from
    if src is None or not package_is_visible(src, viewer):
        return None
    return f"{src.organization.slug}/{src.name}"


def version_roles(version: EnvironmentVersion) -> tuple[list[str], bool]:
    """(roles, whether a rule-based player exists) of a version, for checking a job's `multi_agent.roles`.

    Built-ins answer from their SDK class; an uploaded package from its manifest, and its rule-based player
    cannot be known without running its code, so the runtime checks that part."""
    if version.manifest.get("builtin"):
        cls = BUILTINS.get(version.package.name)
        if cls is not None:
            rule = getattr(cls, "rule_based_action", None) is not MultiAgentEnvironment.rule_based_action
            return list(getattr(cls, "roles", ("agent",))), rule
    return list(version.manifest.get("roles") or ["agent"]), True


def version_pinned(*, owner: str, name: str, version: str, sha256: str) -> EnvironmentVersion:
    """The exact archive a job was pinned to at submission (when its visibility was checked): found by its
    owner, name, version and sha256, whatever the package's visibility is now, so a retried attempt of a
    job can still fetch what it started with."""
    found = (
        EnvironmentVersion.objects.filter(
            package__organization__slug=owner,
            package__name=name,
            version=version,
            sha256=sha256,
            status=EnvironmentVersion.Status.VALID,
        )
        .exclude(archive_uri="")
        .first()
    )
    if found is None:
        raise NotFound(f"no archive {owner}/{name}@{version} with sha256 {sha256}")
    return found
