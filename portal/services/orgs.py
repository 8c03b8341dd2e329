"""Organizations, memberships and invitations."""

from __future__ import annotations

import secrets
from datetime import timedelta

from django.conf import settings
from django.core.exceptions import ValidationError as DjangoValidationError
from django.db import IntegrityError, transaction
from django.utils import timezone

from portal.errors import Conflict, DomainError, Forbidden, NotFound
from portal.models import AuditAction, Invitation, Membership, Organization, Quota, Role
from portal.models.orgs import ROLE_RANK, SLUG_VALIDATOR
from portal.roles import role_at_least
from portal.services.audit import audit_record
from portal.services.secrets import secret_hash, secret_hashes

INVITATION_DAYS = 7


@transaction.atomic
def organization_create(*, slug: str, name: str, owner) -> Organization:
    try:
        SLUG_VALIDATOR(slug)
    except DjangoValidationError as e:
        raise DomainError(e.messages[0], field="slug") from None
    if not name.strip() or len(name) > 100:
        raise DomainError("name must be 1-100 characters", field="name")
    try:
        with transaction.atomic():
            org = Organization.objects.create(slug=slug, name=name.strip())
    except IntegrityError:
        raise Conflict(f"the organization slug {slug!r} is taken", field="slug") from None
    Quota.objects.create(organization=org, **settings.DEFAULT_QUOTA)
    Membership.objects.create(organization=org, user=owner, role=Role.OWNER)
    return org


def _require_admin(membership: Membership) -> None:
    if not role_at_least(membership.role, Role.ADMIN):
        raise Forbidden("only an owner or admin of the organization can do this")


@transaction.atomic
def membership_set_role(*, by: Membership, target: Membership, role: str) -> Membership:
    _require_admin(by)
    if role not in Role.values:
        raise DomainError(f"role must be one of {', '.join(Role.values)}", field="role")
    # Only owners create or demote owners; nobody grants a role above their own.
    if Role.OWNER in (role, target.role) and by.role != Role.OWNER:
        raise Forbidden("only an owner can grant or remove the owner role")
    if ROLE_RANK[Role(role)] > ROLE_RANK[Role(by.role)]:
        raise Forbidden("you cannot grant a role above your own")
    target = Membership.objects.select_for_update().select_related("user").get(pk=target.pk)
    if target.role == Role.OWNER and role != Role.OWNER:
        _keep_an_owner(target)
    before = target.role
    target.role = role
    target.save(update_fields=["role"])
    if before != role:
        audit_record(
            AuditAction.MEMBER_ROLE_CHANGED,
            organization=target.organization,
            user=by.user,
            target=("membership", target.pk, target.user.username),
            details={"username": target.user.username, "from": before, "to": role},
        )
    return target


def _keep_an_owner(leaving: Membership) -> None:
    owners = Membership.objects.select_for_update().filter(organization=leaving.organization, role=Role.OWNER)
    if owners.exclude(pk=leaving.pk).count() == 0:
        raise Conflict("an organization must keep at least one owner")


@transaction.atomic
def membership_remove(*, by: Membership, target: Membership) -> None:
    if by.pk != target.pk:  # anyone may leave; removing others needs admin
        _require_admin(by)
        if target.role == Role.OWNER and by.role != Role.OWNER:
            raise Forbidden("only an owner can remove an owner")
    if target.role == Role.OWNER:
        _keep_an_owner(target)
    # Their tokens for this organization die with the membership (they also stop authenticating at once).
    revoked = target.user.api_tokens.filter(organization=target.organization, revoked_at__isnull=True).update(
        revoked_at=timezone.now()
    )
    audit_record(
        AuditAction.MEMBER_REMOVED,
        organization=target.organization,
        user=by.user,
        target=("membership", target.pk, target.user.username),
        details={
            "username": target.user.username,
            "role": target.role,
            "left": by.pk == target.pk,
            "tokens_revoked": revoked,
        },
    )
    target.delete()


@transaction.atomic
def invitation_create(*, by: Membership, email: str, role: str) -> tuple[Invitation, str]:
    _require_admin(by)
    if role not in Role.values:
        raise DomainError(f"role must be one of {', '.join(Role.values)}", field="role")
    if ROLE_RANK[Role(role)] > ROLE_RANK[Role(by.role)]:
        raise Forbidden("you cannot invite someone to a role above your own")
    email = email.strip().lower()
    if Membership.objects.filter(organization=by.organization, user__email__iexact=email).exists():
        raise Conflict(f"{email} is already a member", field="email")
    secret = secrets.token_urlsafe(32)
    invitation = Invitation.objects.create(
        organization=by.organization,
        email=email,
        role=role,
        secret_hash=secret_hash(secret),
        invited_by=by.user,
        expires_at=timezone.now() + timedelta(days=INVITATION_DAYS),
    )
    audit_record(
        AuditAction.INVITATION_CREATED,
        organization=by.organization,
        user=by.user,
        target=("invitation", invitation.pk, email),
        details={"email": email, "role": role, "expires_at": invitation.expires_at},
    )
    return invitation, secret


@transaction.atomic
def invitation_accept(*, secret: str, user) -> Membership:
    try:
        invitation = Invitation.objects.select_for_update().get(secret_hash__in=secret_hashes(secret))
    except Invitation.DoesNotExist:
        raise NotFound("no such invitation") from None
    if invitation.revoked_at or invitation.accepted_at or invitation.expires_at <= timezone.now():
        raise NotFound("this invitation is no longer valid")
    if (user.email or "").lower() != invitation.email:
        # The secret travels by e-mail; binding it to the address stops a forwarded link being used by others.
        raise Forbidden("this invitation was sent to another e-mail address")
    membership, created = Membership.objects.get_or_create(
        organization=invitation.organization, user=user, defaults={"role": invitation.role}
    )
    if not created:
        raise Conflict("you are already a member of this organization")
    invitation.accepted_at = timezone.now()
    invitation.accepted_by = user
    invitation.save(update_fields=["accepted_at", "accepted_by"])
    audit_record(
        AuditAction.INVITATION_ACCEPTED,
        organization=invitation.organization,
        user=user,
        target=("invitation", invitation.pk, invitation.email),
        details={"email": invitation.email, "role": invitation.role, "username": user.get_username()},
    )
    return membership


@transaction.atomic
def invitation_revoke(*, by: Membership, invitation: Invitation) -> None:
    _require_admin(by)
    if invitation.accepted_at is None and invitation.revoked_at is None:
        invitation.revoked_at = timezone.now()
        invitation.save(update_fields=["revoked_at"])
        audit_record(
            AuditAction.INVITATION_REVOKED,
            organization=invitation.organization,
            user=by.user,
            target=("invitation", invitation.pk, invitation.email),
            details={"email": invitation.email, "role": invitation.role},
        )
