"""Writes to the registry: upload, validation, metadata, stars, forks and usage counts.

An upload is checked completely (size, archive safety, manifest) before anything is written; then the version
row and its archive are written together (the row first, inside the transaction, so a concurrent upload of the
same version waits on the unique index and gets 409 without writing anything). Validation imports the package
and runs one smoke episode in the sandbox, inline or in a Celery task (ENV_VALIDATION_MODE), and leaves the
version `valid` or `invalid` with the reason.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
from hashlib import sha256
from pathlib import Path

from django.conf import settings
from django.db import IntegrityError, transaction
from django.db.models import F
from django.utils import timezone

from env_registry import storage
from env_registry.archive import ArchiveError, Manifest, extract_archive, inspect_archive, manifest_parse
from env_registry.models import EnvironmentPackage, EnvironmentVersion, Star, Visibility
from env_registry.selectors import NAME_RE, package_get, version_list
from env_registry.visibility import Viewer, package_is_visible, package_may_change
from opentinker.env.codec import ByteCodec
from opentinker.env.protocol import Budget, protocol_for
from opentinker.env.sandbox import (
    Sandbox,
    SandboxedEnvironment,
    SandboxError,
    SandboxLimits,
    SandboxUnavailable,
)
from portal.errors import Conflict, DomainError, Forbidden, NotFound
from portal.models import AuditAction, Organization
from portal.services.audit import audit_record
from portal.services.enqueue import enqueue

log = logging.getLogger(__name__)

SMOKE_TURNS = 3
SMOKE_SEED = 0
SMOKE_ACTION = "0"
_ERROR_MAX = 2000
DESCRIPTION_MAX = EnvironmentPackage._meta.get_field("description").max_length


def package_settings_check(viewer: Viewer, package: EnvironmentPackage) -> EnvironmentPackage:
    """Refuse unless the viewer may change the package's settings.

    A visible package of another organization (public) is not the caller's to change: as if absent (404).
    One of the caller's own organization is, for its admins and owners; a member is told why not (403)."""
    if package.organization_id != viewer.organization.pk:
        raise NotFound(f"no environment {package.organization.slug}/{package.name} in your organization")
    if not package_may_change(package, viewer):
        raise Forbidden(
            f"only an admin or owner of {viewer.organization.slug} can change the settings of "
            f"{package.organization.slug}/{package.name} (you are a {viewer.role})"
        )
    return package


# --- upload -------------------------------------------------------------------------------------------------


def version_upload(
    *,
    organization: Organization,
    user,
    data: bytes,
    sha256: str,
    visibility: str | None = None,
    viewer: Viewer | None = None,
) -> EnvironmentVersion:
    """Store a new immutable version (pending validation); creates the package on its first version.

    A new version of an existing package needs the uploader to see it (else 404, as for any read), and
    changing its visibility on the way needs an admin, as in the package's settings. `viewer` defaults to
    the user's current role in the organization."""
    try:
        pkg = inspect_archive(data)
    except ArchiveError as e:
        raise DomainError(str(e), field="archive") from None
    m = pkg.manifest
    if visibility is not None and visibility not in Visibility.values:
        raise DomainError(f"visibility must be one of {', '.join(Visibility.values)}", field="visibility")
    uri = storage.archive_uri(organization.slug, m.name, m.version)
    written = False
    try:
        with transaction.atomic():
            package, created = EnvironmentPackage.objects.get_or_create(
                organization=organization,
                name=m.name,
                defaults={
                    "description": m.description,
                    "tags": list(m.tags),
                    "visibility": visibility or Visibility.PRIVATE,
                    "readme": pkg.readme,
                },
            )
            if not created:
                viewer = viewer or Viewer.for_user(organization, user)
                if not package_is_visible(package, viewer):
                    raise NotFound(f"no environment {organization.slug}/{m.name} you may publish to")
                if visibility and visibility != package.visibility:
                    package_settings_check(viewer, package)
            if package.versions.filter(version=m.version).exists():
                raise _exists(organization, m)
            try:
                with transaction.atomic():
                    version = EnvironmentVersion.objects.create(
                        package=package,
                        version=m.version,
                        manifest=m.model_dump(mode="json"),
                        archive_uri=uri,
                        sha256=sha256,
                        size_bytes=len(data),
                        uploaded_by=user,
                    )
            except IntegrityError:
                raise _exists(organization, m) from None
            if not created:
                package.readme = pkg.readme
                if visibility:
                    package.visibility = visibility
                package.save(update_fields=["readme", "visibility", "updated_at"])
            storage.archive_put(uri, data)
            written = True
    except BaseException:
        if written:  # the commit failed after the write: leave nothing behind
            storage.archive_delete(uri)
        raise
    version_validation_start(version)
    return version


