"""Reads of organizations, memberships, invitations and tokens, scoped to the caller's organization."""

from __future__ import annotations

from django.db.models import QuerySet
from django.utils import timezone

from portal.errors import NotFound
from portal.models import ApiToken, Invitation, Membership, Organization
from portal.services.secrets import secret_hashes


def membership_get(*, organization: Organization, user) -> Membership | None:
    return (
        Membership.objects.select_related("organization", "user")
        .filter(organization=organization, user=user)
        .first()
    )


def membership_list_for_user(user) -> QuerySet:
    return Membership.objects.filter(user=user).select_related("organization").order_by("organization__slug")


def member_list(organization: Organization) -> QuerySet:
    return Membership.objects.filter(organization=organization).select_related("user").order_by("created_at")


def member_get(organization: Organization, member_id: int) -> Membership:
    try:
        return member_list(organization).get(pk=member_id)
    except Membership.DoesNotExist:
        raise NotFound("no such member") from None


def invitation_list(organization: Organization) -> QuerySet:
    return Invitation.objects.filter(
        organization=organization, accepted_at__isnull=True, revoked_at__isnull=True
    )


def invitation_get(organization: Organization, invitation_id: int) -> Invitation:
    try:
        return invitation_list(organization).get(pk=invitation_id)
    except Invitation.DoesNotExist:
        raise NotFound("no such invitation") from None


def invitation_for_secret(secret: str) -> Invitation:
    """The open invitation a link's secret names (the secret is the capability: no organization to scope
    by); a wrong, used, revoked or expired one is NotFound, as invitation_accept has it."""

    found = (
        Invitation.objects.select_related("organization", "invited_by")
        .filter(secret_hash__in=secret_hashes(secret), accepted_at__isnull=True, revoked_at__isnull=True)
        .filter(expires_at__gt=timezone.now())
        .first()
    )
    if found is None:
        raise NotFound("no such invitation")
    return found


def token_list(membership: Membership, *, manage_all: bool) -> QuerySet:
    """With org:admin (`manage_all`), every token of the organization; otherwise the caller's own."""
    qs = ApiToken.objects.filter(organization=membership.organization).select_related("user")
    if not manage_all:
        qs = qs.filter(user=membership.user)
    return qs.order_by("-created_at")


def token_get(membership: Membership, token_id: int, *, manage_all: bool) -> ApiToken:
    try:
        return token_list(membership, manage_all=manage_all).get(pk=token_id)
    except ApiToken.DoesNotExist:
        raise NotFound("no such token") from None
