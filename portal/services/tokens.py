"""API tokens: `otk_<lookup>_<secret>`, shown once, stored as HMAC-SHA256 under a pepper."""

from __future__ import annotations

import re
import secrets
from datetime import datetime, timedelta

from django.db import transaction
from django.utils import timezone

from portal.errors import DomainError, Forbidden
from portal.models import ApiToken, AuditAction, Membership, Scope
from portal.roles import scopes_for
from portal.services.audit import audit_record
from portal.services.secrets import current_pepper_id, secret_hash, secret_matches

TOKEN_RE = re.compile(r"^otk_(?P<lookup>[0-9a-f]{12})_(?P<secret>[A-Za-z0-9_-]{43})$")
MAX_TOKENS_PER_USER = 100
MAX_EXPIRY_DAYS = 366
# last_used_at is a hint, not an audit log: writing it at most once a minute keeps reads cheap.
LAST_USED_RESOLUTION = timedelta(minutes=1)


def token_create(
    *, membership: Membership, name: str, scopes: list[str], expires_in_days: int | None = None
) -> tuple[ApiToken, str]:
    name = name.strip()
    if not name or len(name) > 100:
        raise DomainError("name must be 1-100 characters", field="name")
    if not scopes:
        raise DomainError("give at least one scope", field="scopes")
    unknown = sorted(set(scopes) - set(Scope.values))
    if unknown:
        raise DomainError(f"unknown scopes: {', '.join(unknown)}", field="scopes")
    allowed = scopes_for(membership.role, is_staff=membership.user.is_staff)
    beyond = sorted(set(scopes) - allowed)
    if beyond:
        raise Forbidden(f"your role ({membership.role}) cannot grant: {', '.join(beyond)}", field="scopes")
    if expires_in_days is not None and not 1 <= expires_in_days <= MAX_EXPIRY_DAYS:
        raise DomainError(f"expires_in_days must be between 1 and {MAX_EXPIRY_DAYS}", field="expires_in_days")
    if ApiToken.objects.filter(user=membership.user, revoked_at__isnull=True).count() >= MAX_TOKENS_PER_USER:
        raise DomainError(f"you have {MAX_TOKENS_PER_USER} active tokens; revoke some first")
    lookup = secrets.token_hex(6)
    secret = secrets.token_urlsafe(32)
    pepper_id = current_pepper_id()
    with transaction.atomic():
        token = ApiToken.objects.create(
            organization=membership.organization,
            user=membership.user,
            name=name,
            lookup=lookup,
            secret_hash=secret_hash(secret, pepper_id),
            pepper_id=pepper_id,
            scopes=sorted(set(scopes)),
            expires_at=timezone.now() + timedelta(days=expires_in_days) if expires_in_days else None,
        )
        audit_record(
            AuditAction.TOKEN_CREATED,
            organization=membership.organization,
            user=membership.user,
            target=token,
            details={
                "scopes": token.scopes,
                "expires_at": token.expires_at,
                "owner": membership.user.username,
            },
        )
    return token, f"otk_{lookup}_{secret}"


def token_authenticate(raw: str, *, now: datetime | None = None) -> tuple[ApiToken, Membership] | None:
    """Return the live token and its owner's current membership, or None for any kind of bad token."""
    m = TOKEN_RE.match(raw)
    if not m:
        return None
    token = ApiToken.objects.select_related("user", "organization").filter(lookup=m["lookup"]).first()
    # Hash even when the lookup is unknown, so timing does not tell which lookups exist.
    if token is None:
        secret_matches(m["secret"], "0" * 64)
        return None
    if not secret_matches(m["secret"], token.secret_hash, token.pepper_id):
        return None
    now = now or timezone.now()
    if token.revoked_at is not None or (token.expires_at is not None and token.expires_at <= now):
        return None
    if not token.user.is_active:
        return None
    # By ids, with the token's own user and organization attached: one query for the membership, none later
    # when the request reads membership.organization or membership.user (the API's hot path).
    # Unordered (at most one row: uniq_membership): Membership's default ordering would join the organization
    # to sort by its slug, half of this query's CPU.
    membership = (
        Membership.objects.filter(organization_id=token.organization_id, user_id=token.user_id)
        .order_by()
        .first()
    )
    if membership is None:
        return None
    membership.organization, membership.user = token.organization, token.user
    newest = current_pepper_id()
    if token.pepper_id != newest:
        # Rehash on use: a token in use moves to the newest pepper the first time it is seen after a rotation,
        # so retiring the old pepper later only ends tokens nobody used meanwhile (README "Rotating the
        # token pepper"). Conditional on the old hash, so two concurrent requests write the same thing once.
        rehashed = secret_hash(m["secret"], newest)
        ApiToken.objects.filter(pk=token.pk, pepper_id=token.pepper_id, secret_hash=token.secret_hash).update(
            secret_hash=rehashed, pepper_id=newest
        )
        token.secret_hash, token.pepper_id = rehashed, newest
    if token.last_used_at is None or now - token.last_used_at >= LAST_USED_RESOLUTION:
        ApiToken.objects.filter(pk=token.pk).update(last_used_at=now)
        token.last_used_at = now
    return token, membership


def token_effective_scopes(token: ApiToken, membership: Membership) -> frozenset[str]:
    # A token never does more than its owner's current role allows: demoting a user narrows their tokens.
    return frozenset(token.scopes) & scopes_for(membership.role, is_staff=membership.user.is_staff)


def token_revoke(*, by: Membership, token: ApiToken, manage_all: bool) -> ApiToken:
    """`manage_all`: the caller acts with org:admin (an admin's session, or a token holding that scope)."""
    if token.user_id != by.user_id and not manage_all:
        raise Forbidden("only the token's owner or an organization admin (org:admin) can revoke it")
    with transaction.atomic():
        token = ApiToken.objects.select_for_update().select_related("user").get(pk=token.pk)
        if token.revoked_at is None:
            token.revoked_at = timezone.now()
            token.save(update_fields=["revoked_at"])
            audit_record(
                AuditAction.TOKEN_REVOKED,
                organization=token.organization,
                user=by.user,
                target=token,
                details={"owner": token.user.username},
            )
    return token