def _exists(organization: Organization, m: Manifest) -> Conflict:
    return Conflict(
        f"{organization.slug}/{m.name}@{m.version} already exists; versions are immutable, bump the version",
        field="version",
    )


# --- validation ---------------------------------------------------------------------------------------------


def version_validation_start(version: EnvironmentVersion) -> None:
    """Validate now (ENV_VALIDATION_MODE=inline, the default) or in a Celery task after the commit."""
    if settings.ENV_VALIDATION_MODE == "celery":
        # Sent by name (workers.env_tasks runs it): the registry never imports `workers`.
        enqueue("env_registry.validate_version", version.pk, expires=3600)
        return
    with contextlib.suppress(SandboxUnavailable):  # stays pending, its reason recorded; the upload stands
        version_validate(version.pk)
    version.refresh_from_db()


def version_validate(version_id: int) -> EnvironmentVersion | None:
    """Import the package and run one smoke episode in the sandbox; idempotent (acts on pending only)."""
    version = EnvironmentVersion.objects.select_related("package__organization").filter(pk=version_id).first()
    if version is None or version.status != EnvironmentVersion.Status.PENDING:
        return version
    try:
        data = storage.archive_get(version.archive_uri)
        if sha256(data).hexdigest() != version.sha256:
            raise ArchiveError("the stored archive does not match its sha256")
        smoke_test(data)
    except SandboxUnavailable as e:
        # The server cannot isolate package code: a fault of this host, not of the package. The version stays
        # pending with the reason; the Celery task retries (the inline path leaves it to a later upload or
        # task), and nothing of the package ran.
        log.error("environment %s not validated: %s", version, e)
        EnvironmentVersion.objects.filter(pk=version.pk, status=EnvironmentVersion.Status.PENDING).update(
            validation_error=f"not validated yet: {e}"[:_ERROR_MAX]
        )
        raise
    except Exception as e:  # any failure of the package is its reason for being invalid
        error = str(e) or type(e).__name__
        status = EnvironmentVersion.Status.INVALID
    else:
        error, status = "", EnvironmentVersion.Status.VALID
    # Only a still-pending row changes: a task that runs twice cannot overwrite the first verdict.
    EnvironmentVersion.objects.filter(pk=version.pk, status=EnvironmentVersion.Status.PENDING).update(
        status=status, validation_error=error[:_ERROR_MAX], validated_at=timezone.now()
    )
    version.refresh_from_db()
    log.info("environment %s validated: %s %s", version, version.status, version.validation_error)
    return version


def smoke_test(data: bytes) -> None:
    """Raise with a clear reason unless the archive's environment loads and plays one episode."""
    manifest = inspect_archive(data).manifest
    limits = SandboxLimits(cpu_s=30, call_timeout_s=settings.ENV_VALIDATION_CALL_TIMEOUT_S)
    with tempfile.TemporaryDirectory(prefix="opentinker-validate-") as tmp:
        pkg_dir = Path(tmp) / "pkg"
        extract_archive(data, pkg_dir)
        if manifest.protocol == "multi-agent":
            with Sandbox(manifest.entrypoint, package_dir=pkg_dir, limits=limits) as sb:
                if not sb.info["multi_agent"]:
                    raise SandboxError("the manifest says multi-agent but the entrypoint is single-agent")
                _smoke_multi_agent(sb)
            return
        env = SandboxedEnvironment(manifest.entrypoint, package_dir=pkg_dir, limits=limits)
        try:
            codec = ByteCodec()
            turns = 1 if manifest.protocol == "single-turn" else SMOKE_TURNS
            budget = Budget(max_turns=turns, max_new_tokens=16)
            episode = protocol_for(manifest.protocol, budget).run(
                env, lambda _ids, _n: [*codec.encode_text(SMOKE_ACTION), codec.END], codec, seed=SMOKE_SEED
            )
        finally:
            env.close()
        if episode.failed:
            raise SandboxError(f"smoke episode failed: {episode.error}")


def _smoke_multi_agent(sb) -> None:
    sb.call("reset", SMOKE_SEED)
    for _ in range(SMOKE_TURNS):
        actions = {}
        for role in sb.call("active_roles"):
            try:
                actions[role] = sb.call("rule_based_action", role)
            except Exception:  # no rule-based player: any text is a (possibly illegal) move
                actions[role] = SMOKE_ACTION
        result = sb.call("step", actions)
        if result["done"]:
            return


