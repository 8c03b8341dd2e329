"""The caller's organization, role and scopes for one request.

A token is bound to one organization. A browser session picks one with the `X-OpenTinker-Org` header (the
portal's organization switcher stores it in the session instead); with neither, the user's first organization.
"""

from __future__ import annotations

from dataclasses import dataclass

from rest_framework.exceptions import NotAuthenticated, PermissionDenied

from portal.models import ApiToken, Membership, Organization
from portal.observability import context
from portal.roles import scopes_for
from portal.selectors.orgs import membership_list_for_user
from portal.services.tokens import token_effective_scopes

ORG_HEADER = "HTTP_X_OPENTINKER_ORG"
SESSION_ORG_KEY = "organization"


@dataclass(frozen=True)
class Tenant:
    organization: Organization
    membership: Membership
    scopes: frozenset[str]
    token: ApiToken | None


def _session_membership(request) -> Membership | None:
    slug = request.META.get(ORG_HEADER) or request.session.get(SESSION_ORG_KEY)
    memberships = membership_list_for_user(request.user)
    if slug:
        return memberships.filter(organization__slug=slug).first()
    return memberships.first()


def tenant_of(request) -> Tenant:
    cached = getattr(request, "_tenant", None)
    if cached is not None:
        return cached
    if not request.user or not request.user.is_authenticated:
        raise NotAuthenticated()
    auth = request.auth
    if isinstance(auth, TokenAuth):
        tenant = Tenant(auth.membership.organization, auth.membership, auth.scopes, auth.token)
    else:
        membership = _session_membership(request)
        if membership is None:
            raise PermissionDenied("you are not a member of that organization (or of any)")
        scopes = scopes_for(membership.role, is_staff=request.user.is_staff)
        tenant = Tenant(membership.organization, membership, scopes, None)
    request._tenant = tenant
    context.bind(org_id=tenant.organization.pk)  # on this request's log lines
    return tenant


@dataclass(frozen=True)
class TokenAuth:
    token: ApiToken
    membership: Membership

    @property
    def scopes(self) -> frozenset[str]:
        return token_effective_scopes(self.token, self.membership)
