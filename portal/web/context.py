"""Template context of every page: the signed-in user's organizations and the one the session works in."""

from __future__ import annotations

from portal.selectors.orgs import membership_list_for_user
from portal.web.tenancy import current_membership, page_scopes


def portal(request) -> dict:
    if not getattr(request, "user", None) or not request.user.is_authenticated:
        return {}
    return {
        "current_membership": current_membership(request),
        "memberships": membership_list_for_user(request.user),
        "scopes": page_scopes(request),
    }