# --- metadata, stars, forks, usage --------------------------------------------------------------------------


def package_update(
    package: EnvironmentPackage,
    *,
    viewer: Viewer,
    description: str | None = None,
    visibility: str | None = None,
    tags: list[str] | None = None,
) -> EnvironmentPackage:
    """Change a package's settings (its organization's admins only); everything is checked first."""
    package_settings_check(viewer, package)
    if visibility is not None and visibility not in Visibility.values:
        raise DomainError(f"visibility must be one of {', '.join(Visibility.values)}", field="visibility")
    if description is not None and len(description) > DESCRIPTION_MAX:
        raise DomainError(f"at most {DESCRIPTION_MAX} characters", field="description")
    if description is not None:
        package.description = description
    visibility_before = package.visibility
    if visibility is not None:
        package.visibility = visibility
    if tags is not None:
        # The manifest's rules for tags.
        manifest = {"name": "x", "version": "0.0.0", "entrypoint": "m:C", "protocol": "single-turn"}
        try:
            manifest_parse({**manifest, "tags": tags})
        except ArchiveError as e:
            # "invalid manifest: tags: Value error, <why>" -> "<why>": the field is named by the form.
            why = (
                str(e).removeprefix("invalid manifest: ").removeprefix("tags: ").removeprefix("Value error, ")
            )
            raise DomainError(why, field="tags") from None
        package.tags = list(tags)
    with transaction.atomic():
        package.save()
        if package.visibility != visibility_before:
            audit_record(
                AuditAction.ENV_VISIBILITY_CHANGED,
                organization=package.organization,
                user=viewer.user,
                target=("environmentpackage", package.pk, f"{package.organization.slug}/{package.name}"),
                details={"from": visibility_before, "to": package.visibility},
            )
    return package


def star_set(package: EnvironmentPackage, *, user, starred: bool) -> int:
    """Add or remove the user's star (idempotent); returns the package's star count."""
    if starred:
        Star.objects.get_or_create(package=package, user=user)
    else:
        Star.objects.filter(package=package, user=user).delete()
    return Star.objects.filter(package=package).count()


def package_fork(*, viewer: Viewer, owner: str, name: str, new_name: str | None = None) -> EnvironmentPackage:
    """Copy the newest valid version of a visible package into the viewer's organization, private (the
    forking user is its publisher)."""
    organization, user = viewer.organization, viewer.user
    source = package_get(viewer, owner=owner, name=name)
    new_name = new_name or source.name
    if not NAME_RE.match(new_name):
        raise DomainError("name is 1-64 lowercase letters, digits, '-' or '_'", field="name")
    valid = [v for v in version_list(source) if v.status == EnvironmentVersion.Status.VALID]
    if not valid or not valid[0].archive_uri:
        what = "has no archive to fork (built-in)" if valid else "has no valid version to fork"
        raise DomainError(f"{owner}/{name} {what}")
    latest = valid[0]
    data = storage.archive_get(latest.archive_uri)
    uri = storage.archive_uri(organization.slug, new_name, latest.version)
    written = False
    try:
        with transaction.atomic():
            try:
                with transaction.atomic():
                    fork = EnvironmentPackage.objects.create(
                        organization=organization,
                        name=new_name,
                        description=source.description,
                        tags=list(source.tags),
                        readme=source.readme,
                        visibility=Visibility.PRIVATE,
                        forked_from=source,
                    )
            except IntegrityError:
                raise Conflict(
                    f"your organization already has an environment named {new_name}; pick another name",
                    field="name",
                ) from None
            # Same bytes as a validated version: valid without running it again.
            EnvironmentVersion.objects.create(
                package=fork,
                version=latest.version,
                manifest={**latest.manifest, "name": new_name},
                archive_uri=uri,
                sha256=latest.sha256,
                size_bytes=latest.size_bytes,
                status=EnvironmentVersion.Status.VALID,
                validated_at=timezone.now(),
                uploaded_by=user,
            )
            storage.archive_put(uri, data)
            written = True
    except BaseException:
        if written:
            storage.archive_delete(uri)
        raise
    return fork


def package_usage_record(version: EnvironmentVersion) -> None:
    """Count one job submitted against this version's package (call once per newly created job)."""
    EnvironmentPackage.objects.filter(pk=version.package_id).update(usage_count=F("usage_count") + 1)
