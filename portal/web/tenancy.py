"""The organization a page works in, and the guard every tenant page goes through.

A user may belong to several organizations; the session keeps the one picked in the header's switcher under
the same key the API reads for session callers (api/tenancy.py), so pages and the API calls they make (the
live charts) agree. Without a choice, the user's first organization.

`org_page` wraps a view: sign-in required, the membership set on the request, a user without any
organization sent to create one, and domain errors turned into pages: NotFound (including any object of
another organization) a 404, Forbidden a 403 page that says why.
"""

from __future__ import annotations

import functools

from django.contrib import messages
from django.contrib.auth.views import redirect_to_login
from django.http import Http404
from django.shortcuts import redirect, render

from portal.errors import Forbidden, NotFound
from portal.models import Membership
from portal.roles import scopes_for
from portal.selectors.orgs import membership_list_for_user

SESSION_ORG_KEY = "organization"  # the key api/tenancy.py reads too


def current_membership(request) -> Membership | None:
    if not request.user.is_authenticated:
        return None
    if not hasattr(request, "_membership"):
        memberships = membership_list_for_user(request.user)
        slug = request.session.get(SESSION_ORG_KEY)
        chosen = memberships.filter(organization__slug=slug).first() if slug else None
        request._membership = chosen or memberships.first()
    return request._membership


def select_organization(request, membership: Membership) -> None:
    request.session[SESSION_ORG_KEY] = membership.organization.slug
    request._membership = membership


def page_scopes(request) -> frozenset[str]:
    """What the signed-in user may do in the current organization (their role's scopes)."""
    membership = current_membership(request)
    if membership is None:
        return frozenset()
    return scopes_for(membership.role, is_staff=request.user.is_staff)


def require_scope(request, scope: str, action: str) -> None:
    if scope not in page_scopes(request):
        role = current_membership(request).role
        raise Forbidden(f"a {role} of this organization cannot {action} (this needs the {scope} scope)")


def org_page(view):
    @functools.wraps(view)
    def wrapper(request, *args, **kwargs):
        if not request.user.is_authenticated:
            return redirect_to_login(request.get_full_path())
        membership = current_membership(request)
        if membership is None:
            messages.info(request, "Create an organization to start.")
            return redirect("org_create")
        request.membership = membership
        request.organization = membership.organization
        try:
            return view(request, *args, **kwargs)
        except NotFound as e:
            raise Http404(e.message) from None
        except Forbidden as e:
            return render(request, "portal/forbidden.html", {"reason": e.message}, status=403)

    return wrapper
