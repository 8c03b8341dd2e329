"""Environment secrets: credentials an organization stores for its remote environment servers.

A job names one (`environment.secret`); the launcher decrypts it and hands it to the runtime as
``OPENTINKER_ENV_SECRET`` (gpu_runtime/envs.py sends it as a Bearer token). The value is encrypted at rest
with Fernet under a key derived from SECRET_KEY (HKDF with its own label, so no other use of SECRET_KEY
yields it) and is never returned after creation: not by the API, a page, the spec, logs or events.
"""

from __future__ import annotations

import re

from cryptography.fernet import Fernet, InvalidToken
from django.db import IntegrityError, transaction
from django.db.models import QuerySet

from portal.errors import Conflict, DomainError, Forbidden, NotFound
from portal.models import AuditAction, EnvironmentSecret, Membership, Organization, Role
from portal.roles import role_at_least
from portal.services.audit import audit_record
from portal.services.secrets import fernet

NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")
MAX_VALUE_BYTES = 4096
MAX_SECRETS_PER_ORG = 100
_HKDF_INFO = b"opentinker/env-secrets/v1"
# The runtime reads it from this variable (gpu_runtime/envs.py; not imported: that is the torch side).
REMOTE_SECRET_VAR = "OPENTINKER_ENV_SECRET"  # noqa: S105 (a variable name, not a secret)


class EnvironmentSecretMissing(DomainError):
    """A job names a secret its organization no longer has (deleted after submission)."""


def _fernet() -> Fernet:
    return fernet(_HKDF_INFO)


def _require_admin(membership: Membership) -> None:
    if not role_at_least(membership.role, Role.ADMIN):
        raise Forbidden("only an owner or admin of the organization can manage environment secrets")


def _check_name(name: str) -> str:
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise DomainError(
            "a secret name is 1-63 characters of a-z, 0-9, '_' and '-', starting with a letter or digit",
            field="name",
        )
    return name


# ----------------------------------------------------------------------------------------------------
# services


def environment_secret_create(*, by: Membership, name: str, value: str) -> EnvironmentSecret:
    _require_admin(by)
    _check_name(name)
    if not isinstance(value, str) or not value:
        raise DomainError("the secret value must not be empty", field="value")
    if len(value.encode()) > MAX_VALUE_BYTES:
        raise DomainError(f"the secret value is limited to {MAX_VALUE_BYTES} bytes", field="value")
    org = by.organization
    with transaction.atomic():
        # Counted under the organization's row lock, so two concurrent creates cannot pass the limit.
        Organization.objects.select_for_update().filter(pk=org.pk).first()
        if EnvironmentSecret.objects.filter(organization=org).count() >= MAX_SECRETS_PER_ORG:
            raise DomainError(f"an organization holds at most {MAX_SECRETS_PER_ORG} environment secrets")
        ciphertext = _fernet().encrypt(value.encode()).decode()
        try:
            with transaction.atomic():
                secret = EnvironmentSecret.objects.create(
                    organization=org, name=name, ciphertext=ciphertext, created_by=by.user
                )
        except IntegrityError:
            raise Conflict(f"a secret named {name!r} already exists", field="name") from None
        # The name only: the value never reaches the audit log.
        audit_record(
            AuditAction.ENV_SECRET_CREATED,
            organization=org,
            user=by.user,
            target=("environmentsecret", secret.pk, name),
        )
        return secret


def environment_secret_delete(*, by: Membership, secret: EnvironmentSecret) -> None:
    _require_admin(by)
    with transaction.atomic():
        deleted, _ = EnvironmentSecret.objects.filter(pk=secret.pk, organization=by.organization).delete()
        if deleted:
            audit_record(
                AuditAction.ENV_SECRET_DELETED,
                organization=by.organization,
                user=by.user,
                target=("environmentsecret", secret.pk, secret.name),
            )


# ----------------------------------------------------------------------------------------------------
# selectors


def environment_secret_list(organization: Organization) -> QuerySet:
    return EnvironmentSecret.objects.filter(organization=organization).select_related("created_by")


def environment_secret_get(organization: Organization, name: str) -> EnvironmentSecret:
    try:
        return environment_secret_list(organization).get(name=name)
    except EnvironmentSecret.DoesNotExist:
        raise NotFound(f"no environment secret named {name!r}") from None


def environment_secret_exists(organization: Organization, name: str) -> bool:
    return EnvironmentSecret.objects.filter(organization=organization, name=name).exists()


def environment_secret_reveal(organization: Organization, name: str) -> str:
    """The plain value, for the launcher only (it goes into the runtime's process environment)."""
    row = EnvironmentSecret.objects.filter(organization=organization, name=name).first()
    if row is None:
        raise EnvironmentSecretMissing(
            f"the environment secret {name!r} was deleted after this job was submitted",
            field="environment.secret",
        )
    try:
        return _fernet().decrypt(row.ciphertext.encode()).decode()
    except InvalidToken:
        # SECRET_KEY was rotated since it was stored: say so rather than send garbage.
        raise EnvironmentSecretMissing(
            f"the environment secret {name!r} cannot be decrypted (was SECRET_KEY changed?): store it again",
            field="environment.secret",
        ) from None
